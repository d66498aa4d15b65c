"""Kernel benchmark: flash attention (Pallas) against the XLA reference and cuDNN, and the
Pallas GEMMs against XLA's dot.

    python benchmarks/kernels.py [--seq 1024 4096] [--head-dim 64 128] [--out benchmarks/out/kernels.json]
    python benchmarks/kernels.py --matmul [--matmul-shapes 8192x8192x8192] [--out benchmarks/out/matmul.json]

Reports TFLOP/s of the forward and forward+backward passes (causal FLOPs counted as half of
dense). ``--matmul`` times ``[M, K] @ [K, N]`` instead: the model's projection shapes (demo
config, 16k tokens) and 8192^3, Triton (and the Mosaic GPU kernel on Hopper) against ``jnp.dot``. On a GPU the defaults are real sizes; on CPU it runs tiny sizes with the Pallas
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


def _matmul_impls(on_gpu: bool):
    from pallas_kernels.dispatch import is_hopper
    from pallas_kernels.matmul import matmul
    from pallas_kernels.matmul_mosaic import matmul as matmul_hopper

    impls = {"pallas": lambda a, b: matmul(a, b, interpret=not on_gpu), "xla": jnp.dot}
    if on_gpu and is_hopper():
        impls["mosaic"] = matmul_hopper
    return impls


def _model_shapes(tokens: int) -> list[tuple[int, int, int]]:
    """(M, N, K) of the model's projections at ``tokens`` tokens, demo config."""
    from jaxlm.config import load_config

    m = load_config(pathlib.Path(__file__).parent.parent / "configs" / "demo.yaml").model
    E, F, HD, KD = m.embed_dim, m.mlp_dim, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    return sorted({(tokens, HD, E), (tokens, KD, E), (tokens, E, HD), (tokens, F, E), (tokens, E, F)})


def matmul_main(args, on_gpu: bool) -> list[dict]:
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    shapes = [tuple(map(int, s.split("x"))) for s in args.matmul_shapes] if args.matmul_shapes else (
        _model_shapes(16384) + [(8192, 8192, 8192)] if on_gpu else [(64, 96, 64)]
    )
    rows = []
    for M, N, K in shapes:
        a = jax.random.normal(jax.random.key(0), (M, K), dtype)
        b = jax.random.normal(jax.random.key(1), (K, N), dtype)
        flops = 2 * M * N * K
        for name, fn in _matmul_impls(on_gpu).items():
            fwd = jax.jit(fn)
            grad = jax.jit(jax.grad(lambda a, b, fn=fn: jnp.sum(fn(a, b).astype(jnp.float32)), (0, 1)))
            try:
                t_f = _time(fwd, a, b, iters=args.iters)
                t_fb = _time(grad, a, b, iters=args.iters)
            except Exception as e:  # report, keep going
                print(f"{M}x{N}x{K} {name}: failed: {str(e).splitlines()[0]}")
                continue
            row = {"impl": name, "m": M, "n": N, "k": K, "fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_fb * 1e3,
                   "fwd_tflops": flops / t_f / 1e12, "fwd_bwd_tflops": 3 * flops / t_fb / 1e12}
            rows.append(row)
            print(f"{M:>6}x{N:<6}x{K:<6} {name:<7} fwd {row['fwd_ms']:9.3f} ms {row['fwd_tflops']:8.2f} TFLOP/s   "
                  f"fwd+bwd {row['fwd_bwd_ms']:9.3f} ms {row['fwd_bwd_tflops']:8.2f} TFLOP/s", flush=True)
    return rows


def main() -> None:
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--matmul", action="store_true", help="time the GEMMs instead of attention")
    p.add_argument("--matmul-shapes", nargs="+", default=None, help="MxNxK, e.g. 8192x8192x8192")
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 4096, 16384] if on_gpu else [64])
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128] if on_gpu else [32])
    p.add_argument("--heads", type=int, default=16 if on_gpu else 2)
    p.add_argument("--kv-heads", type=int, default=16 if on_gpu else 2)
    p.add_argument("--tokens", type=int, default=16384 if on_gpu else 64, help="batch * seq per measurement")
    p.add_argument("--iters", type=int, default=10 if on_gpu else 1)
    p.add_argument("--out", default=None, help="default benchmarks/out/kernels.json (matmul.json with --matmul)")
    args = p.parse_args()
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    rows = matmul_main(args, on_gpu) if args.matmul else []
    for T in [] if args.matmul else args.seq:
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
    out = pathlib.Path(args.out or f"benchmarks/out/{'matmul' if args.matmul else 'kernels'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "jax": jax.__version__,
            "dtype": jnp.dtype(dtype).name, **vars(args)}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
