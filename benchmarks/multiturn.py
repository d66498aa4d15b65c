"""Multi-turn chat benchmark: time to first token per turn with the prefix cache on and off.

    python benchmarks/multiturn.py [--users 8 --max-batch 4] [--turns 8] [--configs off on small small+host]
                                   [--out benchmarks/out/multiturn.json]

Simulated users hold ``--turns``-turn conversations with the serving engine at the same time
(``--max-batch`` of them running, the others queued, as a server under load).
Every conversation starts with the same ``--system-tokens`` system prompt; each turn appends
``--user-tokens`` new user tokens to the whole history (prompt and answers so far) and asks for
``--answer-tokens`` tokens; a user sends the next turn as soon as the answer is complete. Time to
first token (arrival to first token, queueing included) is averaged per turn over the users.

Configurations (each on a fresh engine, compiled before timing):

* ``off``: prefix caching disabled: every turn prefills its whole history, so TTFT grows linearly.
* ``on``: a pool that holds every conversation: a turn prefills only its new tokens (and the part
  of the last page not yet full).
* ``on, small pool``: a pool of ``--small-pages`` pages, enough for the running sequences but not
  for every user's history: queued users' pages are evicted and their history recomputed. ``+ host``: the same pool with ``--host-kv-gib`` of host memory; evicted
  pages are copied back instead.

Prints a table and writes JSON with per-turn TTFT and hit rate, and the engine's stats.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import jax
import numpy as np

from jaxlm.build import build_model
from jaxlm.config import load_config
from jaxlm.generate import kv_bytes_per_token
from jaxlm.serve import Engine, Request

PAGE = 16
CONFIGS = {"off": "off", "on": "on", "small": "on, small pool", "small+host": "on, small pool + host"}


def converse(engine: Engine, args, seed: int) -> dict:
    """Run every user's conversation; per-turn TTFTs (s) and prefix-cache hit rates."""
    rng = np.random.default_rng(seed)
    vocab = engine.cfg.vocab_size
    system = rng.integers(0, vocab, args.system_tokens).tolist()
    history = [list(system) for _ in range(args.users)]
    ttft = [[] for _ in range(args.turns)]
    turn_of, waiting = [0] * args.users, {}
    before = engine.stats()

    def send(u):
        history[u] += rng.integers(0, vocab, args.user_tokens).tolist()
        rid = engine.add_request(Request(list(history[u]), max_tokens=args.answer_tokens, temperature=0.0,
                                         ignore_eos=True))
        waiting[rid] = u

    for u in range(args.users):
        send(u)
    while engine.has_work():
        for e in engine.step():
            if e.output is None:
                continue
            u = waiting.pop(e.request_id)
            t = turn_of[u]
            ttft[t].append(e.output.time_to_first_token_s)
            history[u] += e.output.token_ids
            turn_of[u] += 1
            if turn_of[u] < args.turns:
                send(u)
    after = engine.stats()
    return {
        "ttft_s": [float(np.mean(x)) for x in ttft],
        "context_tokens": [args.system_tokens + (t + 1) * args.user_tokens + t * args.answer_tokens for t in range(args.turns)],
        "hit_rate": (after["prefix_cache_hits_total"] - before["prefix_cache_hits_total"])
        / max(after["prefix_cache_queries_total"] - before["prefix_cache_queries_total"], 1),
        "prefill_tokens": after["prefill_tokens_total"] - before["prefill_tokens_total"],
        "stats": after,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=4, help="sequences running at once; the other users queue")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=64)
    p.add_argument("--user-tokens", type=int, default=48)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--embed", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prefill-chunk", type=int, default=64)
    p.add_argument("--small-pages", type=int, default=160,
                   help="pool of the small-pool runs (pages of 16 tokens): holds the running sequences, not every history")
    p.add_argument("--host-kv-gib", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=1, help="conversations per configuration (different random tokens)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--out", default="benchmarks/out/multiturn.json")
    args = p.parse_args()
    cfg = load_config(None, [
        f"model.num_layers={args.layers}", f"model.embed_dim={args.embed}", f"model.mlp_dim={args.embed * 3}",
        "model.num_heads=8", "model.num_kv_heads=4", f"model.head_dim={args.embed // 8}",
        "model.compute_dtype=float32", "model.attention_impl=auto",
    ])
    model = build_model(cfg.model)
    longest = args.system_tokens + args.turns * (args.user_tokens + args.answer_tokens)
    context = -(-longest // PAGE) * PAGE
    big = 1 + args.users * (context // PAGE) + args.users
    shapes = dict(page_size=PAGE, max_batch=args.max_batch, max_context=context, prefill_chunk=args.prefill_chunk,
                  prefill_batch=args.max_batch)
    every = {
        "off": dict(num_pages=big, enable_prefix_caching=False),
        "on": dict(num_pages=big),
        "small": dict(num_pages=args.small_pages),
        "small+host": dict(num_pages=args.small_pages, host_kv_gib=args.host_kv_gib),
    }
    configs = [(CONFIGS[c], every[c]) for c in args.configs]
    load = os.getloadavg()[0]
    results = {}
    for name, kw in configs:
        engine = Engine(model, **shapes, **kw)
        engine.warmup()  # compiles every program the engine runs (prefill, decode, page copies)
        runs = [converse(engine, args, seed=s) for s in range(args.repeats)]
        results[name] = {
            "ttft_s": np.mean([r["ttft_s"] for r in runs], axis=0).tolist(),
            "context_tokens": runs[0]["context_tokens"],
            "hit_rate": float(np.mean([r["hit_rate"] for r in runs])),
            "prefill_tokens": float(np.mean([r["prefill_tokens"] for r in runs])),
            "num_pages": kw["num_pages"], "stats": runs[-1]["stats"],
        }
        r = results[name]
        print(f"{name:>22}: hit rate {r['hit_rate']:.2f}, TTFT turn 1 {r['ttft_s'][0] * 1e3:.1f} ms, "
              f"turn {args.turns} {r['ttft_s'][-1] * 1e3:.1f} ms ({r['ttft_s'][-1] / r['ttft_s'][0]:.2f}x)", flush=True)

    names = [n for n, _ in configs]
    print(f"\nTTFT (ms) per turn, mean over {args.users} users x {args.repeats} conversations")
    print("| turn | context | " + " | ".join(names) + " |")
    print("|---:|---:|" + "---:|" * len(names))
    for t in range(args.turns):
        cells = " | ".join(f"{results[n]['ttft_s'][t] * 1e3:.1f}" for n in names)
        print(f"| {t + 1} | {results[names[0]]['context_tokens'][t]} | {cells} |")
    print(f"| turn {args.turns} / turn 1 | | " + " | ".join(f"{results[n]['ttft_s'][-1] / results[n]['ttft_s'][0]:.2f}x" for n in names) + " |")
    print("| hit rate | | " + " | ".join(f"{results[n]['hit_rate']:.2f}" for n in names) + " |")
    print("| prefill tokens | | " + " | ".join(f"{results[n]['prefill_tokens']:.0f}" for n in names) + " |")

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "jax": jax.__version__,
            "load_average_1min": load, "kv_bytes_per_token": kv_bytes_per_token(cfg.model), **vars(args)}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
