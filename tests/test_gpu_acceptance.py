"""benchmarks/gpu_acceptance.py without a GPU: its plumbing at tiny sizes (--cpu-smoke), its refusal
to pretend on a CPU, and that a kernel leaving part of its output unwritten fails its check."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_acceptance.py")


def _load_script():
    sys.path.insert(0, os.path.dirname(SCRIPT))  # it imports benchmarks/kernels.py beside it
    try:
        spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))


def _run(*args, timeout=900):
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_cpu_smoke_runs_every_section_and_passes(tmp_path):
    out = tmp_path / "acceptance.json"
    proc = _run("--cpu-smoke", "--seed", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["failed"] == [] and report["meta"]["seed"] == 3 and report["meta"]["smoke"]
    checks = [r["case"] for r in rows if r["section"] == "check"]
    for kernel in ("flash triton", "decode contiguous", "decode paged", "matmul triton", "swiglu triton"):
        assert any(c.startswith(kernel) and c.endswith("fwd") for c in checks), kernel
    assert any(c.startswith("flash") and c.endswith("grad") for c in checks)
    assert all(r["ok"] and r["max_rel_err"] <= r["tol"] for r in rows if r["section"] == "check")
    speed = {r["case"].split()[0] for r in rows if r["section"] == "speed"}
    assert speed == {"flash", "gemm", "decode"}
    train = [r for r in rows if r["section"] == "train"]
    assert len(train) == 3 and train[-1]["ok"]  # pallas (interpreter) and xla losses agree step by step
    assert all(r["loss_last"] < r["loss_first"] for r in train[:2])
    assert set(report["meta"]["seconds"]) == {"check", "speed", "train", "total"}
    assert "rows, 0 failed" in proc.stdout  # the table was printed
    # every row was also appended as it came (what a run stopped by a timeout keeps)
    kept = [json.loads(line) for line in out.with_suffix(".rows.jsonl").read_text().splitlines()]
    assert kept == rows


def test_only_keeps_the_matching_cases_and_train_pairs_name_the_reference(tmp_path):
    module = _load_script()
    table = module.Table(0, only="cudnn|decode paged")
    assert table.wanted("flash cudnn d=64 bfloat16 gqa=4") and table.wanted("decode paged page=64 bfloat16")
    assert not table.wanted("flash triton d=64 bfloat16 gqa=4") and module.Table(0).wanted("anything")
    calls = []
    table = module.Table(0)
    table.add = lambda *a, **k: calls.append(a)  # record the rows without training
    import jaxlm

    histories = iter([[{"loss": 2.0, "step_time_s": 1.0, "tokens_per_s": 1.0}] * 4,
                      [{"loss": 2.1, "step_time_s": 1.0, "tokens_per_s": 1.0}] * 4])

    class Result:
        def __init__(self):
            self.history = next(histories)

    real = jaxlm.train
    jaxlm.train = lambda cfg: Result()
    try:
        module.train_both(table, smoke=True, pairs=["pallas/xla", "xla/xla"])
    finally:
        jaxlm.train = real
    assert [c[1] for c in calls] == ["pallas/xla: 4 steps", "xla/xla: 4 steps", "losses pallas/xla vs xla/xla, every step"]
    assert calls[-1][2] is False  # 5% apart: over the 2% tolerance


def test_refuses_to_run_on_a_cpu_without_smoke_flag(tmp_path):
    proc = _run("--out", str(tmp_path / "x.json"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu_acceptance: error: no GPU here")
    assert not (tmp_path / "x.json").exists()


def test_an_unwritten_output_element_fails_the_check():
    """A kernel that writes only the first half of its output: the unwritten half reads as the
    poison (NaN), so the check fails; the same kernel writing everything passes."""
    acceptance = _load_script()

    def kernel(rows_written):
        def body(x_ref, o_ref):
            o_ref[:rows_written, :] = x_ref[:rows_written, :] * 2.0

        return lambda x: pl.pallas_call(body, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)

    x = jax.random.normal(jax.random.key(0), (8, 16), jnp.float32)
    table = acceptance.Table(seed=0)
    acceptance._check(table, "half written", kernel(4), lambda x: x * 2.0, (x,), "float32", grad=False)
    acceptance._check(table, "all written", kernel(8), lambda x: x * 2.0, (x,), "float32", grad=False)
    half, full = table.rows
    assert half["ok"] is False and half["max_rel_err"] == float("inf")
    assert full["ok"] is True and full["max_rel_err"] == 0.0
