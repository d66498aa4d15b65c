"""The ``jaxlm`` command line. Thin: parse arguments, then call the library.

    jaxlm train CONFIG [section.key=value ...] [--force]
    jaxlm generate --checkpoint DIR --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N ...]
    jaxlm rules            # print the logical -> mesh sharding table
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _train(args: argparse.Namespace) -> None:
    import jaxlm

    cfg = jaxlm.load_config(args.config, args.overrides)
    result = jaxlm.train(cfg, force=args.force)
    if result.stopped_by is not None:
        last = int(result.history[-1]["step"]) if result.history else "?"
        where = f"checkpoint: {cfg.checkpoint.dir} (step {last}); " if cfg.checkpoint.dir else ""
        print(f"stopped by {result.stopped_by}; {where}run the same command to resume")
        return
    if cfg.checkpoint.dir:
        print(f"checkpoint: {cfg.checkpoint.dir} (step {cfg.train.steps})")
    print(f"validation loss: {result.val_loss_before:.4f} -> {result.val_loss_after:.4f}")


def _generate(args: argparse.Namespace) -> None:
    import jaxlm

    model, cfg = jaxlm.restore(args.checkpoint, step=args.step)
    overrides = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(cfg.decode)} and v is not None}
    decode = dataclasses.replace(cfg.decode, **overrides)
    cfg = jaxlm.config.validate(cfg.replace(decode=decode))
    outs = jaxlm.generate(model, args.prompt, cfg.decode, tokenizer=jaxlm.load_tokenizer(cfg.data.tokenizer_path))
    for prompt, out in zip(args.prompt, outs):
        print(f"--- prompt: {prompt!r}")
        print(prompt + out)


def _rules(_: argparse.Namespace) -> None:
    from sharding.rules import describe_rules

    print(describe_rules())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description="Train and sample sharded Llama-family models.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config", help="path to a YAML config, e.g. configs/demo.yaml")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    t.add_argument(
        "--force", action="store_true",
        help="start afresh even if checkpoint.dir holds a different model (its checkpoints are moved aside)",
    )
    t.set_defaults(fn=_train)
    g = sub.add_parser("generate", help="generate text from a checkpoint")
    g.add_argument("--checkpoint", required=True, help="run directory written by `jaxlm train`")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    g.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", dest="top_k", type=int)
    g.add_argument("--top-p", dest="top_p", type=float)
    g.add_argument("--seed", type=int)
    g.set_defaults(fn=_generate)
    r = sub.add_parser("rules", help="print the logical-axis -> mesh-axis sharding table")
    r.set_defaults(fn=_rules)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxlm.config import ConfigError
    from jaxlm.train import TrainingDiverged

    try:
        args.fn(args)
    except ConfigError as e:
        print(f"jaxlm: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"jaxlm: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
