"""THE sharding table: logical axis name -> mesh axes.

Model code names every parameter and activation dimension with a logical name (``embed``,
``heads``, ``batch`` ...). This table is the only place those names meet mesh axes, so data
parallelism, FSDP/ZeRO-3, sequence/context parallelism and Megatron tensor parallelism are all the same code with different
mesh sizes. Print it with ``python -m sharding.rules``.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None

LOGICAL_RULES: dict[str, MeshAxes] = {
    # activations
    "batch": ("data", "fsdp"),  # the batch is split over every data-parallel axis
    "seq": "sequence",  # context parallelism; size 1 unless mesh.sequence > 1
    "act_embed": None,  # activations keep the full model width on each device
    "act_heads": "tensor",  # attention heads of q/k/v and the attention output
    "act_mlp": "tensor",  # SwiGLU hidden
    "act_vocab": "tensor",  # logits
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",  # FSDP: every weight's model dim is split, gathered just in time
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,  # RMSNorm scales are tiny: replicate
    "lora_rank": None,  # LoRA adapters: the rank is small; the other axis follows the adapted weight
    "layers": "stage",  # the stacked layer axis: pipeline stages hold consecutive layers
    # KV cache [layers, batch, cache_seq, kv_heads, head_dim]
    "cache_seq": None,
}


def logical_spec(names: Sequence[str | None], rules: dict[str, MeshAxes] = LOGICAL_RULES) -> PartitionSpec:
    """``("batch", "seq", "act_embed")`` -> ``PartitionSpec(("data", "fsdp"), None, None)``."""
    axes = []
    for name in names:
        if name is not None and name not in rules:
            raise KeyError(f"logical axis '{name}' has no rule in sharding.rules.LOGICAL_RULES")
        axes.append(None if name is None else rules[name])
    return PartitionSpec(*axes)


def logical_sharding(mesh: Mesh, names: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's layout by logical names under the current mesh (no-op without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names))


def per_shard(fn, *, in_specs, out_specs):
    """``fn`` run per shard under the current mesh, over every axis not already manual.

    Axes already manual (inside a pipeline stage, say) stay as they are, so a kernel wrapped
    here composes with :mod:`sharding.pipeline`. ``check_vma`` is off: Pallas calls (and the
    Pallas interpreter) carry no varying-axes annotations.
    """
    mesh = jax.sharding.get_abstract_mesh()
    free = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != jax.sharding.AxisType.Manual}
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=free, check_vma=False)


def mesh_axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    size = 1
    for a in names:
        size *= mesh.shape[a]
    return size


def describe_rules(rules: dict[str, MeshAxes] = LOGICAL_RULES) -> str:
    """The table as text, one rule a line."""
    width = max(map(len, rules))
    return "\n".join(f"{k:<{width}}  ->  {v if v is not None else 'replicated'}" for k, v in rules.items())


if __name__ == "__main__":
    print(describe_rules())
