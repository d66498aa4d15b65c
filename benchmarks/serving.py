"""Serving benchmark: decode throughput against batch size, per-token latency against context length.

    python benchmarks/serving.py [--batches 1 2 4 ...] [--contexts 32 64 ...] [--out benchmarks/out/serving.json]

1. Decode throughput: one decode step (one token per sequence) over the paged KV cache, every
   sequence holding ``--context`` tokens, for growing batch sizes. While decoding is memory-bound
   (weights and cache read once per step) the step time stays flat and tokens/s grow with the
   batch; once it is compute-bound the step time grows with the batch and tokens/s level off.
2. Per-token latency against context length, batch 1: a decode step with the cache (reads the
   context's keys/values, computes one token) against recomputing the whole context without a
   cache (the cost the cache saves).

Both run the model's ordinary ``model(tokens, positions, cache)`` call, as the engine does.
On CPU it runs small shapes so it stays quick; on a GPU pass larger ``--embed`` / ``--layers``.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.build import build_model
from jaxlm.cache import PagedKVCache, init_paged_pools
from jaxlm.config import load_config

PAGE = 16


@functools.partial(jax.jit, donate_argnums=(1, 2))  # the pools are updated in place, as the engine's
def _decode_step(model, k, v, tokens_Bx1, positions_Bx1, table_BxP):
    logits, cache = model(tokens_Bx1, positions_Bx1, PagedKVCache(k, v, table_BxP))
    return jnp.argmax(logits[:, -1], axis=-1), cache.k_LxNxPxKxD, cache.v_LxNxPxKxD


@jax.jit
def _no_cache_step(model, tokens_BxT):
    positions = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32), tokens_BxT.shape)
    logits, _ = model(tokens_BxT, positions)
    return jnp.argmax(logits[:, -1], axis=-1)


def _time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats


def decode_step_s(model, batch: int, context: int, repeats: int) -> float:
    pages_per_seq = -(-(context + 1) // PAGE)
    k, v = init_paged_pools(model.cfg, 1 + batch * pages_per_seq, PAGE)
    table = jnp.arange(1, 1 + batch * pages_per_seq, dtype=jnp.int32).reshape(batch, pages_per_seq)
    tokens = jnp.ones((batch, 1), jnp.int32)
    positions = jnp.full((batch, 1), context, jnp.int32)
    pools = [k, v]

    def step():
        out, pools[0], pools[1] = _decode_step(model, *pools, tokens, positions, table)
        return out

    return _time(step, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    p.add_argument("--context", type=int, default=128, help="tokens each sequence holds in the batch sweep")
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="benchmarks/out/serving.json")
    args = p.parse_args()
    cfg = load_config(None, [
        f"model.num_layers={args.layers}", f"model.embed_dim={args.embed}", f"model.mlp_dim={args.embed * 3}",
        "model.num_heads=4", "model.num_kv_heads=2", f"model.head_dim={args.embed // 4}",
        f"model.compute_dtype={args.dtype}", "model.attention_impl=auto",
    ])
    model = build_model(cfg.model)

    batch_rows = []
    print(f"decode step, context {args.context} tokens per sequence")
    print(f"{'batch':>6} {'step (ms)':>10} {'tokens/s':>10} {'ms/token':>9}")
    for b in args.batches:
        s = decode_step_s(model, b, args.context, args.repeats)
        batch_rows.append({"batch": b, "step_ms": s * 1e3, "tokens_per_s": b / s})
        print(f"{b:>6} {s * 1e3:>10.2f} {b / s:>10.0f} {s * 1e3 / b:>9.3f}", flush=True)

    context_rows = []
    print("\nper-token latency, batch 1")
    print(f"{'context':>8} {'cached (ms)':>12} {'no cache (ms)':>14} {'speed-up':>9}")
    for c in args.contexts:
        cached = decode_step_s(model, 1, c, args.repeats)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (1, c + 1)), jnp.int32)
        full = _time(lambda: _no_cache_step(model, tokens), args.repeats)
        context_rows.append({"context": c, "cached_ms": cached * 1e3, "no_cache_ms": full * 1e3})
        print(f"{c:>8} {cached * 1e3:>12.2f} {full * 1e3:>14.2f} {full / cached:>8.1f}x", flush=True)

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "jax": jax.__version__, **vars(args)}
    out.write_text(json.dumps({"meta": meta, "batch_sweep": batch_rows, "context_sweep": context_rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
