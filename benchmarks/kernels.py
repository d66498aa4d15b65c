"""Kernel benchmark: flash attention (Mosaic GPU and Triton) against cuDNN and the XLA reference,
decode attention (Pallas) against the XLA reference, and the Pallas GEMMs against XLA's dot.

    python benchmarks/kernels.py [--seq 1024 4096 16384] [--head-dim 64 128] [--causal both]
                                 [--impls mosaic triton cudnn xla] [--decode-len 8192]
                                 [--matmul-shapes 8192x8192x8192]
                                 [--sections flash decode matmul] [--out benchmarks/out/kernels.json]

Flash: TFLOP/s of the forward and forward+backward passes (causal FLOPs counted as half of
dense). Implementations: ``mosaic`` (Hopper Mosaic GPU forward + Triton backward; sm_90 only),
``triton`` (Pallas Triton forward + backward), ``cudnn`` (``jax.nn.dot_product_attention``),
``xla`` (the reference). Decode (one new token per sequence against a full KV cache): achieved
GB/s over the bytes of K and V cache read, the number that bounds decoding. Matmul: TFLOP/s of
``[M, K] @ [K, N]`` forward and forward+backward for the model's projection shapes (demo config,
16k tokens) and 8192^3: Triton (and the Mosaic GPU kernel on Hopper) against ``jnp.dot``.
On a GPU the defaults are real sizes (bf16); on CPU it runs tiny sizes with the Pallas
interpreter so the script stays runnable (those numbers measure nothing but the plumbing).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp

from pallas_kernels import attention_reference, decode_attention, decode_attention_reference


def _time(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def _impls(on_gpu: bool, hopper: bool, causal: bool):
    def flash(kernel):
        from pallas_kernels import table

        def fn(q, k, v, q_pos, kv_pos):
            blocks = table.blocks_for(kernel, table.Call(q.dtype, head_dim=q.shape[-1]))
            return table.run_attention(kernel, blocks, q, k, v, q_pos, kv_pos, interpret=not on_gpu)
        return fn

    def xla(q, k, v, q_pos, kv_pos):
        return attention_reference(q, k, v, q_positions_BxT=q_pos, kv_positions_BxS=kv_pos)

    def cudnn(q, k, v, q_pos, kv_pos):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

    impls = {"triton": flash("flash_triton"), "xla": xla}
    if hopper:
        impls["mosaic"] = flash("flash_mosaic")
    if on_gpu:
        impls["cudnn"] = cudnn
    return impls


def _decode_rows(args, on_gpu: bool, dtype) -> list[dict]:
    """One token per sequence over a full cache of each length: GB/s over the K/V bytes read."""
    rows = []
    B, H, K, D = args.decode_batch, args.decode_heads, args.decode_kv_heads, args.decode_head_dim
    for S in args.decode_len:
        keys = jax.random.split(jax.random.key(1), 3)
        q = jax.random.normal(keys[0], (B, 1, H, D), dtype)
        k = jax.random.normal(keys[1], (B, S, K, D), dtype)
        v = jax.random.normal(keys[2], (B, S, K, D), dtype)
        lengths = jnp.full((B,), S, jnp.int32)
        kv_bytes = 2 * B * S * K * D * jnp.dtype(dtype).itemsize
        impls = {f"pallas/{n}": (lambda q, k, v, lengths, n=n: decode_attention(
            q, k, v, lengths, num_splits=n, interpret=not on_gpu)) for n in args.decode_splits}
        impls["xla"] = decode_attention_reference
        for name, fn in impls.items():
            t = _time(jax.jit(fn), q, k, v, lengths, iters=args.iters)
            row = {"impl": name, "cache_len": S, "batch": B, "heads": H, "kv_heads": K, "head_dim": D,
                   "ms": t * 1e3, "kv_bytes": kv_bytes, "gb_per_s": kv_bytes / t / 1e9}
            rows.append(row)
            print(f"decode cache={S:<6} b={B:<3} {name:<10} {row['ms']:9.3f} ms {row['gb_per_s']:8.1f} GB/s", flush=True)
    return rows


def _matmul_impls(on_gpu: bool):
    from pallas_kernels.dispatch import device_info
    from pallas_kernels.matmul import matmul
    from pallas_kernels.matmul_mosaic import matmul as matmul_hopper

    impls = {"pallas": lambda a, b: matmul(a, b, interpret=not on_gpu), "xla": jnp.dot}
    if on_gpu and str(device_info()[1]).startswith("9."):
        impls["mosaic"] = matmul_hopper
    return impls


def _model_shapes(tokens: int) -> list[tuple[int, int, int]]:
    """(M, N, K) of the model's projections at ``tokens`` tokens, demo config."""
    from jaxlm.config import load_config

    m = load_config(pathlib.Path(__file__).parent.parent / "configs" / "demo.yaml").model
    E, F, HD, KD = m.embed_dim, m.mlp_dim, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    return sorted({(tokens, HD, E), (tokens, KD, E), (tokens, E, HD), (tokens, F, E), (tokens, E, F)})


def _matmul_rows(args, on_gpu: bool, dtype) -> list[dict]:
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
    p.add_argument("--sections", nargs="+", choices=("flash", "decode", "matmul"),
                   default=["flash", "decode", "matmul"])
    p.add_argument("--matmul-shapes", nargs="+", default=None, help="MxNxK, e.g. 8192x8192x8192")
    p.add_argument("--decode-len", type=int, nargs="+", default=[1024, 8192, 32768] if on_gpu else [40])
    p.add_argument("--decode-batch", type=int, default=16 if on_gpu else 2)
    p.add_argument("--decode-heads", type=int, default=32 if on_gpu else 4)
    p.add_argument("--decode-kv-heads", type=int, default=8 if on_gpu else 2)
    p.add_argument("--decode-head-dim", type=int, default=128 if on_gpu else 16)
    p.add_argument("--decode-splits", type=int, nargs="+", default=[4, 8, 16] if on_gpu else [2])
    p.add_argument("--out", default="benchmarks/out/kernels.json")
    args = p.parse_args()
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    causal_opts = {"yes": [True], "no": [False], "both": [True, False]}[args.causal]
    rows = []
    for T in args.seq if "flash" in args.sections else []:
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
    decode_rows = _decode_rows(args, on_gpu, dtype) if "decode" in args.sections else []
    matmul_rows = _matmul_rows(args, on_gpu, dtype) if "matmul" in args.sections else []
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": jax.devices()[0].device_kind, "platform": platform, "jax": jax.__version__,
            "dtype": jnp.dtype(dtype).name, **vars(args)}
    out.write_text(json.dumps({"meta": meta, "rows": rows, "decode": decode_rows, "matmul": matmul_rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
