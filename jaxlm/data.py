"""Tokens -> deterministic, resumable, packed batches, placed on the mesh shard by shard.

One loader for every corpus. A :class:`TokenStream` is a flat array of token ids with the start
offset of every document in it: a prepared directory (``jaxlm prepare-data``, memory-mapped) or
the embedded corpus (or ``data.text_path``) tokenized in memory as one document (the embedded
corpus's ids ship with it: :func:`shipped_ids`). The stream is
split once into train and validation streams (the last ``val_fraction`` of the *tokens* is held
out; a document straddling the split point continues as the first document of the validation
stream).

:class:`PackedLoader` cuts a stream into rows of ``seq_len + 1`` tokens with stride ``seq_len``
and visits them in a fresh permutation every epoch, drawn from ``(seed, epoch)``. Global batch
``i`` is a pure function of ``(seed, i)``, so the data position saved in a checkpoint is one
integer: the number of batches consumed. Rows pack documents back to back; every row carries

* ``segment_ids``  - 0 at the row start, +1 at every document start inside the row; attention
  is masked by them, so packed documents never see each other (present only when the stream
  has more than one document: otherwise every row is one segment and the key is left out);
* ``positions``    - restart at 0 at the row start and at every document start;
* ``loss_mask``    - 0 where the target token starts a different document than its input token
  (nothing learns to predict across a document boundary), else 1.

A stream of chat conversations (``jaxlm prepare-data --chat``) also carries one label per token
(:mod:`jaxlm.sft`); its rows hold whole conversations instead: packed greedily in order, as many
as fit in ``seq_len + 1`` tokens, the rest of the row padded (its own segment, never trained). A
conversation longer than ``seq_len + 1`` keeps its first ``seq_len + 1`` tokens and fills a row
alone. The loss mask is then 1 only where the *target* token is one ``data.loss_on`` trains (by
default the assistant's) and belongs to the same conversation as the input token. The split into
train and validation falls on a conversation boundary.

:func:`to_global_batch` places a batch on the mesh computing only the rows the calling
process's devices hold, reading only their tokens from the memory map.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import pathlib
import zipfile

import jax
import numpy as np
from jax.sharding import Mesh
from tokenizers import Tokenizer

from jaxlm.config import ConfigError, DataConfig
from jaxlm.errors import DataError
from sharding.context import load_balance_order, sequence_shards
from sharding.rules import logical_sharding

EOS_TOKEN = "<|endoftext|>"
FORMAT_VERSION = 1  # of a prepared directory: tokens.bin, docs.npy, meta.json


def _asset(name: str) -> pathlib.Path:
    return pathlib.Path(str(importlib.resources.files("jaxlm.assets") / name))


def _reason(e: BaseException) -> str:
    """An exception's message on one line, at most 120 characters (for a one-line error)."""
    return " ".join(str(e).split())[:120]


def tokenizer_file(path: str = "") -> pathlib.Path:
    """The tokenizer JSON file: ``path``, or the embedded byte-level BPE when empty."""
    p = pathlib.Path(path) if path else _asset("tokenizer.json")
    if p.is_dir():
        inside = p / "tokenizer.json"
        raise ConfigError(f"tokenizer file '{p}' is a directory, not a file; point to "
                          + (f"'{inside}'" if inside.is_file() else "a tokenizer.json"))
    if not p.is_file():
        raise ConfigError(f"tokenizer file '{p}' does not exist; set data.tokenizer_path to a tokenizer.json")
    return p


def tokenizer_hash(path: str = "") -> str:
    """sha256 of the tokenizer's JSON file (identifies the token ids a prepared directory holds)."""
    return hashlib.sha256(tokenizer_file(path).read_bytes()).hexdigest()


def tokenizer_changed(recorded_sha256: str | None, trained_with: str, path: str) -> tuple[str, str] | None:
    """(what differs, how to fix it) when the tokenizer at ``path`` is not the one a run recorded
    (``recorded_sha256`` of the file it was trained with, at ``trained_with``; "" is the embedded
    one); None when it is, when nothing was recorded, or when ``path`` is missing (loading it says so)."""
    if recorded_sha256 is None:
        return None
    try:
        if tokenizer_hash(path) == recorded_sha256:
            return None
    except ConfigError:
        return None
    if (pathlib.Path(trained_with).resolve() == pathlib.Path(path).resolve()) if trained_with and path else trained_with == path:
        name = f"tokenizer file '{path}'" if path else "embedded tokenizer"
        return (f"the {name} has changed since the run was trained (its sha256 is not the recorded one)",
                "put back the file it was trained with" if path else "use the jaxlm version it was trained with")
    was = f"'{trained_with}'" if trained_with else "the embedded tokenizer"
    return (f"the run was trained with another tokenizer ({was})",
            f"set data.tokenizer_path back to '{trained_with}'" + ("" if trained_with else " (the embedded tokenizer)"))


def load_tokenizer(path: str = "") -> Tokenizer:
    """A Hugging Face ``tokenizers`` tokenizer; the embedded byte-level BPE when ``path`` is empty.

    Raises ConfigError when the file does not exist or is not a ``tokenizer.json``."""
    p = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception for a bad file
        raise ConfigError(f"tokenizer file '{p}' is not a Hugging Face tokenizer.json ({_reason(e)}); "
                          "point to the tokenizer.json saved with the model") from None


def eos_id(tokenizer: Tokenizer) -> int | None:
    return tokenizer.token_to_id(EOS_TOKEN)


def load_text(path: str = "") -> str:
    """The training text; the embedded Shakespeare corpus when ``path`` is empty."""
    p = pathlib.Path(path) if path else _asset("shakespeare.txt")
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise ConfigError(f"text file '{p}' {what}; set data.text_path to a UTF-8 text file")
    return read_utf8(p, hint="convert it to UTF-8")


def read_utf8(p: pathlib.Path, errors: str = "strict", hint: str = "") -> str:
    """The text of ``p``; DataError naming the byte offset when it is not UTF-8 (``errors="strict"``).

    ``errors`` is Python's codec error handler: ``strict``, ``replace`` (U+FFFD) or ``ignore``.
    """
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(f"'{p}' is not UTF-8 text: byte {e.start} is 0x{raw[e.start]:02x}"
                        + (f"; {hint}" if hint else "")) from None


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """Documents back to back: ``tokens [n]`` (uint16/uint32/int32, possibly a memory map) and
    ``doc_starts [d]`` int64, ascending, the offset of every document start (``doc_starts[0] == 0``)."""

    tokens: np.ndarray
    doc_starts: np.ndarray
    labels: np.ndarray | None = None  # uint8 [n], chat streams only: 0 other, 1 assistant, 2 last assistant turn

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts)

    def split_at(self, n: int) -> tuple["TokenStream", "TokenStream"]:
        """Tokens ``[:n]`` and ``[n:]``; a document cut by ``n`` restarts as the tail's first."""
        starts = np.asarray(self.doc_starts)
        labels = (None, None) if self.labels is None else (self.labels[:n], self.labels[n:])
        head = TokenStream(self.tokens[:n], starts[starts < n], labels[0])
        tail_starts = np.unique(np.concatenate([[0], starts[starts >= n] - n])).astype(np.int64)
        return head, TokenStream(self.tokens[n:], tail_starts, labels[1])


@dataclasses.dataclass(frozen=True)
class TokenSplits:
    train: TokenStream
    val: TokenStream


def open_prepared(path: str, tokenizer_path: str = "") -> TokenStream:
    """The memory-mapped stream of a ``jaxlm prepare-data`` directory, checked against its
    meta.json and against the tokenizer in use (``data.tokenizer_path``)."""
    d = pathlib.Path(path)
    if not d.is_dir():
        raise ConfigError(f"data.path '{d}' is not a directory; create one with `jaxlm prepare-data INPUT... --out {d}`")
    meta_path = d / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        n_tokens, n_docs, version = int(meta["num_tokens"]), int(meta["num_docs"]), int(meta["format_version"])
        want_hash = str(meta["tokenizer_sha256"])
    except FileNotFoundError:
        raise ConfigError(f"data.path '{d}' has no meta.json; it was not written by `jaxlm prepare-data`") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"'{meta_path}' is corrupt ({type(e).__name__}: {e}); prepare the data again") from None
    if version != FORMAT_VERSION:
        raise DataError(f"'{d}' has format version {version}, this jaxlm reads {FORMAT_VERSION}; prepare the data again")
    if want_hash != tokenizer_hash(tokenizer_path):
        raise ConfigError(
            f"'{d}' was tokenized with '{meta.get('tokenizer') or 'the embedded tokenizer'}', not with "
            f"data.tokenizer_path='{tokenizer_path}' (tokenizer hashes differ); set data.tokenizer_path to match"
        )
    tokens_path, docs_path = d / "tokens.bin", d / "docs.npy"
    if not tokens_path.is_file() or tokens_path.stat().st_size != n_tokens * dtype.itemsize:
        raise DataError(f"'{tokens_path}' is missing or not {n_tokens} {dtype.name} tokens long; prepare the data again")
    try:
        starts = np.load(docs_path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"'{docs_path}' is missing or unreadable ({e}); prepare the data again") from None
    if starts.shape != (n_docs,) or n_docs == 0 or starts[0] != 0:
        raise DataError(f"'{docs_path}' does not hold {n_docs} document starts from 0; prepare the data again")
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
    labels = None
    if meta.get("labels"):
        labels_path = d / str(meta["labels"])
        if not labels_path.is_file() or labels_path.stat().st_size != n_tokens:
            raise DataError(f"'{labels_path}' is missing or not {n_tokens} uint8 labels long; prepare the data again")
        labels = np.memmap(labels_path, dtype=np.uint8, mode="r", shape=(n_tokens,))
    return TokenStream(tokens, starts, labels)


def corpus_key(text: str, tokenizer: Tokenizer) -> str:
    """sha256 over a text and a tokenizer's serialisation: equal keys, equal token ids."""
    h = hashlib.sha256(text.encode())
    h.update(hashlib.sha256(tokenizer.to_str().encode()).digest())
    return h.hexdigest()


SHIPPED_IDS = "shakespeare.tokens.npz"  # ``ids`` (uint16) and the ``key`` of the text and tokenizer they encode


def shipped_ids(key: str) -> np.ndarray | None:
    """The embedded corpus's token ids (int32) when ``key`` is the :func:`corpus_key` they were
    made from (``scripts/make_corpus.py``), else None: any other text or tokenizer, or an edited
    corpus or tokenizer, is tokenized. DataError when the shipped file is unreadable."""
    p = _asset(SHIPPED_IDS)
    try:
        with np.load(p) as f:
            if str(f["key"]) != key:
                return None
            return f["ids"].astype(np.int32)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"the embedded corpus's token ids '{p}' are unreadable ({_reason(e)}); reinstall jaxlm") from None


def load_stream(cfg: DataConfig, tokenizer: Tokenizer) -> TokenStream:
    """``data.path`` memory-mapped, else ``data.text_path`` (or the embedded corpus) as one document.

    The embedded corpus under the embedded tokenizer is read from its shipped ids (checked by
    :func:`corpus_key`) instead of tokenized again: that takes most of a second, in every process."""
    if cfg.path:
        return open_prepared(cfg.path, cfg.tokenizer_path)
    text = load_text(cfg.text_path)
    ids = shipped_ids(corpus_key(text, tokenizer))
    if ids is None:
        ids = np.asarray(tokenizer.encode(text).ids, dtype=np.int32)
    return TokenStream(ids, np.zeros(1, np.int64))


def _source(cfg: DataConfig) -> str:
    return f"data.path '{cfg.path}'" if cfg.path else f"data.text_path '{cfg.text_path}'" if cfg.text_path else "the embedded corpus"


def load_splits(cfg: DataConfig, tokenizer: Tokenizer) -> TokenSplits:
    """The stream split into train and the held-out last ``val_fraction`` of its tokens."""
    stream = load_stream(cfg, tokenizer)
    n = len(stream)
    n_val = int(n * cfg.val_fraction)
    if stream.labels is not None:  # whole conversations on each side: the first one starting in the held-out tail
        starts = np.asarray(stream.doc_starts)
        cut = int(starts[min(np.searchsorted(starts, n - n_val), len(starts) - 1)])
        if cut == 0:
            raise ConfigError(f"the data holds {len(starts)} conversation(s): too few to hold out "
                              f"data.val_fraction={cfg.val_fraction} of them; add conversations")
        return TokenSplits(*stream.split_at(cut))
    if n_val < cfg.seq_len + 1 or n - n_val < cfg.seq_len + 1:
        raise ConfigError(
            f"the corpus ({_source(cfg)}) has {n} tokens: too few for data.seq_len={cfg.seq_len} "
            f"with data.val_fraction={cfg.val_fraction}; give more text or a shorter data.seq_len"
        )
    train, val = stream.split_at(n - n_val)
    return TokenSplits(train=train, val=val)


def pack_rows(stream: TokenStream, row_ids: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Rows ``row_ids`` of the stream (row ``r`` = tokens ``[r * seq_len, r * seq_len + seq_len]``).

    Returns ``[len(row_ids), seq_len]`` arrays: ``inputs``, ``targets``, ``positions``,
    ``segment_ids`` (int32) and ``loss_mask`` (float32). Reads only these rows' tokens.
    """
    starts_R = np.asarray(row_ids, dtype=np.int64) * seq_len
    if len(starts_R):
        windows = np.stack([np.asarray(stream.tokens[s : s + seq_len + 1]) for s in starts_R]).astype(np.int32)
    else:
        windows = np.zeros((0, seq_len + 1), np.int32)
    offsets_RxL1 = starts_R[:, None] + np.arange(seq_len + 1)
    doc_RxL1 = np.searchsorted(stream.doc_starts, offsets_RxL1, side="right") - 1
    doc_start_RxL = np.maximum(np.asarray(stream.doc_starts)[doc_RxL1[:, :-1]], starts_R[:, None])
    return {
        "inputs": windows[:, :-1],
        "targets": windows[:, 1:],
        "positions": (offsets_RxL1[:, :-1] - doc_start_RxL).astype(np.int32),
        "segment_ids": (doc_RxL1[:, :-1] - doc_RxL1[:, :1]).astype(np.int32),
        "loss_mask": (doc_RxL1[:, 1:] == doc_RxL1[:, :-1]).astype(np.float32),
    }


def pack_conversations(doc_starts: np.ndarray, num_tokens: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(row_bounds [rows + 1], lengths [docs])``: row ``r`` holds documents ``row_bounds[r]`` to
    ``row_bounds[r + 1] - 1``, packed greedily in order into ``seq_len + 1`` tokens; ``lengths`` are the
    documents' lengths after truncation to ``seq_len + 1`` (keep the start)."""
    starts = np.asarray(doc_starts, dtype=np.int64)
    lengths = np.minimum(np.diff(np.append(starts, num_tokens)), seq_len + 1)
    bounds, used = [0], 0
    for d, n in enumerate(lengths.tolist()):
        if used + n > seq_len + 1:
            bounds.append(d)
            used = 0
        used += n
    bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64), lengths


def pack_chat_rows(
    stream: TokenStream, row_bounds: np.ndarray, lengths: np.ndarray, row_ids: np.ndarray, seq_len: int, loss_on: str
) -> dict[str, np.ndarray]:
    """Rows ``row_ids`` of whole conversations (:func:`pack_conversations`), as :func:`pack_rows`
    returns them, with the loss mask on the targets ``loss_on`` trains (:func:`jaxlm.sft.trained`)."""
    from jaxlm.sft import trained

    R, L1 = len(row_ids), seq_len + 1
    window = np.zeros((R, L1), np.int32)
    position = np.zeros((R, L1), np.int32)
    segment = np.zeros((R, L1), np.int32)
    keep = np.zeros((R, L1), bool)
    for i, r in enumerate(np.asarray(row_ids, dtype=np.int64)):
        at = 0
        for seg, d in enumerate(range(int(row_bounds[r]), int(row_bounds[r + 1]))):
            s, n = int(stream.doc_starts[d]), int(lengths[d])
            window[i, at : at + n] = stream.tokens[s : s + n]
            keep[i, at : at + n] = trained(np.asarray(stream.labels[s : s + n]), loss_on)
            position[i, at : at + n] = np.arange(n)
            segment[i, at : at + n] = seg
            at += n
        position[i, at:] = np.arange(L1 - at)  # padding: one more segment, never trained
        segment[i, at:] = int(row_bounds[r + 1] - row_bounds[r])
    return {
        "inputs": window[:, :-1],
        "targets": window[:, 1:],
        "positions": position[:, :-1],
        "segment_ids": segment[:, :-1],
        "loss_mask": ((segment[:, 1:] == segment[:, :-1]) & keep[:, 1:]).astype(np.float32),
    }


class PackedLoader:
    """Global batch ``i`` of ``[batch_size, seq_len]`` packed rows, a pure function of (seed, i).

    ``loss_on`` (``data.loss_on``) applies to chat streams (those with labels) only; a chat stream
    none of whose targets it trains (every conversation cut to ``seq_len + 1`` tokens before its
    first trained one) is a ConfigError naming ``what``.
    """

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, seed: int, shuffle: bool = True,
                 loss_on: str = "assistant", what: str = "the chat data"):
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.seed, self.shuffle, self.loss_on = seed, shuffle, loss_on
        self.num_truncated = 0  # chat streams: conversations longer than seq_len + 1 (their start is kept)
        if stream.labels is not None:
            self._rows, self._lengths = pack_conversations(stream.doc_starts, len(stream), seq_len)
            self.num_rows = len(self._rows) - 1
            self.num_truncated = int(np.sum(np.diff(np.append(stream.doc_starts, len(stream))) > seq_len + 1))
        else:
            self.num_rows = (len(stream) - 1) // seq_len
        if self.num_rows < 1:
            raise ConfigError(f"a stream of {len(stream)} tokens holds no row of data.seq_len+1={seq_len + 1} tokens")
        if stream.labels is not None and not self._trains_something():
            raise ConfigError(f"no token of {what} is trained with data.loss_on={loss_on} once each conversation "
                              f"is cut to data.seq_len+1={seq_len + 1} tokens; raise data.seq_len")
        many = stream.num_docs > 1 or stream.labels is not None
        self.keys = ("inputs", "targets", "positions", "loss_mask") + (("segment_ids",) if many else ())
        self._perm_epoch, self._perm = -1, np.arange(self.num_rows)

    def _trains_something(self) -> bool:
        """Whether any conversation, cut to ``seq_len + 1`` tokens, has a trained target (stops at the first)."""
        from jaxlm.sft import trained

        ends = np.append(self.stream.doc_starts[1:], len(self.stream))
        for start, end in zip(self.stream.doc_starts, ends):
            kept = min(int(end - start), self.seq_len + 1)
            if trained(np.asarray(self.stream.labels[start + 1 : start + kept]), self.loss_on).any():
                return True
        return False

    def _permutation(self, epoch: int) -> np.ndarray:
        if self.shuffle and epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._perm_epoch = epoch
        return self._perm

    def row_ids(self, index: int, rows: slice = slice(None)) -> np.ndarray:
        """Stream row ids ``[k]`` of global batch ``index``, rows ``rows`` of it."""
        js = np.arange(index * self.batch_size, (index + 1) * self.batch_size)[rows]
        epochs, ks = np.divmod(js, self.num_rows)
        return np.array([self._permutation(int(e))[k] for e, k in zip(epochs, ks)], dtype=np.int64)

    def rows(self, index: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """Host arrays ``[k, seq_len]`` (keys ``self.keys``) of rows ``rows`` of global batch ``index``."""
        if self.stream.labels is not None:
            packed = pack_chat_rows(self.stream, self._rows, self._lengths, self.row_ids(index, rows), self.seq_len,
                                    self.loss_on)
        else:
            packed = pack_rows(self.stream, self.row_ids(index, rows), self.seq_len)
        return {k: packed[k] for k in self.keys}

    def batch(self, index: int) -> "BatchRef":
        """Global batch ``index``, computed lazily (by :func:`to_global_batch`, shard by shard)."""
        return BatchRef(self, index)


@dataclasses.dataclass(frozen=True)
class BatchRef:
    """Global batch ``index`` of ``loader``; nothing is read until rows are asked for."""

    loader: PackedLoader
    index: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.loader.batch_size, self.loader.seq_len)

    def rows(self, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        return self.loader.rows(self.index, rows)


def to_global_batch(batch: BatchRef, mesh: Mesh | None) -> dict[str, jax.Array]:
    """The batch's arrays laid out on the mesh by batch (and sequence), ``[batch, seq_len]`` each.

    Each process computes only the rows its own devices hold (the callback of
    ``make_array_from_callback`` is asked for index slices; each distinct row slice is read
    once), so this is correct and cheap on one host or many. When the mesh splits the sequence,
    every array is reordered along it so every sequence shard gets an equal share of causal work
    (:func:`sharding.context.load_balance_order`); positions, segment ids and the loss mask
    travel with their tokens, so attention and the (weighted mean) loss do not change.
    """
    keys = batch.loader.keys
    if mesh is None:
        return {k: jax.numpy.asarray(v) for k, v in batch.rows().items()}
    B, T = batch.shape
    shards = sequence_shards(mesh)
    order = load_balance_order(T, shards) if shards > 1 else None
    cache: dict[tuple[int, int, int], dict[str, np.ndarray]] = {}

    def host_rows(rows: slice) -> dict[str, np.ndarray]:
        key = rows.indices(B)
        if key not in cache:
            host = batch.rows(slice(*key))
            cache[key] = host if order is None else {k: v[:, order] for k, v in host.items()}
        return cache[key]

    sharding = logical_sharding(mesh, ("batch", "seq"))
    return {
        k: jax.make_array_from_callback(
            (B, T), sharding, lambda idx, k=k: np.ascontiguousarray(host_rows(idx[0])[k][:, idx[1]])
        )
        for k in keys
    }
