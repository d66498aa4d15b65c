"""Metrics: parameter counts match the model, FLOPs and peaks, and the written logs read back."""

import json
import struct
import time

import jax
import numpy as np
import pytest

from jaxlm.build import abstract_model
from jaxlm.metrics import MetricsLog, count_params, model_flops_per_token, peak_flops
from tests.conftest import tiny_config


@pytest.mark.parametrize("overrides", [(), ("model.tie_embeddings=false",), ("model.qkv_bias=true", "model.num_layers=3")])
def test_param_count_matches_the_model(overrides):
    cfg = tiny_config(*overrides).model
    _, abstract = abstract_model(cfg)
    actual = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    total, body = count_params(cfg)
    assert total == actual
    assert total - body == cfg.vocab_size * cfg.embed_dim


def test_flops_per_token_by_hand():
    cfg = tiny_config("model.tie_embeddings=false").model
    E, L, H, K, D, F, V = 64, 2, 4, 2, 16, 192, 4096
    per_layer = E * H * D + 2 * E * K * D + H * D * E + 3 * E * F + 2 * E
    n = L * per_layer + E + E * V  # untied head counted, embedding lookup not
    assert model_flops_per_token(cfg, 64) == 6 * n + 12 * L * H * D * 64 / 2


def test_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert peak_flops("NVIDIA H200", "float8") == 1979e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "float8") is None
    assert peak_flops("cpu", "bfloat16") is None


def _tensorboard_scalars(directory, purge=False):
    """Parse TFRecord event files by hand: {tag: [(step, value)]}. With ``purge``, a session
    start at step T drops the events at steps >= T read before it, as TensorBoard does."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            record = data[i + 12 : i + 12 + length]
            i += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            if purge and event.session_log.status == event_pb2.SessionLog.START:
                out = {tag: [(s, v) for s, v in got if s < event.step] for tag, got in out.items()}
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_metrics_log_writes_jsonl_and_tensorboard(tmp_path):
    log = MetricsLog(tmp_path)
    rng = np.random.default_rng(0)
    written = [{"loss": float(rng.uniform(1, 5)), "tokens_per_s": float(rng.uniform(100, 200))} for _ in range(3)]
    for step, values in enumerate(written, start=1):
        log.write(step, {**values, "step": step})
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": s, **v} for s, v in enumerate(written, start=1)]
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    for name in ("loss", "tokens_per_s"):
        got = scalars[f"train/{name}"]
        assert [s for s, _ in got] == [1, 2, 3]
        np.testing.assert_allclose([v for _, v in got], [w[name] for w in written], rtol=1e-6)


def test_metrics_log_without_a_directory_writes_nothing(tmp_path):
    log = MetricsLog(None)
    log.write(1, {"loss": 1.0})
    log.close()
    assert not log.enabled


def test_training_writes_its_metrics_beside_the_checkpoints(tmp_path, devices, monkeypatch):
    import sys

    from jaxlm.checkpoint import Checkpointer
    from jaxlm.config import MeshConfig
    from sharding.mesh import make_mesh

    train_module, loop_module = sys.modules["jaxlm.train"], sys.modules["jaxlm.loop"]
    monkeypatch.setattr(loop_module, "peak_flops", lambda kind, dtype: 1e12)  # as if on a 1 TFLOP/s device
    run = tmp_path / "run"
    cfg = tiny_config("train.steps=3", "train.warmup_steps=1", "train.eval_batches=1", f"checkpoint.dir={run}")
    result = train_module.train(cfg, mesh=make_mesh(MeshConfig(), devices[:1]), log=lambda _: None)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    flops = model_flops_per_token(cfg.model, cfg.data.seq_len) * cfg.train.batch_size * cfg.data.seq_len
    for line, h in zip(lines, result.history):
        assert line["loss"] == h["loss"] and np.isfinite(line["loss"])
        np.testing.assert_allclose(line["mfu"], flops / line["step_time_s"] / 1e12, rtol=1e-9)
    assert _tensorboard_scalars(run / "tensorboard")["train/loss"] == [(h["step"], pytest.approx(h["loss"])) for h in result.history]
    ckpt = Checkpointer(run, create=False)  # the metrics files do not disturb the checkpoints
    assert ckpt.all_steps() == [3]
    ckpt.close()


def test_resumed_log_drops_lines_past_the_restored_step_and_a_torn_line(tmp_path):
    """A run killed after step 5 with its last checkpoint at step 3 left lines 1..5 and half of
    line 6; the resumed log keeps lines 1..3, then continues from step 4. TensorBoard, applying
    the purge the resumed writer records (as its reader does), sees each step once."""
    rng = np.random.default_rng(1)
    rows = [{"step": s, "loss": float(rng.uniform(1, 5))} for s in range(1, 6)]
    first = MetricsLog(tmp_path)
    for r in rows:
        first.write(r["step"], r)
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    time.sleep(1.1)  # event file names carry the second they were opened in
    log = MetricsLog(tmp_path, start_step=3)
    log.write(4, {"loss": 0.5})
    log.commit()
    got = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert got == rows[:3] + [{"step": 4, "loss": 0.5}]
    log.close()
    seen = _tensorboard_scalars(tmp_path / "tensorboard", purge=True)["train/loss"]
    assert [s for s, _ in seen] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in seen], [r["loss"] for r in rows[:3]] + [0.5], rtol=1e-6)
