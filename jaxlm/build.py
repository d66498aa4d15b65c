"""Build a model whose parameters are born sharded, and the shardings of any model state.

Parameters are created inside ``jax.jit`` with ``out_shardings`` taken from their logical axis
names through ``sharding.rules``, so no device ever holds the whole model during init.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.config import ConfigError, ModelConfig
from jaxlm.model import Transformer
from sharding.rules import logical_spec, mesh_axis_size


def _variable_sharding(path: tuple, var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    names = var.get_metadata().get("out_sharding") or (None,) * var.ndim
    spec = logical_spec(names)
    for dim, (name, axes) in enumerate(zip(names, spec)):
        size = mesh_axis_size(mesh, axes)
        if var.shape[dim] % size:
            where = ".".join(str(p) for p in path)
            raise ConfigError(
                f"parameter '{where}' dim {dim} ('{name}', size {var.shape[dim]}) is not divisible by "
                f"mesh axes {axes} (size {size}); change the model size or the mesh"
            )
    return NamedSharding(mesh, spec)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedSharding for every Variable of an (abstract) ``nnx.State``, from its logical names."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: v.replace(_variable_sharding(path, v, mesh)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def like_param_shardings(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree that mirrors the parameters (optimizer moments, gradients).

    A leaf whose key path ends with a parameter's key path and has its shape takes that
    parameter's sharding; anything else (step counters, factored statistics) is replicated.
    """
    by_path = {
        jax.tree_util.keystr(p): (x.shape, s)
        for (p, x), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings))
    }

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        for suffix, (shape, sharding) in by_path.items():
            if key.endswith(suffix) and tuple(leaf.shape) == tuple(shape):
                return sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only state, without allocating parameters."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def build_model(cfg: ModelConfig, mesh: Mesh | None = None, seed: int = 0) -> Transformer:
    """A freshly initialised Transformer; with a mesh, each parameter is born in its shard layout."""

    def init() -> nnx.State:
        with nnx.use_eager_sharding(False):
            return nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)))

    graphdef, abstract = abstract_model(cfg)
    out_shardings = None if mesh is None else state_shardings(abstract, mesh)
    state = jax.jit(init, out_shardings=out_shardings)()
    return nnx.merge(graphdef, state)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


__all__ = ["abstract_model", "build_model", "like_param_shardings", "replicated", "state_shardings"]
