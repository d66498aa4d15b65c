"""The GPUs a compile can aim at without having one: ONE table of targets and their limits.

Each :class:`GpuTarget` carries what XLA needs to compile for it on a CPU machine (the
``stream_executor.GpuTargetConfigProto`` text, :meth:`GpuTarget.target_config`) and what the
rest of the library checks or estimates against: compute capability, the shared memory one
block may opt into, the register ceiling per thread, HBM bytes and bandwidth, and peak dense
FLOP/s per matmul dtype (:data:`PEAK_FLOPS`, which MFU reporting uses too).

Sources:

* Device limits (cores, shared memory, registers, HBM bytes and bandwidth, L2, clocks) are the
  figures XLA ships for these GPUs in ``xla/backends/gpu/target_config/specs/{h100_sxm,h200,
  a100_sxm_80}.txtpb`` (what ``cudaGetDeviceProperties`` reports on the real device). Only the
  fields the installed jaxlib's proto knows are written out, so the text parses on jax 0.10+.
* Peak FLOP/s: NVIDIA H100/H200 SXM and A100 SXM datasheets, dense (without sparsity);
  float32 is the non-tensor-core rate.
* 255 registers per thread: CUDA C Programming Guide, "Compute Capabilities" table (all of
  compute capability 5.0-9.0).

Compile-only devices (:func:`compile_only_devices`) come from
``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=..., topology=...)``.
That needs the CUDA PJRT plugin (``jax-cuda12-plugin`` + ``jax-cuda12-pjrt`` at exactly
jaxlib's version) and, for Mosaic GPU kernels and ``ptxas -v`` reports, ``ptxas`` from
``nvidia-cuda-nvcc-cu12``. ``make install`` puts them in their own directory,
``.venv/gpu-compile`` (:func:`gpu_compile_dir`), not in the environment itself: with the plugin
importable, every ordinary CPU run (no ``JAX_PLATFORMS``) would try to start a CUDA backend and
print a traceback. Only compile-only code adds that directory, through
:func:`use_gpu_compile_toolchain` (in-process, before jax starts its backends) or
:func:`gpu_compile_env` (for a subprocess).

Mosaic GPU caches compiled kernels by content, not by architecture: compile for one target per
process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import shutil
import sys
import tempfile
from types import MappingProxyType
from typing import Mapping

# Environment variable naming the directory that holds the CUDA compile toolchain.
GPU_COMPILE_DIR_ENV = "JAXLM_GPU_COMPILE_DIR"
REGISTERS_PER_THREAD_LIMIT = 255  # CUDA C Programming Guide, compute capabilities 5.0-9.0


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """One GPU model as a compile target. Bytes in bytes, bandwidth in bytes/s, rates per second."""

    name: str  # the CLI's --target value
    device_kind: str  # jax's Device.device_kind on the real GPU
    compute_capability: str  # "9.0"
    ptx_arch: str  # what `ptxas -arch` takes for XLA's PTX of this target
    core_count: int  # streaming multiprocessors
    shared_memory_per_block_optin: int  # the most dynamic shared memory one block may use
    shared_memory_per_core: int
    registers_per_core: int
    hbm_bytes: int
    hbm_bandwidth: float
    l2_cache_bytes: int
    clock_rate_ghz: float
    peak_flops: Mapping[str, float]  # dense FLOP/s per matmul input dtype
    registers_per_thread_limit: int = REGISTERS_PER_THREAD_LIMIT

    @property
    def capability(self) -> tuple[int, int]:
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)

    @property
    def ridge_flops_per_byte(self) -> float:
        """bfloat16 peak FLOP/s over HBM bandwidth: arithmetic intensity where a step turns compute-bound."""
        return self.peak_flops["bfloat16"] / self.hbm_bandwidth

    def target_config(self) -> str:
        """``stream_executor.GpuTargetConfigProto`` as text, for ``get_topology_desc(target_config=...)``."""
        major, minor = self.capability
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_core}
  threads_per_core_limit: 2048
  core_count: {self.core_count}
  fpus_per_core: {128 if major >= 9 else 64}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.hbm_bandwidth)}
  l2_cache_size: {self.l2_cache_bytes}
  clock_rate_ghz: {self.clock_rate_ghz}
  device_memory_size: {self.hbm_bytes}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: {self.registers_per_core}
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{self.device_kind}"
"""


_HOPPER_PEAKS = {"bfloat16": 989e12, "float16": 989e12, "float8": 1979e12, "float32": 67e12}

# The table. Order matters for device_kind lookups: H200 before H100.
TARGETS: Mapping[str, GpuTarget] = MappingProxyType({
    "h200": GpuTarget(  # XLA specs/h200.txtpb; NVIDIA H200 SXM datasheet (141 GB HBM3e, 4.8 TB/s)
        name="h200", device_kind="NVIDIA H200 141GB HBM3e", compute_capability="9.0", ptx_arch="sm_90a",
        core_count=132, shared_memory_per_block_optin=232448, shared_memory_per_core=233472,
        registers_per_core=65536, hbm_bytes=151397597184, hbm_bandwidth=4.8e12,
        l2_cache_bytes=52428800, clock_rate_ghz=1.98, peak_flops=MappingProxyType(_HOPPER_PEAKS),
    ),
    "h100": GpuTarget(  # XLA specs/h100_sxm.txtpb; NVIDIA H100 SXM datasheet (80 GB HBM3, 3.35 TB/s)
        name="h100", device_kind="NVIDIA H100 80GB HBM3", compute_capability="9.0", ptx_arch="sm_90a",
        core_count=132, shared_memory_per_block_optin=232448, shared_memory_per_core=233472,
        registers_per_core=65536, hbm_bytes=84942979072, hbm_bandwidth=3.35232e12,
        l2_cache_bytes=52428800, clock_rate_ghz=1.98, peak_flops=MappingProxyType(_HOPPER_PEAKS),
    ),
    "a100": GpuTarget(  # XLA specs/a100_sxm_80.txtpb; NVIDIA A100 SXM 80 GB datasheet (2.039 TB/s)
        name="a100", device_kind="NVIDIA A100-SXM4-80GB", compute_capability="8.0", ptx_arch="sm_80",
        core_count=108, shared_memory_per_block_optin=166912, shared_memory_per_core=167936,
        registers_per_core=65536, hbm_bytes=85100068864, hbm_bandwidth=2.03904e12,
        l2_cache_bytes=41943040, clock_rate_ghz=1.41,
        peak_flops=MappingProxyType({"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}),
    ),
})

# Peak dense FLOP/s per device-kind substring ("H100" matches "NVIDIA H100 80GB HBM3"), per dtype.
PEAK_FLOPS: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {name.upper(): target.peak_flops for name, target in TARGETS.items()}
)


def get_target(name: str | GpuTarget) -> GpuTarget:
    """The :class:`GpuTarget` called ``name`` (``h100`` | ``h200`` | ``a100``); ValueError otherwise."""
    if isinstance(name, GpuTarget):
        return name
    try:
        return TARGETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU target '{name}'; choose one of {', '.join(TARGETS)}") from None


def target_for_device_kind(device_kind: str) -> GpuTarget | None:
    """The target whose name appears in ``device_kind`` (``"NVIDIA H100 PCIe"`` -> h100), else None."""
    kind = device_kind.upper()
    return next((t for name, t in TARGETS.items() if name.upper() in kind), None)


# --------------------------------------------------------------------------------------------
# the compile toolchain


def gpu_compile_dir() -> pathlib.Path:
    """Where ``make install`` puts the CUDA compile toolchain: ``$JAXLM_GPU_COMPILE_DIR`` or
    ``<environment>/gpu-compile`` (``.venv/gpu-compile``)."""
    return pathlib.Path(os.environ.get(GPU_COMPILE_DIR_ENV) or pathlib.Path(sys.prefix) / "gpu-compile")


def _ptxas_dir(root: pathlib.Path) -> pathlib.Path:
    return root / "nvidia" / "cuda_nvcc" / "bin"


def _missing_toolchain(root: pathlib.Path) -> RuntimeError:
    return RuntimeError(
        f"the CUDA compile toolchain is not installed in {root}; run `make install` (or "
        f"`pip install --target {root} -c constraints.txt jax-cuda12-plugin==<jaxlib version> "
        "jax-cuda12-pjrt==<jaxlib version> nvidia-cuda-nvcc-cu12`)"
    )


def gpu_compile_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess that compiles for GPUs: the toolchain first on ``PYTHONPATH``
    and its ``ptxas`` first on ``PATH``, ``JAX_PLATFORMS=cpu``, XLA's persistent compilation cache
    off. RuntimeError if not installed."""
    root = gpu_compile_dir()
    if not (root / "jax_plugins").is_dir():
        raise _missing_toolchain(root)
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join(p for p in (str(_ptxas_dir(root)), env.get("PATH", "")) if p)
    env["JAX_PLATFORMS"] = "cpu"
    # a persistent-cache hit skips the compiler, and with it the dumps that resource reports read
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the plugin's "no CUDA driver" lines
    return env


def use_gpu_compile_toolchain() -> pathlib.Path:
    """Make this process able to compile for GPUs it does not have; returns the toolchain directory.

    Adds :func:`gpu_compile_dir` to ``sys.path`` and its ``ptxas`` to the front of ``PATH``
    (Mosaic GPU runs ``ptxas`` from ``PATH``) and keeps jax's own backends on the CPU. Call it
    before jax starts its backends (the first ``jax.devices()`` or computation): jax registers
    PJRT plugins only then. RuntimeError if the toolchain is not installed.
    """
    root = gpu_compile_dir()
    if not (root / "jax_plugins").is_dir():
        raise _missing_toolchain(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    ptxas = str(_ptxas_dir(root))
    if os.environ.get("PATH", "").split(os.pathsep)[0] != ptxas:
        os.environ["PATH"] = os.pathsep.join(p for p in (ptxas, os.environ.get("PATH", "")) if p)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax

    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")
    return root


def ptxas_path() -> str:
    """The pinned ``ptxas`` (from the toolchain directory), else the first on ``PATH``."""
    pinned = _ptxas_dir(gpu_compile_dir()) / "ptxas"
    found = str(pinned) if pinned.is_file() else shutil.which("ptxas")
    if not found:
        raise _missing_toolchain(gpu_compile_dir())
    return found


MAX_GPUS_PER_HOST = 8  # an HGX H100/H200/A100 board
MAX_GPUS = 65536  # the compile-only device list is built in host memory


def topology_name(topology: str) -> str:
    """``"HOSTSxGPUS"`` (``"2x8"``) or XLA's ``"SLICESxHOSTSxGPUS"`` (``"1x2x8"``) -> XLA's form."""
    parts = topology.lower().split("x")
    if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"topology '{topology}' is not HOSTSxGPUS (e.g. 1x8, 2x8) or SLICESxHOSTSxGPUS")
    sizes = [int(p) for p in parts]
    if sizes[-1] > MAX_GPUS_PER_HOST:
        raise ValueError(f"topology '{topology}' puts {sizes[-1]} GPUs in one host; an HGX host holds at most "
                         f"{MAX_GPUS_PER_HOST} (write HOSTSxGPUS, e.g. {max(1, sizes[-1] // 8)}x8)")
    if math.prod(sizes) > MAX_GPUS:
        raise ValueError(f"topology '{topology}' has {math.prod(sizes)} GPUs; plans cover at most {MAX_GPUS}")
    return "x".join(["1", *parts] if len(parts) == 2 else parts)


# What the CUDA plugin writes to stderr as it loads on a machine without a GPU: expected here, since
# the plugin only compiles; every other line it writes is passed on.
_PLUGIN_BANNER = ("All log messages before absl::InitializeLog() is called are written to STDERR",
                  "Could not find cuda drivers on your machine, GPU will not be used.")


@contextlib.contextmanager
def _without_plugin_banner():
    """Capture file descriptor 2 (native code writes there, not to ``sys.stderr``) while the plugin
    loads, then write back every line but the banner above."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(line.rstrip().endswith(b) for b in _PLUGIN_BANNER)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def compile_only_devices(target: str | GpuTarget, topology: str = "1x1x8") -> list:
    """Devices of ``topology`` GPUs of kind ``target`` that XLA can compile for but not run on.

    ``topology``: ``"HOSTSxGPUS"`` or ``"SLICESxHOSTSxGPUS"`` (:func:`topology_name`). Arrays for
    them are ``jax.ShapeDtypeStruct`` with a ``NamedSharding``; ``jax.jit(f).trace(*args).lower()
    .compile()`` then runs XLA's whole GPU pipeline (Triton and Mosaic kernels included).
    RuntimeError if the CUDA plugin is not registered in this process.
    """
    from jax.experimental import topologies

    spec = get_target(target)
    try:
        with _without_plugin_banner():
            import jax

            jax.devices()  # jax starts its backends and the CUDA plugin loads (it logs as it does)
            topo = topologies.get_topology_desc(
                platform="cuda", target_config=spec.target_config(), topology=topology_name(topology)
            )
    except NotImplementedError:
        raise RuntimeError(
            "the CUDA compile plugin is not registered in this process: call "
            "sharding.targets.use_gpu_compile_toolchain() before jax starts (or run with "
            "sharding.targets.gpu_compile_env())"
        ) from None
    return list(topo.devices)
