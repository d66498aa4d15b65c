"""GPU acceptance: one command that says whether jaxlm's kernels and training work on this GPU.

    python benchmarks/gpu_acceptance.py [--out benchmarks/out/gpu_acceptance.json] [--seed N]
    python benchmarks/gpu_acceptance.py --cpu-smoke   # no GPU: tiny sizes, kernels in the Pallas interpreter

Made for one H100 or H200 under the GPU machine's own stack (Python 3.12, jax 0.11.x with its CUDA
plugin) with only the jaxlm wheel and pure-Python dependencies added; it runs in about 5-8
minutes. Three sections, one table (printed, and written as JSON with every figure):

1. **check** - every kernel of :mod:`pallas_kernels.table` against its pure-JAX reference on the
   device, forward and gradients: attention (``cudnn``, as the dispatch calls it, segment ids as
   a mask; ``flash_triton``; ``flash_mosaic``, the Mosaic GPU forward with the Triton backward,
   on Hopper) for head_dim 64/128, GQA,
   bf16/fp16/fp32, segment ids; decode attention over contiguous and paged caches with ragged
   lengths (``decode_triton``); the GEMMs ``matmul_triton``, ``swiglu_triton`` and ``matmul_mosaic``
   (Hopper) on the training model's
   projection shapes. Inputs are fresh random normals (``--seed``, default: the clock, printed).
   Before every kernel run the device allocator is poisoned: buffers of NaN as large as the
   outputs are allocated and freed, so an element a kernel never writes reads NaN and fails the
   check. Tolerance: max |kernel - reference| <= tol(dtype) * max |reference|, the reference
   computed from the same inputs in float32.
2. **speed** - attention forward and forward+backward (TFLOP/s, causal FLOPs counted as
   half) at head_dim 64 and 128: cuDNN, Mosaic GPU (Hopper), Triton and XLA, and cuDNN and Triton
   with segment ids; the GEMMs against XLA's dot (TFLOP/s);
   decode attention as GB/s of KV cache read (the Pallas kernel and XLA).
3. **train** - 20 steps of a ~1B-parameter Llama-shaped model (width 2048, 16 layers, 32/8 heads,
   SwiGLU 8192, 2048-token sequences, batch 8, bf16, remat full) on the embedded corpus, with
   ``model.attention_impl/matmul_impl`` = ``auto`` and then ``xla``, from the same initial
   parameters and batches: the losses must agree step by step (within 2%), and each reports its
   median step time, tokens/s and MFU. ``--train`` names other ``attention_impl/matmul_impl``
   pairs (the last is the reference); ``--only REGEX`` keeps the checks and timings whose name
   matches. Every row is also appended to ``OUT.rows.jsonl`` as it comes, so a run stopped
   early keeps what it measured.

Exit code 0 when every check passed and both trainings agree, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels import _time  # benchmarks/kernels.py: the one timing loop

from pallas_kernels import attention_reference, decode_attention, decode_attention_reference, flash_attention
from pallas_kernels.matmul import matmul, swiglu

TOL = {"float32": 2e-3, "bfloat16": 2e-2, "float16": 5e-3}  # relative to max |reference|
TRAIN_LOSS_RTOL = 0.02


class Table:
    """The rows of the one table, printed as they come: section, case, ok (None: a measurement), figures."""

    def __init__(self, seed: int, log: pathlib.Path | None = None, only: str | None = None):
        self.rows: list[dict] = []
        self.seed = seed
        self.only = None if only is None else re.compile(only)
        self.log = log  # every row is also appended here as it comes (JSON lines), so a killed run keeps its rows

    def add(self, section: str, case: str, ok: bool | None, **figures) -> None:
        self.rows.append({"section": section, "case": case, "ok": ok, **figures})
        mark = {True: "ok  ", False: "FAIL", None: "    "}[ok]
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in figures.items() if not isinstance(v, list))  # lists: in the JSON only
        print(f"{section:<6} {mark} {case:<52} {text}", flush=True)
        if self.log is not None:
            with self.log.open("a") as f:
                f.write(json.dumps(self.rows[-1]) + "\n")

    def wanted(self, case: str) -> bool:
        """Whether ``--only`` (a regular expression searched in the case name) keeps this check or timing."""
        return self.only is None or bool(self.only.search(case))

    def key(self) -> jax.Array:
        """A fresh key for each use: the seed folded with the row count."""
        return jax.random.fold_in(jax.random.key(self.seed), len(self.rows))


def _hopper() -> bool:
    """Mosaic GPU kernels (wgmma, TMA) run on compute capability 9.0 only."""
    device = jax.devices()[0]
    return device.platform in ("gpu", "cuda") and getattr(device, "compute_capability", None) == "9.0"


def _table_picks(op: str, kernel: str, **call) -> bool:
    """Whether :func:`pallas_kernels.table.select` runs ``kernel`` for this call on this GPU under ``pallas``."""
    from pallas_kernels import table

    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    return table.select(op, table.Call(**call), impl="pallas", platform="gpu", capability=capability).kernel == kernel


def _cudnn(q, k, v, seg=None):
    """What ``attention_impl`` cudnn runs (:func:`pallas_kernels.dispatch._cudnn`): causal, segments as a mask."""
    from pallas_kernels.dispatch import _cudnn as cudnn

    return cudnn(q, k, v, None, None, seg, seg)


def _mosaic_flash(q, k, v, pos):
    from pallas_kernels.flash_attention_mosaic import flash_attention_mosaic

    return flash_attention_mosaic(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos)


def _poison(nbytes: int) -> None:
    """Fill free device memory with NaN: allocate NaN buffers of ``nbytes`` (in a few blocks) and free them."""
    n = max(1, nbytes // 4)
    blocks = [jnp.full((n,), jnp.nan, jnp.float32) for _ in range(4)]
    jax.block_until_ready(blocks)
    for b in blocks:
        b.delete()


def _normal(key, shape, dtype) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _compare(table: Table, case: str, got, want, dtype: str) -> None:
    """Every output leaf within tol(dtype) * max |want|; NaN anywhere (an unwritten element) fails."""
    worst, ok = 0.0, True
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        scale = max(float(np.abs(w).max()), 1e-6)
        err = float(np.abs(g - w).max()) / scale if np.isfinite(g).all() else float("inf")
        worst = max(worst, err)
        ok &= err <= TOL[dtype]
    table.add("check", case, bool(ok), max_rel_err=worst, tol=TOL[dtype])


def _check(table: Table, case: str, fn: Callable, ref: Callable, args: tuple, dtype: str, grad: bool = True) -> None:
    """Forward (and gradients of sum(out * cotangent)) of ``fn`` against ``ref`` on float32 copies of ``args``."""
    if not table.wanted(case):
        return
    try:
        fwd = jax.jit(fn)
        out_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(fn, *args)))
        _poison(out_bytes)
        got = jax.block_until_ready(fwd(*args))
        f32 = tuple(a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args)
        _compare(table, case + " fwd", got, jax.jit(ref)(*f32), dtype)
        if not grad:
            return
        cot = _normal(table.key(), got.shape, jnp.float32)
        n = sum(jnp.issubdtype(a.dtype, jnp.floating) for a in args)

        def loss(f):
            return lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cot)

        _poison(sum(a.size * a.dtype.itemsize for a in args[:n]))
        got_g = jax.block_until_ready(jax.jit(jax.grad(loss(fn), tuple(range(n))))(*args))
        want_g = jax.jit(jax.grad(loss(ref), tuple(range(n))))(*f32)
        _compare(table, case + " grad", got_g, want_g, dtype)
    except Exception as e:  # a kernel that does not compile or run is a failed check, not a crash
        table.add("check", case, False, error=str(e).splitlines()[0][:160])


def check_kernels(table: Table, smoke: bool) -> None:
    interpret = smoke
    key = table.key()
    B, T, H, K = (1, 40, 4, 2) if smoke else (2, 1024, 16, 4)
    dtypes = ["float32"] if smoke else ["bfloat16", "float16", "float32"]
    for D in (32,) if smoke else (64, 128):
        for dtype in dtypes:
            key, *ks = jax.random.split(key, 5)
            q, k, v = (_normal(kk, (B, T, n, D), dtype) for kk, n in zip(ks, (H, K, K)))
            pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            seg = jnp.broadcast_to((jnp.arange(T) >= T // 3).astype(jnp.int32), (B, T))  # two packed documents
            backends = [] if smoke else ["triton"]  # smoke: the segment-id case below covers the Triton kernel
            mosaic = _hopper() and _table_picks("attention", "flash_mosaic", dtype=dtype, head_dim=D, group=H // K)
            cudnn = not smoke and dtype != "float32"
            for backend in backends + (["mosaic"] if mosaic else []) + (["cudnn"] if cudnn else []):
                def flash(q, k, v, backend=backend):
                    if backend == "mosaic":  # Mosaic GPU forward, Triton backward
                        return _mosaic_flash(q, k, v, pos)
                    if backend == "cudnn":
                        return _cudnn(q, k, v)
                    return flash_attention(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos, interpret=interpret)

                def ref(q, k, v):
                    return attention_reference(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos)

                _check(table, f"flash {backend} d={D} {dtype} gqa={H // K}", flash, ref, (q, k, v), dtype)
            if dtype != "float16":
                def flash_seg(q, k, v):
                    return flash_attention(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos,
                                           q_segment_ids_BxT=seg, interpret=interpret)

                def ref_seg(q, k, v):
                    return attention_reference(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos, q_segment_ids_BxT=seg)

                _check(table, f"flash triton d={D} {dtype} segment ids", flash_seg, ref_seg, (q, k, v), dtype)
                if cudnn:
                    _check(table, f"flash cudnn d={D} {dtype} segment ids", lambda q, k, v: _cudnn(q, k, v, seg),
                           ref_seg, (q, k, v), dtype)
    # decode: one new token per sequence over ragged caches, contiguous and paged
    B, S, H, K, D, page = (2, 48, 4, 2, 16, 16) if smoke else (8, 8192, 32, 8, 128, 64)
    dtype = "float32" if smoke else "bfloat16"
    key, kq, kk, kv, kl, kp = jax.random.split(key, 6)
    q = _normal(kq, (B, 1, H, D), dtype)
    k, v = _normal(kk, (B, S, K, D), dtype), _normal(kv, (B, S, K, D), dtype)
    lengths = jax.random.randint(kl, (B,), 1, S + 1)
    _check(table, f"decode contiguous S={S} {dtype}", lambda q, k, v: decode_attention(q, k, v, lengths, interpret=interpret),
           lambda q, k, v: decode_attention_reference(q, k, v, lengths), (q, k, v), dtype, grad=False)
    pages = B * S // page
    page_table = jax.random.permutation(kp, pages).reshape(B, S // page).astype(jnp.int32)
    kpool, vpool = k.reshape(pages, page, K, D), v.reshape(pages, page, K, D)
    _check(table, f"decode paged page={page} {dtype}",
           lambda q, k, v: decode_attention(q, k, v, lengths, page_table_BxP=page_table, interpret=interpret),
           lambda q, k, v: decode_attention_reference(q, k, v, lengths, page_table_BxP=page_table),
           (q, kpool, vpool), dtype, grad=False)
    # GEMMs on the projection shapes of the training model (4096 tokens)
    shapes = [(64, 96, 64)] if smoke else [(4096, 2048, 2048), (4096, 512, 2048), (4096, 8192, 2048), (4096, 2048, 8192)]
    for i, (M, N, Kd) in enumerate(shapes):
        for dtype in dtypes if i == 0 else dtypes[:1]:  # every dtype on one shape, bfloat16 on the rest
            key, ka, kb, kc = jax.random.split(key, 4)
            a, b, c = _normal(ka, (M, Kd), dtype), _normal(kb, (Kd, N), dtype), _normal(kc, (Kd, N), dtype)
            _check(table, f"matmul triton {M}x{N}x{Kd} {dtype}", lambda a, b: matmul(a, b, interpret=interpret),
                   jnp.dot, (a, b), dtype)
            if _hopper() and _table_picks("projection", "matmul_mosaic", dtype=dtype, mnk=(M, N, Kd)):
                from pallas_kernels.matmul_mosaic import matmul as matmul_mosaic

                _check(table, f"matmul mosaic {M}x{N}x{Kd} {dtype}", matmul_mosaic, jnp.dot, (a, b), dtype)
            _check(table, f"swiglu triton {M}x{N}x{Kd} {dtype}", lambda a, b, c: swiglu(a, b, c, interpret=interpret),
                   lambda a, b, c: jax.nn.silu(a @ b) * (a @ c), (a, b, c), dtype)


def _timed(table: Table, case: str, fn: Callable, *args, iters: int) -> float | None:
    """Seconds per call, or None after a row saying why it could not run (no cuDNN attention, out of memory)."""
    try:
        return _time(fn, *args, iters=iters)
    except Exception as e:
        table.add("speed", case, None, error=str(e).splitlines()[0][:160])
        return None


def time_kernels(table: Table, smoke: bool) -> None:
    iters = 1 if smoke else 10
    on_gpu = not smoke
    dtype = jnp.float32 if smoke else jnp.bfloat16
    key = table.key()
    H, K = (4, 2) if smoke else (32, 8)
    for T, D in [(32, 32)] if smoke else [(2048, 64), (2048, 128), (8192, 64), (8192, 128)]:
        B = max(1, (64 if smoke else 16384) // T)
        ks = jax.random.split(key, 3)
        q, k, v = _normal(ks[0], (B, T, H, D), dtype), _normal(ks[1], (B, T, K, D), dtype), _normal(ks[2], (B, T, K, D), dtype)
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        seg = jnp.broadcast_to((jnp.arange(T) >= T // 3).astype(jnp.int32), (B, T))  # two packed documents
        impls = {
            "triton": lambda q, k, v: flash_attention(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos, interpret=smoke),
            "xla": lambda q, k, v: attention_reference(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos),
        }
        if _hopper() and _table_picks("attention", "flash_mosaic", dtype=dtype, head_dim=D, group=H // K):
            impls["mosaic"] = lambda q, k, v: _mosaic_flash(q, k, v, pos)
        if on_gpu:
            impls["cudnn"] = lambda q, k, v: _cudnn(q, k, v)
            impls["cudnn segment ids"] = lambda q, k, v: _cudnn(q, k, v, seg)
        impls["triton segment ids"] = lambda q, k, v: flash_attention(
            q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos, q_segment_ids_BxT=seg, interpret=smoke)
        flops = 4 * B * H * T * T * D / 2  # causal (segment rows: the same count, for comparison)
        for name, fn in impls.items():
            label = f"flash {name}"
            grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2)))
            case = f"{label} T={T} d={D} gqa={H // K} B={B}"
            if not table.wanted(case):
                continue
            t_f = _timed(table, case, jax.jit(fn), q, k, v, iters=iters)
            # smoke: the interpreted backward costs a minute of compiling and measures nothing
            t_fb = float("nan") if smoke and name != "xla" else _timed(table, case + " fwd+bwd", grad, q, k, v, iters=iters)
            if t_f is None or t_fb is None:
                continue
            table.add("speed", case, None, fwd_ms=t_f * 1e3,
                      fwd_tflops=flops / t_f / 1e12, fwd_bwd_ms=t_fb * 1e3, fwd_bwd_tflops=3.5 * flops / t_fb / 1e12)
    shapes = [(64, 96, 64)] if smoke else [(8192, 4096, 4096), (8192, 1024, 4096), (8192, 14336, 4096), (8192, 4096, 14336)]
    gemms = {"triton": lambda a, b: matmul(a, b, interpret=smoke), "xla": jnp.dot}
    if _hopper():
        from pallas_kernels.matmul_mosaic import matmul as matmul_mosaic

        gemms["mosaic"] = matmul_mosaic
    for M, N, Kd in shapes:
        a, b = _normal(key, (M, Kd), dtype), _normal(jax.random.fold_in(key, 1), (Kd, N), dtype)
        for name, fn in gemms.items():
            if not table.wanted(f"gemm {name} {M}x{N}x{Kd}"):
                continue
            t = _timed(table, f"gemm {name} {M}x{N}x{Kd}", jax.jit(fn), a, b, iters=iters)
            if t is not None:
                table.add("speed", f"gemm {name} {M}x{N}x{Kd}", None, ms=t * 1e3, tflops=2 * M * N * Kd / t / 1e12)
    B, H, K, D = (2, 4, 2, 16) if smoke else (16, 32, 8, 128)
    for S in (48,) if smoke else (8192, 32768):
        ks = jax.random.split(key, 3)
        q = _normal(ks[0], (B, 1, H, D), dtype)
        k, v = _normal(ks[1], (B, S, K, D), dtype), _normal(ks[2], (B, S, K, D), dtype)
        lengths = jnp.full((B,), S, jnp.int32)
        kv_bytes = 2 * B * S * K * D * jnp.dtype(dtype).itemsize
        for name, fn in (("pallas", lambda q, k, v: decode_attention(q, k, v, lengths, interpret=smoke)),
                         ("xla", lambda q, k, v: decode_attention_reference(q, k, v, lengths))):
            if not table.wanted(f"decode {name} S={S} B={B}"):
                continue
            t = _timed(table, f"decode {name} S={S} B={B}", jax.jit(fn), q, k, v, iters=iters)
            if t is not None:
                table.add("speed", f"decode {name} S={S} B={B}", None, ms=t * 1e3, kv_gb_per_s=kv_bytes / t / 1e9)


TRAIN_1B = [  # ~1.0B parameters on the embedded corpus (vocabulary 4096)
    "model.embed_dim=2048", "model.num_layers=16", "model.num_heads=32", "model.num_kv_heads=8", "model.head_dim=64",
    "model.mlp_dim=8192", "model.compute_dtype=bfloat16", "model.remat=full", "data.seq_len=2048",
    "train.batch_size=8", "train.steps=20", "train.warmup_steps=5", "train.learning_rate=3e-4",
    "train.eval_every=20", "train.eval_batches=1", "train.progress=false", "mesh.fsdp=-1",
]
TRAIN_SMOKE = ["train.steps=2", "train.warmup_steps=1", "train.batch_size=8", "train.eval_every=2",
               "train.eval_batches=1", "train.progress=false", "model.compute_dtype=float32"]


def train_both(table: Table, smoke: bool, pairs: list[str] | None = None) -> None:
    """Train each ``attention_impl/matmul_impl`` pair from the same start; the last pair is the
    reference every other one's losses must match step by step."""
    import jaxlm

    repo = pathlib.Path(__file__).resolve().parent.parent
    base = ["configs/tiny.yaml", TRAIN_SMOKE] if smoke else ["configs/demo.yaml", TRAIN_1B]
    # on CPU `auto` is XLA: smoke runs the kernels in the interpreter
    pairs = pairs or (["pallas/pallas", "xla/xla"] if smoke else ["auto/auto", "xla/xla"])
    histories = {}
    for pair in pairs:
        attention_impl, matmul_impl = pair.split("/")
        cfg = jaxlm.load_config(repo / base[0], [*base[1], f"model.attention_impl={attention_impl}",
                                                 f"model.matmul_impl={matmul_impl}"])
        start = time.perf_counter()
        try:
            result = jaxlm.train(cfg)
        except Exception as e:  # a training that fails is a failed row; the others still run
            table.add("train", f"{pair}: training", False, error=str(e).splitlines()[0][:160])
            continue
        wall = time.perf_counter() - start
        h = result.history
        steady = h[len(h) // 4:] or h
        histories[pair] = [x["loss"] for x in h]
        mfu = [x["mfu"] for x in steady if "mfu" in x]
        table.add("train", f"{pair}: {len(h)} steps", None, loss_first=h[0]["loss"], loss_last=h[-1]["loss"],
                  step_ms=statistics.median(x["step_time_s"] for x in steady) * 1e3,
                  tokens_per_s=statistics.median(x["tokens_per_s"] for x in steady),
                  mfu=statistics.median(mfu) if mfu else float("nan"), wall_s=wall, losses=histories[pair])
    reference = pairs[-1]
    if reference not in histories:
        return
    b = np.asarray(histories[reference])
    for pair, losses in histories.items():
        if pair != reference:
            worst = float(np.max(np.abs(np.asarray(losses) - b) / np.abs(b)))
            table.add("train", f"losses {pair} vs {reference}, every step", bool(worst <= TRAIN_LOSS_RTOL),
                      max_rel_diff=worst, tol=TRAIN_LOSS_RTOL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", dest="smoke", action="store_true", help="tiny sizes on CPU (checks the plumbing only)")
    p.add_argument("--seed", type=int, default=None, help="random inputs (default: from the clock)")
    p.add_argument("--sections", nargs="+", choices=("check", "speed", "train"), default=["check", "speed", "train"])
    p.add_argument("--only", default=None, metavar="REGEX",
                   help="check and time only the cases whose name matches (e.g. 'cudnn|d=64')")
    p.add_argument("--train", nargs="+", default=None, metavar="ATTENTION/MATMUL",
                   help="the attention_impl/matmul_impl pairs to train; the last is the reference "
                        "(default: auto/auto xla/xla)")
    p.add_argument("--out", default="benchmarks/out/gpu_acceptance.json")
    args = p.parse_args(argv)
    device = jax.devices()[0]
    if device.platform not in ("gpu", "cuda") and not args.smoke:
        print(f"gpu_acceptance: error: no GPU here (jax sees {device.platform}); run on a GPU, or pass --cpu-smoke "
              "to check the script's plumbing at tiny sizes", file=sys.stderr)
        return 2
    seed = int(time.time()) % 2**31 if args.seed is None else args.seed
    meta = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
            "python": sys.version.split()[0], "seed": seed, "smoke": args.smoke}
    print(f"gpu_acceptance on {meta['device']} ({meta['platform']}), jax {meta['jax']}, Python {meta['python']}, "
          f"seed {seed}", flush=True)
    start = time.perf_counter()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows_log = out.with_suffix(".rows.jsonl")
    rows_log.write_text("")
    table, seconds = Table(seed, rows_log, args.only), {}
    sections = {"check": check_kernels, "speed": time_kernels,
                "train": lambda table, smoke: train_both(table, smoke, args.train)}
    for name, fn in sections.items():
        if name in args.sections:
            t0 = time.perf_counter()
            fn(table, args.smoke)
            seconds[name] = time.perf_counter() - t0
    meta["seconds"] = {**seconds, "total": time.perf_counter() - start}
    failed = [r["case"] for r in table.rows if r["ok"] is False]
    out.write_text(json.dumps({"meta": meta, "rows": table.rows, "failed": failed}, indent=1))
    print(f"{len(table.rows)} rows, {len(failed)} failed, {meta['seconds']['total']:.0f} s; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
