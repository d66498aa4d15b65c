"""A jax without Pallas's Triton backend: jaxlm still imports and its XLA paths compute the same
logits; every Triton kernel stops with one ImportError line that names the fix.

The removal is simulated in a subprocess by blocking the module's import
(``sys.modules["jax.experimental.pallas.triton"] = None``), as an import of a removed module fails.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.build import build_model
from tests.conftest import REPO, tiny_config

_WITHOUT_TRITON = r"""
import json, sys
sys.modules["jax.experimental.pallas.triton"] = None  # what an import of a removed module does
import jax, jax.numpy as jnp, numpy as np
import jaxlm
from jaxlm.build import build_model
from jaxlm.config import load_config
from pallas_kernels import decode_attention, flash_attention
from pallas_kernels.matmul import matmul
from pallas_kernels.triton_backend import AVAILABLE

cfg = load_config("configs/tiny.yaml", ["model.attention_impl=xla", "model.matmul_impl=xla"])
model = build_model(cfg.model, seed=5)
tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.model.vocab_size)
positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
np.save(sys.argv[1], np.asarray(model(tokens, positions)[0]))

q = jax.random.normal(jax.random.key(2), (1, 16, 2, 16))
pos = jnp.broadcast_to(jnp.arange(16), (1, 16))
calls = {
    "flash_attention": lambda: flash_attention(q, q, q, q_positions_BxT=pos, kv_positions_BxS=pos, interpret=True),
    "decode_attention": lambda: decode_attention(q[:, :1], q, q, jnp.array([16]), interpret=True),
    "matmul": lambda: matmul(q[0, :, 0], q[0, :, 0].T, interpret=True),
}
errors = {}
for name, call in calls.items():
    try:
        call()
        errors[name] = None
    except ImportError as e:
        errors[name] = str(e)
print(json.dumps({"available": AVAILABLE, "errors": errors}))
"""


@pytest.mark.slow
def test_without_triton_backend_jaxlm_imports_and_triton_kernels_fail_in_one_line(tmp_path):
    logits_path = tmp_path / "logits.npy"
    r = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON, str(logits_path)], cwd=REPO, env=dict(os.environ),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["available"] is False
    for name, message in report["errors"].items():
        assert message is not None, f"{name} ran without the Triton backend"
        assert "\n" not in message and "Pallas Triton backend is not in jax" in message, name
        assert "model.attention_impl=xla" in message, name

    # the XLA paths are untouched: the same logits as this process (which has the backend)
    cfg = tiny_config("model.attention_impl=xla", "model.matmul_impl=xla")
    model = build_model(cfg.model, seed=5)
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.model.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
    want = np.asarray(model(tokens, positions)[0])
    got = np.load(logits_path)
    assert got.shape == want.shape == (2, 24, cfg.model.vocab_size)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
