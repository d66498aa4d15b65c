"""Low-rank adapters (LoRA) on the projections: parameters, the adapted call, init, merge and PEFT export.

LoRA (Hu et al. 2021, arXiv:2106.09685) adds to a frozen projection ``y = x W`` a trainable update
``y += (alpha / rank) * (dropout(x) A) B`` with ``A [*in, rank]`` and ``B [rank, *out]``. As in PEFT
(``peft.tuners.lora.layer.LoraLayer.reset_lora_parameters`` / ``update_layer``): ``A`` starts
kaiming-uniform (``a = sqrt(5)``, i.e. uniform in ``+-1/sqrt(fan_in)``), ``B`` starts at zero, and
the scaling is ``lora_alpha / r``; so at step 0 the model is the base model exactly.

Adapters are :class:`LoRAParam` (a subclass of ``nnx.Param``) inside the model itself, with logical
axis names (``lora_rank`` replicated; the others those of the weight they adapt), so every mesh
layout shards them like their weights. ``nnx.split(model, LoRAParam, ...)`` separates the trainable
adapters from the frozen base; :func:`merge` folds them into the weights.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import LORA_TARGETS, Config, ConfigError, LoRAConfig, ModelConfig
from sharding.rules import constrain

# target -> (submodule of a block, weight attribute, Hugging Face module under model.layers.N)
TARGET_WEIGHTS = {
    "q": ("attn", "wq", "self_attn.q_proj"),
    "k": ("attn", "wk", "self_attn.k_proj"),
    "v": ("attn", "wv", "self_attn.v_proj"),
    "o": ("attn", "wo", "self_attn.o_proj"),
    "gate": ("mlp", "w_gate", "mlp.gate_proj"),
    "up": ("mlp", "w_up", "mlp.up_proj"),
    "down": ("mlp", "w_down", "mlp.down_proj"),
}


class LoRAParam(nnx.Param):
    """A trainable adapter matrix; everything else in a LoRA model is frozen."""


class LoRA(nnx.Module):
    """One adapter: ``A [*in, rank]`` (kaiming-uniform), ``B [rank, *out]`` (zero), float32."""

    def __init__(self, in_shape: tuple[int, ...], in_names: tuple[str, ...], out_shape: tuple[int, ...],
                 out_names: tuple[str, ...], cfg: LoRAConfig, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(math.prod(in_shape))  # kaiming_uniform_(a=sqrt(5)) over fan_in, as PEFT/torch
        a = jax.random.uniform(rngs.params(), (*in_shape, cfg.rank), jnp.float32, -bound, bound)
        self.lora_a = LoRAParam(a, out_sharding=(*in_names, "lora_rank"))
        self.lora_b = LoRAParam(jnp.zeros((cfg.rank, *out_shape), jnp.float32), out_sharding=("lora_rank", *out_names))
        self.scaling = cfg.alpha / cfg.rank  # PEFT: scaling = lora_alpha / r
        self.dropout = cfg.dropout
        self.n_in = len(in_shape)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        """``(alpha / rank) * dropout(x) A B`` for ``x [batch, seq, *in]`` -> ``[batch, seq, *out]`` in x's dtype."""
        if key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        h = jnp.tensordot(x, self.lora_a[...].astype(x.dtype), axes=self.n_in)
        h = constrain(h, ("batch", "seq", "lora_rank"))
        return jnp.tensordot(h, self.lora_b[...].astype(x.dtype), axes=1) * jnp.asarray(self.scaling, x.dtype)


def adapters(cfg: LoRAConfig | None, rngs: nnx.Rngs, shapes: dict[str, tuple]) -> dict[str, LoRA] | None:
    """The adapters of one module: ``shapes`` maps a target to ``((in_shape, in_names), (out_shape, out_names))``;
    only ``cfg.targets`` get one. None without LoRA (rank 0)."""
    if cfg is None or cfg.rank == 0:
        return None
    made = {t: LoRA(*shapes[t][0], *shapes[t][1], cfg, rngs) for t in LORA_TARGETS if t in shapes and t in cfg.targets}
    return nnx.Dict(made) if made else None


def lora_delta(table: dict[str, LoRA] | None, target: str, x: jax.Array, y: jax.Array, key: jax.Array | None) -> jax.Array:
    """``y`` plus the adapter of ``target`` applied to ``x`` (``y`` itself when there is none)."""
    if not table or target not in table:
        return y
    if key is not None:
        key = jax.random.fold_in(key, LORA_TARGETS.index(target))
    return y + table[target](x, key).astype(y.dtype)


def abstract_lora_model(model_cfg: ModelConfig, lora: LoRAConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, adapters, base): the shape-only split of a LoRA model; merge as ``nnx.merge(g, adapters, base)``."""
    from jaxlm.model import Transformer

    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0), lora=lora))
    return nnx.split(model, LoRAParam, ...)


def init_adapters(model_cfg: ModelConfig, lora: LoRAConfig, mesh: Any, seed: int) -> nnx.State:
    """Freshly initialised adapters (A random, B zero), each born in its shard layout on ``mesh``.

    The base weights the same init would draw are never computed (only the adapters leave the jit).
    """
    from jaxlm.build import state_shardings
    from jaxlm.model import Transformer

    _, abstract, _ = abstract_lora_model(model_cfg, lora)

    def init() -> nnx.State:
        with nnx.use_eager_sharding(False):
            return nnx.state(Transformer(model_cfg, rngs=nnx.Rngs(seed + 1), lora=lora), LoRAParam)

    shardings = None if mesh is None else state_shardings(abstract, mesh)
    return jax.jit(init, out_shardings=shardings)()


def base_dtype(model_cfg: ModelConfig, lora: LoRAConfig) -> str:
    return lora.base_dtype or model_cfg.param_dtype


def lora_changed(saved: Config, cfg: Config) -> tuple[str, Any, Any] | None:
    """(key, saved value, new value) of the first ``train.lora`` key that makes the saved run another one.

    ``rank`` and ``targets`` decide the adapters' shapes and tree (rank 0: no adapters, a full-weight run);
    ``alpha`` the scaling ``alpha / rank`` the trained ``A B`` were learned under (the same arrays under
    another alpha are another model); ``base_dtype`` the frozen base whose checksum is stored with them.
    ``dropout`` only acts while training, so it may change between resumes (like the learning rate).
    """
    old, new = saved.train.lora, cfg.train.lora
    if old.rank == 0 and new.rank == 0:
        return None
    if old.rank != new.rank:
        return "rank", old.rank, new.rank
    if set(old.targets) != set(new.targets):  # the order of the list does not change the adapters
        return "targets", f"[{','.join(old.targets)}]", f"[{','.join(new.targets)}]"
    if old.alpha != new.alpha:
        return "alpha", old.alpha, new.alpha
    old_dtype, new_dtype = base_dtype(saved.model, old), base_dtype(cfg.model, new)
    if old_dtype != new_dtype:
        return "base_dtype", old_dtype, new_dtype
    return None


def cast_base(base: nnx.State, dtype: str) -> nnx.State:
    """The frozen base with its floating arrays in ``dtype`` (bfloat16 halves its memory)."""
    dt = jnp.dtype(dtype)
    cast = jax.jit(lambda s: jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, s))
    return cast(base)


def _find(state: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        state = state[p]
    return state


def merge(model: nnx.Module, param_dtype: str | None = None) -> nnx.Module:
    """A plain Transformer (no adapters) whose weights are ``W + (alpha / rank) * A B``, computed in float32
    and stored in ``param_dtype`` (default: the model config's ``param_dtype``)."""
    from jaxlm.build import abstract_model

    cfg: ModelConfig = model.cfg
    dtype = jnp.dtype(param_dtype or cfg.param_dtype)
    values = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Not(LoRAParam)))}
    for target, (sub, weight, _) in TARGET_WEIGHTS.items():
        table = getattr(getattr(model.blocks, sub), "lora")
        if table is None or target not in table:
            continue
        ad = table[target]
        key = ("blocks", sub, weight)
        values[key] = _merge_weight(values[key], ad.lora_a.get_value(), ad.lora_b.get_value(), ad.scaling)
    graphdef, plain = abstract_model(cfg)

    def fill(path: tuple, var: nnx.Variable) -> nnx.Variable:
        x = values[tuple(str(getattr(k, "key", k)) for k in path)]
        return var.replace(x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, plain, is_leaf=lambda x: isinstance(x, nnx.Variable)))


@jax.jit
def _merge_weight(w: jax.Array, a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """``w [L, *in, *out] + scaling * a [L, *in, r] @ b [L, r, *out]`` in float32 (keeps w's sharding)."""
    delta = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(a.astype(jnp.float32), b.astype(jnp.float32))
    return w.astype(jnp.float32) + scaling * delta


MODEL_PASSED = "a model passed to jaxlm.train"


def check_base(directory: Any, meta: dict, base_meta: dict) -> None:
    """ConfigError when a LoRA checkpoint's adapters were trained over another base than the one loaded."""
    saved = meta.get("lora_base") or {}
    if saved.get("checksum") != base_meta["checksum"]:
        raise ConfigError(
            f"the LoRA run in '{directory}' was trained over base '{saved.get('reference')}' (checksum "
            f"{saved.get('checksum')}), but the base loaded now ('{base_meta['reference']}') has checksum "
            f"{base_meta['checksum']}; point model.init_from to the original base, or use a new checkpoint.dir"
        )


def restore_lora(ckpt: Any, step: int, cfg: Any, mesh: Any) -> nnx.Module:
    """A LoRA run's step as one plain model: its base (re-read from ``model.init_from``, or re-made from
    ``train.seed``) with the saved adapters merged in. ConfigError when the base is not the one trained over."""
    from jaxlm import pretrained
    from jaxlm.build import state_shardings
    from jaxlm.checkpoint import tree_checksum

    meta = ckpt.read_meta(step)
    reference = (meta.get("lora_base") or {}).get("reference")
    if reference == MODEL_PASSED:
        raise ConfigError(f"the LoRA run in '{ckpt.directory}' was trained over a model passed in Python, which "
                          "cannot be re-read; train with model.init_from=PATH to make a run that loads on its own")
    base = pretrained.load_base(cfg, mesh)
    graphdef, abstract, _ = abstract_lora_model(cfg.model, cfg.train.lora)
    adapters_state, _, meta = ckpt.restore(abstract, state_shardings(abstract, mesh), step=step)
    check_base(ckpt.directory, meta, {"reference": pretrained.base_reference(cfg, False), "checksum": tree_checksum(base)})
    return merge(nnx.merge(graphdef, adapters_state, base))


def restore_adapters(directory: str | pathlib.Path, step: int | None = None) -> tuple[nnx.State, Any]:
    """(adapters on one device, config) of a LoRA run's step (default: the newest); the base is not read."""
    from jaxlm.build import state_shardings
    from jaxlm.checkpoint import Checkpointer
    from jaxlm.config import MeshConfig
    from sharding.mesh import make_mesh

    ckpt = Checkpointer(directory, create=False)
    try:
        step = ckpt._step_or_latest(step)
        cfg = ckpt.read_config(step)
        if cfg.train.lora.rank == 0:
            raise ConfigError(f"'{directory}' is not a LoRA run (train.lora.rank is 0); export it without --adapter-only")
        _, abstract, _ = abstract_lora_model(cfg.model, cfg.train.lora)
        mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
        adapters_state, _, _ = ckpt.restore(abstract, state_shardings(abstract, mesh), step=step)
        return adapters_state, cfg
    finally:
        ckpt.close()
