"""Pipeline parallelism: the stacked layers split over the ``stage`` mesh axis, a GPipe schedule.

The model's blocks are stacked on a leading ``layers`` axis, which the rules map to ``stage``:
stage ``s`` holds layers ``[s * L/P, (s + 1) * L/P)``. :func:`pipeline_layers` runs them under a
``jax.shard_map`` that is manual over ``stage`` only, so FSDP, tensor and data parallelism keep
working inside each stage through the same logical-axis constraints (GSPMD over the other axes).

Schedule (GPipe): the batch is cut into ``M`` microbatches. At tick ``t`` stage ``s`` runs its
layers on microbatch ``t - s`` and passes the result to stage ``s + 1`` with ``ppermute``; after
``M + P - 1`` ticks the last stage holds every microbatch's output, which is then shared with all
stages. The backward pass is the transpose of that loop (``ppermute`` runs the other way), so
gradients need no extra code. Stages idle for ``P - 1`` of the ``M + P - 1`` ticks: see
:func:`bubble_fraction`; more microbatches shrink the bubble.

Microbatch ``m`` takes rows ``m, m + M, m + 2M ...`` of the batch, so every data-parallel shard
contributes to every microbatch and no rows move between devices.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from sharding.rules import LOGICAL_RULES

# layer(x [b, T, E], params of one layer, aux for these rows) -> x
Layer = Callable[[jax.Array, Any, Any], jax.Array]


def stage_axis() -> str:
    """The mesh axis the stacked ``layers`` axis maps to."""
    axis = LOGICAL_RULES["layers"]
    assert isinstance(axis, str), "pipeline parallelism expects 'layers' to map to a single mesh axis"
    return axis


def num_stages(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> int:
    """Pipeline stages on ``mesh`` (1 when the axis is absent)."""
    return 1 if mesh.empty else dict(mesh.shape).get(stage_axis(), 1)


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Share of stage-ticks spent idle in a GPipe schedule: ``(P - 1) / (M + P - 1)``."""
    return (stages - 1) / (microbatches + stages - 1)


def _to_microbatches(a: jax.Array, m: int) -> jax.Array:
    """``[B, ...] -> [M, B/M, ...]``, microbatch ``i`` holding rows ``i, i + M, ...``."""
    return jnp.swapaxes(a.reshape(a.shape[0] // m, m, *a.shape[1:]), 0, 1)


def _from_microbatches(a: jax.Array) -> jax.Array:
    return jnp.swapaxes(a, 0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def pipeline_layers(layer: Layer, x_BxTxE: jax.Array, stacked_params: Any, aux: Any, *, microbatches: int) -> jax.Array:
    """Apply all stacked layers to ``x`` with the layers split over the ``stage`` axis.

    ``stacked_params`` has a leading layer axis on every leaf (sharded over ``stage``); ``aux`` is
    a pytree of per-row arrays ``[B, ...]`` (positions, RoPE angles, segment ids) that each
    microbatch needs alongside its activations. Equal to ``lax.scan`` of ``layer`` over the
    stack, up to float rounding.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axis, P, M = stage_axis(), num_stages(mesh), microbatches
    B = x_BxTxE.shape[0]
    if B % M:
        raise ValueError(f"batch {B} is not divisible by {M} pipeline microbatches")
    # The two all-reduces over stages (the outputs shared below, and the input's gradient summed
    # over the stages in the backward pass) run in float32: XLA's CPU compiler aborts on a
    # bfloat16 all-reduce inside a shard_map manual over some axes only ("Invalid binary
    # instruction opcode copy" in AllReducePromotion, jaxlib 0.10.2: the reducer's root is a
    # sharding annotation). Exact: the values are only cast, and the output sum has one non-zero term.
    dtype = x_BxTxE.dtype
    wide = jnp.promote_types(dtype, jnp.float32)
    x_mb = _to_microbatches(x_BxTxE, M).astype(wide)
    aux_mb = jax.tree.map(lambda a: _to_microbatches(a, M), aux)

    def stages(x_mb, params, aux_mb):
        x_mb = x_mb.astype(dtype)
        s = lax.axis_index(axis)

        def run_stage(h, aux_t):
            return lax.scan(lambda h, p: (layer(h, p, aux_t), None), h, params)[0]

        def tick(carry, t):
            incoming, outputs = carry
            mb = jnp.clip(t - s, 0, M - 1)  # the microbatch this stage works on at tick t
            h = jnp.where(s == 0, x_mb[jnp.minimum(t, M - 1)], incoming)
            out = run_stage(h, jax.tree.map(lambda a: a[mb], aux_mb))
            done = (s == P - 1) & (t - s >= 0) & (t - s < M)
            outputs = outputs.at[mb].set(jnp.where(done, out, outputs[mb]))
            incoming = lax.ppermute(out, axis, [(i, i + 1) for i in range(P - 1)])
            return (incoming, outputs), None

        init = (jnp.zeros_like(x_mb[0]), jnp.zeros_like(x_mb))
        (_, outputs), _ = lax.scan(tick, init, jnp.arange(M + P - 1))
        # share the last stage's outputs with every stage
        return lax.psum(jnp.where(s == P - 1, outputs, jnp.zeros_like(outputs)).astype(wide), axis)

    param_specs = jax.tree.map(lambda _: PartitionSpec(axis), stacked_params)
    out = jax.shard_map(
        stages, mesh=mesh, in_specs=(PartitionSpec(), param_specs, PartitionSpec()), out_specs=PartitionSpec(),
        axis_names={axis}, check_vma=False,
    )(x_mb, stacked_params, aux_mb)
    return _from_microbatches(out).astype(dtype)
