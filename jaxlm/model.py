"""The decoder-only transformer (Llama family) as Flax NNX modules.

One call serves training, prefill and decoding (with ``mesh.stage > 1`` training runs the
layers as a pipeline, :mod:`sharding.pipeline`)::

    logits_BxTxV, cache = model(tokens_BxT, positions_BxT, cache=None, segment_ids_BxT=None)

Every parameter carries its logical axis names in the ``out_sharding`` metadata; where those
names land on the mesh is decided by ``sharding.rules`` alone (see :func:`jaxlm.sharded.build_model`).
Parameters are stored in ``param_dtype`` and cast to ``compute_dtype`` at use; RMSNorm, RoPE,
softmax and the logits are computed in float32.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.cache import KVCache, PagedKVCache, update
from jaxlm.config import LoRAConfig, ModelConfig
from jaxlm.lora import adapters, lora_delta
from pallas_kernels import attention, cached_attention
from pallas_kernels.dispatch import gated_mlp_hidden, projection
from sharding.pipeline import num_stages, pipeline_layers
from sharding.rules import constrain

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # save the matmul outputs, but in host memory: device memory of "full", less recomputation
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], std: float, dtype: Any) -> nnx.Param:
    init = jax.nn.initializers.truncated_normal(std)
    return nnx.Param(init(rngs.params(), shape, jnp.dtype(dtype)), out_sharding=names)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: Any):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(dtype)), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x_BxTxE: jax.Array) -> jax.Array:
        x = x_BxTxE.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)[None, None, :]).astype(x_BxTxE.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """RoPE inverse frequencies ``[head_dim // 2]`` float32, rescaled as Llama 3.1 does when configured."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
    if cfg.rope_scaling == "llama3":
        inv_freq = llama3_inv_freq(
            inv_freq, cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len
        )
    return inv_freq


def llama3_inv_freq(inv_freq: jax.Array, factor: float, low: float, high: float, original_max_len: int) -> jax.Array:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short kept, a smooth blend between."""
    low_freq_wavelen, high_freq_wavelen = original_max_len / low, original_max_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_angles(positions_BxT: jax.Array, inv_freq_F: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) of shape ``[batch, seq, head_dim // 2]``, float32."""
    angles = positions_BxT.astype(jnp.float32)[:, :, None] * inv_freq_F[None, None, :]
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x_BxTxHxD: jax.Array, sin_BxTxF: jax.Array, cos_BxTxF: jax.Array) -> jax.Array:
    """Rotate the two halves of head_dim (the Llama / Hugging Face convention)."""
    x = x_BxTxHxD.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    sin, cos = sin_BxTxF[:, :, None, :], cos_BxTxF[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxD.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
        E, H, K, D = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std, pd = cfg.init_std, cfg.param_dtype
        self.wq = _param(rngs, (E, H, D), ("embed", "heads", "head_dim"), std, pd)
        self.wk = _param(rngs, (E, K, D), ("embed", "kv_heads", "head_dim"), std, pd)
        self.wv = _param(rngs, (E, K, D), ("embed", "kv_heads", "head_dim"), std, pd)
        self.wo = _param(rngs, (H, D, E), ("heads", "head_dim", "embed"), std / (2 * cfg.num_layers) ** 0.5, pd)
        if cfg.qkv_bias:
            self.bq = nnx.Param(jnp.zeros((H, D), jnp.dtype(pd)), out_sharding=("heads", "head_dim"))
            self.bk = nnx.Param(jnp.zeros((K, D), jnp.dtype(pd)), out_sharding=("kv_heads", "head_dim"))
            self.bv = nnx.Param(jnp.zeros((K, D), jnp.dtype(pd)), out_sharding=("kv_heads", "head_dim"))
        self.cfg = cfg
        self.lora = adapters(lora, rngs, {
            "q": (((E,), ("embed",)), ((H, D), ("heads", "head_dim"))),
            "k": (((E,), ("embed",)), ((K, D), ("kv_heads", "head_dim"))),
            "v": (((E,), ("embed",)), ((K, D), ("kv_heads", "head_dim"))),
            "o": (((H, D), ("heads", "head_dim")), ((E,), ("embed",))),
        })

    def __call__(self, x_BxTxE, sin, cos, positions_BxT, segment_ids_BxT, kv, lora_key=None):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.compute_dtype)
        mm = cfg.matmul_impl
        q = projection("bte,ehd->bthd", x_BxTxE, self.wq[...].astype(dt), impl=mm)
        k = projection("bte,ehd->bthd", x_BxTxE, self.wk[...].astype(dt), impl=mm)
        v = projection("bte,ehd->bthd", x_BxTxE, self.wv[...].astype(dt), impl=mm)
        q = lora_delta(self.lora, "q", x_BxTxE, q, lora_key)
        k = lora_delta(self.lora, "k", x_BxTxE, k, lora_key)
        v = lora_delta(self.lora, "v", x_BxTxE, v, lora_key)
        if cfg.qkv_bias:
            q, k, v = (a + b[...].astype(dt)[None, None] for a, b in ((q, self.bq), (k, self.bk), (v, self.bv)))
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        q = constrain(q, ("batch", "seq", "act_heads", "head_dim"))
        if kv is None:  # training: keys are this call's tokens
            out = attention(
                q, k, v, q_positions=positions_BxT, kv_positions=positions_BxT, segment_ids=segment_ids_BxT,
                impl=cfg.attention_impl, context_impl=cfg.context_impl,
            )
        else:  # prefill / decode: write into the cache, attend over all of it (masked by position)
            k_cache, v_cache, *table = kv  # a paged layer also carries the page table
            page_table = table[0] if table else None
            kv = (update(k_cache, k, positions_BxT, page_table), update(v_cache, v, positions_BxT, page_table))
            out = cached_attention(q, *kv, q_positions=positions_BxT, page_table=page_table, impl=cfg.attention_impl)
        out = constrain(out, ("batch", "seq", "act_heads", "head_dim"))
        y = projection("bthd,hde->bte", out, self.wo[...].astype(dt), impl=mm)
        return lora_delta(self.lora, "o", out, y, lora_key), kv


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(x @ gate) * (x @ up))``."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
        E, F, std, pd = cfg.embed_dim, cfg.mlp_dim, cfg.init_std, cfg.param_dtype
        self.w_gate = _param(rngs, (E, F), ("embed", "mlp"), std, pd)
        self.w_up = _param(rngs, (E, F), ("embed", "mlp"), std, pd)
        self.w_down = _param(rngs, (F, E), ("mlp", "embed"), std / (2 * cfg.num_layers) ** 0.5, pd)
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.impl = cfg.matmul_impl
        self.lora = adapters(lora, rngs, {
            "gate": (((E,), ("embed",)), ((F,), ("mlp",))),
            "up": (((E,), ("embed",)), ((F,), ("mlp",))),
            "down": (((F,), ("mlp",)), ((E,), ("embed",))),
        })

    def __call__(self, x_BxTxE: jax.Array, lora_key: jax.Array | None = None) -> jax.Array:
        dt = self.dtype
        if self.lora and ("gate" in self.lora or "up" in self.lora):  # adapters change gate/up before the SiLU
            g = projection("bte,ef->btf", x_BxTxE, self.w_gate[...].astype(dt), impl=self.impl)
            u = projection("bte,ef->btf", x_BxTxE, self.w_up[...].astype(dt), impl=self.impl)
            g = lora_delta(self.lora, "gate", x_BxTxE, g, lora_key)
            u = lora_delta(self.lora, "up", x_BxTxE, u, lora_key)
            h = jax.nn.silu(g) * u  # as gated_mlp_hidden's XLA path
        else:
            h = gated_mlp_hidden(x_BxTxE, self.w_gate[...].astype(dt), self.w_up[...].astype(dt), impl=self.impl)
        h = constrain(h, ("batch", "seq", "act_mlp"))
        y = projection("btf,fe->bte", h, self.w_down[...].astype(dt), impl=self.impl)
        return lora_delta(self.lora, "down", h, y, lora_key)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
        self.attn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, cfg.param_dtype)
        self.attn = Attention(cfg, rngs, lora)
        self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, cfg.param_dtype)
        self.mlp = MLP(cfg, rngs, lora)

    def __call__(self, x_BxTxE, sin, cos, positions_BxT, segment_ids_BxT, kv, lora_key=None):
        h, kv = self.attn(self.attn_norm(x_BxTxE), sin, cos, positions_BxT, segment_ids_BxT, kv, lora_key)
        x = constrain(x_BxTxE + h, ("batch", "seq", "act_embed"))
        x = constrain(x + self.mlp(self.mlp_norm(x), lora_key), ("batch", "seq", "act_embed"))
        return x, kv


# The weights every use casts to the compute dtype: the embedding, the projections with their
# biases, the head. Decoding holds them in it (norm scales and LoRA adapters keep their own dtype).
COMPUTE_DTYPE_WEIGHTS = frozenset({"embed", "lm_head", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "w_gate", "w_up", "w_down"})


def in_compute_dtype(state: nnx.State, compute_dtype: Any) -> nnx.State:
    """``state`` (of a :class:`Transformer`; arrays or ``jax.ShapeDtypeStruct``) with the weights of
    :data:`COMPUTE_DTYPE_WEIGHTS` in ``compute_dtype``, shardings kept.

    The model computes with exactly these values (each use casts first), so outputs are unchanged;
    what changes is what a step reads. Held in float32 under bfloat16 compute, every decode step
    reads each weight in float32 and writes and reads a bfloat16 copy of it (XLA's GPU compile of
    an 8B decode step: 5.9e10 bytes of traffic, against 4.3e10 with the weights held in bfloat16).
    A no-op (the same arrays) when the weights are in that dtype already.
    """
    dt = jnp.dtype(compute_dtype)

    def cast(path, x):
        name = next((k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey)), None)
        if name not in COMPUTE_DTYPE_WEIGHTS or x.dtype == dt:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dt, sharding=x.sharding)
        return x.astype(dt)

    return jax.tree_util.tree_map_with_path(cast, state)


class Transformer(nnx.Module):
    """Embedding -> ``num_layers`` pre-norm blocks (stacked on a ``layers`` axis) -> norm -> head.

    With ``lora`` (rank > 0) the targeted projections also carry low-rank adapters
    (:class:`jaxlm.lora.LoRAParam`), which training updates while the rest stays frozen.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), cfg.init_std, cfg.param_dtype)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs, lora)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, cfg.param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, cfg.param_dtype)

    def __call__(
        self,
        tokens_BxT: jax.Array,
        positions_BxT: jax.Array,
        cache: KVCache | PagedKVCache | None = None,
        segment_ids_BxT: jax.Array | None = None,
        lora_dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | PagedKVCache | None]:
        """Logits ``[batch, seq, vocab]`` (float32) and the updated cache (None when none given).

        ``lora_dropout_key`` (training only) draws the adapters' dropout masks, one key per layer.
        """
        cfg, dt = self.cfg, jnp.dtype(self.cfg.compute_dtype)
        x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(dt)
        x = constrain(x, ("batch", "seq", "act_embed"))
        sin, cos = rope_angles(positions_BxT, rope_inv_freq(cfg))

        graphdef, stacked = nnx.split(self.blocks)
        aux = (sin, cos, positions_BxT, segment_ids_BxT)  # per-row inputs every layer needs

        # per-layer dropout keys travel with the stacked parameters (scan, loop and pipeline alike)
        keys = None if lora_dropout_key is None else jax.random.split(lora_dropout_key, cfg.num_layers)
        stacked = (stacked, keys)

        def layer(x, params, aux, kv):
            params, key = params
            return nnx.merge(graphdef, params)(x, *aux, kv, key)

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        # What rides the layer loop besides x: a contiguous cache's layers are sliced out (scan inputs)
        # and stacked back (outputs); a paged cache's pools are carried whole and written in place
        # (PagedKVCache.flat_pools says why), each layer finding its pages by its index.
        paged = isinstance(cache, PagedKVCache)
        carried = cache.flat_pools() if paged else None
        per_layer = (jnp.arange(cfg.num_layers, dtype=jnp.int32) if paged
                     else None if cache is None else cache.layer_stack())

        def layer_step(x, carried, params, per_layer):
            kv = (*carried, cache.layer_table(per_layer)) if paged else per_layer
            x, kv = layer(x, params, aux, kv)
            return (x, kv, None) if paged else (x, carried, kv)

        if cache is None and num_stages(jax.sharding.get_abstract_mesh()) > 1:
            x = pipeline_layers(
                lambda x, p, a: layer(x, p, a, None)[0], x, stacked, aux, microbatches=cfg.pipeline_microbatches
            )
        elif cfg.scan_layers:
            def body(carry, xs):
                x, carried, out = layer_step(*carry, *xs)
                return (x, carried), out

            (x, carried), per_layer = jax.lax.scan(body, (x, carried), (stacked, per_layer))
        else:
            outs = []
            for i in range(cfg.num_layers):
                params_i, per_i = jax.tree.map(lambda a: a[i], (stacked, per_layer))
                x, carried, kv_i = layer_step(x, carried, params_i, per_i)
                outs.append(kv_i)
            per_layer = None if paged or cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)

        x = self.final_norm(x)
        if cfg.tie_embeddings:  # contract the embedding's own rows: a transposed copy of it costs a read and write per call
            logits = jnp.einsum("bte,ve->btv", x, self.embed[...].astype(dt), preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("bte,ev->btv", x, self.lm_head[...].astype(dt), preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "seq", "act_vocab"))
        new_cache = (cache.with_flat_pools(*carried) if paged else None if cache is None
                     else cache.with_layers(per_layer))
        return logits, new_cache
