"""A small load generator for ``jaxlm serve``: concurrent completions, then throughput and latency as JSON.

    python -m jaxlm.serve.loadtest --url http://127.0.0.1:8000 --requests 32 --concurrency 8

A server started with ``--api-key`` needs the same key: ``--api-key KEY`` or ``$JAXLM_API_KEY``
(as ``jaxlm serve`` reads it).

Each worker thread sends streaming completions (so time to first token is seen) until the count
or the time limit is reached. Prints one JSON object: requests ok / errors, requests/s, streamed chunks/s (about tokens/s),
latency and time-to-first-token p50/p99, and the first few error messages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np

PROMPTS = ["ROMEO:", "To be, or not to be", "Good morrow", "What light through yonder window", "Now is the winter"]


def one_request(url: str, prompt: str, max_tokens: int, seed: int, timeout: float, api_key: str | None = None,
                model: str | None = None) -> dict:
    fields = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed, "stream": True}
    body = json.dumps(fields if model is None else dict(fields, model=model))
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(f"{url}/v1/completions", body.encode(), headers)
    t0 = time.perf_counter()
    ttft, chunks, done = None, 0, False
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if ttft is None:
                ttft = time.perf_counter() - t0
            chunks += 1
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    return {"latency_s": time.perf_counter() - t0, "ttft_s": ttft or 0.0, "chunks": chunks}


def run(url: str, requests: int, concurrency: int, max_tokens: int, time_limit: float, api_key: str | None = None,
        model: str | None = None) -> dict:
    results, errors, lock = [], [], threading.Lock()
    counter = iter(range(requests))
    deadline = time.perf_counter() + time_limit

    def worker():
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                r = one_request(url, PROMPTS[i % len(PROMPTS)], max_tokens, i, max(1.0, deadline - time.perf_counter()),
                                api_key, model)
                with lock:
                    results.append(r)
            except (OSError, urllib.error.URLError, RuntimeError, ValueError) as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray([r["latency_s"] for r in results]) if results else np.zeros(1)
    ttft = np.asarray([r["ttft_s"] for r in results]) if results else np.zeros(1)
    return {
        "requests_ok": len(results), "errors": len(errors), "wall_s": wall, "requests_per_s": len(results) / wall,
        "stream_chunks_per_s": sum(r["chunks"] for r in results) / wall,  # about tokens/s (a chunk per token)
        "max_tokens": max_tokens, "concurrency": concurrency,
        "latency_p50_s": float(np.quantile(lat, 0.5)), "latency_p99_s": float(np.quantile(lat, 0.99)),
        "ttft_p50_s": float(np.quantile(ttft, 0.5)), "ttft_p99_s": float(np.quantile(ttft, 0.99)),
        "first_errors": errors[:5],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=32)
    p.add_argument("--time-limit", dest="time_limit", type=float, default=120.0, help="seconds; no request starts after")
    p.add_argument("--api-key", dest="api_key", default=os.environ.get("JAXLM_API_KEY") or None,
                   help="the server's --api-key (default: $JAXLM_API_KEY)")
    p.add_argument("--model", default=None, help="the served model's name (default: none sent, which the server takes)")
    args = p.parse_args(argv)
    report = run(args.url.rstrip("/"), args.requests, args.concurrency, args.max_tokens, args.time_limit,
                 args.api_key, args.model)
    print(json.dumps(report))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
