"""Plan a cluster run before it starts: compile the real train and decode steps for GPUs one does
not have, and read per-device memory, collectives, FLOPs and a roofline step time from them.

::

    plan = plan_run(load_config("configs/llama3_8b.yaml"), target="h100", topology="1x8")
    print(format_plan(plan))

Nothing is materialised: parameters, optimizer state, batches and the KV cache are
``jax.ShapeDtypeStruct`` with the ``NamedSharding`` the run would give them, over compile-only
devices of the target (:func:`sharding.targets.compile_only_devices`, which needs the CUDA compile
toolchain registered in this process: :func:`sharding.targets.use_gpu_compile_toolchain`).

* Train: :class:`jaxlm.train.Trainer`'s own jitted step (its shardings, donation, layout, remat
  and ``train.grad_accum_steps``), lowered and compiled for the topology.
* Decode: the serving engine's compiled call (``jaxlm.serve.engine._forward_and_sample``: one
  token per sequence over a paged KV cache, then sampling) on the decoding mesh (the sequence
  axis folded into ``data``), with a page pool holding ``decode_batch`` sequences of ``context``
  tokens, and the weights as the engine holds them (the matrices in the compute dtype).

Per device, from XLA: memory (``compiled.memory_analysis()``: arguments, outputs, aliased
(donated) bytes, temporaries; peak = arguments + outputs - aliased + temporaries), and from the
optimised HLO (:mod:`jaxlm.hlo_stats`, loops counted by their trip counts) the collectives and
the matmul FLOPs and memory traffic. The roofline step time is ``max(FLOPs / peak FLOP/s,
bytes / HBM bandwidth, NVLink bytes / NVLink bandwidth + network bytes / network bandwidth)``:
compute, memory traffic and communication overlap perfectly, and none can hide the others. A
collective's link bytes are what a hierarchical ring sends through each device for its device
groups (:func:`jaxlm.hlo_stats.link_bytes`: ``(g - 1) / g`` of the buffer within a host of ``g``
group members, ``(H - 1) / H`` of it between ``H`` hosts over the members' ``g`` NICs, twice for an
all-reduce). It ignores kernel launch and pipeline-bubble overheads. The HLO shows no FLOPs inside kernels (Pallas,
cuDNN custom calls: listed); when a program holds any, the compute term uses the model's FLOPs
for the step instead (:func:`model_step_flops`, if larger). Kernels are what :mod:`pallas_kernels.dispatch` selects under the mesh; the
report says whether the compiled programs hold any (or only XLA ops).

Decode analytics (whole model, per model replica): KV bytes per token ``2 * layers * kv_heads *
head_dim * itemsize``; the sequences of ``context`` tokens that fit in the memory left after the
decode program's other buffers; and the batch at which a decode step turns compute-bound:
``B * F_tok / (W + B * context * kv_tok) = peak / bandwidth`` solved for ``B``, with ``F_tok = 2 *
(matmul parameters) + 4 * layers * heads * head_dim * context`` and ``W`` the weight bytes read per step
(the matmul parameters in the compute dtype).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.build import abstract_model, state_shardings
from jaxlm.cache import PAGED_CACHE_AXES
from jaxlm.config import Config, ConfigError
from jaxlm.decoding_weights import for_decoding
from jaxlm.hlo_stats import CollectiveStat, collectives, cost
from jaxlm.metrics import count_params, model_flops_per_token
from jaxlm.precision import LossScale
from sharding.mesh import decoding_mesh, make_compile_only_mesh
from sharding.rules import LOGICAL_RULES, logical_sharding, logical_spec, mesh_axis_size
from sharding.targets import get_target, topology_name

# JAX preallocates this fraction of device memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION).
DEFAULT_MEMORY_FRACTION = 0.75
# Link bandwidth per GPU and direction, bytes/s, for the communication term (NVIDIA datasheets:
# NVLink 4 900 GB/s bidirectional on H100/H200, NVLink 3 600 GB/s on A100; across hosts one
# 400 Gb/s InfiniBand NIC per GPU).
NVLINK_BANDWIDTH = {"h100": 450e9, "h200": 450e9, "a100": 300e9}
NETWORK_BANDWIDTH = 50e9


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """One compiled program on one device. Bytes in bytes, FLOPs per step, seconds."""

    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated argument buffers
    temp_bytes: int
    flops: float  # matmul FLOPs per step outside opaque custom calls (hlo_stats.cost)
    bytes_accessed: float  # estimated HBM bytes read + written per step
    collectives: tuple[CollectiveStat, ...]
    opaque_custom_calls: tuple[str, ...]  # kernels whose FLOPs the HLO does not show
    compile_seconds: float
    model_flops: float  # the model's FLOPs for this step on one device (model_step_flops / devices)
    # the kernel table's reasons for each kernel compiled in another's place (e.g. cuDNN, which
    # compiles only with the GPU present): the figures are those of the stand-in
    substitutions: tuple[str, ...] = ()

    @property
    def compute_flops(self) -> float:
        """FLOPs the roofline uses: the HLO's, or the model's when kernels hide theirs (whichever is larger)."""
        return max(self.flops, self.model_flops) if self.opaque_custom_calls else self.flops

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclasses.dataclass(frozen=True)
class Links:
    """Bandwidth of each GPU's links, bytes/s per direction: NVLink within a host, the network across hosts."""

    nvlink: float
    network: float

    def seconds(self, program: ProgramReport) -> float:
        """The program's collectives one after another: their NVLink and network bytes at those bandwidths."""
        return sum(c.nvlink_bytes / self.nvlink + c.network_bytes / self.network for c in program.collectives)


@dataclasses.dataclass(frozen=True)
class Roofline:
    compute_s: float  # FLOPs / peak FLOP/s
    memory_s: float  # bytes / HBM bandwidth
    comms_s: float  # link bytes / link bandwidth (Links.seconds)

    @property
    def step_s(self) -> float:
        """Compute, memory traffic and communication overlapped: the longest of the three."""
        return max(self.compute_s, self.memory_s, self.comms_s)

    @property
    def bound(self) -> str:
        """``compute``, ``memory`` or ``communication``: the term that sets :attr:`step_s`."""
        terms = {"compute": self.compute_s, "memory": self.memory_s, "communication": self.comms_s}
        return max(terms, key=terms.get)


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    program: ProgramReport
    tokens_per_step: int  # global
    roofline: Roofline
    model_flops_per_token: float  # 6 N + attention (jaxlm.metrics)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.roofline.step_s


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    program: ProgramReport
    batch: int  # sequences decoded together (rounded up to the data-parallel size)
    context: int  # tokens each sequence may hold
    page_size: int
    num_pages: int
    param_bytes: int  # per device
    kv_pool_bytes: int  # per device
    kv_bytes_per_token: int  # whole model: 2 * layers * kv_heads * head_dim * itemsize
    kv_bytes_per_token_device: float  # what one token's K and V take on one device
    max_sequences: int  # sequences of `context` tokens that fit (memory budget minus everything but the pool)
    compute_bound_batch: float | None  # per model replica; None: memory-bound at any batch at this context
    compute_bound_batch_short: float  # the same for contexts short enough that weights dominate (context -> 0)
    roofline: Roofline
    requested_batch: int = 0  # the batch asked for (--decode-batch), before rounding
    mesh: dict[str, int] = dataclasses.field(default_factory=dict)  # the decoding mesh (sharding.mesh.decoding_mesh)

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.roofline.step_s


@dataclasses.dataclass(frozen=True)
class Plan:
    target: str
    topology: str  # XLA's SLICESxHOSTSxGPUS
    num_devices: int
    mesh: dict[str, int]
    hbm_bytes: int
    memory_fraction: float
    links: Links
    peak_flops: float  # per device, for the config's compute dtype
    hbm_bandwidth: float
    param_bytes: int  # per device, in the training layout
    opt_state_bytes: int  # per device
    train: TrainPlan | None
    decode: DecodePlan | None

    @property
    def budget_bytes(self) -> int:
        return int(self.hbm_bytes * self.memory_fraction)

    def headroom(self, program: ProgramReport) -> int:
        """Bytes left in the budget (negative: short by that much)."""
        return self.budget_bytes - program.peak_bytes

    def fits(self, program: ProgramReport) -> bool:
        return self.headroom(program) >= 0

    @property
    def mfu(self) -> float | None:
        if self.train is None:
            return None
        t = self.train
        return t.model_flops_per_token * t.tokens_per_s / (self.num_devices * self.peak_flops)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["budget_bytes"] = self.budget_bytes
        for name in ("train", "decode"):
            part = getattr(self, name)
            if part is not None:
                out[name]["program"]["peak_bytes"] = part.program.peak_bytes
                out[name]["fits"] = self.fits(part.program)
                out[name]["headroom_bytes"] = self.headroom(part.program)
                out[name]["step_s"] = part.roofline.step_s
                out[name]["tokens_per_s"] = part.tokens_per_s
        if self.train is not None:
            out["train"]["mfu"] = self.mfu
        return out


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ``ShapeDtypeStruct`` with shardings (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _matmul_params(cfg: Config) -> int:
    """Parameters that multiply activations: all but the embedding table (a tied table also serves as the head)."""
    m = cfg.model
    _, body = count_params(m)
    return body + (m.embed_dim * m.vocab_size if m.tie_embeddings else 0)


def model_step_flops(cfg: Config, tokens: int, *, train: bool, context: int = 0) -> float:
    """The model's FLOPs for one step over ``tokens`` tokens (all devices together).

    Train: :func:`jaxlm.metrics.model_flops_per_token` (6 N + causal attention, forward and
    backward), times 4/3 with ``model.remat=full`` (the forward runs twice). Decode: each token
    multiplies every matmul parameter once and attends over ``context`` keys:
    ``2 N + 4 * layers * heads * head_dim * context``.
    """
    m = cfg.model
    if train:
        return model_flops_per_token(m, cfg.data.seq_len) * tokens * (4 / 3 if m.remat == "full" else 1.0)
    return tokens * (2 * _matmul_params(cfg) + 4 * m.num_layers * m.num_heads * m.head_dim * context)


def _report(name: str, lowered: jax.stages.Lowered, mesh: Mesh, model_flops: float, substitutions=()) -> ProgramReport:
    start = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    c = cost(text)
    hosts = [d.process_index for d in mesh.devices.flat]  # the program's device ids, in order
    return ProgramReport(
        name, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes), int(mem.alias_size_in_bytes),
        int(mem.temp_size_in_bytes), c.flops, c.bytes_accessed, tuple(collectives(text, hosts)), c.opaque_custom_calls,
        seconds, model_flops, tuple(substitutions),
    )


def _roofline(program: ProgramReport, peak: float, bandwidth: float, links: Links) -> Roofline:
    return Roofline(program.compute_flops / peak, program.bytes_accessed / bandwidth, links.seconds(program))


def abstract_train_state(trainer: Any) -> Any:
    """A :class:`jaxlm.train.TrainState` of ``ShapeDtypeStruct`` with the trainer's shardings."""
    from jaxlm.train import TrainState

    rep = trainer.shardings.step
    params = _abstract(trainer.abstract_params, trainer.param_shardings)
    opt_state = _abstract(trainer.abstract_opt_state, trainer.opt_shardings)
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=rep)  # noqa: E731
    return TrainState(scalar(jnp.int32), params, opt_state, LossScale(scalar(jnp.float32), scalar(jnp.int32)))


def abstract_base(trainer: Any) -> Any:
    """A LoRA run's frozen base (in ``train.lora.base_dtype``) as ``ShapeDtypeStruct`` with its
    shardings; None without LoRA."""
    return None if trainer.abstract_base is None else _abstract(trainer.abstract_base, trainer.base_shardings)


def state_bytes(cfg: Config, mesh: Mesh) -> tuple[int, int]:
    """(parameter bytes, optimizer-state bytes) one device holds when training ``cfg`` on ``mesh``.
    With LoRA the parameters are the frozen base plus the adapters; the optimizer state is the adapters'."""
    from jaxlm.train import Trainer

    trainer = Trainer(cfg, mesh)
    state = abstract_train_state(trainer)
    base = abstract_base(trainer)
    return device_bytes(state.params) + (0 if base is None else device_bytes(base)), device_bytes(state.opt_state)


def plan_train(cfg: Config, mesh: Mesh, peak: float, bandwidth: float, links: Links) -> TrainPlan:
    """Compile the trainer's step for ``mesh`` from abstract shapes; see the module docstring."""
    from jaxlm.train import Trainer  # the trainer's own step

    trainer = Trainer(cfg, mesh)
    state = abstract_train_state(trainer)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    row = logical_sharding(mesh, ("batch", "seq"))
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=row) for k in ("inputs", "targets", "positions")}
    model_flops = model_step_flops(cfg, B * T, train=True) / mesh.size
    from pallas_kernels.dispatch import substitutions

    with substitutions() as swapped:
        lowered = trainer.lower_step(state, batch, abstract_base(trainer))
    program = _report("train_step", lowered, mesh, model_flops, swapped)
    return TrainPlan(
        program, B * T,
        _roofline(program, peak, bandwidth, links), model_flops_per_token(cfg.model, T),
    )


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def plan_decode(
    cfg: Config, mesh: Mesh, budget: int, peak: float, bandwidth: float, links: Links,
    *, batch: int, context: int, page_size: int = 16,
) -> DecodePlan:
    """Compile the serving engine's decode call for ``batch`` sequences of up to ``context`` tokens."""
    from jaxlm.serve.engine import _forward_and_sample  # the engine's own compiled call
    from jaxlm.serve.request import MAX_STOP_TOKEN_IDS
    from jaxlm.serve.sampling import SamplingRows

    mesh = decoding_mesh(mesh)
    m = cfg.model
    graphdef, abstract = abstract_model(m)
    # the weights as the engine holds them (jaxlm.decoding_weights)
    graphdef, params = for_decoding(graphdef, _abstract(abstract, state_shardings(abstract, mesh)))
    rows = _round_up(batch, mesh_axis_size(mesh, LOGICAL_RULES["batch"]))
    pages_per_seq = -(-context // page_size)
    num_pages = rows * pages_per_seq + 1  # + the engine's scratch page
    dtype = jnp.dtype(m.compute_dtype)
    pool_sharding = NamedSharding(mesh, logical_spec(PAGED_CACHE_AXES))
    pool = jax.ShapeDtypeStruct((m.num_layers, num_pages, page_size, m.num_kv_heads, m.head_dim), dtype,
                                sharding=pool_sharding)
    rep = NamedSharding(mesh, PartitionSpec())
    like = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep)  # noqa: E731
    # the engine's step inputs, as it builds them: tokens, positions, page table, last index, next
    # tokens (prompt scoring; unused here), then the sampling rows (seeds, counters, generated ids,
    # banned ids, temperature, top-k/p, penalties, which rows report log-probabilities)
    sampling = SamplingRows(rows, context, 1 + MAX_STOP_TOKEN_IDS)
    host = (np.zeros((rows, 1), np.int32), np.zeros((rows, 1), np.int32), np.zeros((rows, pages_per_seq), np.int32),
            np.zeros((rows,), np.int32), np.zeros((rows, 1), np.int32), *sampling.arrays())
    args = tuple(like(a) for a in host)
    from pallas_kernels.dispatch import substitutions

    with jax.set_mesh(mesh), substitutions() as swapped:
        lowered = _forward_and_sample.trace(graphdef, False, params, pool, pool, *args).lower()
    program = _report("decode_step", lowered, mesh, model_step_flops(cfg, rows, train=False, context=context) / mesh.size,
                      swapped)
    pool_bytes = 2 * device_bytes(pool)
    kv_token = 2 * m.num_layers * m.num_kv_heads * m.head_dim * dtype.itemsize
    kv_token_device = pool_bytes / (num_pages * page_size)
    free = budget - (program.peak_bytes - pool_bytes)
    return DecodePlan(
        program, rows, pages_per_seq * page_size, page_size, num_pages, device_bytes(params), pool_bytes,
        kv_token, kv_token_device, max(0, int(free // (kv_token_device * pages_per_seq * page_size))),
        compute_bound_batch(cfg, context, peak / bandwidth), compute_bound_batch(cfg, 0, peak / bandwidth),
        _roofline(program, peak, bandwidth, links), batch, dict(mesh.shape),
    )


def compute_bound_batch(cfg: Config, context: int, ridge: float) -> float | None:
    """Sequences per model replica at which a decode step's arithmetic intensity reaches ``ridge``
    (peak FLOP/s over HBM bandwidth), each attending over ``context`` tokens; None if it never does."""
    m = cfg.model
    matmul_params = _matmul_params(cfg)
    # decoding holds the weights in the compute dtype (in_compute_dtype); the embedding lookup reads B rows only
    weight_bytes = matmul_params * jnp.dtype(m.compute_dtype).itemsize
    flops_per_token = 2 * matmul_params + 4 * m.num_layers * m.num_heads * m.head_dim * context
    kv_read = 2 * m.num_layers * m.num_kv_heads * m.head_dim * jnp.dtype(m.compute_dtype).itemsize * context
    denominator = flops_per_token - ridge * kv_read
    return ridge * weight_bytes / denominator if denominator > 0 else None


def plan_run(
    cfg: Config,
    target: str = "h100",
    topology: str = "1x8",
    *,
    train: bool = True,
    decode: bool = True,
    decode_batch: int = 16,
    context: int | None = None,
    page_size: int = 16,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    links: Links | None = None,
) -> Plan:
    """Compile ``cfg``'s train step and/or decode step for ``topology`` GPUs of kind ``target``.

    ``context`` defaults to ``data.seq_len``. ``links`` defaults to the target's NVLink
    (:data:`NVLINK_BANDWIDTH`) and one 400 Gb/s NIC per GPU (:data:`NETWORK_BANDWIDTH`). Raises ConfigError for an
    unknown target, a malformed topology, or a config that does not fit the device count.
    ``model.init_from`` gives the architecture (its metadata is read, not its weights), as in training.
    """
    from jaxlm.pretrained import resolve_init_from

    cfg = resolve_init_from(cfg)
    try:
        spec = get_target(target)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not 0 < memory_fraction <= 1:
        raise ConfigError(f"memory fraction must be in (0, 1], got {memory_fraction}")
    if context is not None and context < 1:
        raise ConfigError(f"context must be at least 1 token, got {context}")
    if decode_batch < 1 or page_size < 16 or page_size & (page_size - 1):
        raise ConfigError(f"decode batch must be >= 1 and page size a power of two >= 16, got {decode_batch}, {page_size}")
    try:
        mesh = make_compile_only_mesh(cfg.mesh, spec.name, topology)
    except ValueError as e:  # a malformed topology, or mesh sizes that do not fit its GPUs
        raise ConfigError(str(e)) from None
    links = links or Links(NVLINK_BANDWIDTH[spec.name], NETWORK_BANDWIDTH)
    dtype = "float32" if cfg.model.compute_dtype == "float32" else cfg.model.compute_dtype
    peak, bandwidth = spec.peak_flops[dtype], spec.hbm_bandwidth
    budget = int(spec.hbm_bytes * memory_fraction)
    param_bytes, opt_bytes = state_bytes(cfg, mesh)
    train_plan = plan_train(cfg, mesh, peak, bandwidth, links) if train else None
    decode_plan = None
    if decode:
        decode_plan = plan_decode(
            cfg, mesh, budget, peak, bandwidth, links,
            batch=decode_batch, context=cfg.data.seq_len if context is None else context, page_size=page_size,
        )
    return Plan(
        spec.name, topology_name(topology), mesh.size, dict(mesh.shape), spec.hbm_bytes, memory_fraction, links,
        peak, bandwidth, param_bytes, opt_bytes, train_plan, decode_plan,
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _program_lines(plan: Plan, p: ProgramReport) -> list[str]:
    room = plan.headroom(p)
    verdict = f"fits, {_gib(room)} to spare" if room >= 0 else f"does NOT fit: {_gib(-room)} over the budget"
    lines = [
        f"  memory (XLA)      arguments {_gib(p.argument_bytes)}, outputs {_gib(p.output_bytes)}, "
        f"aliased (donated) {_gib(p.alias_bytes)}, temporaries {_gib(p.temp_bytes)}",
        f"  peak              {_gib(p.peak_bytes)}: {verdict}",
        "  collectives       " + (", ".join(
            f"{c.kind} x{c.count} ({_gib(c.bytes)}; sends {_gib(c.nvlink_bytes)} over NVLink"
            + (f", {_gib(c.network_bytes)} over the network)" if c.network_bytes else ")")
            for c in p.collectives) or "none"),
        f"  cost (HLO)        {p.flops:.3e} matmul FLOPs, {p.bytes_accessed:.3e} HBM bytes per step"
        + (f" outside kernels; kernels hide theirs, so compute time uses the model's {p.model_flops:.3e}"
           if p.opaque_custom_calls else ""),
    ]
    return lines


def _roofline_line(plan: Plan, r: Roofline) -> str:
    return (
        f"  roofline          compute {r.compute_s * 1e3:.2f} ms, memory {r.memory_s * 1e3:.2f} ms, "
        f"communication {r.comms_s * 1e3:.2f} ms (NVLink {plan.links.nvlink / 1e9:.0f} GB/s, network "
        f"{plan.links.network / 1e9:.0f} GB/s per GPU) -> {r.step_s * 1e3:.2f} ms/step ({r.bound}-bound)"
    )


def format_plan(plan: Plan) -> str:
    """The plan as a short report (per device unless said otherwise)."""
    mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
    out = [
        f"{plan.num_devices} x {plan.target} (topology {plan.topology}), mesh {mesh}",
        f"memory budget per device: {_gib(plan.budget_bytes)} ({plan.memory_fraction:.0%} of {_gib(plan.hbm_bytes)}; "
        "JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75)",
        f"training state per device: parameters {_gib(plan.param_bytes)}, optimizer state {_gib(plan.opt_state_bytes)}",
    ]
    if plan.train is not None:
        t = plan.train
        out += [
            f"train step: {t.tokens_per_step} tokens per step, compiled in {t.program.compile_seconds:.1f} s",
            *_program_lines(plan, t.program), _roofline_line(plan, t.roofline),
            f"  implies           {t.tokens_per_s:,.0f} tokens/s, MFU {plan.mfu:.1%} "
            f"({t.model_flops_per_token:.3e} model FLOPs per token)",
        ]
    if plan.decode is not None:
        d = plan.decode
        bound = (f"{d.compute_bound_batch:,.0f} sequences per model replica at {d.context} tokens of context"
                 if d.compute_bound_batch is not None
                 else f"never at {d.context} tokens of context (the KV reads alone keep it memory-bound)")
        rounded = (f" ({d.requested_batch} rounded up to the decoding mesh's {d.batch}-way batch split)"
                   if d.requested_batch and d.requested_batch != d.batch else "")
        folded = ("" if not d.mesh or d.mesh == plan.mesh else
                  "  mesh              decoding folds sequence into data and stage into fsdp: "
                  + " ".join(f"{k}={v}" for k, v in d.mesh.items()))
        out += [
            f"decode step: {d.batch} sequences{rounded} x {d.context} tokens (paged KV, {d.page_size}-token pages, "
            f"{d.num_pages} pages), compiled in {d.program.compile_seconds:.1f} s",
            *([folded] if folded else []),
            f"  state             parameters {_gib(d.param_bytes)}, KV pool {_gib(d.kv_pool_bytes)}",
            *_program_lines(plan, d.program), _roofline_line(plan, d.roofline),
            f"  implies           {d.tokens_per_s:,.0f} tokens/s",
            f"  KV cache          {d.kv_bytes_per_token / 2**10:.1f} KiB per token (model), "
            f"{d.kv_bytes_per_token_device / 2**10:.1f} KiB per token on each device; "
            f"{d.max_sequences:,} sequences of {d.context} tokens fit",
            f"  compute-bound     {bound}; at {d.compute_bound_batch_short:,.0f} for short contexts (weights only)",
        ]
    programs = [p.program for p in (plan.train, plan.decode) if p is not None]
    calls = sorted({c for p in programs for c in p.opaque_custom_calls})
    if programs:
        out.append("kernels: " + (f"custom calls {', '.join(calls)} (FLOPs inside them not counted)" if calls else
                                  "attention and projections compiled as XLA ops (no Pallas or cuDNN custom calls)"))
        for reason in dict.fromkeys(r for p in programs for r in p.substitutions):
            out.append(f"  compiled in another kernel's place (the figures are the stand-in's): {reason}")
    out.append(
        "estimate assumes compute, memory traffic and communication overlap perfectly; ignores kernel launch "
        "and pipeline-bubble overhead, elementwise FLOPs and caches"
    )
    return "\n".join(out)
