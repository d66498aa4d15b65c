"""Every kernel configuration the kernel table can pick, compiled for real GPUs (sm_90 and sm_80).

No GPU needed: ``pallas_kernels.resources`` compiles each configuration with XLA's CUDA
pipeline for a compile-only H100 / A100 and reads ``ptxas -v`` and XLA's launch records. Each
target compiles in its own process (Mosaic GPU caches kernels by content, not by target); the
two tests run in parallel under xdist. The checker's own logic is tested on recorded reports.
"""

import json
import subprocess
import sys

import jax
import pytest

from pallas_kernels import resources, table
from sharding import targets
from tests.conftest import REPO, gpu_env

# the three configurations that pass interpret mode and cross-lowering, and what the compiler says
KNOWN_BAD = {
    "h100": {
        "block_q=128 block_k=512": "requested 294912, available: 232448",  # the flash forward's shared memory
        "block_q=256 block_k=128": "spills",
        "256x256x256 warps=8 stages=3": "requested 786432, available: 232448",
    },
    "a100": {  # sm_80 pipelines differently: the first two spill, the GEMM asks for two stages' worth
        "block_q=128 block_k=512": "spills",
        "block_q=256 block_k=128": "spills",
        "256x256x256 warps=8 stages=3": "requested 524288, available: 166912",
    },
}


def _measure(target: str, tmp_path) -> list[resources.KernelResource]:
    out = tmp_path / f"{target}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pallas_kernels.resources", "--target", target, "--json", str(out)],
        cwd=REPO, env=gpu_env(), capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [resources.KernelResource(**row) for row in json.loads(out.read_text())]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["h100", "a100"])  # sm_90 (Mosaic kernels too) and sm_80
def test_every_pickable_configuration_compiles_clean_and_known_bad_ones_are_flagged(target, tmp_path):
    spec = targets.get_target(target)
    rows = _measure(target, tmp_path)
    good = [r for r in rows if r.expect_ok]
    bad = {f"{r.kernel}[{r.config}]({r.shape}) {r.entry}": resources.problems(r, spec)
           for r in good if resources.problems(r, spec)}
    assert not bad, f"configurations the table can pick fail on {target}: {bad}"

    # every case the table lists was compiled, with the kernels it should contain
    names = {c.name: c for c in resources.cases(spec)}
    by_case = {}
    for r in good:
        by_case.setdefault(f"{r.kernel}[{r.config}]({r.shape})", []).append(r.entry)
    assert set(by_case) == {n for n, c in names.items() if c.expect_ok}
    for name, entries in by_case.items():
        if name.startswith("flash_triton"):
            assert sorted(entries) == ["flash_attention_dkdv", "flash_attention_dq", "flash_attention_fwd"], name
        if name.startswith("flash_mosaic"):
            assert sorted(e.split(":")[0] for e in entries) == ["flash_attention_dkdv", "flash_attention_dq", "mosaic"]
    assert any(n.startswith("flash_mosaic") for n in by_case) == (spec.capability[0] == 9)
    # XLA from jaxlib 0.11 on writes no PTX for the Triton kernels: no registers or spills to read there
    assert all(r.ptxas_report for r in rows if not r.error) or jax.__version_info__ >= (0, 11)
    for r in good:  # plausible figures: the compiler filled in every field
        assert r.threads in (128, 256, 384) and r.shared_memory > 0
        assert 0 < r.registers <= 255 if r.ptxas_report else r.registers is None

    flagged = {r.config: resources.problems(r, spec) for r in rows if not r.expect_ok}
    assert set(flagged) == set(KNOWN_BAD[target])
    for config, words in KNOWN_BAD[target].items():
        if words == "spills" and not any(r.ptxas_report for r in rows if r.config == config and not r.expect_ok):
            continue  # a spill is seen only in a ptxas report
        assert any(words in p for p in flagged[config]), (config, flagged[config])


_PTXAS = """ptxas warning : Registers are spilled to local memory in function 'flash_attention_fwd', 1548 bytes spill stores, 1596 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'flash_attention_fwd' for 'sm_90a'
ptxas info    : Function properties for flash_attention_fwd
    1552 bytes stack frame, 1548 bytes spill stores, 1596 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1552 bytes cumulative stack size
ptxas info    : Compiling entry function 'matmul' for 'sm_90a'
ptxas info    : Function properties for matmul
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 154 registers, used 1 barriers
"""


def test_ptxas_report_parsing():
    assert resources._parse_ptxas(_PTXAS) == {
        "flash_attention_fwd": {"stack_bytes": 1552, "spill_bytes": 1548 + 1596, "registers": 255},
        "matmul": {"stack_bytes": 0, "spill_bytes": 0, "registers": 154},
    }


def test_checker_flags_each_limit():
    h100, a100 = targets.get_target("h100"), targets.get_target("a100")
    row = dict(op="projection", kernel="matmul_triton", config="c", shape="s", target="h100", entry="matmul",
               threads=256, registers=200, shared_memory=200_000, spill_bytes=0, stack_bytes=0)
    assert resources.problems(resources.KernelResource(**row), h100) == []
    assert resources.problems(resources.KernelResource(**row), a100) == ["shared memory 200000 B > 166912 B"]
    assert resources.problems(resources.KernelResource(**{**row, "spill_bytes": 8}), h100) == ["spills 8 B per thread"]
    assert "does not compile: boom" in resources.problems(resources.KernelResource(**{**row, "error": "boom"}), h100)
    assert resources.problems(resources.KernelResource(**{**row, "registers": None}), h100) == [
        "no ptxas report or launch record found"]


def test_cases_cover_every_block_table_row():
    from pallas_kernels.matmul import BLOCK_TABLE, SWIGLU_BLOCK_TABLE

    for name, capability in (("h100", 9), ("a100", 8)):
        configs = {(c.kernel, c.config) for c in resources.cases(targets.get_target(name)) if c.expect_ok}
        want = {("flash_triton", b.describe()) for b in table.BLOCKS["flash_triton"].values()}
        want |= {("decode_triton", b.describe()) for b in table.BLOCKS["decode_triton"].values()}
        want |= {("matmul_triton", b.describe()) for b in BLOCK_TABLE.values()}
        want |= {("swiglu_triton", b.describe()) for b in SWIGLU_BLOCK_TABLE.values()}
        if capability == 9:
            want |= {("flash_mosaic", b.describe()) for b in table.BLOCKS["flash_mosaic"].values()}
        assert want <= configs
        assert any(k == "matmul_mosaic" for k, _ in configs) == (capability == 9)
