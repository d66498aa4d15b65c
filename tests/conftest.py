"""Test setup: 8 simulated CPU devices, strict numerics rails, and shared tiny configs."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f
) + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)

from jaxlm.config import load_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(*overrides: str):
    """configs/tiny.yaml, float32, with the given overrides."""
    return load_config(os.path.join(REPO, "configs", "tiny.yaml"), ["train.progress=false", *overrides])


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, "tests expect 8 simulated CPU devices"
    return devs
