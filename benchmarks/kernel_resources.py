"""What each kernel configuration costs on real GPUs: registers, shared memory, spills, threads.

    python benchmarks/kernel_resources.py [--targets h100 a100] [--out benchmarks/out/kernel_resources.json]
                                          [--results benchmarks/RESULTS.md]

No GPU needed: every configuration the kernel table can pick (and the known-bad ones) is
compiled for each target by ``pallas_kernels.resources`` in its own process (the CUDA compile
toolchain of ``make install``), then printed as one markdown table, written as JSON, and put in
``RESULTS.md`` between the ``kernel-resources`` markers.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jaxlm  # noqa: E402,F401  (before sharding: sharding.mesh and jaxlm import each other)
from pallas_kernels.resources import KernelResource, problems  # noqa: E402
from sharding.targets import get_target, gpu_compile_env  # noqa: E402

BEGIN, END = "<!-- kernel-resources:begin -->", "<!-- kernel-resources:end -->"


def measure(targets: list[str]) -> tuple[list[KernelResource], dict[str, float]]:
    """Compile every case for each target, one process per target, all at once."""
    with tempfile.TemporaryDirectory() as tmp:
        start, procs, seconds = time.perf_counter(), {}, {}
        for target in targets:
            out = pathlib.Path(tmp) / f"{target}.json"
            cmd = [sys.executable, "-m", "pallas_kernels.resources", "--target", target, "--json", str(out)]
            procs[target] = (subprocess.Popen(cmd, cwd=ROOT, env=gpu_compile_env()), out)
        rows = []
        for target, (proc, out) in procs.items():
            if proc.wait():
                raise SystemExit(f"compiling for {target} failed (exit {proc.returncode})")
            seconds[target] = time.perf_counter() - start
            rows += [KernelResource(**r) for r in json.loads(out.read_text())]
        return rows, seconds


def markdown(rows: list[KernelResource]) -> str:
    head = "| kernel | config | shape | target | GPU function | registers | shared memory (B) | spills (B) | threads | verdict |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        found = problems(r, get_target(r.target))
        verdict = ("ok" if not found else "; ".join(found)) if r.expect_ok else (
            "flagged (negative test): " + "; ".join(found) if found else "NOT flagged")
        cells = [r.kernel, r.config, r.shape, r.target, r.entry, r.registers, r.shared_memory, r.spill_bytes, r.threads, verdict]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", default=["h100", "a100"])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "kernel_resources.json"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = p.parse_args()
    rows, seconds = measure(args.targets)
    table = markdown(rows)
    print(table)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"compile_seconds": seconds, "rows": [r.__dict__ for r in rows]}, indent=1))
    results = pathlib.Path(args.results)
    text = results.read_text()
    took = ", ".join(f"{t} done after {s:.0f} s" for t, s in seconds.items())
    section = (f"{BEGIN}\n{table}\n\nCompiled on a 2-core CPU machine with jax {jaxlm_jax_version()}, the targets in "
               f"parallel ({took}).\n{END}")
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Kernel resources (`benchmarks/kernel_resources.py`)\n\n" + section + "\n"
    results.write_text(text)


def jaxlm_jax_version() -> str:
    import jax

    return jax.__version__


if __name__ == "__main__":
    main()
