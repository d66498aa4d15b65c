"""The exception types: one base class, exit codes, re-exports, and packages that import without jaxlm."""

import subprocess
import sys

import jaxlm
import jaxlm.config
import jaxlm.errors
import sharding.errors
from tests.conftest import REPO


def test_one_base_class_with_exit_codes_and_one_definition_everywhere():
    errors = [jaxlm.errors.ConfigError, jaxlm.errors.DataError, jaxlm.errors.CheckpointError,
              jaxlm.errors.InteropError, jaxlm.errors.ServeError, jaxlm.errors.DistributedError]
    assert all(issubclass(e, jaxlm.errors.JaxlmError) for e in errors)
    assert issubclass(jaxlm.ConfigError, ValueError)  # callers catching ValueError keep working
    assert jaxlm.ConfigError is jaxlm.config.ConfigError is sharding.errors.ConfigError is jaxlm.errors.ConfigError
    assert jaxlm.CheckpointError is sharding.errors.CheckpointError
    codes = {e.__name__: e.exit_code for e in errors}
    assert codes == {"ConfigError": 2, "DataError": 65, "CheckpointError": 74, "InteropError": 65,
                     "ServeError": 69, "DistributedError": 75}
    from sharding.distributed import LOST_PEER_EXIT_CODE

    assert LOST_PEER_EXIT_CODE == 75


def test_sharding_and_pallas_kernels_load_nothing_of_jaxlm():
    """Every module of both packages, imported in a fresh interpreter, leaves no jaxlm module loaded."""
    code = (
        "import pkgutil, importlib, sys\n"
        "import sharding, pallas_kernels\n"
        "for pkg in (sharding, pallas_kernels):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(pkg.__name__ + '.' + m.name)\n"
        "print(sorted(n for n in sys.modules if n == 'jaxlm' or n.startswith('jaxlm.')))\n"
        "print(len([n for n in sys.modules if n.startswith(('sharding.', 'pallas_kernels.'))]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    loaded, count = r.stdout.splitlines()
    assert loaded == "[]"
    assert int(count) >= 10  # the walk did import the submodules
