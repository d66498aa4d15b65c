"""Embedded corpus and tokenizer, deterministic resumable batches, global batch layout."""

import numpy as np
import pytest

from jaxlm.config import ConfigError, DataConfig, MeshConfig
from jaxlm.data import EOS_TOKEN, WindowSampler, load_text, load_tokenizer, to_global_batch, tokenize_corpus
from sharding.mesh import make_mesh


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


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
    splits = tokenize_corpus(DataConfig(val_fraction=0.05), tokenizer)
    total = len(splits.train) + len(splits.val)
    assert len(splits.val) == int(total * 0.05)
    assert splits.train.dtype == np.int32


def test_sampler_is_a_pure_function_of_the_batch_index():
    tokens = np.random.default_rng(0).integers(0, 1000, 10_000).astype(np.int32)
    a = WindowSampler(tokens, seq_len=16, batch_size=8, seed=1)
    b = WindowSampler(tokens, seq_len=16, batch_size=8, seed=1)
    seq_a = [a.batch(i) for i in range(200)]  # crosses several epochs
    for i in (150, 3, 77, 199, 0):  # any order, fresh object: same batch
        np.testing.assert_array_equal(b.batch(i), seq_a[i])
    assert seq_a[0].shape == (8, 17)
    # no window repeats within an epoch
    per_epoch = a.num_windows // 8
    rows = {tuple(r) for w in seq_a[:per_epoch] for r in w}
    assert len(rows) == per_epoch * 8
    c = WindowSampler(tokens, seq_len=16, batch_size=8, seed=2)
    assert not np.array_equal(c.batch(0), seq_a[0])


def test_global_batch_is_sharded_by_batch(devices):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices)
    windows = np.arange(8 * 9, dtype=np.int32).reshape(8, 9)
    batch = to_global_batch(windows, mesh)
    np.testing.assert_array_equal(batch["inputs"], windows[:, :-1])
    np.testing.assert_array_equal(batch["targets"], windows[:, 1:])
    np.testing.assert_array_equal(batch["positions"][3], np.arange(8))
    assert batch["inputs"].addressable_shards[0].data.shape == (2, 8)


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="text file .* does not exist"):
        load_text(str(tmp_path / "x.txt"))
    with pytest.raises(ConfigError, match="tokenizer file .* does not exist"):
        load_tokenizer(str(tmp_path / "t.json"))
