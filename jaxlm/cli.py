"""The ``jaxlm`` command line. Thin: parse arguments, then call the library.

    jaxlm train CONFIG [LAYOUT.yaml ...] [section.key=value ...]   # e.g. configs/layouts/fsdp_tp.yaml
    jaxlm generate --checkpoint DIR --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N ...]
    jaxlm generate --checkpoint DIR --chat --prompt TEXT          # instruct models: the model's chat template
    jaxlm convert SRC DST  # Hugging Face dir / .gguf -> jaxlm checkpoint, or jaxlm checkpoint -> Hugging Face dir
    jaxlm rules            # print the logical -> mesh sharding table
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _train(args: argparse.Namespace) -> None:
    import jax

    import jaxlm
    from sharding import distributed

    distributed.initialize()  # joins a multi-process launch; before anything touches a device
    cfg = jaxlm.load_config(args.config, args.overrides)
    result = jaxlm.train(cfg)
    distributed.finish()
    if jax.process_index() == 0:
        if cfg.checkpoint.dir:
            print(f"checkpoint: {cfg.checkpoint.dir} (step {cfg.train.steps})")
        print(f"validation loss: {result.val_loss_before:.4f} -> {result.val_loss_after:.4f}")


def _generate(args: argparse.Namespace) -> None:
    import jaxlm
    from sharding import distributed

    distributed.initialize()
    model, cfg = jaxlm.restore(args.checkpoint, step=args.step)
    overrides = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(cfg.decode)} and v is not None}
    decode = dataclasses.replace(cfg.decode, **overrides)
    cfg = jaxlm.config.validate(cfg.replace(decode=decode))
    if args.chat:
        from jaxlm.interop.chat import chat

        if not cfg.data.tokenizer_path:
            raise jaxlm.ConfigError("--chat needs the model's own tokenizer; convert the model with `jaxlm convert`")
        for prompt, out in zip(args.prompt, chat(model, args.prompt, cfg.decode, tokenizer_path=cfg.data.tokenizer_path)):
            print(f"--- user: {prompt}")
            print(out)
        return
    outs = jaxlm.generate(model, args.prompt, cfg.decode, tokenizer=jaxlm.load_tokenizer(cfg.data.tokenizer_path))
    for prompt, out in zip(args.prompt, outs):
        print(f"--- prompt: {prompt!r}")
        print(prompt + out)


def _convert(args: argparse.Namespace) -> None:
    from jaxlm.interop.convert import convert

    print(convert(args.src, args.dst, dtype=args.dtype))


def _rules(_: argparse.Namespace) -> None:
    from sharding.rules import describe_rules

    print(describe_rules())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description="Train and sample sharded Llama-family models.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config", help="path to a YAML config, e.g. configs/demo.yaml")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides or YAML files merged in order, e.g. configs/layouts/fsdp_tp.yaml train.steps=100")
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
    g.add_argument("--chat", action="store_true", help="treat each prompt as a user message in the model's chat template")
    g.set_defaults(fn=_generate)
    c = sub.add_parser("convert", help="Hugging Face dir or .gguf -> jaxlm checkpoint, or jaxlm checkpoint -> Hugging Face dir")
    c.add_argument("src", help="Hugging Face model directory, .gguf file, or jaxlm checkpoint directory")
    c.add_argument("dst", help="output directory")
    c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="parameter dtype written")
    c.set_defaults(fn=_convert)
    r = sub.add_parser("rules", help="print the logical-axis -> mesh-axis sharding table")
    r.set_defaults(fn=_rules)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxlm.config import ConfigError

    try:
        args.fn(args)
    except ConfigError as e:
        print(f"jaxlm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
