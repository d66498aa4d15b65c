"""`jaxlm plan`: the real train and decode steps compiled for GPU clusters on this CPU, checked
against hand counts from the architecture; and the HLO statistics it reads, against XLA's own
cost analysis and hand counts on small programs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import hlo_stats
from jaxlm.config import load_config
from sharding import targets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def hand_count(cfg):
    """(all parameters, norm scales, matmul parameters outside the embedding table) of an untied Llama."""
    m = cfg.model
    E, L, H, K, D, F, V = m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size
    q, k, v, o = E * H * D, E * K * D, E * K * D, H * D * E
    gate, up, down = E * F, E * F, F * E
    norms = L * 2 * E + E  # two per layer + the final norm
    embed, lm_head = V * E, E * V
    total = embed + L * (q + k + v + o + gate + up + down) + norms + lm_head
    return total, norms, total - embed - norms


def config(name, *overrides):
    return load_config(os.path.join(REPO, "configs", name), list(overrides))


# ------------------------------------------------------------------ the shipped configs, planned

_PLANS = r"""
import json, sys
import jaxlm  # before sharding: sharding.mesh and jaxlm import each other
from sharding import targets
targets.use_gpu_compile_toolchain()
from jaxlm.plan import plan_run
out = {}
cfg = jaxlm.load_config("configs/llama3_8b.yaml")
out["8b"] = plan_run(cfg, "h100", "1x8").to_dict()
for name, topology in (("70b", "8x8"), ("405b", "32x8")):  # state only: no compile
    cfg = jaxlm.load_config(f"configs/llama3_{name}.yaml")
    out[name] = plan_run(cfg, "h100", topology, train=False, decode=False).to_dict()
lora = ["train.lora.rank=16", "train.lora.targets=[q,v]", "train.lora.base_dtype=bfloat16"]
cfg = jaxlm.load_config("configs/llama3_8b.yaml", lora)
out["8b_lora"] = plan_run(cfg, "h100", "1x8", train=False, decode=False).to_dict()
cfg = jaxlm.load_config("configs/tiny.yaml", lora)
out["tiny_lora"] = plan_run(cfg, "h100", "1x8", decode=False).to_dict()
# two hosts of four GPUs: tensor within each host, fsdp across them
cfg = jaxlm.load_config("configs/tiny.yaml", ["mesh.fsdp=4", "mesh.tensor=2"])
out["tiny_2x4"] = plan_run(cfg, "h100", "2x4", decode=False).to_dict()
import tempfile
from jaxlm.interop.hf import to_hf
source = jaxlm.load_config("configs/tiny.yaml", ["model.num_layers=3", "model.embed_dim=96"])
hf_dir = tempfile.mkdtemp()
to_hf(jaxlm.build_model(source.model), source, hf_dir)
for name, c in (("source", source), ("init_from", jaxlm.load_config("configs/finetune.yaml", [f"model.init_from={hf_dir}"])),
                ("no_init_from", jaxlm.load_config("configs/finetune.yaml"))):
    out[name] = plan_run(c, "h100", "1x8", train=False, decode=False).to_dict()
print(json.dumps(out))
"""


# The tests that read `plans` (a minute of GPU compiles in a subprocess) run in one test worker
# (`make test` distributes with --dist loadgroup), so the fixture is built once.
PLANS = pytest.mark.xdist_group("plans")


@pytest.fixture(scope="module")
def plans():
    proc = subprocess.run([sys.executable, "-c", _PLANS], cwd=REPO, env=targets.gpu_compile_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def replicated_plan(tmp_path_factory):
    """The 8B model with mesh.data=8 (parameters and optimizer state replicated), through the CLI."""
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "plan", "configs/llama3_8b.yaml", "mesh.data=8", "mesh.fsdp=1",
         "--target", "h100", "--topology", "1x8", "--no-decode", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,  # as a user runs it: the command finds the toolchain
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout, proc.stderr


@PLANS
@pytest.mark.slow
@pytest.mark.parametrize("name, devices, split", [("8b", 8, 8), ("70b", 64, 64), ("405b", 256, 256)])
def test_state_bytes_match_a_hand_count(plans, name, devices, split):
    """Per device: every weight but the norms is split `split` ways (FSDP, and tensor for 405B);
    float32 master weights; AdamW holds two float32 moments per parameter."""
    plan = plans[name]
    total, norms, _ = hand_count(config(f"llama3_{name}.yaml"))
    params = ((total - norms) / split + norms) * 4
    assert plan["num_devices"] == devices
    assert plan["param_bytes"] == pytest.approx(params, rel=0.01)
    assert plan["opt_state_bytes"] == pytest.approx(2 * params, rel=0.01)


@PLANS
@pytest.mark.slow
def test_a_config_with_init_from_is_planned_with_the_sources_architecture(plans):
    assert plans["init_from"]["param_bytes"] == plans["source"]["param_bytes"]
    assert plans["init_from"]["param_bytes"] != plans["no_init_from"]["param_bytes"]


@PLANS
@pytest.mark.slow
def test_lora_state_is_the_frozen_base_plus_adapters_and_its_step_compiles(plans):
    """LoRA r16 on q and v over a bfloat16 base: the parameters one device holds are the base (split
    8 ways but the norms) plus the float32 adapters; AdamW's state is two moments of the adapters
    only. The tiny model's LoRA train step compiles, its arguments being exactly that state."""
    plan = plans["8b_lora"]
    m = config("llama3_8b.yaml").model
    total, norms, _ = hand_count(config("llama3_8b.yaml"))
    base = ((total - norms) / 8 + norms) * 2
    adapters = m.num_layers * 16 * ((m.embed_dim + m.num_heads * m.head_dim) + (m.embed_dim + m.num_kv_heads * m.head_dim)) * 4
    on_device = plan["param_bytes"] - base
    assert adapters / 8 * 0.99 <= on_device <= adapters * 1.01, (on_device, adapters)
    assert plan["opt_state_bytes"] == pytest.approx(2 * on_device, rel=0.01)
    full = plans["8b"]
    assert plan["opt_state_bytes"] < 0.01 * full["opt_state_bytes"]
    tiny = plans["tiny_lora"]
    program = tiny["train"]["program"]
    assert tiny["train"]["fits"]
    assert program["argument_bytes"] == pytest.approx(tiny["param_bytes"] + tiny["opt_state_bytes"], rel=0.05)


@PLANS
@pytest.mark.slow
def test_8b_fits_on_one_host_of_h100s_under_fsdp(plans):
    plan, train = plans["8b"], plans["8b"]["train"]
    total, norms, matmul = hand_count(config("llama3_8b.yaml"))
    assert plan["mesh"]["fsdp"] == 8 and plan["target"] == "h100" and plan["topology"] == "1x1x8"
    assert plan["budget_bytes"] == int(targets.get_target("h100").hbm_bytes * 0.75)
    assert train["fits"] and train["headroom_bytes"] == plan["budget_bytes"] - train["program"]["peak_bytes"] > 0
    program = train["program"]
    # XLA's arguments are the state (plus the batch and scalars), donated back as outputs
    assert program["argument_bytes"] == pytest.approx(plan["param_bytes"] + plan["opt_state_bytes"], rel=0.01)
    assert program["alias_bytes"] == pytest.approx(program["output_bytes"], rel=0.01)
    # FSDP gathers every sharded weight in bfloat16 for the forward and again for the recomputed
    # forward (remat=full) and reduce-scatters every gradient in bfloat16; the embedding table is
    # never gathered (its lookup runs on the shards).
    kinds = {c["kind"]: c for c in program["collectives"]}
    assert kinds["all-gather"]["bytes"] == pytest.approx(2 * 2 * matmul, rel=0.01)
    assert kinds["reduce-scatter"]["bytes"] == pytest.approx(2 * (total - norms), rel=0.01)
    assert kinds["all-gather"]["count"] >= 2 * 32  # inside the layer scan: counted per layer
    # matmul FLOPs on one device (one sequence of T tokens): between no recomputation (6 N T plus
    # three passes of attention scores and values) and a whole recomputed forward (8 N T, four passes)
    T, m = 8192, config("llama3_8b.yaml").model
    attention = 4 * m.num_layers * m.num_heads * m.head_dim * T * T  # one forward pass, every score
    upper = 8 * matmul * T + 4 * attention
    if program["opaque_custom_calls"]:  # Pallas/cuDNN kernels: their FLOPs are not in the HLO
        assert 0 < program["flops"] <= upper
    else:
        assert 6 * matmul * T + 3 * attention <= program["flops"] <= upper
    r = train["roofline"]
    assert train["step_s"] == max(r["compute_s"], r["memory_s"], r["comms_s"]) > 0
    # one host: every collective on NVLink, a ring over 8 GPUs sending 7/8 of each buffer (twice
    # for the all-reduces of a few scalars)
    assert not any(c["network_bytes"] for c in program["collectives"])
    ring = 7 / 8 * (kinds["all-gather"]["bytes"] + kinds["reduce-scatter"]["bytes"])
    assert r["comms_s"] == pytest.approx(ring / plan["links"]["nvlink"], rel=0.01)
    # the model's FLOPs per device: 6 N + attention per token, the forward twice (remat full)
    model = (6 * matmul + 12 * m.num_layers * m.num_heads * m.head_dim * T / 2) * 8 * T * 4 / 3 / 8
    assert program["model_flops"] == pytest.approx(model, rel=1e-4)  # (jaxlm.metrics counts the norm scales too)
    if program["opaque_custom_calls"]:  # the compute term cannot be less than the model's FLOPs
        assert r["compute_s"] == pytest.approx(max(program["flops"], program["model_flops"]) / plan["peak_flops"])
    assert train["tokens_per_s"] == pytest.approx(8 * T / train["step_s"])
    assert 0 < train["mfu"] < 1


@PLANS
@pytest.mark.slow
def test_8b_decode_kv_cache_figures(plans):
    decode = plans["8b"]["decode"]
    cfg = config("llama3_8b.yaml")
    m = cfg.model
    kv_token = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 2  # k and v, bfloat16
    assert decode["kv_bytes_per_token"] == kv_token == 128 * 1024
    assert decode["batch"] == 16 and decode["context"] == 8192 and decode["num_pages"] == 16 * 8192 // 16 + 1
    # FSDP shards no KV head: every device holds the whole pool
    assert decode["kv_pool_bytes"] == decode["num_pages"] * 16 * kv_token
    other = decode["program"]["peak_bytes"] - decode["kv_pool_bytes"]
    assert decode["max_sequences"] == (plans["8b"]["budget_bytes"] - other) // (kv_token * 8192)
    # weights alone: B * 2 N FLOPs against 2 N bytes of weights reach the ridge at B = ridge (stored in
    # float32, decoded in bfloat16: the engine holds them in the compute dtype)
    ridge = targets.get_target("h100").ridge_flops_per_byte
    assert decode["compute_bound_batch_short"] == pytest.approx(ridge)
    total, norms, _ = hand_count(cfg)  # per device: FSDP splits all but the norms 8 ways
    assert decode["param_bytes"] == pytest.approx(((total - norms) / 8) * 2 + norms * 4, rel=0.01)
    # at 8192 tokens each sequence reads 1 GiB of KV for 2 N + 4 L H D T FLOPs: never compute-bound
    assert decode["compute_bound_batch"] is None
    _, _, matmul = hand_count(cfg)
    rows = 16 // 8  # sequences per device
    flops = decode["program"]["flops"]
    upper = rows * (2 * matmul + 4 * m.num_layers * m.num_heads * m.head_dim * 8192) * 1.01
    lower = 0 if decode["program"]["opaque_custom_calls"] else rows * 2 * matmul  # kernels' FLOPs are invisible
    assert lower < flops <= upper


@pytest.mark.slow
def test_replicated_optimizer_does_not_fit_and_says_by_how_much(replicated_plan):
    plan, printed, stderr = replicated_plan
    total, _, _ = hand_count(config("llama3_8b.yaml"))
    assert plan["mesh"]["data"] == 8 and plan["mesh"]["fsdp"] == 1
    assert plan["param_bytes"] == pytest.approx(4 * total, rel=0.001)  # every device holds everything
    assert plan["opt_state_bytes"] == pytest.approx(8 * total, rel=0.001)
    train = plan["train"]
    over = train["program"]["peak_bytes"] - plan["budget_bytes"]
    assert not train["fits"] and train["headroom_bytes"] == -over
    assert over > 12 * total - plan["budget_bytes"]  # at least the state alone is over
    assert f"does NOT fit: {over / GIB:.2f} GiB over the budget" in printed
    # bf16 at head_dim 128: the GPU would run cuDNN, which a CPU cannot compile; the plan says what stood in
    assert any("cudnn, which the GPU runs for this call, compiles only with the GPU present" in r
               for r in train["program"]["substitutions"])
    assert "compiled in another kernel's place (the figures are the stand-in's): attention: flash_triton" in printed
    assert plan["decode"] is None
    assert "absl::InitializeLog" not in stderr and "cudart_stub" not in stderr  # the plugin's load banner is dropped


@pytest.mark.slow
def test_bad_target_and_topology_are_one_line():
    for args, message in (
        (["--target", "v100"], "jaxlm plan: argument --target: 'v100' is not a GPU target; choose one of h200, h100, a100"),
        (["--topology", "8"], "jaxlm plan: argument --topology: topology '8' is not HOSTSxGPUS"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "jaxlm.cli", "plan", "configs/tiny.yaml", *args, "--no-train", "--no-decode"],
            cwd=REPO, env=targets.gpu_compile_env(), capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("jaxlm: error: " + message)


# ------------------------------------------------------------------ HLO statistics


def test_matmul_flops_and_bytes_equal_xlas_cost_analysis_without_loops():
    ws = jax.ShapeDtypeStruct((3, 48, 40), jnp.float32)
    x = jax.ShapeDtypeStruct((16, 48), jnp.float32)

    def unrolled(ws, x):
        x = x @ ws[0]
        return (x @ ws[1][:40]) @ ws[2][:48, :40].T

    compiled = jax.jit(unrolled).lower(ws, x).compile()
    xla = compiled.cost_analysis()
    ours = hlo_stats.cost(compiled.as_text())
    assert ours.flops == xla["flops"] == 2 * 16 * 48 * 40 + 2 * 16 * 40 * 40 + 2 * 16 * 40 * 48
    assert ours.bytes_accessed == pytest.approx(xla["bytes accessed"], rel=0.05)
    assert ours.loops_without_trip_count == 0


def test_loops_count_once_per_iteration():
    L, M, K = 5, 16, 32
    ws = jax.ShapeDtypeStruct((L, K, K), jnp.float32)
    x = jax.ShapeDtypeStruct((M, K), jnp.float32)
    scanned = jax.jit(lambda ws, x: jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, ws)[0])
    compiled = scanned.lower(ws, x).compile()
    assert hlo_stats.cost(compiled.as_text()).flops == L * 2 * M * K * K
    # XLA's own analysis counts the loop body once, which is why the planner does not use it
    assert compiled.cost_analysis()["flops"] < L * 2 * M * K * K


@PLANS
def test_collectives_across_hosts_are_priced_at_the_network_and_within_a_host_at_nvlink(plans):
    """tiny on two hosts of four GPUs, fsdp=4 x tensor=2 (tensor inside a host): the fsdp
    gathers of the weights span both hosts, two group members on each (half of each buffer moves
    within a host, half of it between the hosts over two NICs); the tensor-parallel all-reduces
    stay in a host between two. The step's communication time is their sum at each bandwidth."""
    plan = plans["tiny_2x4"]
    assert plan["topology"] == "1x2x4" and plan["mesh"]["fsdp"] == 4 and plan["mesh"]["tensor"] == 2
    rows = {c["kind"]: c for c in plan["train"]["program"]["collectives"]}
    gathers, reduces = rows["all-gather"], rows["all-reduce"]
    assert gathers["nvlink_bytes"] == pytest.approx(gathers["bytes"] / 2, rel=0.01)
    assert gathers["network_bytes"] == pytest.approx(gathers["bytes"] / 2 / 2, rel=0.01)
    assert reduces["nvlink_bytes"] == pytest.approx(reduces["bytes"] * 2 * 1 / 2, rel=0.02)
    links = plan["links"]
    seconds = sum(c["nvlink_bytes"] / links["nvlink"] + c["network_bytes"] / links["network"]
                  for c in plan["train"]["program"]["collectives"])
    assert seconds > 0 and plan["train"]["roofline"]["comms_s"] == pytest.approx(seconds)


def test_device_groups_in_each_form_and_what_crosses_hosts():
    """Replica groups as listed, as an iota (plain and transposed), empty (all devices), a
    permute's pairs; two hosts of four devices: counts, bytes and ring link bytes by hand."""
    assert hlo_stats.device_groups("replica_groups={{0,1},{2,3}}, dimensions={0}", 4) == [[0, 1], [2, 3]]
    assert hlo_stats.device_groups("replica_groups=[2,4]<=[8], dimensions={0}", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert hlo_stats.device_groups("replica_groups=[4,2]<=[2,4]T(1,0)", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert hlo_stats.device_groups("replica_groups=[4,2]<=[2,2,2]T(2,1,0)", 8) == [[0, 4], [2, 6], [1, 5], [3, 7]]
    mesh = "replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2] {'axis_0'}, dimensions={0}"
    assert hlo_stats.device_groups(mesh, 8) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert hlo_stats.device_groups(mesh.replace("{'axis_0'}", "{'axis_2'}"), 8) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # devices placed on the mesh in the order of an iota: [2, 4] transposed is 0 4 1 5 2 6 3 7
    placed = mesh.replace("] {", "], device_ids=([2,4]T(1,0)) {")
    assert hlo_stats.device_groups(placed, 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert hlo_stats.device_groups("replica_groups={}, to_apply=%add", 8) == [list(range(8))]
    assert hlo_stats.device_groups("replica_groups={}, to_apply=%add", 0) is None
    assert hlo_stats.device_groups("source_target_pairs={{0,1},{1,0}}", 8) == [[0, 1], [1, 0]]
    assert hlo_stats.device_groups("dimensions={0}", 8) is None
    text = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: bf16[16,64]) -> bf16[16,64] {
  %x = bf16[16,64]{1,0} parameter(0)
  %in_host = bf16[64,64]{1,0} all-gather(%x), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  %across = bf16[32,64]{1,0} all-gather(%x), channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}, use_global_device_ids=true
  %everyone = bf16[16,64]{1,0} all-reduce(%x), channel_id=3, replica_groups={}, use_global_device_ids=true, to_apply=%add
  %rs-start = ((bf16[16,64]{1,0}), bf16[4,64]{1,0}) reduce-scatter-start(%x), channel_id=4, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
  %rs-done = bf16[4,64]{1,0} reduce-scatter-done(%rs-start)
  %perm = bf16[16,64]{1,0} collective-permute(%x), channel_id=5, source_target_pairs={{3,4},{7,0}}
  ROOT %r = bf16[16,64]{1,0} copy(%x)
}
"""
    x = 16 * 64 * 2
    rows = {c.kind: c for c in hlo_stats.collectives(text, hosts=[0, 0, 0, 0, 1, 1, 1, 1])}
    # (NVLink, network) bytes per device: within one host of 4, 3/4 of the buffer; a pair across
    # the two hosts, 1/2 of it over the network; all 8, 4 per host: twice (3/4 within, 1/2 between
    # over 4 NICs); the permute's pairs cross hosts
    nvlink = {"all-gather": 3 / 4 * 4 * x, "all-reduce": 2 * 3 / 4 * x, "reduce-scatter": 3 / 4 * x,
              "collective-permute": 0}
    network = {"all-gather": 1 / 2 * 2 * x, "all-reduce": 2 * 1 / 2 * x / 4, "reduce-scatter": 0,
               "collective-permute": x}
    assert {k: (c.count, c.bytes) for k, c in rows.items()} == {
        "all-gather": (2, 6 * x), "all-reduce": (1, x), "reduce-scatter": (1, x), "collective-permute": (1, x)}
    assert {k: c.nvlink_bytes for k, c in rows.items()} == nvlink
    assert {k: c.network_bytes for k, c in rows.items()} == network
    # without hosts everything stays on NVLink; groups it cannot read are priced as a large ring's bound
    alone = {c.kind: c for c in hlo_stats.collectives(text)}
    assert not any(c.network_bytes for c in alone.values())
    assert alone["all-reduce"].nvlink_bytes == 2 * x
    assert alone["all-gather"].nvlink_bytes == 3 / 4 * 4 * x + 1 / 2 * 2 * x


def test_collectives_in_a_loop_are_counted_per_iteration(devices):
    mesh = jax.make_mesh((8,), ("d",), devices=devices)

    def body(x):
        y = jax.lax.fori_loop(0, 3, lambda i, x: jax.lax.psum(x, "d") * 0.5, x)
        return jax.lax.all_gather(y, "d", tiled=True)

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec("d"), out_specs=PartitionSpec(), check_vma=False))
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("d")))
    stats = {c.kind: c for c in hlo_stats.collectives(fn.lower(x).compile().as_text())}
    shard = 64 // 8 * 128 * 4
    assert (stats["all-reduce"].count, stats["all-reduce"].bytes) == (3, 3 * shard)
    assert (stats["all-gather"].count, stats["all-gather"].bytes) == (1, 8 * shard)


def test_async_collectives_and_fusion_slices_in_gpu_hlo_text():
    """A GPU-style module (async start/done pairs, a layer loop of 4, a fusion that slices one
    layer of a stacked weight): counts and bytes by hand."""
    text = """HloModule m

%fused_slice (p0: bf16[4,64,32], p1: s32[]) -> bf16[64,32] {
  %p0 = bf16[4,64,32]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %c = s32[] constant(0)
  %ds = bf16[1,64,32]{2,1,0} dynamic-slice(%p0, %p1, %c, %c), dynamic_slice_sizes={1,64,32}
  ROOT %b = bf16[64,32]{1,0} bitcast(%ds)
}

%gemm (a: bf16[16,64], w: bf16[64,32]) -> bf16[16,32] {
  %a = bf16[16,64]{1,0} parameter(0)
  %w = bf16[64,32]{1,0} parameter(1)
  ROOT %d = bf16[16,32]{1,0} dot(%a, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (t: (s32[], bf16[16,64], bf16[4,64,32])) -> (s32[], bf16[16,64], bf16[4,64,32]) {
  %t = (s32[], bf16[16,64]{1,0}, bf16[4,64,32]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = bf16[16,64]{1,0} get-tuple-element(%t), index=1
  %ws = bf16[4,64,32]{2,1,0} get-tuple-element(%t), index=2
  %w = bf16[64,32]{1,0} fusion(%ws, %i), kind=kLoop, calls=%fused_slice
  %ag-start = (bf16[8,64]{1,0}, bf16[16,64]{1,0}) all-gather-start(%x), dimensions={0}
  %ag-done = bf16[16,64]{1,0} all-gather-done(%ag-start)
  %y = bf16[16,32]{1,0} fusion(%ag-done, %w), kind=kCustom, calls=%gemm
  ROOT %out = (s32[], bf16[16,64]{1,0}, bf16[4,64,32]{2,1,0}) tuple(%i, %x, %ws)
}

%cond (t: (s32[], bf16[16,64], bf16[4,64,32])) -> pred[] {
  %t = (s32[], bf16[16,64]{1,0}, bf16[4,64,32]{2,1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

ENTRY %main (x: bf16[16,64], ws: bf16[4,64,32]) -> bf16[16,64] {
  %x = bf16[16,64]{1,0} parameter(0)
  %ws = bf16[4,64,32]{2,1,0} parameter(1)
  %z = s32[] constant(0)
  %t = (s32[], bf16[16,64]{1,0}, bf16[4,64,32]{2,1,0}) tuple(%z, %x, %ws)
  %loop = (s32[], bf16[16,64]{1,0}, /*index=2*/bf16[4,64,32]{2,1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %ar-start = bf16[16,64]{1,0} all-reduce-start(%x), to_apply=%cond
  %ar-done = bf16[16,64]{1,0} all-reduce-done(%ar-start)
  ROOT %r = bf16[16,64]{1,0} get-tuple-element(%loop), index=1
}
"""
    stats = {c.kind: c for c in hlo_stats.collectives(text)}
    assert (stats["all-gather"].count, stats["all-gather"].bytes) == (4, 4 * 16 * 64 * 2)
    assert (stats["all-reduce"].count, stats["all-reduce"].bytes) == (1, 16 * 64 * 2)
    cost = hlo_stats.cost(text)
    assert cost.flops == 4 * 2 * 16 * 32 * 64
    slice_fusion = 64 * 32 * 2 + 4 + 64 * 32 * 2  # reads one layer's slice (not the stack) and its index, writes it
    gemm = 16 * 64 * 2 + 64 * 32 * 2 + 16 * 32 * 2
    assert cost.bytes_accessed == 4 * (slice_fusion + gemm)


# a fusion writing two rows into a [8, 16, 64] pool in place (the KV pools' per-layer write)
_SCATTER_INTO_POOL = """%fused_scatter (p0: bf16[8,16,64], p1: s32[2,1], p2: bf16[2,16,64]) -> bf16[8,16,64] {
  %p0 = bf16[8,16,64]{2,1,0} parameter(0)
  %p1 = s32[2,1]{1,0} parameter(1)
  %p2 = bf16[2,16,64]{2,1,0} parameter(2)
  ROOT %s = bf16[8,16,64]{2,1,0} scatter(%p0, %p1, %p2), update_window_dims={1,2}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%add
}

%add (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %c = bf16[] add(%a, %b)
}
"""


def test_a_kernel_reading_a_pool_the_layer_loop_carries_counts_its_share_per_layer():
    """The serving engine's layer loop carries the KV pools of every layer whole, writes each
    layer's new tokens in place (a scatter fusion) and hands the pool to the decode kernel, which
    reads that layer's pages: the kernel counts one layer's share of the pool per trip; the scatter
    counts only its update. Bytes by hand."""
    text = """HloModule m

""" + _SCATTER_INTO_POOL + """
%body (t: (s32[], bf16[8,16,64], s32[2,1], bf16[2,16,64])) -> (s32[], bf16[8,16,64], s32[2,1], bf16[2,16,64]) {
  %t = (s32[], bf16[8,16,64]{2,1,0}, s32[2,1]{1,0}, bf16[2,16,64]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %pool = bf16[8,16,64]{2,1,0} get-tuple-element(%t), index=1
  %idx = s32[2,1]{1,0} get-tuple-element(%t), index=2
  %new = bf16[2,16,64]{2,1,0} get-tuple-element(%t), index=3
  %written = bf16[8,16,64]{2,1,0} fusion(%pool, %idx, %new), kind=kInput, calls=%fused_scatter
  %flat = bf16[128,64]{1,0} bitcast(%written)
  %out = bf16[2,64]{1,0} custom-call(%flat, %idx), custom_call_target="__gpu$xla.gpu.triton"
  ROOT %r = (s32[], bf16[8,16,64]{2,1,0}, s32[2,1]{1,0}, bf16[2,16,64]{2,1,0}) tuple(%i, %written, %idx, %new)
}

%cond (t: (s32[], bf16[8,16,64], s32[2,1], bf16[2,16,64])) -> pred[] {
  %t = (s32[], bf16[8,16,64]{2,1,0}, s32[2,1]{1,0}, bf16[2,16,64]{2,1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

ENTRY %main (pool: bf16[8,16,64], idx: s32[2,1], new: bf16[2,16,64]) -> bf16[8,16,64] {
  %pool = bf16[8,16,64]{2,1,0} parameter(0)
  %idx = s32[2,1]{1,0} parameter(1)
  %new = bf16[2,16,64]{2,1,0} parameter(2)
  %z = s32[] constant(0)
  %t = (s32[], bf16[8,16,64]{2,1,0}, s32[2,1]{1,0}, bf16[2,16,64]{2,1,0}) tuple(%z, %pool, %idx, %new)
  %loop = (s32[], bf16[8,16,64]{2,1,0}, s32[2,1]{1,0}, bf16[2,16,64]{2,1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %r = bf16[8,16,64]{2,1,0} get-tuple-element(%loop), index=1
}
"""
    cost = hlo_stats.cost(text)
    pool, idx, update, out = 8 * 16 * 64 * 2, 2 * 4, 2 * 16 * 64 * 2, 2 * 64 * 2
    scatter = idx + update + update  # reads the indices and the update, writes the update in place
    kernel = pool / 4 + idx + out  # one layer's share of the carried pool, the indices, its result
    assert cost.bytes_accessed == pytest.approx(4 * (scatter + kernel))
    assert cost.opaque_custom_calls == ("__gpu$xla.gpu.triton",)


def test_kernels_reading_a_pool_unrolled_layers_update_count_it_once_between_them():
    """Decoding runs the layers unrolled (jaxlm.decoding_weights): each layer writes its tokens
    into the pool in place and hands the new version to its decode kernel. The kernels read the
    pool once per step between them (each its own layer's pages), not once each. Bytes by hand."""
    text = """HloModule m

""" + _SCATTER_INTO_POOL + """
ENTRY %main (pool: bf16[8,16,64], idx: s32[2,1], new: bf16[2,16,64]) -> bf16[8,16,64] {
  %pool = bf16[8,16,64]{2,1,0} parameter(0)
  %idx = s32[2,1]{1,0} parameter(1)
  %new = bf16[2,16,64]{2,1,0} parameter(2)
  %w0 = bf16[8,16,64]{2,1,0} fusion(%pool, %idx, %new), kind=kInput, calls=%fused_scatter
  %f0 = bf16[128,64]{1,0} bitcast(%w0)
  %o0 = bf16[2,64]{1,0} custom-call(%f0, %idx), custom_call_target="__gpu$xla.gpu.triton"
  %w1 = bf16[8,16,64]{2,1,0} fusion(%w0, %idx, %new), kind=kInput, calls=%fused_scatter
  %o1 = bf16[2,64]{1,0} custom-call(%w1, %idx), custom_call_target="__gpu$xla.gpu.triton"
  %w2 = bf16[8,16,64]{2,1,0} fusion(%w1, %idx, %new), kind=kInput, calls=%fused_scatter
  %f2 = bf16[128,64]{1,0} bitcast(%w2)
  %o2 = bf16[2,64]{1,0} custom-call(%f2, %idx, %pool), custom_call_target="__gpu$xla.gpu.triton"
  ROOT %w3 = bf16[8,16,64]{2,1,0} fusion(%w2, %idx, %new), kind=kInput, calls=%fused_scatter
}
"""
    cost = hlo_stats.cost(text)
    pool, idx, update, out = 8 * 16 * 64 * 2, 2 * 4, 2 * 16 * 64 * 2, 2 * 64 * 2
    scatter = idx + update + update  # reads the indices and the update, writes the update in place
    kernels = pool + 3 * (idx + out) + pool  # three layers' shares of the pool; the last also reads the old pool whole
    assert cost.bytes_accessed == pytest.approx(4 * scatter + kernels)
