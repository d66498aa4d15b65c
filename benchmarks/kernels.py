"""Attention kernel benchmark: flash attention (Pallas) against the XLA reference and cuDNN.

    python benchmarks/kernels.py [--seq 1024 4096] [--head-dim 64 128] [--out benchmarks/out/kernels.json]

Reports TFLOP/s of the forward and forward+backward passes (causal FLOPs counted as half of
dense). On a GPU the defaults are real sizes; on CPU it runs tiny sizes with the Pallas
interpreter so the script stays runnable (those numbers measure nothing but correctness of the
plumbing). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp

from pallas_kernels import attention_reference, flash_attention


def _time(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def _impls(on_gpu: bool):
    def pallas(q, k, v, pos):
        return flash_attention(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos, interpret=not on_gpu)

    def xla(q, k, v, pos):
        return attention_reference(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos)

    impls = {"pallas": pallas, "xla": xla}
    if on_gpu:
        def cudnn(q, k, v, pos):
            G = q.shape[2] // k.shape[2]
            return jax.nn.dot_product_attention(q, jnp.repeat(k, G, 2), jnp.repeat(v, G, 2), is_causal=True,
                                                implementation="cudnn")
        impls["cudnn"] = cudnn
    return impls


def main() -> None:
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 4096, 16384] if on_gpu else [64])
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128] if on_gpu else [32])
    p.add_argument("--heads", type=int, default=16 if on_gpu else 2)
    p.add_argument("--kv-heads", type=int, default=16 if on_gpu else 2)
    p.add_argument("--tokens", type=int, default=16384 if on_gpu else 64, help="batch * seq per measurement")
    p.add_argument("--iters", type=int, default=10 if on_gpu else 1)
    p.add_argument("--out", default="benchmarks/out/kernels.json")
    args = p.parse_args()
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    rows = []
    for T in args.seq:
        for D in args.head_dim:
            B = max(1, args.tokens // T)
            keys = jax.random.split(jax.random.key(0), 4)
            q = jax.random.normal(keys[0], (B, T, args.heads, D), dtype)
            k = jax.random.normal(keys[1], (B, T, args.kv_heads, D), dtype)
            v = jax.random.normal(keys[2], (B, T, args.kv_heads, D), dtype)
            pos = jnp.broadcast_to(jnp.arange(T), (B, T))
            flops_fwd = 4 * B * args.heads * T * T * D / 2  # causal
            for name, fn in _impls(on_gpu).items():
                fwd = jax.jit(fn)
                grad = jax.jit(jax.grad(lambda q, k, v, pos, fn=fn: jnp.sum(fn(q, k, v, pos).astype(jnp.float32)), (0, 1, 2)))
                try:
                    t_f = _time(fwd, q, k, v, pos, iters=args.iters)
                    t_fb = _time(grad, q, k, v, pos, iters=args.iters)
                except Exception as e:  # a backend without cuDNN attention, say: report, keep going
                    print(f"seq={T} d={D} {name}: failed: {str(e).splitlines()[0]}")
                    continue
                row = {"impl": name, "seq": T, "head_dim": D, "batch": B, "fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_fb * 1e3,
                       "fwd_tflops": flops_fwd / t_f / 1e12, "fwd_bwd_tflops": 3.5 * flops_fwd / t_fb / 1e12}
                rows.append(row)
                print(f"seq={T:<6} d={D:<4} {name:<7} fwd {row['fwd_ms']:9.3f} ms {row['fwd_tflops']:8.2f} TFLOP/s   "
                      f"fwd+bwd {row['fwd_bwd_ms']:9.3f} ms {row['fwd_bwd_tflops']:8.2f} TFLOP/s", flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "jax": jax.__version__,
            "dtype": jnp.dtype(dtype).name, **vars(args)}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
