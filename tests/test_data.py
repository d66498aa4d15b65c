"""Embedded corpus and tokenizer, prepare-data, packed deterministic resumable batches, per-host layout."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer

import jaxlm
import jaxlm.data as data_module
from jaxlm.build import build_model
from jaxlm.config import ConfigError, DataConfig, MeshConfig
from jaxlm.errors import DataError
from jaxlm.data import (
    EOS_TOKEN, PackedLoader, TokenStream, corpus_key, load_splits, load_stream, load_text, load_tokenizer, open_prepared,
    to_global_batch,
)
from jaxlm.prepare import prepare_data
from jaxlm.train import cross_entropy
from sharding.context import load_balance_order
from sharding.mesh import make_mesh
from tests.conftest import REPO, tiny_config


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _jaxlm(*args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _stream(doc_lengths, seed=0):
    """Random tokens (never zeros) in documents of the given lengths."""
    n = int(sum(doc_lengths))
    tokens = np.random.default_rng(seed).integers(1, 4000, n).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]]).astype(np.int64)
    return TokenStream(tokens, starts)


def _old_windows(tokens, seq_len, batch_size, seed, index):
    """The previous sampler, verbatim in behaviour: windows of seq_len+1, stride seq_len, per-epoch permutation."""
    n = (len(tokens) - 1) // seq_len
    rows = []
    for j in range(index * batch_size, (index + 1) * batch_size):
        epoch, k = divmod(j, n)
        start = int(np.random.default_rng([seed, epoch]).permutation(n)[k]) * seq_len
        rows.append(tokens[start : start + seq_len + 1])
    return np.stack(rows)


def test_embedded_corpus_and_tokenizer(tokenizer):
    text = load_text()
    assert 900_000 < len(text.encode()) < 1_200_000
    assert 4096 <= tokenizer.get_vocab_size() <= 8192
    assert tokenizer.token_to_id(EOS_TOKEN) is not None
    piece = text[123_456:133_456]
    assert tokenizer.decode(tokenizer.encode(piece).ids) == piece  # byte-level BPE is lossless
    odd = "naïve café — “quotes” 日本語 \t\n  emoji 🎭"
    assert tokenizer.decode(tokenizer.encode(odd).ids) == odd


def test_train_and_val_are_disjoint_tail_split(tokenizer):
    splits = load_splits(DataConfig(val_fraction=0.05), tokenizer)
    ids = np.asarray(tokenizer.encode(load_text()).ids, dtype=np.int32)
    assert len(splits.val) == int(len(ids) * 0.05)
    np.testing.assert_array_equal(np.concatenate([splits.train.tokens, splits.val.tokens]), ids)
    assert splits.train.tokens.dtype == np.int32
    assert splits.train.num_docs == splits.val.num_docs == 1  # the embedded corpus is one document


def test_shipped_corpus_ids_are_the_embedded_tokenizers_encoding_and_other_text_is_encoded(tokenizer, tmp_path, monkeypatch):
    """The embedded corpus is read from its shipped ids: they must be what the tokenizer gives
    (rebuild them with scripts/make_corpus.py when the corpus or tokenizer changes); any other
    or edited text, or another tokenizer, is tokenized."""
    text, shipped = load_text(), pathlib.Path(REPO) / "jaxlm" / "assets" / "shakespeare.tokens.npz"
    with np.load(shipped) as f:
        np.testing.assert_array_equal(f["ids"], tokenizer.encode(text).ids)
        assert str(f["key"]) == corpus_key(text, tokenizer)
    own = tmp_path / "own.txt"
    own.write_text("To be, or not to be: that is the question.\n" * 40)
    edited = tmp_path / "edited.txt"
    edited.write_text(text + "Exeunt.\n")
    other = Tokenizer.from_str(tokenizer.to_str())
    other.add_tokens(["question"])  # not the embedded tokenizer any more: its ids differ
    for path, tok in ((str(own), tokenizer), (str(edited), tokenizer), ("", other)):
        got = load_stream(DataConfig(text_path=path), tok).tokens
        np.testing.assert_array_equal(got, tok.encode(load_text(path)).ids)
    bad = tmp_path / shipped.name
    bad.write_bytes(shipped.read_bytes()[:1000])
    asset = data_module._asset
    monkeypatch.setattr(data_module, "_asset", lambda name: bad if name == bad.name else asset(name))
    with pytest.raises(DataError, match=r"^the embedded corpus's token ids .* are unreadable \(.*\); reinstall jaxlm$"):
        load_stream(DataConfig(), tokenizer)


def test_split_of_many_documents_restarts_the_cut_document():
    s = _stream([5, 7, 3, 9])  # starts 0, 5, 12, 15
    head, tail = s.split_at(10)
    np.testing.assert_array_equal(head.doc_starts, [0, 5])
    np.testing.assert_array_equal(tail.doc_starts, [0, 2, 5])
    head, tail = s.split_at(12)  # on a boundary: nothing is cut
    np.testing.assert_array_equal(tail.doc_starts, [0, 3])
    np.testing.assert_array_equal(np.concatenate([head.tokens, tail.tokens]), s.tokens)


def test_one_document_gives_exactly_the_old_windows_deterministically():
    tokens = np.random.default_rng(0).integers(1, 1000, 10_000).astype(np.int32)
    stream = TokenStream(tokens, np.zeros(1, np.int64))
    a = PackedLoader(stream, seq_len=16, batch_size=8, seed=1)
    b = PackedLoader(stream, seq_len=16, batch_size=8, seed=1)
    seq_a = [a.rows(i) for i in range(200)]  # crosses several epochs
    assert set(seq_a[0]) == {"inputs", "targets", "positions", "loss_mask"}  # one segment: no segment ids
    for i in (150, 3, 77, 199, 0):  # any order, fresh object: same batch, equal to the old sampler's
        got = b.rows(i)
        for k in got:
            np.testing.assert_array_equal(got[k], seq_a[i][k])
        old = _old_windows(tokens, 16, 8, 1, i)
        np.testing.assert_array_equal(got["inputs"], old[:, :-1])
        np.testing.assert_array_equal(got["targets"], old[:, 1:])
        np.testing.assert_array_equal(got["positions"], np.broadcast_to(np.arange(16), (8, 16)))
        np.testing.assert_array_equal(got["loss_mask"], np.ones((8, 16)))
    c = PackedLoader(stream, seq_len=16, batch_size=8, seed=2)
    assert not np.array_equal(c.rows(0)["inputs"], seq_a[0]["inputs"])


def test_every_epoch_is_a_permutation_of_the_rows():
    loader = PackedLoader(_stream([40, 300, 17, 500, 150]), seq_len=16, batch_size=5, seed=3)
    n = loader.num_rows  # 62: not a multiple of the batch size, so batches straddle epochs
    assert n == (1007 - 1) // 16 and n % 5
    flat = np.concatenate([loader.row_ids(i) for i in range(3 * n // 5 + 1)])
    epochs = [flat[e * n : (e + 1) * n] for e in range(3)]
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])
    unshuffled = PackedLoader(loader.stream, 16, 5, seed=3, shuffle=False)
    np.testing.assert_array_equal(np.concatenate([unshuffled.row_ids(i) for i in range(4)]), np.arange(20))


def test_packed_rows_at_document_boundaries():
    lengths = [1, 3, 20, 1, 1, 45, 7, 2, 70, 16, 5]
    stream = _stream(lengths, seed=4)
    L = 16
    loader = PackedLoader(stream, seq_len=L, batch_size=4, seed=0)
    doc_of, start_of = [], []  # reference, one token at a time
    for d, (s, n) in enumerate(zip(stream.doc_starts, lengths)):
        doc_of += [d] * n
        start_of += [int(s)] * n
    for i in range(loader.num_rows // 4):
        got, ids = loader.rows(i), loader.row_ids(i)
        for b, r in enumerate(ids):
            for t in range(L):
                p = int(r) * L + t
                assert got["inputs"][b, t] == stream.tokens[p] and got["targets"][b, t] == stream.tokens[p + 1]
                assert got["segment_ids"][b, t] == doc_of[p] - doc_of[int(r) * L]
                assert got["positions"][b, t] == p - max(start_of[p], int(r) * L)
                assert got["loss_mask"][b, t] == float(doc_of[p + 1] == doc_of[p])
    assert loader.keys[-1] == "segment_ids"


def test_masked_cross_entropy_is_the_mean_over_kept_tokens():
    logits = jax.random.normal(jax.random.key(0), (2, 6, 11)) * 3
    targets = jax.random.randint(jax.random.key(1), (2, 6), 0, 11)
    mask = (np.random.default_rng(0).random((2, 6)) < 0.6).astype(np.float32)
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(cross_entropy(logits, targets, mask), (nll * mask).sum() / mask.sum(), rtol=1e-6)
    np.testing.assert_allclose(cross_entropy(logits, targets, np.ones((2, 6), np.float32)), nll.mean(), rtol=1e-6)


def test_packed_documents_never_attend_to_each_other():
    """Each document's logits inside a packed row equal the model run on that document alone."""
    cfg = tiny_config("model.num_layers=1")
    graphdef, params = nnx.split(build_model(cfg.model, seed=0))
    model = jax.jit(lambda *a, **kw: nnx.merge(graphdef, params)(*a, **kw))
    loader = PackedLoader(_stream([5, 20, 9, 30, 40, 12], seed=5), seq_len=32, batch_size=1, seed=0, shuffle=False)
    row = loader.rows(1)  # tokens 32..64: the tail of doc 2, doc 3 (30 tokens) is cut, ...
    seg = row["segment_ids"][0]
    assert seg.max() >= 1
    packed, _ = model(row["inputs"], row["positions"], segment_ids_BxT=row["segment_ids"])
    unmasked, _ = model(row["inputs"], row["positions"])
    for s in np.unique(seg):
        keep = seg == s
        alone, _ = model(row["inputs"][:, keep], row["positions"][:, keep])
        np.testing.assert_allclose(packed[:, keep], alone, rtol=1e-5, atol=1e-5)
        if s > 0:  # without segment ids the later documents would see the earlier ones
            assert not np.allclose(unmasked[:, keep], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=2, fsdp=2, tensor=2), MeshConfig(fsdp=2, sequence=2, tensor=2)])
def test_global_batch_reads_only_each_shards_rows(devices, mesh_cfg):
    stream = _stream([30, 100, 3, 250, 64, 90, 40], seed=6)
    loader = PackedLoader(stream, seq_len=8, batch_size=8, seed=7)
    whole = loader.rows(5)
    for a, b in [(0, 2), (2, 4), (3, 8), (7, 8)]:  # any row slice equals that slice of the whole batch
        part = loader.rows(5, slice(a, b))
        for k in whole:
            np.testing.assert_array_equal(part[k], whole[k][a:b])
    asked = []
    rows = loader.rows
    loader.rows = lambda index, sl=slice(None): asked.append((sl.start, sl.stop)) or rows(index, sl)
    batch = to_global_batch(loader.batch(5), make_mesh(mesh_cfg, devices))
    per_shard = 8 // (mesh_cfg.data * mesh_cfg.fsdp)
    assert sorted(asked) == [(i, i + per_shard) for i in range(0, 8, per_shard)]  # each shard's rows, once
    order = load_balance_order(8, mesh_cfg.sequence)
    for k in whole:
        assert batch[k].shape == (8, 8)
        np.testing.assert_array_equal(np.asarray(batch[k]), whole[k][:, order])
    assert batch["inputs"].addressable_shards[0].data.shape == (per_shard, 8 // mesh_cfg.sequence)


def _write_inputs(tmp_path):
    docs = ["First document.\nWith two lines.", "naïve café — 日本語 🎭", "The third one, from JSONL.", "",
            "Fourth: \"quoted\" and\ttabbed."]
    (tmp_path / "a.txt").write_text(docs[0], encoding="utf-8")
    (tmp_path / "b.txt").write_text(docs[1], encoding="utf-8")
    with (tmp_path / "c.jsonl").open("w", encoding="utf-8") as f:
        for d in docs[2:]:
            f.write(json.dumps({"id": 1, "body": d}) + "\n\n")
    return [str(tmp_path / n) for n in ("a.txt", "b.txt", "c.jsonl")], [d for d in docs if d]


def test_prepare_data_round_trips_token_ids(tmp_path, tokenizer):
    inputs, docs = _write_inputs(tmp_path)
    meta = prepare_data(inputs, str(tmp_path / "out"), text_field="body")
    eos = tokenizer.token_to_id(EOS_TOKEN)
    want = [np.asarray(tokenizer.encode(d).ids + [eos]) for d in docs]
    assert meta["dtype"] == "uint16" and meta["num_docs"] == 4 and meta["eos_id"] == eos
    assert meta["num_tokens"] == sum(map(len, want)) and meta["vocab_size"] == tokenizer.get_vocab_size()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["docs.npy", "meta.json", "tokens.bin"]
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out" / "tokens.bin", np.uint16), np.concatenate(want))
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "docs.npy"), np.cumsum([0] + [len(w) for w in want[:-1]]))
    stream = open_prepared(str(tmp_path / "out"))
    np.testing.assert_array_equal(stream.tokens, np.concatenate(want))
    assert [tokenizer.decode(list(stream.tokens[s : s + len(w) - 1])) for s, w in zip(stream.doc_starts, want)] == docs
    with pytest.raises(ConfigError, match="already exists"):
        prepare_data(inputs, str(tmp_path / "out"), text_field="body")
    with pytest.raises(DataError, match=r"c.jsonl:1 .* field 'text'"):
        prepare_data(inputs, str(tmp_path / "out2"))
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2*"))  # nothing left behind


def test_prepare_data_command_refuses_an_existing_directory(tmp_path):
    inputs, _ = _write_inputs(tmp_path)
    r = _jaxlm("prepare-data", *inputs[:2], "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "2 documents" in r.stdout
    before = (tmp_path / "out" / "tokens.bin").read_bytes()
    r = _jaxlm("prepare-data", *inputs[:2], "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "already exists" in r.stderr
    assert (tmp_path / "out" / "tokens.bin").read_bytes() == before


def test_bad_data_paths_are_one_line(tmp_path, tokenizer):
    inputs, _ = _write_inputs(tmp_path)
    prepare_data(inputs[:2], str(tmp_path / "ok"))
    with pytest.raises(ConfigError, match="is not a directory"):
        open_prepared(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no meta.json"):
        open_prepared(str(tmp_path / "empty"))
    (tmp_path / "empty" / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json' is corrupt"):
        open_prepared(str(tmp_path / "empty"))
    other = tmp_path / "other_tokenizer.json"
    other.write_text(json.dumps(json.loads(load_tokenizer_json())))  # same vocabulary, different bytes
    with pytest.raises(ConfigError, match="tokenizer hashes differ"):
        open_prepared(str(tmp_path / "ok"), str(other))
    with open(tmp_path / "ok" / "tokens.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match="tokens.bin' is missing or not"):
        open_prepared(str(tmp_path / "ok"))
    with pytest.raises(ConfigError, match="not both"):
        tiny_config(f"data.path={tmp_path / 'ok'}", "data.text_path=x.txt")
    with pytest.raises(ConfigError, match="text file .* does not exist"):
        load_text(str(tmp_path / "x.txt"))
    with pytest.raises(ConfigError, match="tokenizer file .* does not exist"):
        load_tokenizer(str(tmp_path / "t.json"))


def load_tokenizer_json():
    from jaxlm.data import tokenizer_file

    return tokenizer_file().read_text(encoding="utf-8")


@pytest.mark.slow
def test_train_on_prepared_data_and_resume(tmp_path):
    text = load_text()
    inputs = []
    for i in range(12):  # twelve documents of about 4 KB
        p = tmp_path / f"doc{i}.txt"
        p.write_text(text[i * 50_000 : i * 50_000 + 4_000], encoding="utf-8")
        inputs.append(str(p))
    assert _jaxlm("prepare-data", *inputs, "--out", str(tmp_path / "data")).returncode == 0
    common = ["configs/tiny.yaml", f"data.path={tmp_path / 'data'}", "data.seq_len=32", "data.val_fraction=0.1",
              "train.warmup_steps=1", "train.progress=false", "train.eval_batches=1", "checkpoint.save_every=100"]
    straight = _jaxlm("train", *common, "train.steps=4", f"checkpoint.dir={tmp_path / 'a'}")
    assert straight.returncode == 0, straight.stderr
    first = _jaxlm("train", *common, "train.steps=2", f"checkpoint.dir={tmp_path / 'b'}")
    assert first.returncode == 0, first.stderr
    resumed = _jaxlm("train", *common, "train.steps=4", f"checkpoint.dir={tmp_path / 'b'}")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 2" in resumed.stdout
    after = lambda out: [l for l in out.splitlines() if l.startswith("validation loss:")][-1].split("->")[1]  # noqa: E731
    assert after(resumed.stdout) == after(straight.stdout)
    (a, _), (b, _) = jaxlm.restore(str(tmp_path / "a")), jaxlm.restore(str(tmp_path / "b"))
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):  # same data, same updates
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
