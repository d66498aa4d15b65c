"""``jaxlm prepare-data``: text files -> a directory of token ids the data loader memory-maps.

Inputs are ``.txt`` files (one document per file) and ``.jsonl`` files (one JSON object per line,
the document in ``text_field``). Every document is tokenized, followed by the EOS token, and
appended to ``DIR/tokens.bin`` (uint16 when the vocabulary fits, else uint32); ``DIR/docs.npy``
holds the int64 start offset of every document and ``DIR/meta.json`` describes both::

    prepare_data(["a.txt", "b.jsonl"], "data/mine")   # then train with data.path=data/mine

With ``--chat`` (:func:`prepare_chat`) the inputs are JSONL conversations (:mod:`jaxlm.sft`): each is
rendered with the model's chat template found beside ``--tokenizer``, one document per
conversation, and ``DIR/labels.bin`` holds one uint8 assistant label per token (``data.loss_on``
reads it). A conversation longer than ``--seq-len + 1`` tokens keeps its first ``seq_len + 1``
tokens and drops the rest; how many were cut is printed and kept in meta.json (``num_truncated``).

Documents are read and tokenized a batch at a time and written as they come, so memory holds one
batch of text plus the document offsets. Everything is written under a temporary name next to
``DIR`` and renamed into place at the end; an existing ``DIR`` is refused, never overwritten.
"""

from __future__ import annotations

import array
import json
import os
import pathlib
import shutil
from typing import Iterable, Iterator

import numpy as np

from jaxlm.config import ConfigError
from jaxlm.errors import DataError
from jaxlm.data import EOS_TOKEN, FORMAT_VERSION, load_tokenizer, tokenizer_hash

_BATCH_DOCS = 256  # documents tokenized together (encode_batch runs them in parallel)


ENCODING_ERRORS = ("strict", "replace", "ignore")  # Python codec error handlers, as --encoding-errors


def _not_utf8(p: pathlib.Path, offset: int, byte: int, where: str = "") -> DataError:
    return DataError(
        f"input '{p}'{where} is not UTF-8 text: byte {offset} is 0x{byte:02x}; convert it to UTF-8, or pass "
        "--encoding-errors replace (or ignore) to replace (or drop) the bytes that are not"
    )


def iter_documents(paths: Iterable[str], text_field: str = "text", encoding_errors: str = "strict") -> Iterator[str]:
    """Document texts of ``.txt`` (whole file) and ``.jsonl`` (``text_field`` of each line) files, in order.

    Text that is not UTF-8 raises DataError naming the file and byte offset, unless
    ``encoding_errors`` is ``replace`` (U+FFFD) or ``ignore`` (the bytes are dropped).
    """
    if encoding_errors not in ENCODING_ERRORS:
        raise ConfigError(f"encoding_errors '{encoding_errors}' is not one of {', '.join(ENCODING_ERRORS)}")
    for name in paths:
        p = pathlib.Path(name)
        if not p.is_file():
            raise ConfigError(f"input '{p}' " + ("is a directory, not a file" if p.is_dir() else "does not exist"))
        if p.suffix == ".txt":
            raw = p.read_bytes()
            try:
                yield raw.decode("utf-8", errors=encoding_errors)
            except UnicodeDecodeError as e:
                raise _not_utf8(p, e.start, raw[e.start]) from None
        elif p.suffix == ".jsonl":
            with p.open("rb") as f:
                offset = 0
                for line_no, raw in enumerate(f, 1):
                    start, offset = offset, offset + len(raw)
                    try:
                        line = raw.decode("utf-8", errors=encoding_errors)
                    except UnicodeDecodeError as e:
                        raise _not_utf8(p, start + e.start, raw[e.start], f" line {line_no}") from None
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[text_field]
                    except (ValueError, KeyError, TypeError):
                        raise DataError(
                            f"{p}:{line_no} is not a JSON object with a string field '{text_field}'; "
                            "set --text-field to the field holding the text"
                        ) from None
                    if not isinstance(text, str):
                        raise DataError(f"{p}:{line_no}: field '{text_field}' is {type(text).__name__}, not a string")
                    yield text
        else:
            raise ConfigError(f"input '{p}' is neither .txt (one document) nor .jsonl (one document per line)")


def _batches(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        if doc:  # an empty document would be a lone EOS
            batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_paths(out_dir: pathlib.Path, inputs: list[str]) -> None:
    """ConfigError, before any work, when ``out_dir`` exists or cannot be made, or an input is missing."""
    if out_dir.exists():
        raise ConfigError(f"output directory '{out_dir}' already exists; choose a new --out (nothing was written)")
    if not inputs:
        raise ConfigError("give at least one input .txt or .jsonl file")
    for parent in out_dir.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"--out '{out_dir}': '{parent}' is a file, not a directory; choose another --out")
    for name in inputs:  # every input checked before any work
        if not pathlib.Path(name).is_file():
            raise ConfigError(f"input '{name}' " + ("is a directory, not a file" if pathlib.Path(name).is_dir() else "does not exist"))


def _make_tmp(out_dir: pathlib.Path) -> pathlib.Path:
    """The temporary directory next to ``out_dir`` that is renamed to it at the end."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise ConfigError(f"cannot create --out '{out_dir}': {e.strerror or e}; choose a writable location") from None
    return tmp


def _commit(tmp: pathlib.Path, out_dir: pathlib.Path, starts: array.array, dtype: np.dtype, vocab: int,
            n_tokens: int, eos_id: int | None, tokenizer_path: str, extra: dict | None = None) -> dict:
    """Write the document index and meta.json into ``tmp``, then rename it to ``out_dir`` (atomic:
    a prepared directory is whole or absent). Returns the meta."""
    np.save(tmp / "docs.npy", np.frombuffer(starts, dtype=np.int64))
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "num_tokens": n_tokens,
        "num_docs": len(starts),
        "eos_id": eos_id,
        "tokenizer": tokenizer_path,
        "tokenizer_sha256": tokenizer_hash(tokenizer_path),
        **(extra or {}),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    os.rename(tmp, out_dir)
    return meta


def prepare_chat(inputs: list[str], out: str, tokenizer_path: str, seq_len: int = 2048) -> dict:
    """Render and tokenize the JSONL conversations of ``inputs`` into the directory ``out``. Returns its meta.json.

    ``tokenizer_path`` is the model's ``tokenizer.json``; its chat template is read beside it
    (``tokenizer_config.json`` or ``chat_template.jinja``, as ``jaxlm convert`` writes them).
    Conversations longer than ``seq_len + 1`` tokens keep their first ``seq_len + 1`` tokens.
    Raises ConfigError for a bad argument or a tokenizer without a chat template, DataError naming
    ``file:line`` for a bad row; nothing is left behind either way.
    """
    from jaxlm.interop.chat import load_chat_template
    from jaxlm.sft import LAST_ASSISTANT, encode_conversation, iter_conversations

    out_dir = pathlib.Path(out)
    _check_paths(out_dir, inputs)
    if not tokenizer_path:
        raise ConfigError("--chat needs --tokenizer: the model's tokenizer.json, with its chat template beside it")
    if seq_len < 1:
        raise ConfigError(f"--seq-len {seq_len} must be positive")
    for name in inputs:
        if pathlib.Path(name).suffix != ".jsonl":
            raise ConfigError(f"input '{name}' is not .jsonl; --chat reads JSONL rows with 'messages' or 'prompt'/'completion'")
    tokenizer = load_tokenizer(tokenizer_path)
    template = load_chat_template(tokenizer_path)
    if template is None:
        raise ConfigError(f"no chat template beside '{tokenizer_path}' (tokenizer_config.json or chat_template.jinja); "
                          "--chat needs the model's template")
    vocab = tokenizer.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
    tmp = _make_tmp(out_dir)
    try:
        starts = array.array("q")
        n_tokens = n_truncated = n_assistant = 0
        with (tmp / "tokens.bin").open("wb") as f, (tmp / "labels.bin").open("wb") as g:
            for name in inputs:
                for where, messages in iter_conversations(pathlib.Path(name)):
                    ids, labels = encode_conversation(template, tokenizer, messages, where)
                    if len(ids) > seq_len + 1:  # keep the start, drop the rest
                        ids, labels = ids[: seq_len + 1], labels[: seq_len + 1]
                        n_truncated += 1
                    starts.append(n_tokens)
                    n_tokens += len(ids)
                    n_assistant += int(np.count_nonzero(labels))
                    f.write(ids.astype(dtype).tobytes())
                    g.write(labels.tobytes())
        if not starts:
            raise ConfigError("the inputs hold no conversation; nothing to prepare")
        if not n_assistant:
            raise DataError(f"no assistant token is left in the {len(starts)} conversations ({n_truncated} cut to "
                            f"--seq-len+1={seq_len + 1} tokens); raise --seq-len")
        return _commit(tmp, out_dir, starts, dtype, vocab, n_tokens, tokenizer.token_to_id(EOS_TOKEN), tokenizer_path, {
            "labels": "labels.bin",  # uint8 per token: 0 other, 1 assistant, 2 last assistant turn
            "seq_len": seq_len,
            "num_truncated": n_truncated,
            "num_assistant_tokens": n_assistant,
            "max_label": LAST_ASSISTANT,
        })
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_data(
    inputs: list[str], out: str, tokenizer_path: str = "", text_field: str = "text", encoding_errors: str = "strict"
) -> dict:
    """Tokenize ``inputs`` into the directory ``out`` (which must not exist). Returns its meta.json.

    ``encoding_errors`` (``strict`` | ``replace`` | ``ignore``) handles input bytes that are not
    UTF-8. Raises ConfigError for a bad argument or an ``out`` that cannot be created, DataError
    for input that cannot be read; nothing is left behind either way.
    """
    out_dir = pathlib.Path(out)
    _check_paths(out_dir, inputs)
    tokenizer = load_tokenizer(tokenizer_path)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    if eos is None:
        raise ConfigError(f"the tokenizer has no '{EOS_TOKEN}' token to end documents with; add it to the tokenizer")
    vocab = tokenizer.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
    tmp = _make_tmp(out_dir)
    try:
        starts = array.array("q")  # 8 bytes a document
        n_tokens = 0
        with (tmp / "tokens.bin").open("wb") as f:
            for batch in _batches(iter_documents(inputs, text_field, encoding_errors), _BATCH_DOCS):
                for enc in tokenizer.encode_batch(batch):
                    ids = np.asarray(enc.ids + [eos], dtype=np.int64)
                    starts.append(n_tokens)
                    n_tokens += len(ids)
                    f.write(ids.astype(dtype).tobytes())
        if not starts:
            raise ConfigError("the inputs hold no text; nothing to prepare")
        return _commit(tmp, out_dir, starts, dtype, vocab, n_tokens, eos, tokenizer_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
