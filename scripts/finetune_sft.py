"""Fully fine-tune a converted model (``jaxlm convert``) on prepared chat data.

The model, its tokenizer and chat template come from ``--base`` (a converted checkpoint); the data,
training and checkpoint sections from CONFIG and its ``section.key=value`` overrides, as for
``jaxlm train``. The run is an ordinary training run: ``--out`` holds its checkpoints (rerunning
resumes), and ``jaxlm generate --checkpoint OUT --chat`` chats with the result.

    python scripts/finetune_sft.py configs/sft_demo.yaml --base runs/smollm2 --out runs/sft data.path=runs/sft-data
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import jaxlm

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from eval_sft import evaluate, report  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", help="YAML with the data, train and checkpoint sections")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    ap.add_argument("--base", required=True, help="converted model directory (jaxlm convert)")
    ap.add_argument("--out", required=True, help="checkpoint directory of the fine-tuning run")
    ap.add_argument("--eval", default="", help="held-out JSONL: print exact match and loss before and after (scripts/eval_sft.py)")
    ap.add_argument("--show", type=int, default=0, help="with --eval: print this many replies before and after")
    args = ap.parse_intermixed_args(argv)
    model, base = jaxlm.restore(args.base, log=lambda _: None)
    cfg = jaxlm.load_config(args.config, [*args.overrides, f"checkpoint.dir={args.out}"])
    cfg = cfg.replace(model=base.model, data=dataclasses.replace(cfg.data, tokenizer_path=base.data.tokenizer_path),
                      decode=base.decode)
    tok_path = cfg.data.tokenizer_path
    if args.eval:
        report(evaluate(model, tok_path, args.eval), "before fine-tuning: ", args.show, f"{args.out}-before.json")
    result = jaxlm.train(cfg, model)
    print(f"validation loss (assistant tokens): {result.val_loss_before:.4f} -> {result.val_loss_after:.4f}")
    if args.eval:
        report(evaluate(result.model, tok_path, args.eval), "after fine-tuning:  ", args.show, f"{args.out}-after.json")


if __name__ == "__main__":
    main()
