"""Compile every kernel configuration for a real GPU target and measure what the compiler made.

No GPU is needed: the arguments are ``jax.ShapeDtypeStruct`` on a compile-only device
(:func:`sharding.targets.compile_only_devices`) and ``jax.jit(f).trace(...).lower().compile()``
runs XLA's whole CUDA pipeline. Triton kernels go TTIR -> PTX -> ``ptxas`` inside XLA (a
shared-memory overflow raises from ``compile()``); their PTX lands in ``xla_dump_to``, and
``ptxas -v -arch=<target>`` on it reports registers, spills and stack (XLA from jaxlib 0.11 on
writes no such PTX: there the Triton rows carry ``ptxas_report=False``, and only compiling, threads
and shared memory are checked). XLA's thunk sequence
gives each kernel's threads per block and dynamic shared memory. Mosaic GPU kernels compile in
the same step; ``MOSAIC_GPU_DUMP_TO`` makes Mosaic write their PTX, its ``ptxas`` report and
the MLIR whose launch carries the dynamic shared memory size.

One :class:`KernelCase` is one compile (usually a forward+backward, so several GPU kernels);
one :class:`KernelResource` is one GPU kernel of it. :func:`cases` lists, from the kernel table
(:mod:`pallas_kernels.table`), every block configuration ``select()`` can pick for a target,
at representative shapes, plus the known-bad configurations the checker must flag.
:func:`problems` is the checker: compiles, zero spill bytes, shared memory within the target's
opt-in limit, registers within 255 per thread.

Run one target per process (Mosaic GPU caches compiled kernels by content, not by target):
``python -m pallas_kernels.resources --target h100 --json out.json`` under
:func:`sharding.targets.gpu_compile_env` (done by ``benchmarks/kernel_resources.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import table

_THUNK = re.compile(r"kCustomKernel.*?\]\s+(\S+) grid: \[[^\]]*\] threads: \[(\d+), (\d+), (\d+)\]\s+shared_memory: (\d+) bytes")
_PALLAS_NAME = re.compile(r'custom_call_target="__gpu\$xla\.gpu\.triton".*?, name = "([^"]+)"')
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_MOSAIC_SMEM = re.compile(rb"dynamic_shared_memory_size %c(\d+)_i32")
_MAXNTID = re.compile(r"\.(?:maxntid|reqntid) (\d+), (\d+), (\d+)")


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One compile: ``build(sharding)`` returns ``(function, abstract arguments)``."""

    op: str  # the kernel table's op
    kernel: str  # the table's candidate name
    config: str  # the block configuration, as the table prints it
    shape: str  # what the arguments are, in words
    build: Callable
    expect_ok: bool = True  # False: a known-bad configuration the checker must flag

    @property
    def name(self) -> str:
        return f"{self.kernel}[{self.config}]({self.shape})"


@dataclasses.dataclass
class KernelResource:
    """What one GPU kernel of a case needs. ``error`` is set when the case did not compile."""

    op: str
    kernel: str
    config: str
    shape: str
    target: str
    entry: str  # the GPU function's name
    threads: int | None = None
    registers: int | None = None
    shared_memory: int | None = None  # dynamic bytes per block
    spill_bytes: int | None = None  # stores + loads
    stack_bytes: int | None = None
    ptxas_report: bool = True  # False: XLA wrote no PTX to read (jaxlib >= 0.11 for Triton kernels)
    expect_ok: bool = True
    error: str | None = None


def problems(row: KernelResource, target) -> list[str]:
    """Why ``row`` may not be picked on ``target`` (:class:`sharding.targets.GpuTarget`); empty when fine."""
    if row.error:
        return [f"does not compile: {row.error}"]
    found = []
    if row.spill_bytes:
        found.append(f"spills {row.spill_bytes} B per thread")
    if row.shared_memory is not None and row.shared_memory > target.shared_memory_per_block_optin:
        found.append(f"shared memory {row.shared_memory} B > {target.shared_memory_per_block_optin} B")
    if row.registers is not None and row.registers > target.registers_per_thread_limit:
        found.append(f"{row.registers} registers > {target.registers_per_thread_limit}")
    if (row.ptxas_report and row.registers is None) or row.shared_memory is None or row.threads is None:
        found.append("no ptxas report or launch record found")
    return found


# --------------------------------------------------------------------------------------------
# the cases


def _sds(sharding, shape, dtype):
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)


def _flash_case(kernel, blocks, dtype, head_dim, segments, *, expect_ok=True, grad=True):
    B, T, H, K, D = 1, 1024, 8, 2, head_dim  # GQA: 4 query heads per kv head

    def build(s):
        q, k = _sds(s, (B, T, H, D), dtype), _sds(s, (B, T, K, D), dtype)
        pos = _sds(s, (B, T), jnp.int32)
        args = (q, k, k, pos) + ((pos,) if segments else ())

        def f(q, k, v, pos, seg=None):
            out = table.run_attention(kernel, blocks, q, k, v, pos, pos, seg, interpret=False)
            return out.astype(jnp.float32).sum()

        return (jax.value_and_grad(f, argnums=(0, 1, 2)) if grad else f), args

    what = f"{'fwd+bwd' if grad else 'fwd'} {jnp.dtype(dtype).name} D={D} T={T} GQA {H}/{K}{' segments' if segments else ''}"
    return KernelCase("attention", kernel, blocks.describe(), what, build, expect_ok)


def _decode_case(kernel, blocks, dtype, head_dim, q_len, *, paged, cache_len=32768, heads=(32, 8)):
    B, (H, K), D = 2, heads, head_dim

    def build(s):
        q = _sds(s, (B, q_len, H, D), dtype)
        lengths = _sds(s, (B,), jnp.int32)
        if paged:
            pages = cache_len // blocks.block_k
            cache = _sds(s, (B * pages + 1, blocks.block_k, K, D), dtype)
            table_ = _sds(s, (B, pages), jnp.int32)
            return (lambda q, k, v, n, t: table.run_decode(kernel, blocks, q, k, v, n, t, interpret=False)), (q, cache, cache, lengths, table_)
        cache = _sds(s, (B, cache_len, K, D), dtype)
        return (lambda q, k, v, n: table.run_decode(kernel, blocks, q, k, v, n, None, interpret=False)), (q, cache, cache, lengths)

    what = f"{jnp.dtype(dtype).name} D={D} T={q_len} cache={cache_len}{' paged' if paged else ''} GQA {H}/{K}"
    return KernelCase("cached_attention", kernel, blocks.describe(), what, build)


def _gemm_case(op, kernel, blocks, dtype, M, N, K, *, expect_ok=True, grad=True):
    def build(s):
        a, b = _sds(s, (M, K), dtype), _sds(s, (K, N), dtype)
        if op == "swiglu":
            def f(x, wg, wu):
                return table.run_swiglu(kernel, blocks, x, wg, wu, interpret=False).astype(jnp.float32).sum()

            return (jax.value_and_grad(f, argnums=(0, 1, 2)) if grad else f), (a, b, b)

        def g(x, w):
            return table.run_matmul(kernel, blocks, x, w, interpret=False).astype(jnp.float32).sum()

        return (jax.value_and_grad(g, argnums=(0, 1)) if grad else g), (a, b)

    what = f"{'fwd+bwd' if grad else 'fwd'} {jnp.dtype(dtype).name} M={M} N={N} K={K}"
    return KernelCase(op, kernel, blocks.describe(), what, build, expect_ok)


def cases(target) -> list[KernelCase]:
    """Every configuration :func:`pallas_kernels.table.select` can pick on ``target``, at
    representative shapes, then the known-bad configurations (``expect_ok=False``)."""
    out = []
    for case in table.pickable(target):
        kind = case["kind"]
        if kind == "attention":
            out.append(_flash_case(case["kernel"], case["blocks"], case["dtype"], case["head_dim"], case["segments"]))
        elif kind == "decode":
            out.append(_decode_case(case["kernel"], case["blocks"], case["dtype"], case["head_dim"], case["q_len"],
                                    paged=case["paged"], heads=case.get("heads", (32, 8))))
        else:
            out.append(_gemm_case(kind, case["kernel"], case["blocks"], case["dtype"], *case["mnk"],
                                  grad=case.get("grad", True)))
    for case in table.known_bad(target):
        if case["kind"] == "attention":
            out.append(_flash_case(case["kernel"], case["blocks"], case["dtype"], case["head_dim"], False,
                                   expect_ok=False, grad=False))
        else:
            out.append(_gemm_case(case["kind"], case["kernel"], case["blocks"], case["dtype"], *case["mnk"],
                                  expect_ok=False, grad=False))
    return out


# --------------------------------------------------------------------------------------------
# compiling and reading the compiler's reports


def _ptxas(ptx: pathlib.Path, arch: str, ptxas: str) -> dict[str, dict]:
    """``ptxas -v`` on one PTX file -> {entry: {registers, spill_bytes, stack_bytes}}."""
    proc = subprocess.run([ptxas, "-v", f"-arch={arch}", str(ptx), "-o", os.devnull],
                          capture_output=True, text=True, timeout=300)
    return _parse_ptxas(proc.stderr + proc.stdout)


def _parse_ptxas(report: str) -> dict[str, dict]:
    found, entry = {}, None
    for line in report.splitlines():
        if m := _ENTRY.search(line):
            entry = m.group(1)
            found[entry] = {}
        elif entry and (m := _SPILLS.search(line)):
            found[entry].update(stack_bytes=int(m.group(1)), spill_bytes=int(m.group(2)) + int(m.group(3)))
        elif entry and (m := _REGS.search(line)):
            found[entry]["registers"] = int(m.group(1))
    return found


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def measure(case: KernelCase, spec, sharding, workdir: pathlib.Path, ptxas: str) -> list[KernelResource]:
    """Compile ``case`` for ``spec`` and return one :class:`KernelResource` per Pallas kernel."""
    xla_dir, mosaic_dir = workdir / "xla", workdir / "mosaic"
    mosaic_dir.mkdir(parents=True, exist_ok=True)
    os.environ["MOSAIC_GPU_DUMP_TO"] = str(mosaic_dir)
    base = dict(op=case.op, kernel=case.kernel, config=case.config, shape=case.shape, target=spec.name,
                expect_ok=case.expect_ok)
    try:
        fn, args = case.build(sharding)
        # the abstract mesh names the target GPU: from jax 0.11 on, Pallas-Triton lowering asks it
        # (not the process's default device, a CPU here) for the compute capability
        with jax.sharding.use_abstract_mesh(sharding.mesh.abstract_mesh):
            lowered = jax.jit(fn).trace(*args).lower()
        lowered.compile(compiler_options={"xla_dump_to": str(xla_dir)})
    except Exception as e:  # the compiler's refusal is the measurement
        return [KernelResource(**base, entry="-", error=_one_line(e))]
    finally:
        os.environ.pop("MOSAIC_GPU_DUMP_TO", None)
    rows = []
    hlo = "\n".join(pathlib.Path(p).read_text() for p in glob.glob(str(xla_dir / "*after_optimizations.txt")))
    pallas_names = set(_PALLAS_NAME.findall(hlo))
    launches = {}
    for path in glob.glob(str(xla_dir / "*thunk_sequence.txt")):
        for m in _THUNK.finditer(pathlib.Path(path).read_text()):
            launches[m.group(1)] = (int(m.group(2)) * int(m.group(3)) * int(m.group(4)), int(m.group(5)))
    reports = {}
    ptx_files = glob.glob(str(xla_dir / "*.ptx"))
    for ptx in ptx_files:
        if pathlib.Path(ptx).stat().st_size:
            reports.update(_ptxas(pathlib.Path(ptx), spec.ptx_arch, ptxas))
    for name, (threads, smem) in sorted(launches.items()):  # XLA numbers repeated names: matmul_1 (matmul__1 from 0.11)
        if name in pallas_names or re.sub(r"_+\d+$", "", name) in pallas_names:
            rows.append(KernelResource(**base, entry=name, threads=threads, shared_memory=smem,
                                       ptxas_report=bool(ptx_files), **reports.get(name, {})))
    for report in sorted(glob.glob(str(mosaic_dir / "*.ptxas"))):
        stem = report[: -len(".ptxas")]
        parsed = _parse_ptxas(pathlib.Path(report).read_text())
        ptx = pathlib.Path(stem + ".ptx").read_text() if os.path.exists(stem + ".ptx") else ""
        threads = next((int(a) * int(b) * int(c) for a, b, c in _MAXNTID.findall(ptx)), None)
        smem = _mosaic_smem(pathlib.Path(stem + ".mlir-passes.log"))
        for info in parsed.values():
            rows.append(KernelResource(**base, entry=f"mosaic:{pathlib.Path(stem).name}", threads=threads,
                                       shared_memory=smem, **info))
    if not rows:
        rows.append(KernelResource(**base, entry="-", error="no Pallas kernel in the compiled program"))
    return rows


def _mosaic_smem(log: pathlib.Path) -> int | None:
    """The launch's dynamic shared memory, from the first IR dump of Mosaic's pass log."""
    if not log.exists():
        return None
    with open(log, "rb") as f:
        while chunk := f.read(1 << 20):
            if m := _MOSAIC_SMEM.search(chunk):
                return int(m.group(1))
    return None


def measure_all(target: str, selected: Callable[[KernelCase], bool] = lambda c: True) -> list[KernelResource]:
    """Compile every case of ``target`` in this process; the CUDA toolchain must be enabled."""
    from sharding.targets import compile_only_devices, get_target, ptxas_path

    # a persistent-cache hit would skip the compiler and the dumps read below (effective before the
    # process's first compile; sharding.targets.gpu_compile_env sets it for subprocesses)
    jax.config.update("jax_enable_compilation_cache", False)
    spec = get_target(target)
    mesh = jax.sharding.Mesh(compile_only_devices(spec, "1x1"), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rows = []
    with tempfile.TemporaryDirectory(prefix="jaxlm-kernels-") as tmp:
        for i, case in enumerate(c for c in cases(spec) if selected(c)):
            start = time.perf_counter()
            got = measure(case, spec, sharding, pathlib.Path(tmp) / str(i), ptxas_path())
            for row in got:
                row.config = case.config
            rows.extend(got)
            print(f"{spec.name} {case.name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--json", help="write the rows here (default: stdout)")
    parser.add_argument("--only", default="", help="compile only cases whose name contains this")
    args = parser.parse_args(argv)
    from sharding.targets import use_gpu_compile_toolchain

    use_gpu_compile_toolchain()
    rows = [dataclasses.asdict(r) for r in measure_all(args.target, lambda c: args.only in c.name)]
    text = json.dumps(rows, indent=1)
    if args.json:
        pathlib.Path(args.json).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
