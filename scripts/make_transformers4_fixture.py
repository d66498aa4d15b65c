"""Record what transformers 4.x reads from jaxlm's exported ``config.json``: tests/fixtures/transformers4_export.json.

The main environment holds transformers 5.x only; tests/test_fidelity.py checks 5.x live and 4.x
against this file. Run it again whenever ``jaxlm.interop.hf.hf_config_from_model`` changes (the test
says so when the exported ``config.json`` no longer equals the recorded one)::

    python3.11 -m venv /tmp/tf4 && /tmp/tf4/bin/pip install torch==2.13.0 "transformers<5" safetensors
    .venv/bin/python scripts/make_transformers4_fixture.py --tf4-python /tmp/tf4/bin/python

For each case, a tiny jaxlm model (``build_model(ModelConfig(**model), seed)``) is exported with
``to_hf``; transformers 4.x loads the directory and the file keeps the ``config.json`` text, the
parsed config attributes, and the float32 logits for ``input_ids``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "transformers4_export.json"
COMMON = dict(vocab_size=96, embed_dim=64, num_layers=2, head_dim=16, mlp_dim=80, norm_eps=1e-5, init_std=0.2,
              compute_dtype="float32")
CASES = {
    "llama_llama3_rope_theta5e4_untied": dict(
        COMMON, num_heads=4, num_kv_heads=2, rope_theta=50000.0, rope_scaling="llama3", rope_factor=8.0,
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=256, tie_embeddings=False),
    "qwen2_bias_theta2e4_tied": dict(COMMON, num_heads=4, num_kv_heads=4, rope_theta=20000.0, qkv_bias=True,
                                      tie_embeddings=True),
}
SEED = 3
INPUT_IDS = [[5, 17, 33, 2, 90, 41, 8, 63, 12, 77, 0, 54]]
ATTRIBUTES = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling",
              "tie_word_embeddings", "hidden_act", "attention_bias")


def export(case: str, out_dir: pathlib.Path) -> None:
    """Build the case's jaxlm model and write it as a Hugging Face directory (main environment)."""
    from jaxlm.build import build_model
    from jaxlm.config import Config, ModelConfig, validate
    from jaxlm.interop import to_hf

    cfg = validate(Config(model=ModelConfig(**CASES[case])))
    to_hf(build_model(cfg.model, seed=SEED), cfg, out_dir)


def read_with_transformers(model_dir: str) -> dict:
    """What this environment's transformers reads from ``model_dir`` (run in the 4.x environment)."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor(INPUT_IDS)).logits[0].float().numpy()
    return {
        "transformers_version": transformers.__version__,
        "attributes": {k: getattr(config, k, None) for k in ATTRIBUTES},
        "logits": [[float(f"{x:.7g}") for x in row] for row in logits.tolist()],
    }


def dumps(record: dict) -> str:
    """JSON with every innermost list of numbers on one line (a logits row per line)."""
    text = json.dumps(record, indent=1)
    return re.sub(r"\[\n\s+([-0-9.e,\s]+?)\n\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf4-python", help="python of an environment with transformers 4.x and torch")
    parser.add_argument("--read", help=argparse.SUPPRESS)  # internal: run inside the 4.x environment
    args = parser.parse_args()
    if args.read:
        print(json.dumps(read_with_transformers(args.read)))
        return
    if not args.tf4_python:
        parser.error("--tf4-python is required")
    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            out = pathlib.Path(tmp) / case
            export(case, out)
            read = subprocess.run([args.tf4_python, __file__, "--read", str(out)], check=True, capture_output=True,
                                  text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
            seen = json.loads(read.stdout.strip().splitlines()[-1])
            cases[case] = {"model": CASES[case], "config_json": (out / "config.json").read_text(), **seen}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    record = {"seed": SEED, "input_ids": INPUT_IDS, "cases": cases}
    OUT.write_text(dumps(record))
    print(f"wrote {OUT.relative_to(REPO)} (transformers {next(iter(cases.values()))['transformers_version']})")


if __name__ == "__main__":
    sys.exit(main())
