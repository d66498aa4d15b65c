"""Train-step benchmark: compile time, step time and memory for layer stacking and remat choices.

    python benchmarks/train_step.py [--layers 2 4 8] [--steps 5] [--out benchmarks/out/train_step.json]

Prints a table and writes JSON. On CPU it runs small shapes so it stays quick; on a GPU pass
larger ``--embed`` / ``--seq`` / ``--batch``. Memory is XLA's own accounting
(``compiled.memory_analysis()``): the temporary buffers a step needs beyond its arguments.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from jaxlm.build import build_model
from jaxlm.config import MeshConfig, load_config
from jaxlm.data import PackedLoader, TokenStream, to_global_batch
from jaxlm.train import Trainer
from sharding.mesh import make_mesh


def bench_one(cfg, mesh, steps: int) -> dict:
    trainer = Trainer(cfg, mesh)
    state = trainer.init_state(nnx.state(build_model(cfg.model, mesh)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, cfg.train.batch_size * cfg.data.seq_len + 1).astype(np.int32)
    loader = PackedLoader(TokenStream(tokens, np.zeros(1, np.int64)), cfg.data.seq_len, cfg.train.batch_size, seed=0)
    batch = to_global_batch(loader.batch(0), mesh)
    t0 = time.perf_counter()
    compiled = trainer.lower_step(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp_mb = getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem is not None else float("nan")
    state, m = trainer.step(state, batch)  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = trainer.step(state, batch)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / steps
    tokens = cfg.train.batch_size * cfg.data.seq_len
    return {"compile_s": compile_s, "step_ms": step_s * 1e3, "tokens_per_s": tokens / step_s, "temp_mb": temp_mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="benchmarks/out/train_step.json")
    args = p.parse_args()
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    rows = []
    variants = [("scan", True, "none"), ("loop", False, "none"), ("scan", True, "full"), ("scan", True, "save_dots"),
                ("scan", True, "offload")]
    for layers in args.layers:
        for stacking, scan, remat in variants:
            if remat != "none" and layers != args.layers[-1]:
                continue  # remat policies only at the deepest size
            cfg = load_config(None, [
                f"model.num_layers={layers}", f"model.embed_dim={args.embed}", f"model.mlp_dim={args.embed * 3}",
                "model.num_heads=4", "model.num_kv_heads=2", f"model.head_dim={args.embed // 4}",
                f"model.scan_layers={str(scan).lower()}", f"model.remat={remat}", "model.compute_dtype=float32",
                f"data.seq_len={args.seq}", f"train.batch_size={args.batch}", "train.warmup_steps=1",
            ])
            r = {"layers": layers, "stacking": stacking, "remat": remat, **bench_one(cfg, mesh, args.steps)}
            rows.append(r)
            print(f"layers={layers:<3} {stacking:<5} remat={remat:<9} compile {r['compile_s']:6.2f} s  "
                  f"step {r['step_ms']:8.1f} ms  {r['tokens_per_s']:9.0f} tok/s  temp {r['temp_mb']:7.1f} MiB", flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "jax": jax.__version__, **vars(args)}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
