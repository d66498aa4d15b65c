"""Attention kernel benchmark: Mosaic GPU and Triton flash attention, cuDNN and the XLA reference.

    python benchmarks/kernels.py [--seq 1024 4096 16384] [--head-dim 64 128] [--causal both]
                                 [--impls mosaic triton cudnn xla] [--out benchmarks/out/kernels.json]

Reports TFLOP/s of the forward and forward+backward passes (causal FLOPs counted as half of
dense). Implementations: ``mosaic`` (Hopper Mosaic GPU forward + Triton backward; sm_90 only),
``triton`` (Pallas Triton forward + backward), ``cudnn`` (``jax.nn.dot_product_attention``),
``xla`` (the reference). On a GPU the defaults are real sizes (seq 1k-16k, head_dim 64/128, causal
and not, bf16); on CPU it runs one tiny size with the Pallas interpreter so the script stays
runnable (those numbers measure nothing but the plumbing). Prints a table and writes JSON.
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


def _impls(on_gpu: bool, hopper: bool, causal: bool):
    def flash(backend):
        def fn(q, k, v, q_pos, kv_pos):
            return flash_attention(q, k, v, q_positions_BxT=q_pos, kv_positions_BxS=kv_pos,
                                   interpret=not on_gpu, backend=backend)
        return fn

    def xla(q, k, v, q_pos, kv_pos):
        return attention_reference(q, k, v, q_positions_BxT=q_pos, kv_positions_BxS=kv_pos)

    def cudnn(q, k, v, q_pos, kv_pos):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

    impls = {"triton": flash("triton"), "xla": xla}
    if hopper:
        impls["mosaic"] = flash("mosaic")
    if on_gpu:
        impls["cudnn"] = cudnn
    return impls


def main() -> None:
    platform = jax.devices()[0].platform
    on_gpu = platform in ("gpu", "cuda")
    hopper = on_gpu and getattr(jax.devices()[0], "compute_capability", None) == "9.0"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 4096, 16384] if on_gpu else [64])
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128] if on_gpu else [64])
    p.add_argument("--causal", choices=("yes", "no", "both"), default="both" if on_gpu else "yes")
    p.add_argument("--impls", nargs="+", default=None, help="subset of mosaic triton cudnn xla")
    p.add_argument("--heads", type=int, default=16 if on_gpu else 2)
    p.add_argument("--kv-heads", type=int, default=16 if on_gpu else 2)
    p.add_argument("--tokens", type=int, default=16384 if on_gpu else 64, help="batch * seq per measurement")
    p.add_argument("--iters", type=int, default=10 if on_gpu else 1)
    p.add_argument("--out", default="benchmarks/out/kernels.json")
    args = p.parse_args()
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    causal_opts = {"yes": [True], "no": [False], "both": [True, False]}[args.causal]
    rows = []
    for T in args.seq:
        for D in args.head_dim:
            for causal in causal_opts:
                B = max(1, args.tokens // T)
                keys = jax.random.split(jax.random.key(0), 4)
                q = jax.random.normal(keys[0], (B, T, args.heads, D), dtype)
                k = jax.random.normal(keys[1], (B, T, args.kv_heads, D), dtype)
                v = jax.random.normal(keys[2], (B, T, args.kv_heads, D), dtype)
                q_pos = jnp.broadcast_to(jnp.arange(T), (B, T))
                # not causal: every key at position 0 is visible to every query
                kv_pos = q_pos if causal else jnp.zeros_like(q_pos)
                flops_fwd = 4 * B * args.heads * T * T * D / (2 if causal else 1)
                for name, fn in _impls(on_gpu, hopper, causal).items():
                    if args.impls and name not in args.impls:
                        continue
                    fwd = jax.jit(fn)
                    grad = jax.jit(jax.grad(
                        lambda q, k, v, qp, kp, fn=fn: jnp.sum(fn(q, k, v, qp, kp).astype(jnp.float32)), (0, 1, 2)))
                    try:
                        t_f = _time(fwd, q, k, v, q_pos, kv_pos, iters=args.iters)
                        t_fb = _time(grad, q, k, v, q_pos, kv_pos, iters=args.iters)
                    except Exception as e:  # out of memory (xla at 16k), no cuDNN attention: report, go on
                        print(f"seq={T} d={D} causal={causal} {name}: failed: {str(e).splitlines()[0]}")
                        continue
                    row = {"impl": name, "seq": T, "head_dim": D, "causal": causal, "batch": B,
                           "fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_fb * 1e3, "fwd_tflops": flops_fwd / t_f / 1e12,
                           "fwd_bwd_tflops": 3.5 * flops_fwd / t_fb / 1e12}
                    rows.append(row)
                    print(f"seq={T:<6} d={D:<4} causal={causal!s:<5} {name:<7} "
                          f"fwd {row['fwd_ms']:9.3f} ms {row['fwd_tflops']:8.2f} TFLOP/s   "
                          f"fwd+bwd {row['fwd_bwd_ms']:9.3f} ms {row['fwd_bwd_tflops']:8.2f} TFLOP/s", flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": jax.devices()[0].device_kind, "platform": platform, "jax": jax.__version__,
            "dtype": jnp.dtype(dtype).name, **vars(args)}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
