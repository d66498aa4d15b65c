"""Text -> tokens -> deterministic, resumable batches of next-token windows.

The corpus is split once into train and validation token streams (the last ``val_fraction`` of
the text is held out). Training cuts the train stream into non-overlapping windows of
``seq_len + 1`` tokens and visits them in a fresh permutation every epoch, drawn from
``(seed, epoch)``. The whole order is a pure function of the batch index, so the data position
saved in a checkpoint is one integer: the number of batches consumed.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import pathlib

import jax
import numpy as np
from jax.sharding import Mesh
from tokenizers import Tokenizer

from jaxlm.config import ConfigError, DataConfig
from sharding.context import load_balance_order, sequence_shards
from sharding.rules import logical_sharding

EOS_TOKEN = "<|endoftext|>"


def _asset(name: str) -> pathlib.Path:
    return pathlib.Path(str(importlib.resources.files("jaxlm.assets") / name))


def load_tokenizer(path: str = "") -> Tokenizer:
    """A Hugging Face ``tokenizers`` tokenizer; the embedded byte-level BPE when ``path`` is empty."""
    p = pathlib.Path(path) if path else _asset("tokenizer.json")
    if not p.is_file():
        raise ConfigError(f"tokenizer file '{p}' does not exist; set data.tokenizer_path to a tokenizer.json")
    return Tokenizer.from_file(str(p))


def eos_id(tokenizer: Tokenizer) -> int | None:
    return tokenizer.token_to_id(EOS_TOKEN)


def load_text(path: str = "") -> str:
    """The training text; the embedded Shakespeare corpus when ``path`` is empty."""
    p = pathlib.Path(path) if path else _asset("shakespeare.txt")
    if not p.is_file():
        raise ConfigError(f"text file '{p}' does not exist; set data.text_path to a UTF-8 text file")
    return p.read_text(encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class TokenSplits:
    train: np.ndarray  # int32 [n_train]
    val: np.ndarray  # int32 [n_val]


def tokenize_corpus(cfg: DataConfig, tokenizer: Tokenizer) -> TokenSplits:
    ids = np.asarray(tokenizer.encode(load_text(cfg.text_path)).ids, dtype=np.int32)
    n_val = int(len(ids) * cfg.val_fraction)
    if n_val < cfg.seq_len + 1 or len(ids) - n_val < cfg.seq_len + 1:
        raise ConfigError(
            f"the corpus has {len(ids)} tokens: too few for data.seq_len={cfg.seq_len} "
            f"with data.val_fraction={cfg.val_fraction}"
        )
    return TokenSplits(train=ids[:-n_val], val=ids[-n_val:])


class WindowSampler:
    """Global batch ``i`` of ``[batch, seq_len + 1]`` windows, a pure function of (seed, i)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, shuffle: bool = True):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.num_windows = (len(tokens) - 1) // seq_len
        self._perm_epoch, self._perm = -1, np.arange(self.num_windows)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self.shuffle and epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, index: int) -> np.ndarray:
        rows = []
        for j in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, k = divmod(j, self.num_windows)
            start = int(self._permutation(epoch)[k]) * self.seq_len
            rows.append(self.tokens[start : start + self.seq_len + 1])
        return np.stack(rows)


def to_global_batch(windows_BxL1: np.ndarray, mesh: Mesh | None) -> dict[str, jax.Array]:
    """Split windows into inputs/targets/positions, each laid out on the mesh by batch.

    Every process computes the same global windows (cheap for token ids) and places only the
    shards its own devices hold, so this is correct on one host or many. When the mesh splits
    the sequence, tokens (with their positions and targets) are reordered so every sequence
    shard gets an equal share of causal work (:func:`sharding.context.load_balance_order`).
    """
    inputs, targets = windows_BxL1[:, :-1], windows_BxL1[:, 1:]
    positions = np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape)
    host = {"inputs": inputs, "targets": targets, "positions": positions}
    if mesh is None:
        return {k: jax.numpy.asarray(v) for k, v in host.items()}
    shards = sequence_shards(mesh)
    if shards > 1:
        order = load_balance_order(inputs.shape[1], shards)
        host = {k: v[:, order] for k, v in host.items()}
    sharding = logical_sharding(mesh, ("batch", "seq"))
    return {
        k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: np.ascontiguousarray(v[idx]))
        for k, v in host.items()
    }
