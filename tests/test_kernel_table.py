"""The kernel table: every candidate and block row is reachable through select(), with its reason;
substitutions are reported once; `jaxlm kernels` prints what each call runs."""

import os
import subprocess
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import ConfigError
from pallas_kernels import dispatch, table
from pallas_kernels.table import Call, select
from tests.conftest import REPO, random_qkv, tiny_config

BF16, FP16, FP32 = jnp.bfloat16, jnp.float16, jnp.float32
H100, A100 = dict(platform="gpu", capability="9.0"), dict(platform="gpu", capability="8.0")
CPU = dict(platform="cpu", capability=None)

# (op, call, impl, machine) -> the kernel select() must return: one line per candidate of the table
REACH = [
    ("attention", Call(BF16, head_dim=128, segment_ids=True, seq_len=2048), "auto", A100, "cudnn"),
    ("attention", Call(BF16, head_dim=64), "pallas", H100, "flash_mosaic"),
    ("attention", Call(FP32, head_dim=128), "auto", A100, "flash_triton"),
    ("attention", Call(FP32, head_dim=64), "pallas", CPU, "flash_triton"),
    ("attention", Call(BF16, head_dim=128), "auto", CPU, "xla"),
    ("attention", Call(BF16, head_dim=256), "auto", H100, "xla"),  # no kernel for head_dim 256
    ("cached_attention", Call(BF16, head_dim=128, cache="contiguous", q_len=1, group=8), "auto", H100, "decode_triton"),
    ("cached_attention", Call(BF16, head_dim=128, cache="paged", q_len=1, group=8, page_size=16), "auto", A100, "decode_triton"),
    ("cached_attention", Call(BF16, head_dim=64, cache="contiguous", q_len=512, group=4), "auto", H100, "flash_mosaic"),
    ("cached_attention", Call(BF16, head_dim=128, cache="contiguous", q_len=512, group=4), "pallas", H100, "flash_triton"),
    ("cached_attention", Call(FP32, head_dim=128, cache="contiguous", q_len=1, group=4), "xla", H100, "xla"),
    ("projection", Call(BF16, mnk=(4096, 4096, 4096)), "pallas", H100, "matmul_mosaic"),
    ("projection", Call(BF16, mnk=(4096, 4096, 4096)), "pallas", A100, "matmul_triton"),
    ("projection", Call(BF16, mnk=(4096, 4096, 4096)), "auto", H100, "xla"),
    ("swiglu", Call(FP16, mnk=(8, 14336, 4096)), "pallas", H100, "swiglu_triton"),
    ("swiglu", Call(FP16, mnk=(8, 14336, 4096)), "auto", CPU, "xla"),
]


@pytest.mark.parametrize("op, call, impl, machine, want", REACH)
def test_every_candidate_is_reachable_with_its_reason(op, call, impl, machine, want):
    chosen = select(op, call, impl=impl, **machine)
    assert chosen.kernel == want and chosen.op == op
    assert chosen.reason.startswith(f"{op}: {want} ({impl} on ")
    assert call.describe() in chosen.reason


def test_reach_covers_the_whole_table():
    reached = {(op, want) for op, *_, want in REACH}
    assert reached == {(op, k.name) for op, ks in table.KERNELS.items() for k in ks}


def test_every_block_row_is_what_select_hands_out():
    for (dclass, nbytes), blocks in table.BLOCKS["flash_triton"].items():
        call = Call(BF16 if nbytes == 2 else FP32, head_dim=dclass)
        chosen = select("attention", call, impl="pallas", **A100)
        assert (chosen.kernel, chosen.blocks) == ("flash_triton", blocks)
    assert select("attention", Call(FP16, head_dim=64), impl="pallas", **H100).blocks == table.BLOCKS["flash_mosaic"][(64, 2)]
    for (layout, nbytes), blocks in table.BLOCKS["decode_triton"].items():
        paged = layout != "contiguous"
        call = Call(BF16 if nbytes == 2 else FP32, head_dim=128, cache="paged" if paged else "contiguous", q_len=1,
                    group=8, page_size=layout if paged else None)
        chosen = select("cached_attention", call, impl="auto", **H100)
        assert (chosen.kernel, chosen.blocks) == ("decode_triton", blocks)
    from pallas_kernels.matmul import BLOCK_TABLE

    for (cls, nbytes), blocks in BLOCK_TABLE.items():
        M = {"skinny": 8, "medium": 200, "large": 4096}[cls]
        chosen = select("projection", Call(BF16 if nbytes == 2 else FP32, mnk=(M, 1000, 1000)), impl="pallas", **A100)
        assert (chosen.kernel, chosen.blocks) == ("matmul_triton", blocks)


@pytest.mark.parametrize(
    "op, call, impl, machine, want, fragment",
    [
        ("attention", Call(FP32, head_dim=64), "auto", H100, "flash_triton",
         "instead of cudnn: dtype float32 not supported; instead of flash_mosaic: dtype float32"),
        ("attention", Call(BF16, head_dim=60), "auto", A100, "flash_triton", "instead of cudnn: head_dim 60 not a multiple of 8"),
        ("attention", Call(BF16, head_dim=128, segment_ids=True, seq_len=2047), "auto", H100, "flash_triton",
         "instead of cudnn: segment ids (a mask) need an even sequence length, not 2047"),
        ("attention", Call(BF16, head_dim=64, sequence_sharded=True), "auto", H100, "flash_mosaic",
         "instead of cudnn: cannot mask keys other than the queries' own tokens"),
        ("attention", Call(BF16, head_dim=128, other_keys=True), "auto", A100, "flash_triton",
         "instead of cudnn: cannot mask keys other than the queries' own tokens"),
        ("attention", Call(BF16, head_dim=128), "pallas", H100, "flash_triton", "instead of flash_mosaic: head_dim 128"),
        ("attention", Call(BF16, head_dim=64, sequence_sharded=True), "cudnn", H100, "flash_mosaic",
         "cudnn cannot mask keys gathered over the sequence axis"),
        ("cached_attention", Call(BF16, head_dim=128, cache="contiguous", q_len=1, group=4), "cudnn", H100,
         "decode_triton", "cudnn cannot mask a KV cache"),
        ("cached_attention", Call(BF16, head_dim=128, cache="contiguous", q_len=16, group=8), "auto", H100,
         "flash_triton", "16 tokens x 8 heads per kv head = 128 rows > 64"),
        ("cached_attention", Call(FP32, head_dim=128, cache="paged", q_len=1, group=4, page_size=64), "pallas", A100,
         "flash_triton", "page_size 64 not one of 16, 32 for float32"),
        ("projection", Call(BF16, mnk=(40, 4096, 4096)), "pallas", H100, "matmul_triton", "instead of matmul_mosaic: shape M=40"),
        ("attention", Call(BF16, head_dim=256), "pallas", A100, "xla", "no pallas kernel takes it: flash_triton: head_dim 256"),
    ],
)
def test_substitutions_say_what_was_passed_over_and_why(op, call, impl, machine, want, fragment):
    chosen = select(op, call, impl=impl, **machine)
    assert chosen.kernel == want and chosen.substituted
    assert fragment in chosen.reason


@pytest.mark.parametrize("impl, want, fragment", [
    ("auto", "flash_mosaic", "cudnn, which the GPU runs for this call, compiles only with the GPU present"),
    ("cudnn", "flash_mosaic", "cudnn compiles only with the GPU present, so this compile-only plan compiles the pallas kernels"),
])
def test_a_compile_only_plan_says_it_compiles_another_kernel_than_cudnn(impl, want, fragment):
    chosen = select("attention", Call(BF16, head_dim=64), impl=impl, deviceless=True, **H100)
    assert chosen.kernel == want and chosen.substituted and fragment in chosen.reason
    # with the GPU present the same call runs cuDNN, unannounced under auto
    chosen = select("attention", Call(BF16, head_dim=64), impl=impl, **H100)
    assert chosen.kernel == "cudnn" and not chosen.substituted
    # calls cuDNN does not take plan exactly what the GPU runs: no note
    fp32 = select("attention", Call(FP32, head_dim=64), impl="auto", deviceless=True, **H100)
    assert fp32.kernel == "flash_triton" and "compile-only" not in fp32.reason


def test_routing_is_not_a_substitution():
    # a long prefill over a cache runs the flash kernel by design, not as a stand-in
    chosen = select("cached_attention", Call(BF16, head_dim=64, cache="contiguous", q_len=512, group=4), impl="auto", **H100)
    assert not chosen.substituted and "instead of decode_triton: 512 new tokens > 16" in chosen.reason


def test_impls_the_machine_cannot_run_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"^attention_impl 'cudnn' has no kernel for cpu \(cudnn: not on cpu\); use 'xla' or 'auto'$"):
        select("cached_attention", Call(BF16, head_dim=64, cache="contiguous", q_len=1), impl="cudnn", **CPU)
    with pytest.raises(ConfigError, match=r"^matmul_impl 'cudnn' is not available; choose one of auto, xla, pallas$"):
        select("projection", Call(BF16, mnk=(8, 8, 8)), impl="cudnn", **H100)
    with pytest.raises(ValueError, match="kernel op 'conv'"):
        select("conv", Call(BF16), impl="auto", **H100)


def test_substitution_through_the_model_door_is_warned_once_with_the_reason():
    """On this CPU, `pallas` on a head_dim the Triton kernel cannot take runs XLA, announced once."""
    dispatch._announce.cache_clear()
    q, k, v = random_qkv(0, 1, 16, 16, 2, 2, 256, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(16), (1, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = dispatch.attention(q, k, v, q_positions=pos, kv_positions=pos, impl="pallas")
        dispatch.attention(q, k, v, q_positions=pos, kv_positions=pos, impl="pallas")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "attention: xla (pallas on cpu; float32, head_dim 256)" in messages[0]
    want = dispatch.attention(q, k, v, q_positions=pos, kv_positions=pos, impl="xla")
    np.testing.assert_array_equal(np.asarray(first), np.asarray(want))


def _jaxlm(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "jaxlm.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_cli_prints_each_call_with_kernel_and_reason():
    r = _jaxlm("kernels", "configs/tiny.yaml", "model.compute_dtype=bfloat16", "model.head_dim=64", "--target", "h100")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("kernels on h100 (NVIDIA H100 80GB HBM3, sm_90): attention_impl=auto")
    rows = {tuple(line.split()[:2]): line for line in lines[2:]}
    assert "cudnn" in rows[("train", "attention")]
    assert "flash_mosaic" in rows[("prefill", "attention")] and "block_q=2x64" in rows[("prefill", "attention")]
    assert "decode_triton" in rows[("decode", "attention")] and "block_k=64" in rows[("decode", "attention")]
    assert "decode_triton" in rows[("serve", "attention")] and "paged cache (page 16)" in rows[("serve", "attention")]
    assert "flash_mosaic" in rows[("serve", "prefill")] and "64 new token(s)" in rows[("serve", "prefill")]
    assert all(k in r.stdout for k in ("q projection", "k/v projection", "o projection", "gate/up (SwiGLU)", "down projection"))
    a100 = _jaxlm("kernels", "configs/tiny.yaml", "--target", "a100")
    assert a100.returncode == 0 and "flash_mosaic" not in a100.stdout and "sm_80" in a100.stdout
    bad = _jaxlm("kernels", "configs/tiny.yaml", "--target", "v100")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "jaxlm: error: jaxlm kernels: argument --target: 'v100' is not a target; choose one of h200, h100, a100, cpu; "
        "see `jaxlm kernels --help`")


def test_model_kernel_calls_follow_the_config():
    from jaxlm.kernels import model_kernel_calls

    cfg = tiny_config("model.attention_impl=xla", "model.matmul_impl=pallas")
    calls = model_kernel_calls(cfg, "h100")
    assert {c.selection.kernel for c in calls if "attention" in c.call} == {"xla"}
    assert {c.selection.kernel for c in calls if "projection" in c.call} <= {"matmul_triton", "matmul_mosaic"}
    assert [c.phase for c in calls].count("decode") == 6  # attention + five projections
    assert {c.selection.kernel for c in model_kernel_calls(cfg, "cpu") if "projection" in c.call} == {"matmul_triton"}


def test_overrides_after_a_flag_are_overrides_and_unknown_flags_one_line(capsys):
    from jaxlm.cli import main

    config = os.path.join(REPO, "configs", "tiny.yaml")
    assert main(["kernels", config, "--target", "h100", "model.compute_dtype=float32"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("kernels on h100") and "compute_dtype=float32" in first
    assert main(["kernels", config, "--target", "h100", "--bogus", "model.compute_dtype=float32"]) == 2
    assert capsys.readouterr().err.strip() == ("jaxlm: error: unrecognized arguments: --bogus "
                                               "model.compute_dtype=float32; see `jaxlm --help`")
