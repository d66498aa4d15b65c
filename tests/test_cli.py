"""The `jaxlm` command line end to end, in subprocesses (as users run it)."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _jaxlm(*args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_train_then_generate(tmp_path):
    run = tmp_path / "run"
    r = _jaxlm("train", "configs/tiny.yaml", "train.steps=12", "train.warmup_steps=2", "train.progress=false",
               f"checkpoint.dir={run}", "checkpoint.save_every=6")
    assert r.returncode == 0, r.stderr
    assert "validation loss before" in r.stdout and "validation loss after" in r.stdout
    assert sorted(p.name for p in run.iterdir() if p.name.isdigit()) == ["12", "6"]
    g = _jaxlm("generate", "--checkpoint", str(run), "--prompt", "ROMEO:", "--prompt", "Good", "--max-new-tokens", "12",
               "--temperature", "0")
    assert g.returncode == 0, g.stderr
    assert g.stdout.count("--- prompt:") == 2 and "ROMEO:" in g.stdout


def test_bad_key_is_one_line_and_exit_2():
    r = _jaxlm("train", "configs/tiny.yaml", "train.step=3")
    assert r.returncode == 2
    assert r.stderr.strip() == "jaxlm: error: unknown config key 'train.step'; did you mean 'steps'?"


def test_missing_checkpoint_is_one_line(tmp_path):
    r = _jaxlm("generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "does not exist" in r.stderr


def test_rules_prints_the_table():
    r = _jaxlm("rules")
    assert r.returncode == 0 and "embed" in r.stdout and "fsdp" in r.stdout


def test_serve_api_key_comes_from_the_flag_or_the_environment(monkeypatch):
    from jaxlm.cli import build_parser

    monkeypatch.delenv("JAXLM_API_KEY", raising=False)
    assert build_parser().parse_args(["serve", "run"]).api_key is None
    monkeypatch.setenv("JAXLM_API_KEY", "sk-env")
    assert build_parser().parse_args(["serve", "run"]).api_key == "sk-env"
    assert build_parser().parse_args(["serve", "run", "--api-key", "sk-flag"]).api_key == "sk-flag"
