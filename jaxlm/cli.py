"""The ``jaxlm`` command line. Thin: parse arguments, then call the library.

    jaxlm train CONFIG [LAYOUT.yaml ...] [section.key=value ...] [--force]   # e.g. configs/layouts/fsdp_tp.yaml
    jaxlm generate --checkpoint DIR --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N ...]
    jaxlm serve CHECKPOINT [--host 127.0.0.1 --port 8000 --num-pages N ...]   # OpenAI-style HTTP server
    jaxlm generate --checkpoint DIR --chat --prompt TEXT          # instruct models: the model's chat template
    jaxlm convert SRC DST  # Hugging Face dir / .gguf -> jaxlm checkpoint, or jaxlm checkpoint -> Hugging Face dir
    jaxlm convert RUN DST --adapter-only   # a LoRA run's adapters as a PEFT adapter directory
    jaxlm prepare-data INPUT.txt|INPUT.jsonl ... --out DIR [--tokenizer PATH] [--text-field text]
    jaxlm prepare-data --chat CHATS.jsonl ... --out DIR --tokenizer MODEL/tokenizer/tokenizer.json [--seq-len N]
    jaxlm rules            # print the logical -> mesh sharding table
    jaxlm plan CONFIG [overrides ...] --target h100|h200|a100 --topology HOSTSxGPUS [--json PATH]
    jaxlm kernels CONFIG [section.key=value ...] [--target h100|h200|a100|cpu]   # what each call runs, and why
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
import warnings


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    from jaxlm.interop.eos import eos_token_ids
    from sharding import distributed

    distributed.initialize()
    fields = {f.name for f in dataclasses.fields(jaxlm.config.DecodeConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    defaults = jaxlm.config.Config()  # the sampling flags are checked before the checkpoint is read
    jaxlm.config.validate(defaults.replace(decode=dataclasses.replace(defaults.decode, **overrides)))
    model, cfg = jaxlm.restore(args.checkpoint, step=args.step, log=_warn)
    cfg = jaxlm.config.validate(cfg.replace(decode=dataclasses.replace(cfg.decode, **overrides)))
    tokenizer = jaxlm.load_tokenizer(cfg.data.tokenizer_path)
    eos = () if args.ignore_eos else eos_token_ids(cfg.data.tokenizer_path, tokenizer)
    eos += tuple(args.stop_token_ids)
    if args.chat:
        from jaxlm.interop.chat import chat

        if not cfg.data.tokenizer_path:
            raise jaxlm.ConfigError("--chat needs the model's own tokenizer; convert the model with `jaxlm convert`")
        outs = chat(model, args.prompt, cfg.decode, tokenizer_path=cfg.data.tokenizer_path, eos_token_id=eos)
        for prompt, out in zip(args.prompt, outs):
            print(f"--- user: {prompt}")
            print(out)
        return
    outs = jaxlm.generate(model, args.prompt, cfg.decode, tokenizer=tokenizer, eos_token_id=eos)
    for prompt, out in zip(args.prompt, outs):
        print(f"--- prompt: {prompt!r}")
        print(prompt + out)


def _serve(args: argparse.Namespace) -> None:
    import jaxlm
    from jaxlm.interop.chat import load_chat_template
    from jaxlm.interop.eos import eos_token_ids
    from jaxlm.serve import Engine
    from jaxlm.serve.server import serve

    model, cfg = jaxlm.restore(args.checkpoint, step=args.step, log=_warn)
    tokenizer = jaxlm.load_tokenizer(cfg.data.tokenizer_path)
    template = load_chat_template(cfg.data.tokenizer_path) if cfg.data.tokenizer_path else None
    try:
        engine = Engine(
            model, num_pages=args.num_pages, page_size=args.page_size, max_batch=args.max_batch,
            max_context=args.max_context, prefill_chunk=args.prefill_chunk, tokenizer=tokenizer,
            eos_token_id=eos_token_ids(cfg.data.tokenizer_path, tokenizer),
            enable_prefix_caching=args.prefix_caching, extra_key=str(args.checkpoint), host_kv_gib=args.host_kv_gib,
        )
    except ValueError as e:
        raise jaxlm.ConfigError(str(e)) from None
    del model  # the engine holds its own copy of the weights, laid out for decoding: free the restored ones
    engine.warmup()

    def ready(address):
        print(f"serving {args.checkpoint} on http://{address[0]}:{address[1]}", flush=True)

    chat_prompt_ids = (lambda messages: template.prompt_ids(tokenizer, messages)) if template is not None else None
    serve(engine, args.host, args.port, model_name=args.model_name or args.checkpoint, ready=ready,
          chat_prompt_ids=chat_prompt_ids, api_key=args.api_key)


def _convert(args: argparse.Namespace) -> None:
    from jaxlm.interop.convert import convert

    print(convert(args.src, args.dst, dtype=args.dtype, adapter_only=args.adapter_only))


def _prepare_data(args: argparse.Namespace) -> None:
    from jaxlm.prepare import prepare_chat, prepare_data

    if args.chat:
        meta = prepare_chat(args.inputs, args.out, tokenizer_path=args.tokenizer, seq_len=args.seq_len)
        print(f"{args.out}: {meta['num_docs']} conversations, {meta['num_tokens']} tokens ({meta['dtype']}), "
              f"{meta['num_assistant_tokens']} of them the assistant's; {meta['num_truncated']} longer than "
              f"--seq-len+1={args.seq_len + 1} tokens kept their start and lost the rest")
        return
    meta = prepare_data(args.inputs, args.out, tokenizer_path=args.tokenizer, text_field=args.text_field,
                        encoding_errors=args.encoding_errors)
    print(f"{args.out}: {meta['num_tokens']} tokens ({meta['dtype']}) in {meta['num_docs']} documents")


def _rules(_: argparse.Namespace) -> None:
    from sharding.rules import describe_rules

    print(describe_rules())


class _UsageError(Exception):
    """A command line argparse refused (printed as one line, exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``jaxlm: error: ...``) instead of usage text and a message."""

    def error(self, message: str) -> typing.NoReturn:
        where = "" if self.prog == "jaxlm" else f"{self.prog}: "  # main() already says "jaxlm: error:"
        raise _UsageError(f"{where}{message}; see `{self.prog} --help`")


def _api_key(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text) or not text.isprintable():
        raise argparse.ArgumentTypeError("must be a non-empty printable string without spaces")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def _gpu_target(text: str) -> str:
    from sharding.targets import TARGETS

    if text.lower() not in TARGETS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a GPU target; choose one of {', '.join(TARGETS)}")
    return text.lower()


def _gpu_target_or_cpu(text: str) -> str:
    from sharding.targets import TARGETS

    if text.lower() not in (*TARGETS, "cpu"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a target; choose one of {', '.join(TARGETS)}, cpu")
    return text.lower()


def _topology(text: str) -> str:
    from sharding.targets import topology_name

    try:
        topology_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0..65535)")
    return value


def _plan(args: argparse.Namespace) -> None:
    import json

    import jaxlm
    from sharding.targets import use_gpu_compile_toolchain

    try:
        use_gpu_compile_toolchain()
    except RuntimeError as e:
        raise jaxlm.ConfigError(str(e)) from None
    from jaxlm.plan import format_plan, plan_run

    if args.no_train and args.no_decode:
        raise jaxlm.ConfigError("--no-train and --no-decode leave nothing to plan: drop one of them")
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
    parser = _Parser(prog="jaxlm", description="Train and sample sharded Llama-family models.")
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
    g.add_argument("--step", type=_non_negative_int, default=None, help="checkpoint step (default: the newest readable)")
    g.add_argument("--max-new-tokens", dest="max_new_tokens", type=_positive_int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", dest="top_k", type=_non_negative_int)
    g.add_argument("--top-p", dest="top_p", type=float)
    g.add_argument("--seed", type=_non_negative_int)
    g.add_argument("--chat", action="store_true", help="treat each prompt as a user message in the model's chat template")
    g.add_argument("--stop-token-id", dest="stop_token_ids", type=_non_negative_int, action="append", default=[],
                   help="also stop at this token id (repeat for several); the model's EOS set always stops")
    g.add_argument("--ignore-eos", dest="ignore_eos", action="store_true",
                   help="do not stop at the model's EOS set (runs to --max-new-tokens or a --stop-token-id)")
    g.set_defaults(fn=_generate)
    s = sub.add_parser("serve", help="serve a checkpoint over HTTP: /v1/completions, /v1/chat/completions, /metrics")
    s.add_argument("checkpoint", help="run directory written by `jaxlm train`")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_port, default=8000, help="0 picks a free port (printed on start)")
    s.add_argument("--step", type=_non_negative_int, default=None, help="checkpoint step (default: the newest readable)")
    s.add_argument("--num-pages", dest="num_pages", type=_positive_int, default=1024, help="KV-cache pages in the pool")
    s.add_argument("--page-size", dest="page_size", type=_positive_int, default=16, help="tokens per page (a power of two >= 16)")
    s.add_argument("--max-batch", dest="max_batch", type=_positive_int, default=16, help="sequences decoded together")
    s.add_argument("--max-context", dest="max_context", type=_positive_int, default=512, help="prompt + max_tokens limit")
    s.add_argument("--prefill-chunk", dest="prefill_chunk", type=_positive_int, default=64, help="prompt tokens per step")
    s.add_argument("--model-name", dest="model_name", default=None,
                   help="the model's name in /v1/models and responses; requests naming another get a 404")
    s.add_argument("--api-key", dest="api_key", type=_api_key, default=os.environ.get("JAXLM_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every route but /health and /metrics (401 otherwise); "
                        "default: $JAXLM_API_KEY (which, unlike the flag, other users cannot read in the process list)")
    s.add_argument("--host-kv-gib", dest="host_kv_gib", type=_non_negative_float, default=0.0,
                   help="GiB of host memory keeping evicted KV pages for the prefix cache (default 0: none)")
    s.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="compute every prompt in full (no KV pages shared between requests)")
    s.set_defaults(fn=_serve)
    c = sub.add_parser("convert", help="Hugging Face dir or .gguf -> jaxlm checkpoint, or jaxlm checkpoint -> Hugging Face dir")
    c.add_argument("src", help="Hugging Face model directory, .gguf file, or jaxlm checkpoint directory")
    c.add_argument("dst", help="output directory")
    c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="parameter dtype written")
    c.add_argument("--adapter-only", dest="adapter_only", action="store_true",
                   help="for a LoRA run: write only its adapters, as a PEFT adapter (default: merged weights)")
    c.set_defaults(fn=_convert)
    p = sub.add_parser("prepare-data", help="tokenize .txt/.jsonl files into a directory for data.path")
    p.add_argument("inputs", nargs="+", help=".txt files (one document each) and .jsonl files (one document per line)")
    p.add_argument("--out", required=True, help="directory to create (an existing one is refused)")
    p.add_argument("--tokenizer", default="", help="tokenizer.json (default: the embedded tokenizer)")
    p.add_argument("--text-field", dest="text_field", default="text", help="JSONL field holding the text")
    p.add_argument("--encoding-errors", dest="encoding_errors", default="strict", choices=("strict", "replace", "ignore"),
                   help="input bytes that are not UTF-8: stop (strict), replace with U+FFFD, or ignore them")
    p.add_argument("--chat", action="store_true",
                   help="inputs are JSONL conversations ('messages', or 'prompt'/'completion'), rendered with the chat "
                        "template beside --tokenizer; stores which tokens are the assistant's (data.loss_on)")
    p.add_argument("--seq-len", dest="seq_len", type=_positive_int, default=2048,
                   help="--chat: a conversation longer than this + 1 tokens keeps its start (default 2048)")
    p.set_defaults(fn=_prepare_data)
    r = sub.add_parser("rules", help="print the logical-axis -> mesh-axis sharding table")
    r.set_defaults(fn=_rules)
    pl = sub.add_parser("plan", help="compile the train and decode steps for a GPU cluster: memory, collectives, roofline")
    pl.add_argument("config", help="path to a YAML config, e.g. configs/llama3_8b.yaml")
    pl.add_argument("overrides", nargs="*", help="section.key=value overrides or layout YAML files, as for train")
    pl.add_argument("--target", default="h100", type=_gpu_target, help="GPU model: h100, h200 or a100 (default h100)")
    pl.add_argument("--topology", default="1x8", type=_topology,
                    help="HOSTSxGPUS, e.g. 1x8 or 2x8, or SLICESxHOSTSxGPUS (default 1x8)")
    pl.add_argument("--decode-batch", dest="decode_batch", type=_positive_int, default=16, help="sequences decoded together")
    pl.add_argument("--context", type=_positive_int, default=None, help="tokens per decoded sequence (default: data.seq_len)")
    pl.add_argument("--memory-fraction", dest="memory_fraction", type=float, default=0.75,
                    help="share of HBM the run may use (JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75)")
    pl.add_argument("--json", default=None, help="also write the plan as JSON to this path")
    pl.add_argument("--no-train", dest="no_train", action="store_true", help="skip the train step")
    pl.add_argument("--no-decode", dest="no_decode", action="store_true", help="skip the decode step")
    pl.set_defaults(fn=_plan)
    k = sub.add_parser("kernels", help="print what each attention/projection call of a model runs, and why")
    k.add_argument("config", help="path to a YAML config, e.g. configs/demo.yaml")
    k.add_argument("overrides", nargs="*", help="section.key=value overrides or YAML files merged in order")
    k.add_argument("--target", default=None, type=_gpu_target_or_cpu, help="h100 | h200 | a100 | cpu (default: this machine)")
    k.set_defaults(fn=_kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code. Every expected failure is one line on stderr,
    ``jaxlm: error: ...``, with the exit code of its type (see :mod:`jaxlm.errors`)."""
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # overrides after a flag (`--target h100 model.x=1`) are overrides all the same
            if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides = [*args.overrides, *extra]
    except _UsageError as e:
        print(f"jaxlm: error: {e}", file=sys.stderr)
        return 2
    from jaxlm.errors import JaxlmError

    _one_line_errors_only()
    try:
        args.fn(args)
    except JaxlmError as e:
        print(f"jaxlm: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a file the command writes or reads: full disk, read-only, missing
        where = f" '{e.filename}'" if e.filename else ""
        print(f"jaxlm: error: cannot access{where}: {e.strerror or _one_line(e)}; free disk space or fix the "
              "permissions, then run again (what was saved before is kept)", file=sys.stderr)
        return 74  # EX_IOERR, as CheckpointError
    except MemoryError:
        print("jaxlm: error: out of host memory; lower the sizes this command asks for (model.*, train.batch_size, "
              "--max-new-tokens, --num-pages)",
              file=sys.stderr)
        return 1
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e)[:200]:
            raise  # not a bad input: a bug, shown with its traceback
        print(f"jaxlm: error: out of device memory ({_one_line(e)[:160]}); lower the model or batch size, "
              "raise train.grad_accum_steps, or use more devices", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jaxlm: interrupted", file=sys.stderr)
        return 130
    return 0


class _DropCheckpointerErrorLogs(logging.Filter):
    """Orbax logs each failed background write with its traceback, then raises it; the raised error
    becomes the command's one line, so the logged copies are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


class _DropOrphanedCheckpointerTasks(logging.Filter):
    """The sibling writes of a failed orbax save end as asyncio tasks whose error nobody retrieves
    (the first error already ended the save); asyncio logs each when it is collected."""

    def filter(self, record: logging.LogRecord) -> bool:
        # asyncio names the class: "Task exception ...", "_GatheringFuture exception ...", "Future exception ..."
        message = record.getMessage()
        if "exception was never retrieved" not in message:
            return True
        return not (f"{os.sep}orbax{os.sep}" in message or _raised_in_orbax_or_native_code(record.exc_info))


def _raised_in_orbax_or_native_code(exc_info) -> bool:
    """True for an error raised in orbax, or set on its future by native code (tensorstore's reads
    and writes: no Python frame at all). jaxlm itself never sets an exception on a future."""
    if not exc_info or exc_info[1] is None:
        return False
    tb = exc_info[1].__traceback__
    if tb is None:
        return True
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _one_line_errors_only() -> None:
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _DropCheckpointerErrorLogs) for f in absl.filters):
        absl.addFilter(_DropCheckpointerErrorLogs())
    tasks = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropOrphanedCheckpointerTasks) for f in tasks.filters):
        tasks.addFilter(_DropOrphanedCheckpointerTasks())
    # an asynchronous save cut short by an error leaves coroutines that were never awaited
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    # ... and tensorstore reads or writes of that save or restore that finish after orbax closed its event
    # loop: their done-callbacks reach sys.unraisablehook from a C++ thread (object None, so no "Exception
    # ignored in" header) while the failure itself is already on its way to the one line
    if not getattr(sys.unraisablehook, "_jaxlm", False):
        sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


def _drop_closed_loop_callbacks(hook):
    def unraisablehook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed" and unraisable.object is None:
            return
        hook(unraisable)

    unraisablehook._jaxlm = True
    return unraisablehook


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
