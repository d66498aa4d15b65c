"""Devices -> a ``jax.sharding.Mesh`` with named axes ``(stage, data, fsdp, sequence, tensor)``.

The order runs from the slowest links to the fastest: pipeline stages exchange one activation
per microbatch, data and FSDP traffic can cross hosts,
the sequence ring passes K/V between neighbours, and tensor parallelism, which talks every
layer, stays innermost.

Axis types are ``Auto`` on purpose: the model states the layout it wants through logical-axis
constraints (``sharding.rules``) and GSPMD inserts the collectives. ``Explicit`` axes would make
every ambiguous op (an embedding gather, a reshape across a sharded dim) demand a hand-written
reshard, which doubles model code for no gain at this size; explicit collectives are written with
``shard_map`` where we want them (kernels, ring attention, pipelines).
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from sharding.errors import ConfigError


class MeshConfig(Protocol):
    """The mesh axis sizes (``jaxlm.config.MeshConfig`` is one); ``-1`` fills the rest."""

    stage: int
    data: int
    fsdp: int
    sequence: int
    tensor: int

MESH_AXES: tuple[str, ...] = ("stage", "data", "fsdp", "sequence", "tensor")


def resolve_axis_sizes(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Sizes for ``MESH_AXES``, with a single ``-1`` filled so the product is ``num_devices``."""
    sizes = [getattr(cfg, axis) for axis in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices: "
                f"{known} does not divide {num_devices}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh {'*'.join(MESH_AXES)} = {'*'.join(map(str, sizes))} = {math.prod(sizes)} but there are "
            f"{num_devices} devices; set one axis to -1 to fill the rest"
        )
    return tuple(sizes)


def split_across_processes(sizes: Sequence[int], num_processes: int, local_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(per_process, across_processes)`` sizes for ``MESH_AXES`` whose elementwise product is ``sizes``.

    The tensor axis stays inside a process (it communicates every layer); the processes are laid
    over ``data`` first, then ``fsdp``, ``stage`` and ``sequence``.
    """
    axis = dict(zip(MESH_AXES, sizes))
    if local_devices % axis["tensor"]:
        raise ConfigError(
            f"mesh.tensor={axis['tensor']} must divide the {local_devices} devices of one process: "
            "tensor parallelism stays inside a process; lower mesh.tensor"
        )
    across = dict.fromkeys(MESH_AXES, 1)
    remaining = num_processes
    for name in ("data", "fsdp", "stage", "sequence"):
        across[name] = math.gcd(axis[name], remaining)
        remaining //= across[name]
    if remaining != 1:
        raise ConfigError(
            f"mesh {', '.join(f'{k}={v}' for k, v in axis.items())} cannot be split over {num_processes} processes "
            "(data*fsdp*stage*sequence must be a multiple of the process count)"
        )
    return tuple(axis[a] // across[a] for a in MESH_AXES), tuple(across[a] for a in MESH_AXES)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the mesh over ``devices`` (default: all devices of all processes).

    With several processes the mesh is hybrid: ``data``/``fsdp`` cross processes, ``tensor``
    stays within one (see ``split_across_processes``).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(cfg, len(devices))
    if jax.process_count() > 1 and len(devices) == len(jax.devices()):
        per_process, across = split_across_processes(sizes, jax.process_count(), jax.local_device_count())
        grid = mesh_utils.create_hybrid_device_mesh(per_process, across, devices, process_is_granule=True)
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
    # A subset of devices (tests, notebooks): keep the given order.
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def make_compile_only_mesh(cfg: MeshConfig, target: str, topology: str = "1x8") -> Mesh:
    """The mesh ``cfg`` describes over compile-only GPUs: ``topology`` (``HOSTSxGPUS``) of ``target``.

    Built like :func:`make_mesh` for that many processes (``tensor`` inside a host, ``data`` and
    ``fsdp`` across hosts), from :func:`sharding.targets.compile_only_devices`; arrays placed on it
    are abstract (``jax.ShapeDtypeStruct``) and programs on it can be compiled, not run. The CUDA
    compile toolchain must be enabled first (:func:`sharding.targets.use_gpu_compile_toolchain`).
    """
    from sharding.targets import compile_only_devices

    devices = compile_only_devices(target, topology)
    sizes = resolve_axis_sizes(cfg, len(devices))
    hosts = len({d.process_index for d in devices})
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if hosts > 1:
        per_process, across = split_across_processes(sizes, hosts, len(devices) // hosts)
        grid = mesh_utils.create_hybrid_device_mesh(per_process, across, devices, process_is_granule=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=axis_types)


def decoding_mesh(mesh: Mesh) -> Mesh:
    """The same devices laid out for decoding: the ``sequence`` axis folded into ``data`` and the
    ``stage`` axis into ``fsdp``.

    Decoding feeds one token per step, which cannot be split along the sequence; parameters are
    never split over ``sequence``, so folding it keeps every device's shards. Decoding runs the
    layers one after another on every device (:mod:`jaxlm.decoding_weights` holds each layer's
    weights as arrays of their own), so pipeline stages become more ``fsdp`` shards of each
    layer: the same bytes per device, moved once when the weights are placed.
    """
    shape = dict(mesh.shape)
    if shape.get("sequence", 1) == 1 and shape.get("stage", 1) == 1:
        return mesh
    p, d, f, s, t = (shape[a] for a in MESH_AXES)
    devices = np.asarray(mesh.devices).transpose(1, 3, 0, 2, 4).reshape(1, d * s, p * f, 1, t)
    return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
