"""Per-step figures read from a compiled program's HLO text (``compiled.as_text()``).

XLA's own cost analysis (``compiled.cost_analysis()``) is not available for a program compiled
for a GPU this process does not have (it returns None), and where it is available it counts the
body of a ``while`` loop once, whatever its trip count, so a layer scan would count one layer.
This module walks the optimised HLO instead and multiplies every computation by the number of
times it runs per step (``known_trip_count`` of the loops around it):

* :func:`collectives` - each collective kind (``all-reduce``, ``all-gather``, ``reduce-scatter``,
  ``all-to-all``, ``collective-permute``, ...): how many run per step, the bytes they span, and
  what each device sends over NVLink and over the network for its device groups
  (:func:`device_groups`, :func:`link_bytes`) given each device's host.
* :func:`cost` - matmul FLOPs (``dot`` instructions, inside fusions too, and cuBLAS gemm custom
  calls: ``2 * prod(result dims) * prod(contracting dims)``) and an estimate of the bytes each
  top-level kernel reads and writes in device memory.

What is not counted, and said so in :class:`Cost`: elementwise FLOPs (small next to the
matmuls), FLOPs inside opaque custom calls (Pallas/Triton and cuDNN kernels; listed by name), and
cache effects (the byte estimate assumes every kernel reads its operands once from HBM; a fused
slice of a stacked tensor counts only the slice, and opaque kernels handed a buffer that the step
updates in place, as each layer's KV pools after it writes its keys and values, count it once
per step between them: each kernel reads its own layer's part, whether the layers run as a loop
(a share per trip) or unrolled (a share per kernel)).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Iterator

import numpy as np

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "f8e8m0fnu": 1,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%(\S+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*)$")
_CALLED = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')

COLLECTIVE_KINDS = (
    "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute",
    "collective-broadcast",
)
_NO_TRAFFIC = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
    "after-all", "partition-id", "replica-id", "iota", "async-start", "async-done", "async-update",
    "copy-start", "copy-done", "send", "send-done", "recv", "recv-done", "add-dependency", "opt-barrier",
}
_SLICING = {"dynamic-slice", "slice", "gather"}
_IN_PLACE = {"dynamic-update-slice", "scatter"}  # operand 0 is updated in place; the update is the last operand (DUS: operand 1)


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str  # the result shape text, e.g. "bf16[8,128]{1,0}" or a tuple "(f32[], bf16[4]{0})"
    opcode: str
    operands: tuple[str, ...]
    args: str  # the operand list as written, e.g. "(%a, %b)" or "(0)" for a parameter
    attrs: str  # everything after the operand list
    is_root: bool = False


@dataclasses.dataclass(frozen=True)
class CollectiveStat:
    kind: str  # all-reduce | all-gather | reduce-scatter | all-to-all | collective-permute | ...
    count: int  # times it runs per step (loops unrolled by their trip counts)
    bytes: int  # per device per step: for each run, the larger of its operands and its results
    # per device per step, what a hierarchical ring algorithm sends over each device's links
    # (:func:`link_bytes`): within its host (NVLink) and over its own network link (NIC)
    nvlink_bytes: float = 0.0
    network_bytes: float = 0.0


@dataclasses.dataclass(frozen=True)
class Cost:
    flops: float  # matmul FLOPs per step on one device
    bytes_accessed: float  # estimated device-memory bytes read + written per step on one device
    opaque_custom_calls: tuple[str, ...]  # custom-call targets whose FLOPs are not counted
    loops_without_trip_count: int  # while loops counted once because XLA does not know their trip count


def shape_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape text (tuples summed), e.g. ``bf16[2,3]{1,0}`` -> 12."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def _dims(shape: str) -> list[int]:
    """Dimensions of the first array in a shape text."""
    match = _ARRAY.search(shape)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


def _split_paren(text: str) -> tuple[str, str]:
    """``"(a, (b)) rest"`` -> ``("(a, (b))", " rest")``: a balanced parenthesised prefix and the rest."""
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return text[: i + 1], text[i + 1:]
    raise ValueError(f"unbalanced parentheses in HLO text: {text[:80]!r}")


def _parse_instruction(line: str) -> Instruction | None:
    match = _INSTR.match(line)
    if not match:
        return None
    name, rest = match.groups()
    if rest.startswith("("):
        shape, rest = _split_paren(rest)
    else:
        shape, _, rest = rest.partition(" ")
    rest = rest.lstrip()
    paren = rest.find("(")
    if paren < 0:
        return None
    opcode = rest[:paren]
    args, attrs = _split_paren(rest[paren:])
    operands = tuple(re.findall(r"%([\w.\-]+)", re.sub(r"/\*.*?\*/", "", args)))
    return Instruction(name, shape, opcode, operands, args, attrs, line.lstrip().startswith("ROOT "))


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """``({computation name: its instructions}, entry computation name)`` of an HLO module's text."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and "=" not in line.split("(", 1)[0]:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None:
            instr = _parse_instruction(line)
            if instr is not None:
                computations[current].append(instr)
    if not entry:
        raise ValueError("HLO text has no ENTRY computation")
    return computations, entry


def _called(instr: Instruction) -> Iterator[tuple[str, str]]:
    for role, name in _CALLED.findall(instr.attrs):
        yield role, name
    for group in _BRANCHES.findall(instr.attrs):
        for name in re.findall(r"%([\w.\-]+)", group):
            yield "branch", name


def run_counts(computations: dict[str, list[Instruction]], entry: str,
               trips: dict[str, int] | None = None) -> tuple[dict[str, int], set[str], int]:
    """``(runs per step of each computation, the computations that are fusion bodies, loops of unknown trip count)``;
    ``trips``, when given, receives each loop body's own trip count."""
    counts: dict[str, int] = {}
    fused: set[str] = set()
    unknown = 0
    trips = {} if trips is None else trips
    stack = [(entry, 1)]
    while stack:
        name, times = stack.pop()
        counts[name] = counts.get(name, 0) + times
        for instr in computations.get(name, ()):
            trip = 1
            if instr.opcode == "while":
                found = _TRIP.search(instr.attrs)
                unknown += found is None
                trip = int(found.group(1)) if found else 1
            for role, callee in _called(instr):
                if role == "to_apply":  # reductions' scalar bodies: no matmuls, no traffic of their own
                    continue
                if instr.opcode == "fusion":
                    fused.add(callee)
                if role == "body":
                    trips[callee] = trip
                stack.append((callee, times * (trip if role == "body" else 1)))
    return counts, fused, unknown


_GROUPS_LIST = re.compile(r"\b(?:replica_groups|source_target_pairs)=\{((?:\{[0-9,]*\},?)*)\}")
_GROUPS_IOTA = re.compile(r"\breplica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?")
_GROUPS_MESH = re.compile(
    r"\breplica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([0-9,]+)\](?:T\(([0-9,]+)\))?\))?\s*\{([^}]*)\}")


def _iota(dims: str, perm: str | None) -> np.ndarray:
    """XLA's iota tile ``[dims]T(perm)``: ``arange`` over ``dims``, transposed by ``perm``, flattened."""
    shape = [int(d) for d in dims.split(",")]
    ids = np.arange(math.prod(shape)).reshape(shape)
    return (ids.transpose([int(p) for p in perm.split(",")]) if perm else ids).ravel()


def device_groups(attrs: str, num_devices: int) -> list[list[int]] | None:
    """The device groups a collective's attributes name: ``replica_groups={{0,1},{2,3}}``, the
    iota form ``replica_groups=[2,4]<=[4,2]T(1,0)`` (an iota over the second shape, transposed,
    reshaped to groups), the mesh form ``replica_groups=mesh['a'=4,'b'=2] {'a'}`` (ids laid out
    row-major over the named axes, or in the order of an iota ``device_ids=([2,4]T(1,0))``; a
    group along the braced axes), ``replica_groups={}`` (one group of all ``num_devices``; None
    if that is 0, unknown), or a collective-permute's ``source_target_pairs`` (each pair a
    group). None if it names none.
    Ids are the program's device ids (its device assignment: a mesh's devices in ``.flat`` order)."""
    iota = _GROUPS_IOTA.search(attrs)
    if iota:
        size = int(iota.group(1).split(",")[-1])
        return _iota(iota.group(2), iota.group(3)).reshape(-1, size).tolist()
    mesh = _GROUPS_MESH.search(attrs)
    if mesh:
        axes = re.findall(r"'([^']+)'=(\d+)", mesh.group(1))
        along = re.findall(r"'([^']+)'", mesh.group(4))
        names = [a for a, _ in axes]
        if not axes or not along or any(a not in names for a in along) or re.search(r"[:(]", mesh.group(4)):
            return None  # sub-axes or a form not read here: priced as unknown
        shape = [int(n) for _, n in axes]
        order = _iota(mesh.group(2), mesh.group(3)) if mesh.group(2) else np.arange(math.prod(shape))
        if order.size != math.prod(shape):
            return None
        ids = order.reshape(shape)
        kept = [names.index(a) for a in along]
        others = [i for i in range(len(names)) if i not in kept]
        size = math.prod(ids.shape[i] for i in kept)
        return ids.transpose(others + kept).reshape(-1, size).tolist()
    listed = _GROUPS_LIST.search(attrs)
    if listed is None:
        return None
    groups = [[int(d) for d in g.split(",") if d] for g in re.findall(r"\{([0-9,]*)\}", listed.group(1))]
    groups = [g for g in groups if g]
    return groups or ([list(range(num_devices))] if num_devices else None)


def link_bytes(kind: str, size: float, groups: list[list[int]] | None, hosts: list[int] | None) -> tuple[float, float]:
    """``(NVLink bytes, network bytes)`` one device sends for a collective spanning ``size`` bytes
    over ``groups`` (device ids), ``hosts[i]`` being device ``i``'s host (None: one host).

    A hierarchical ring, as NCCL runs across hosts with one NIC per GPU: a group of ``n`` devices
    on ``H`` hosts, ``g = n / H`` on each, moves ``(g - 1) / g`` of the buffer within each host and
    ``(H - 1) / H`` of it between hosts, the host's share split over its ``g`` NICs. An all-reduce
    does both twice (reduce-scatter, then all-gather); an all-to-all sends each peer its part
    directly; a collective-permute sends its buffer once, over the network if any pair crosses
    hosts. Groups the text does not name are priced as the bound of a large ring (the buffer,
    twice for an all-reduce), over the network when there are several hosts. The group spanning
    the most hosts sets the figure."""
    many_hosts = bool(hosts) and len(set(hosts)) > 1
    if groups is None or (hosts and any(d >= len(hosts) for g in groups for d in g)):
        bound = (2.0 if kind == "all-reduce" else 1.0) * size
        return (0.0, bound) if many_hosts else (bound, 0.0)
    if max(len(g) for g in groups) <= 1:
        return 0.0, 0.0
    host_count = (lambda g: len({hosts[d] for d in g})) if hosts else (lambda g: 1)
    if kind == "collective-permute":
        return (0.0, float(size)) if any(host_count(g) > 1 for g in groups) else (float(size), 0.0)
    widest = max(groups, key=lambda g: (host_count(g), len(g)))
    H = host_count(widest)
    n = len(widest)
    per_host = n / H
    if kind == "all-to-all":
        return (per_host - 1) / n * size, (n - per_host) / n * size
    twice = 2.0 if kind == "all-reduce" else 1.0
    return twice * (per_host - 1) / per_host * size, twice * (H - 1) / H * size / per_host


def collectives(text: str, hosts: list[int] | None = None) -> list[CollectiveStat]:
    """Collectives per step, one row per kind: see :class:`CollectiveStat`. ``hosts[i]``: the host
    of device id ``i`` (the program's device assignment); without it every group counts as within
    one host."""
    computations, entry = parse_module(text)
    counts, _, _ = run_counts(computations, entry)
    num_devices = len(hosts) if hosts else 0
    found: dict[str, list[float]] = {}
    for comp, instrs in computations.items():
        times = counts.get(comp, 0)
        table = {i.name: i for i in instrs}
        for instr in instrs:
            kind = instr.opcode.removesuffix("-done")
            if kind not in COLLECTIVE_KINDS or instr.opcode.endswith("-start"):
                continue
            source = table.get(instr.operands[0]) if instr.opcode.endswith("-done") and instr.operands else instr
            inputs = sum(shape_bytes(table[o].shape) for o in (source.operands if source else ()) if o in table)
            size = max(inputs, shape_bytes(instr.shape))
            nvlink, network = link_bytes(kind, size, device_groups((source or instr).attrs, num_devices), hosts)
            row = found.setdefault(kind, [0, 0, 0.0, 0.0])
            row[0] += times
            row[1] += times * size
            row[2] += times * nvlink
            row[3] += times * network
    return [CollectiveStat(kind, int(row[0]), int(row[1]), row[2], row[3])
            for kind in COLLECTIVE_KINDS if (row := found.get(kind))]


def _dot_flops(instr: Instruction, table: dict[str, Instruction]) -> float:
    lhs = table.get(instr.operands[0]) if instr.operands else None
    if lhs is None:
        return 0.0
    contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.attrs)
    dims = _dims(lhs.shape)
    k = math.prod(dims[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
    return 2.0 * math.prod(_dims(instr.shape)) * k


def _gemm_flops(instr: Instruction, table: dict[str, Instruction]) -> float:
    """A cuBLAS gemm custom call: the dimension numbers sit in its backend config."""
    lhs = table.get(instr.operands[0]) if instr.operands else None
    config = re.search(r"backend_config=(\{.*\})", instr.attrs)
    if lhs is None or config is None:
        return 0.0
    try:
        numbers = json.loads(config.group(1))["gemm_backend_config"]["dot_dimension_numbers"]
    except (ValueError, KeyError):
        return 0.0
    dims = _dims(lhs.shape)
    k = math.prod(dims[int(d)] for d in numbers.get("lhs_contracting_dimensions", []))
    return 2.0 * math.prod(_dims(instr.shape)) * k


def _root(body: list[Instruction]) -> Instruction | None:
    """A fusion body's root instruction, looking through bitcasts of it."""
    by_name = {i.name: i for i in body}
    root = next((i for i in body if i.is_root), None)
    while root is not None and root.opcode == "bitcast" and root.operands and root.operands[0] in by_name:
        root = by_name[root.operands[0]]
    return root


def _fusion_traffic(instr: Instruction, body: list[Instruction], table: dict[str, Instruction]) -> float:
    """Bytes a fusion moves: the slices of operands it only slices, only the update of a buffer it
    updates in place (dynamic-update-slice, scatter), everything else in full."""
    users: dict[str, list[Instruction]] = {}
    for i in body:
        for o in i.operands:
            users.setdefault(o, []).append(i)

    def uses(name: str) -> list[tuple[Instruction, str]]:  # (user, the name it reads), through bitcasts
        out = []
        for u in users.get(name, []):
            out.extend(uses(u.name) if u.opcode == "bitcast" else [(u, name)])
        return out

    params = {int(i.args.strip("()")): i for i in body if i.opcode == "parameter"}
    total = 0.0
    for pos, operand in enumerate(instr.operands):
        used = uses(params[pos].name) if pos in params else []
        if used and all(u.opcode in _SLICING and u.operands[0] == via for u, via in used):
            total += sum(shape_bytes(u.shape) for u, _ in used)
        elif not (used and all(u.opcode in _IN_PLACE and u.operands[0] == via for u, via in used)):
            total += shape_bytes(table[operand].shape) if operand in table else 0  # (in-place buffers: 0)
    by_name = {i.name: i for i in body}
    root = _root(body)
    if root is not None and root.opcode in _IN_PLACE:
        update = root.operands[1] if root.opcode == "dynamic-update-slice" else root.operands[-1]
        if update in by_name:
            return total + shape_bytes(by_name[update].shape)
    return total + shape_bytes(instr.shape)


def _updated_in_place(name: str, table: dict[str, Instruction], computations: dict[str, list[Instruction]]) -> str | None:
    """When value ``name`` is a buffer this computation updated in place (through fusions rooted
    at a dynamic-update-slice or scatter, and bitcasts) from one of its parameters or a loop's
    carried element, that source's name (one per buffer, as the KV pools a layer writes its part
    of); else None."""
    seen, updated = set(), False
    while name in table and name not in seen:
        seen.add(name)
        instr = table[name]
        if instr.opcode == "parameter":
            return name if updated else None
        if instr.opcode == "get-tuple-element":
            source = table.get(instr.operands[0]) if instr.operands else None
            return name if updated and source is not None and source.opcode == "parameter" else None
        if instr.opcode == "bitcast":
            name = instr.operands[0]
            continue
        if instr.opcode == "fusion":
            body = computations.get(dict(_called(instr)).get("calls", ""), [])
            by_name = {i.name: i for i in body}
            root = _root(body)
            if root is None or root.opcode not in _IN_PLACE:
                return None
            target = by_name.get(root.operands[0])
            while target is not None and target.opcode == "bitcast":
                target = by_name.get(target.operands[0])
            if target is None or target.opcode != "parameter":
                return None
            name, updated = instr.operands[int(target.args.strip("()"))], True
            continue
        return None
    return None


def _opaque_kernel(instr: Instruction) -> str | None:
    """The target of a custom call whose FLOPs and reads the HLO hides (Pallas/Triton, cuDNN; not a
    cuBLAS gemm), else None."""
    if instr.opcode != "custom-call":
        return None
    target = _TARGET.search(instr.attrs)
    name = target.group(1) if target else "?"
    return None if name.startswith("__cublas$") else name


def _kernel_shares(instrs: list[Instruction], table: dict[str, Instruction],
                   computations: dict[str, list[Instruction]]) -> dict[tuple[str, str], int]:
    """``{(kernel, operand): n}`` for each operand of an opaque kernel that is a buffer this
    computation updates in place (:func:`_updated_in_place`): ``n`` kernels here read a version of
    that buffer, so each reads 1/n of it (per trip of the loop around them)."""
    reads = [(instr.name, o, _updated_in_place(o, table, computations))
             for instr in instrs if _opaque_kernel(instr) is not None for o in dict.fromkeys(instr.operands) if o in table]
    reads = [r for r in reads if r[2] is not None]
    readers: dict[str, set[str]] = {}
    for kernel, _, source in reads:
        readers.setdefault(source, set()).add(kernel)
    return {(kernel, o): len(readers[source]) for kernel, o, source in reads}


def cost(text: str) -> Cost:
    """Matmul FLOPs and estimated device-memory bytes per step on one device (see :class:`Cost`)."""
    computations, entry = parse_module(text)
    trips: dict[str, int] = {}
    counts, fused, unknown = run_counts(computations, entry, trips)
    flops = traffic = 0.0
    opaque: set[str] = set()
    for comp, instrs in computations.items():
        times = counts.get(comp, 0)
        if not times:
            continue
        table = {i.name: i for i in instrs}
        shares = _kernel_shares(instrs, table, computations)
        for instr in instrs:
            kernel = _opaque_kernel(instr)  # it may read only part of an operand
            if instr.opcode == "dot":
                flops += times * _dot_flops(instr, table)
            elif kernel is not None:
                opaque.add(kernel)
            elif instr.opcode == "custom-call":  # a cuBLAS gemm
                flops += times * _gemm_flops(instr, table)
            if comp in fused or instr.opcode in _NO_TRAFFIC:
                continue
            kind = instr.opcode.removesuffix("-done").removesuffix("-start")
            if kind in COLLECTIVE_KINDS:
                continue  # link traffic: see collectives()
            if instr.opcode == "fusion":
                callee = dict(_called(instr)).get("calls")
                traffic += times * _fusion_traffic(instr, computations.get(callee, []), table)
            else:
                inputs = 0.0
                for o in instr.operands:
                    if o not in table:
                        continue
                    size = shape_bytes(table[o].shape)
                    if (instr.name, o) in shares:  # the kernels reading this buffer read it once per step between them
                        size /= shares[instr.name, o] * trips.get(comp, 1)
                    inputs += size
                traffic += times * (inputs + shape_bytes(instr.shape))
    return Cost(flops, traffic, tuple(sorted(opaque)), unknown)
