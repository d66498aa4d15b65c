"""How decoding holds a model's weights: in the compute dtype, each layer's as arrays of its own.

Training stacks the layers' weights on a leading ``layers`` axis and scans over it. In a decode
step, which reads every weight once, each layer's slice of that stack is a copy: XLA's CPU and
GPU backends materialise a dynamic slice of a loop-invariant operand (on GPU its dynamic-slice
copy fusion), so every weight is read twice and written once per step, and at batch 1 the k/v
projections' weights are transposed whole on top (docs/serving.md, measured on XLA's GPU compile
of an 8B step). Decoding therefore holds

* the matrices in the model's compute dtype (:func:`jaxlm.model.in_compute_dtype`), and
* each layer's block as separate arrays, ``(everything else, (layer 0's block, layer 1's, ...))``,

and runs the layers unrolled: :func:`decoding_model` (inside the compiled step) stacks the
layers back, and XLA folds each layer's static slice of that stack to the layer's own array, so
no weight is copied (docs/serving.md has the figures: an 8B step on one H100 moves 1.63e10 bytes
instead of 4.32e10).

The layer split is a copy of the blocks' weights; a caller that keeps its model holds both.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.build import state_shardings
from jaxlm.model import Transformer, in_compute_dtype
from sharding.mesh import decoding_mesh

# (every weight outside the blocks, one block's weights per layer); arrays or jax.ShapeDtypeStruct
DecodingWeights = tuple[nnx.State, tuple[nnx.State, ...]]


def decoding_placement(model: Transformer, mesh: Mesh | None = None) -> tuple[nnx.GraphDef, DecodingWeights, Mesh | None]:
    """``(graphdef, weights, mesh)`` to decode with (:func:`decoding_model` rebuilds the model from
    the first two inside a compiled step): ``mesh`` (default: the one the model's parameters live
    on) as :func:`sharding.mesh.decoding_mesh` folds it, the weights placed on it as
    :func:`for_decoding` lays them out. Weights on another mesh (or on one device) are placed as the
    sharding rules say; folding keeps every device's shards unless the mesh has pipeline stages
    (each layer's weights then spread over the devices of every stage)."""
    if mesh is None:
        sharding = getattr(model.embed[...], "sharding", None)
        mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None
    graphdef, state = nnx.split(model)
    if mesh is not None:
        mesh = decoding_mesh(mesh)
        on_mesh = all(isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh for x in jax.tree.leaves(state))
        if not on_mesh:  # another mesh (or none): each weight where the sharding rules put it on this one
            state = jax.device_put(state, state_shardings(state, mesh))
    graphdef, weights = for_decoding(graphdef, state)
    return graphdef, weights, mesh


def for_decoding(graphdef: nnx.GraphDef, state: nnx.State) -> tuple[nnx.GraphDef, DecodingWeights]:
    """A Transformer's ``(graphdef, state)`` (arrays, or ``jax.ShapeDtypeStruct`` with shardings
    for a compile-only plan) as decoding holds it: the graph with its layers unrolled
    (``scan_layers=False``; no rematerialisation) and the weights in the compute dtype, split per
    layer. Each layer's arrays keep their shards (the stacked spec without the layer axis), which
    needs that axis unsharded (:func:`sharding.mesh.decoding_mesh` folds the stage axis away)."""
    model = nnx.merge(graphdef, state)
    cfg = dataclasses.replace(model.cfg, scan_layers=False, remat="none")
    model.cfg = cfg
    graphdef, state = nnx.split(model)
    state = in_compute_dtype(state, cfg.compute_dtype)
    rest = nnx.State({k: v for k, v in state.items() if k != "blocks"})
    return graphdef, (rest, _unstack(state["blocks"], cfg.num_layers))


def decoding_model(graphdef: nnx.GraphDef, weights: DecodingWeights) -> Transformer:
    """The model to call inside a compiled decode step, from :func:`for_decoding`'s pair."""
    rest, layers = weights
    state = nnx.State(dict(rest))
    state["blocks"] = jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *layers)
    return nnx.merge(graphdef, state)


def _layer_sharding(x):
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    if sharding.spec and sharding.spec[0] is not None and sharding.mesh.shape[sharding.spec[0]] > 1:
        raise ValueError(f"the stacked layer axis is sharded over {sharding.spec[0]!r}; decode on "
                         "sharding.mesh.decoding_mesh(mesh), which folds it")
    return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))


def _unstack(blocks: nnx.State, num_layers: int) -> tuple[nnx.State, ...]:
    leaves, treedef = jax.tree.flatten(blocks)
    shardings = tuple(_layer_sharding(x) for x in leaves)
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        per_layer = [[jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=s) for x, s in zip(leaves, shardings)]
                     for _ in range(num_layers)]
    else:
        per_layer = _split_layers(tuple(leaves), shardings)
    return tuple(jax.tree.unflatten(treedef, layer) for layer in per_layer)


@functools.partial(jax.jit, static_argnums=1)
def _split_layers(leaves, shardings):
    """``[layer][leaf]``: each stacked leaf's slices, in one program (one compile per model shape)."""
    return [[x[i] if s is None else jax.lax.with_sharding_constraint(x[i], s) for x, s in zip(leaves, shardings)]
            for i in range(leaves[0].shape[0])]
