"""The wheel built from pyproject.toml holds every package and works installed (not editable) elsewhere.

The wheel is built from a copy of the sources (nothing is written into the checkout). The install
test puts it into a fresh virtual environment outside the checkout, whose dependencies come from
this environment's site-packages through a ``.pth`` line (the editable ``jaxlm`` finder there is not
loaded: a ``.pth`` line adds a directory to ``sys.path`` without running the ``.pth`` files in it).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from jaxlm.cli import build_parser
from tests.conftest import REPO, xla_flags

PACKAGE_ROOTS = ("jaxlm", "sharding", "pallas_kernels")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE", *PACKAGE_ROOTS):
        path = pathlib.Path(REPO) / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(src), "-w", str(out)],
                   check=True, capture_output=True, cwd=out)
    (whl,) = out.glob("jaxlm-*.whl")
    return whl


def test_every_package_and_asset_is_in_the_wheel(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = [p.parent for root in PACKAGE_ROOTS for p in (pathlib.Path(REPO) / root).rglob("__init__.py")
                if "__pycache__" not in p.parts]
    assert len(packages) >= 6
    for package in packages:
        rel = package.relative_to(REPO).as_posix()
        missing = [f"{rel}/{m.name}" for m in package.glob("*.py") if f"{rel}/{m.name}" not in names]
        assert not missing, f"the wheel lacks {missing}"
    for asset in (pathlib.Path(REPO) / "jaxlm" / "assets").iterdir():
        if asset.suffix in (".json", ".txt"):
            assert f"jaxlm/assets/{asset.name}" in names


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return dict(env, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")  # one CPU device


@pytest.mark.slow
def test_the_installed_wheel_runs_every_command_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (pathlib.Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args: str) -> str:
        proc = subprocess.run([str(venv / "bin" / "jaxlm"), *args], cwd=work, env=_env(), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"jaxlm {' '.join(args)}: {proc.stderr[-2000:]}"
        return proc.stdout

    where = subprocess.run([python, "-c", "import jaxlm, jaxlm.serve.server, sharding; print(jaxlm.__file__)"], cwd=work,
                           env=_env(), check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(site), f"jaxlm imported from {where}, not from the fresh environment"
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert {"train", "generate", "serve", "convert", "prepare-data", "rules"} <= set(subcommands)
    for name in subcommands:
        assert "usage: jaxlm" in run(name, "--help")
    config = str(pathlib.Path(REPO) / "configs" / "tiny.yaml")
    trained = run("train", config, "train.steps=5", "train.eval_every=5", "train.progress=false", "checkpoint.dir=run")
    assert "checkpoint: run (step 5)" in trained
    assert run("generate", "--checkpoint", "run", "--prompt", "ROMEO:", "--max-new-tokens", "8").startswith("--- prompt: 'ROMEO:'")
