"""`jaxlm serve` end to end: a server subprocess on 127.0.0.1, clients over HTTP (and a load test process)."""

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from jaxlm.build import build_model
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import CheckpointConfig, DecodeConfig
from jaxlm.data import load_tokenizer
from jaxlm.generate import generate_tokens
from tests.conftest import REPO, tiny_config, xla_flags

MAX_CONTEXT = 64


def _env():
    # one CPU device in the server: no simulated mesh to compile for
    return dict(os.environ, XLA_FLAGS=xla_flags(1), PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config("model.init_std=0.2").model, seed=5)


@contextlib.contextmanager
def serving(model, directory, *args: str):
    """Save ``model`` as a checkpoint in ``directory``/run and serve it with ``jaxlm serve ... *args``;
    yields (base url, server process)."""
    from flax import nnx

    run = directory / "run"
    ckpt = Checkpointer(run, CheckpointConfig(async_save=False))
    ckpt.save(1, nnx.state(model), {"count": np.zeros((), np.int32)}, 0, tiny_config("model.init_std=0.2"))
    ckpt.wait()
    ckpt.close()
    log = open(directory / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxlm.cli", "serve", str(run), "--port", "0", "--num-pages", "24", "--max-batch", "4",
         "--prefill-chunk", "16", *args],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=log, text=True,
    )
    try:
        line = proc.stdout.readline()  # "serving RUN on http://127.0.0.1:PORT" once warm
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not match:
            log.seek(0)
            pytest.fail(f"server did not start: {line!r}\n{log.read()[-3000:]}")
        yield f"http://127.0.0.1:{match.group(1)}", proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """(base url, server process) for a checkpoint of ``model``."""
    with serving(model, tmp_path_factory.mktemp("serve"), "--max-context", str(MAX_CONTEXT)) as served:
        yield served


def _post(url, path, body, raw=False):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode(), r.headers.get("Content-Type")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers.get("Content-Type")


def _get(url, path):
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return r.status, r.read().decode()


def _sse_text(body, key):
    chunks = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    assert body.rstrip().endswith("data: [DONE]")
    return "".join(key(c["choices"][0]) for c in chunks), chunks[-1]["choices"][0]["finish_reason"]


def test_greedy_completion_equals_standalone_generation(server, model):
    url, _ = server
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 4096, 21)]
    status, body, _ = _post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 10, "temperature": 0})
    assert status == 200, body
    out = json.loads(body)
    want = generate_tokens(model, [prompt], DecodeConfig(max_new_tokens=10, temperature=0.0))[0]
    assert out["choices"][0]["text"] == load_tokenizer().decode(want)
    assert out["usage"] == {"prompt_tokens": 21, "completion_tokens": 10, "total_tokens": 31,
                            "prompt_tokens_details": {"cached_tokens": 0}}
    assert out["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streaming_returns_the_same_text(server, path):
    url, _ = server
    chat = path.endswith("chat/completions")
    body = {"messages": [{"role": "user", "content": "Speak, ROMEO"}]} if chat else {"prompt": "ROMEO:"}
    body.update(max_tokens=14, temperature=0.9, seed=3)
    status, plain, _ = _post(url, path, body)
    assert status == 200, plain
    choice = json.loads(plain)["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    assert text
    status, streamed, ctype = _post(url, path, {**body, "stream": True})
    assert status == 200 and ctype.startswith("text/event-stream")
    got, reason = _sse_text(streamed, (lambda c: c["delta"].get("content", "")) if chat else (lambda c: c["text"]))
    assert got == text and reason == choice["finish_reason"]
    # a stop string cuts both the same way
    stop = text[len(text) // 2:][:2]
    _, cut, _ = _post(url, path, {**body, "stop": [stop]})
    cut_choice = json.loads(cut)["choices"][0]
    cut_text = cut_choice["message"]["content"] if chat else cut_choice["text"]
    assert cut_text == text[: text.find(stop)] and cut_choice["finish_reason"] == "stop"
    _, cut_stream, _ = _post(url, path, {**body, "stop": [stop], "stream": True})
    assert _sse_text(cut_stream, (lambda c: c["delta"].get("content", "")) if chat else (lambda c: c["text"])) == (
        cut_text, "stop")


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"prompt": "hi", "max_token": 3}).encode(), "unknown field 'max_token'"),
    (json.dumps({"prompt": "hi", "max_tokens": -4}).encode(), "field 'max_tokens': Input should be greater than or equal to 0"),
    (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), "field 'temperature': Input should be a valid number"),
    (json.dumps({"prompt": list(range(MAX_CONTEXT + 1))}).encode(), f"exceeds the context of {MAX_CONTEXT} tokens"),
    (json.dumps({"max_tokens": 3}).encode(), "field 'prompt' is required"),
    (json.dumps({"prompt": "hi", "top_p": 0}).encode(), "field 'top_p': Input should be greater than 0"),
])
def test_malformed_requests_get_400_and_the_server_keeps_serving(server, body, message):
    url, proc = server
    status, text, ctype = _post(url, "/v1/completions", body, raw=True)
    assert status == 400 and ctype == "application/json"
    assert message in json.loads(text)["error"]["message"]
    assert proc.poll() is None and _get(url, "/health") == (200, '{"status":"ok"}')
    assert _post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


def test_unknown_route_is_404(server):
    url, _ = server
    assert _post(url, "/v1/embeddings", {"input": "x"})[0] == 404


@pytest.mark.slow
def test_load_from_another_process_then_metrics(server):
    url, proc = server
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "jaxlm.serve.loadtest", "--url", url, "--requests", "16", "--concurrency", "6",
         "--max-tokens", "12", "--time-limit", "120"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    print(f"\nload test ({time.perf_counter() - t0:.1f} s): {report}")
    assert report["errors"] == 0 and report["requests_ok"] == 16
    assert report["requests_per_s"] > 0 and report["latency_p99_s"] >= report["latency_p50_s"] > 0
    _, metrics = _get(url, "/metrics")
    values = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line and not line.startswith("#"))
    assert float(values["jaxlm_requests_finished_total"]) >= 16
    assert float(values["jaxlm_decode_tokens_total"]) > 0 and float(values["jaxlm_prefill_tokens_total"]) > 0
    assert float(values['jaxlm_inter_token_latency_seconds{quantile="0.99"}']) > 0
    assert float(values["jaxlm_time_to_first_token_seconds_count"]) >= 16
    assert float(values["jaxlm_kv_cache_usage_ratio"]) == 0  # every request finished and freed its pages
    for name in ("running_requests", "waiting_requests", "preemptions_total", "recomputed_tokens_total",
                 "prefill_tokens_per_second", "decode_tokens_per_second"):
        assert f"jaxlm_{name}" in values
    assert proc.poll() is None


def test_chat_messages_use_the_models_template_when_it_has_one(tmp_path):
    from tokenizers import AddedToken

    from jaxlm.data import load_tokenizer
    from jaxlm.interop.chat import end_of_turn_id, load_chat_template
    from jaxlm.serve.server import _chat_prompt

    tok = load_tokenizer()
    assert load_chat_template(tmp_path / "tokenizer.json") is None  # no template beside it: plain lines
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": chatml}))
    template = load_chat_template(tmp_path / "tokenizer.json")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert template.render(messages) == text
    assert _chat_prompt(messages, lambda m: template.prompt_ids(tok, m)) == tok.encode(text, add_special_tokens=False).ids
    assert end_of_turn_id(template, tok) == tok.token_to_id("<|im_end|>")
    assert _chat_prompt(messages) == "system: Be brief.\nuser: Hi\nassistant:"
