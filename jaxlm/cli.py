"""The ``jaxlm`` command line. Thin: parse arguments, then call the library.

    jaxlm train CONFIG [LAYOUT.yaml ...] [section.key=value ...] [--force]   # e.g. configs/layouts/fsdp_tp.yaml
    jaxlm generate --checkpoint DIR --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N ...]
    jaxlm serve CHECKPOINT [--host 127.0.0.1 --port 8000 --num-pages N ...]   # OpenAI-style HTTP server
    jaxlm generate --checkpoint DIR --chat --prompt TEXT          # instruct models: the model's chat template
    jaxlm convert SRC DST  # Hugging Face dir / .gguf -> jaxlm checkpoint, or jaxlm checkpoint -> Hugging Face dir
    jaxlm prepare-data INPUT.txt|INPUT.jsonl ... --out DIR [--tokenizer PATH] [--text-field text]
    jaxlm rules            # print the logical -> mesh sharding table
    jaxlm plan CONFIG [overrides ...] --target h100|h200|a100 --topology HOSTSxGPUS [--json PATH]
    jaxlm kernels CONFIG [section.key=value ...] [--target h100|h200|a100|cpu]   # what each call runs, and why
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
    result = jaxlm.train(cfg, force=args.force)
    distributed.finish()
    if jax.process_index() != 0:
        return
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


def _serve(args: argparse.Namespace) -> None:
    import jaxlm
    from jaxlm.data import eos_id
    from jaxlm.serve import Engine
    from jaxlm.serve.server import serve

    model, cfg = jaxlm.restore(args.checkpoint, step=args.step)
    tokenizer = jaxlm.load_tokenizer(cfg.data.tokenizer_path)
    stop_id, render_chat = eos_id(tokenizer), None
    if cfg.data.tokenizer_path:  # an instruct model converted with its chat template: use it
        from jaxlm.interop.chat import chat_renderer

        template = chat_renderer(cfg.data.tokenizer_path, tokenizer)
        if template is not None:
            render_chat, stop_id = template
    try:
        engine = Engine(
            model, num_pages=args.num_pages, page_size=args.page_size, max_batch=args.max_batch,
            max_context=args.max_context, prefill_chunk=args.prefill_chunk, tokenizer=tokenizer, eos_id=stop_id,
        )
    except ValueError as e:
        raise jaxlm.ConfigError(str(e)) from None
    engine.warmup()

    def ready(address):
        print(f"serving {args.checkpoint} on http://{address[0]}:{address[1]}", flush=True)

    serve(engine, args.host, args.port, model_name=args.model_name or args.checkpoint, ready=ready, render_chat=render_chat)


def _convert(args: argparse.Namespace) -> None:
    from jaxlm.interop.convert import convert

    print(convert(args.src, args.dst, dtype=args.dtype))


def _prepare_data(args: argparse.Namespace) -> None:
    from jaxlm.prepare import prepare_data

    meta = prepare_data(args.inputs, args.out, tokenizer_path=args.tokenizer, text_field=args.text_field)
    print(f"{args.out}: {meta['num_tokens']} tokens ({meta['dtype']}) in {meta['num_docs']} documents")


def _rules(_: argparse.Namespace) -> None:
    from sharding.rules import describe_rules

    print(describe_rules())


def _plan(args: argparse.Namespace) -> None:
    import json
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before jax loads: the CUDA plugin's "no driver" lines
    import jaxlm
    from sharding.targets import use_gpu_compile_toolchain

    try:
        use_gpu_compile_toolchain()
    except RuntimeError as e:
        raise jaxlm.ConfigError(str(e)) from None
    from jaxlm.plan import format_plan, plan_run

    cfg = jaxlm.load_config(args.config, args.overrides)
    plan = plan_run(
        cfg, args.target, args.topology, train=not args.no_train, decode=not args.no_decode,
        decode_batch=args.decode_batch, context=args.context, memory_fraction=args.memory_fraction,
    )
    print(f"{args.config}: {format_plan(plan)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan.to_dict(), f, indent=1)


def _kernels(args: argparse.Namespace) -> None:
    import jaxlm
    from jaxlm.kernels import format_kernel_calls

    cfg = jaxlm.load_config(args.config, args.overrides)
    try:
        print(format_kernel_calls(cfg, args.target))
    except ValueError as e:  # an unknown --target
        raise jaxlm.ConfigError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description="Train and sample sharded Llama-family models.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config", help="path to a YAML config, e.g. configs/demo.yaml")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides or YAML files merged in order, e.g. configs/layouts/fsdp_tp.yaml train.steps=100")
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
    g.add_argument("--chat", action="store_true", help="treat each prompt as a user message in the model's chat template")
    g.set_defaults(fn=_generate)
    s = sub.add_parser("serve", help="serve a checkpoint over HTTP: /v1/completions, /v1/chat/completions, /metrics")
    s.add_argument("checkpoint", help="run directory written by `jaxlm train`")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    s.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    s.add_argument("--num-pages", dest="num_pages", type=int, default=1024, help="KV-cache pages in the pool")
    s.add_argument("--page-size", dest="page_size", type=int, default=16, help="tokens per page (a power of two >= 16)")
    s.add_argument("--max-batch", dest="max_batch", type=int, default=16, help="sequences decoded together")
    s.add_argument("--max-context", dest="max_context", type=int, default=512, help="prompt + max_tokens limit")
    s.add_argument("--prefill-chunk", dest="prefill_chunk", type=int, default=64, help="prompt tokens per step")
    s.add_argument("--model-name", dest="model_name", default=None, help="name reported in responses")
    s.set_defaults(fn=_serve)
    c = sub.add_parser("convert", help="Hugging Face dir or .gguf -> jaxlm checkpoint, or jaxlm checkpoint -> Hugging Face dir")
    c.add_argument("src", help="Hugging Face model directory, .gguf file, or jaxlm checkpoint directory")
    c.add_argument("dst", help="output directory")
    c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="parameter dtype written")
    c.set_defaults(fn=_convert)
    p = sub.add_parser("prepare-data", help="tokenize .txt/.jsonl files into a directory for data.path")
    p.add_argument("inputs", nargs="+", help=".txt files (one document each) and .jsonl files (one document per line)")
    p.add_argument("--out", required=True, help="directory to create (an existing one is refused)")
    p.add_argument("--tokenizer", default="", help="tokenizer.json (default: the embedded tokenizer)")
    p.add_argument("--text-field", dest="text_field", default="text", help="JSONL field holding the text")
    p.set_defaults(fn=_prepare_data)
    r = sub.add_parser("rules", help="print the logical-axis -> mesh-axis sharding table")
    r.set_defaults(fn=_rules)
    pl = sub.add_parser("plan", help="compile the train and decode steps for a GPU cluster: memory, collectives, roofline")
    pl.add_argument("config", help="path to a YAML config, e.g. configs/llama3_8b.yaml")
    pl.add_argument("overrides", nargs="*", help="section.key=value overrides or layout YAML files, as for train")
    pl.add_argument("--target", default="h100", help="GPU model: h100, h200 or a100 (sharding/targets.py)")
    pl.add_argument("--topology", default="1x8", help="HOSTSxGPUS, e.g. 1x8 or 2x8")
    pl.add_argument("--decode-batch", dest="decode_batch", type=int, default=16, help="sequences decoded together")
    pl.add_argument("--context", type=int, default=None, help="tokens per decoded sequence (default: data.seq_len)")
    pl.add_argument("--memory-fraction", dest="memory_fraction", type=float, default=0.75,
                    help="share of HBM the run may use (JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75)")
    pl.add_argument("--json", default=None, help="also write the plan as JSON to this path")
    pl.add_argument("--no-train", dest="no_train", action="store_true", help="skip the train step")
    pl.add_argument("--no-decode", dest="no_decode", action="store_true", help="skip the decode step")
    pl.set_defaults(fn=_plan)
    k = sub.add_parser("kernels", help="print what each attention/projection call of a model runs, and why")
    k.add_argument("config", help="path to a YAML config, e.g. configs/demo.yaml")
    k.add_argument("overrides", nargs="*", help="section.key=value overrides or YAML files merged in order")
    k.add_argument("--target", default=None, help="h100 | h200 | a100 | cpu (default: this machine)")
    k.set_defaults(fn=_kernels)
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
