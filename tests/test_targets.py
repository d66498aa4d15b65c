"""The GPU target table and compile-only devices: XLA compiles for each target as described."""

import json
import subprocess
import sys

import pytest

from jaxlm.metrics import peak_flops
from sharding import targets

# Compiles a sharded matmul for each target on 1x8 and 2x8 compile-only topologies and reports
# what XLA's devices say about themselves.
_PROBE = r"""
import json, sys
import jaxlm
from sharding import targets
targets.use_gpu_compile_toolchain()
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxlm.config import MeshConfig
from sharding.mesh import make_compile_only_mesh
from pallas_kernels.dispatch import device_info
out = {"backend": jax.default_backend()}
for name in targets.TARGETS:
    mesh = make_compile_only_mesh(MeshConfig(data=2, fsdp=-1, tensor=2), name, "2x8")
    x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P(("data", "fsdp"), "tensor")))
    compiled = jax.jit(lambda x: x @ x.T).trace(x).lower().compile()
    seen = []  # what kernel selection sees while tracing under the compile-only mesh
    with jax.set_mesh(mesh):
        jax.jit(lambda x: seen.append(device_info()) or x).trace(x)
    d = mesh.devices.flat[0]
    out[name] = {"kind": d.device_kind, "cc": d.compute_capability, "n": mesh.devices.size,
                 "hosts": len({d.process_index for d in mesh.devices.flat}),
                 "arg_bytes": compiled.memory_analysis().argument_size_in_bytes,
                 "text": compiled.as_text()[:200000], "selects_for": seen}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe():
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=targets.gpu_compile_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_each_target_compiles_as_itself(probe):
    assert probe["backend"] == "cpu"  # the process itself stays on the CPU
    for name, target in targets.TARGETS.items():
        got = probe[name]
        assert got["kind"] == target.device_kind and got["cc"] == target.compute_capability
        assert got["n"] == 16 and got["hosts"] == 2
        # per device: a [256/8, 512/2] bf16 shard of x
        assert got["arg_bytes"] == 256 // 8 * 512 // 2 * 2
        assert "custom-call" in got["text"] or "fusion" in got["text"]  # a GPU program, not the CPU's
        assert got["selects_for"] == [["gpu", target.compute_capability]]  # kernels are chosen for that GPU


def test_peak_flops_come_from_the_target_table():
    for target in targets.TARGETS.values():
        for dtype, peak in target.peak_flops.items():
            assert peak_flops(target.device_kind, dtype) == peak
    assert peak_flops("NVIDIA H100 PCIe", "bfloat16") == 989e12
    assert peak_flops("cpu", "bfloat16") is None
    # the ridge point: bf16 FLOP/s per HBM byte (H100 SXM: 989e12 / 3.35e12 ~ 295)
    assert targets.get_target("h100").ridge_flops_per_byte == pytest.approx(295, rel=0.01)


def test_names_and_topologies():
    assert targets.get_target("H100") is targets.TARGETS["h100"]
    assert targets.target_for_device_kind("NVIDIA H200 141GB HBM3e").name == "h200"
    assert targets.target_for_device_kind("cpu") is None
    with pytest.raises(ValueError, match="unknown GPU target 'v100'; choose one of h200, h100, a100"):
        targets.get_target("v100")
    assert targets.topology_name("2x8") == "1x2x8" and targets.topology_name("1x1x8") == "1x1x8"
    with pytest.raises(ValueError, match="HOSTSxGPUS"):
        targets.topology_name("8")
    with pytest.raises(ValueError, match="an HGX host holds at most 8"):  # refused before any device list is built
        targets.topology_name("1x100000000")
    with pytest.raises(ValueError, match="has 80000 GPUs; plans cover at most 65536"):
        targets.topology_name("10000x8")


def test_missing_toolchain_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(targets.GPU_COMPILE_DIR_ENV, str(tmp_path / "none"))
    with pytest.raises(RuntimeError, match="make install"):
        targets.gpu_compile_env()
