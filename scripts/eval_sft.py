"""Held-out exact-match accuracy and loss of a chat model on an SFT JSONL file.

* **accuracy:** the conversation up to its last assistant turn is the prompt (the model's chat
  template with the generation prompt); the reply is generated greedily through the KV cache
  (:func:`jaxlm.interop.chat.chat`, stopping at the model's EOS set) and counts when it equals the
  last assistant turn after stripping surrounding whitespace and ignoring case;
* **loss:** mean next-token cross-entropy (nats) over the assistant tokens of the whole
  conversations (``data.loss_on=assistant``, the rule of :mod:`jaxlm.sft`), teacher-forced.

    python scripts/eval_sft.py --checkpoint runs/smollm2 --data runs/sft-demo/heldout.jsonl [--show 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

import jaxlm
from jaxlm.config import DecodeConfig
from jaxlm.interop.chat import chat, load_chat_template
from jaxlm.sft import encode_conversation, iter_conversations, trained
from jaxlm.train import cross_entropy_sum

_BATCH = 16


def heldout_loss(model, template, tokenizer: Tokenizer, conversations: list[list[dict]]) -> float:
    """Mean cross-entropy over the assistant tokens (targets) of ``conversations``, float64 on the host."""
    encoded = [encode_conversation(template, tokenizer, c) for c in conversations]
    T = max(len(ids) for ids, _ in encoded) - 1
    T = -(-T // 16) * 16
    forward = jax.jit(lambda ids, pos, tgt, mask: cross_entropy_sum(model(ids, pos)[0], tgt, mask))
    total = count = 0.0
    for b in range(0, len(encoded), _BATCH):
        chunk = encoded[b : b + _BATCH]
        ids = np.zeros((_BATCH, T + 1), np.int32)
        mask = np.zeros((_BATCH, T), np.float32)
        for i, (tok, lab) in enumerate(chunk):
            ids[i, : len(tok)] = tok
            mask[i, : len(tok) - 1] = trained(lab[1:], "assistant")
        pos = np.broadcast_to(np.arange(T, dtype=np.int32), (_BATCH, T))
        s, n = forward(jnp.asarray(ids[:, :-1]), jnp.asarray(pos), jnp.asarray(ids[:, 1:]), jnp.asarray(mask))
        total, count = total + float(s), count + float(n)
    return total / count


def evaluate(model, tok_path: str, data: str, max_new_tokens: int = 8) -> dict:
    """``{"accuracy", "loss", "n", "examples": [(question, want, got), ...]}`` of ``model`` (whose
    tokenizer.json, with the chat template beside it, is ``tok_path``) on the JSONL file ``data``."""
    template, tokenizer = load_chat_template(tok_path), Tokenizer.from_file(tok_path)
    conversations = [m for _, m in iter_conversations(pathlib.Path(data))]
    prompts = [c[:-1] for c in conversations]
    wants = [c[-1]["content"] for c in conversations]
    greedy = DecodeConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    replies = chat(model, prompts, greedy, tokenizer_path=tok_path)
    hits = [r.strip().lower() == w.strip().lower() for r, w in zip(replies, wants)]
    return {
        "accuracy": float(np.mean(hits)),
        "loss": heldout_loss(model, template, tokenizer, conversations),
        "n": len(conversations),
        "examples": [(p[-1]["content"], w, r) for p, w, r in zip(prompts, wants, replies)],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a jaxlm run or converted model directory")
    ap.add_argument("--data", required=True, help="held-out JSONL conversations (the last turn is the assistant's)")
    ap.add_argument("--label", default="", help="printed before the numbers")
    ap.add_argument("--show", type=int, default=0, help="print this many replies next to the expected answer")
    ap.add_argument("--json", default="", help="also write the numbers to this file")
    args = ap.parse_args(argv)
    model, cfg = jaxlm.restore(args.checkpoint, log=lambda _: None)
    report(evaluate(model, cfg.data.tokenizer_path, args.data), args.label, args.show, args.json)


def report(out: dict, label: str = "", show: int = 0, json_path: str = "") -> None:
    """Print the numbers of :func:`evaluate` (and ``show`` replies); write them to ``json_path`` when given."""
    print(f"{label}held-out exact match {out['accuracy']:.1%} of {out['n']}, held-out loss {out['loss']:.3f}", flush=True)
    for _, want, got in out["examples"][:show]:
        print(f"  want {want!r:24} got {got!r}")
    if json_path:
        pathlib.Path(json_path).write_text(json.dumps({k: v for k, v in out.items() if k != "examples"}, indent=2) + "\n")


if __name__ == "__main__":
    main()
