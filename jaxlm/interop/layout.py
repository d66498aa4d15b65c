"""Where each jaxlm parameter lives in a Hugging Face Llama-family checkpoint, and the moves between them.

Hugging Face stores a linear layer as ``weight[out, in]`` per layer; jaxlm stores ``[in, ...out...]``
with heads split out and the layers stacked on a leading axis. A :class:`Leaf` records, for one
jaxlm parameter, the Hugging Face tensor name (``{i}`` for the layer), whether the two are
transposed, and how many jaxlm axes fold into each Hugging Face axis. From that alone we can

* read any shard of a jaxlm parameter by reading only the Hugging Face rows/columns it covers
  (:func:`build_state` -- each device's shard is made by ``jax.make_array_from_callback``, so the
  whole model is never gathered on one device or in host memory), and
* write a jaxlm parameter back in Hugging Face layout (:func:`to_hf_tensors`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from jaxlm.build import abstract_model, state_shardings
from jaxlm.config import ConfigError, ModelConfig

# read(name, slices) -> the Hugging Face tensor ``name`` (layout [out, in]) restricted to ``slices``
Reader = Callable[[str, tuple[slice, ...]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One jaxlm parameter as seen in a Hugging Face checkpoint (per layer for stacked leaves)."""

    hf_name: str  # '{i}' stands for the layer index
    transpose: bool  # jaxlm axes run in the reverse order of the Hugging Face axes
    groups: tuple[int, ...]  # jaxlm axes folded into each (transposed) Hugging Face axis, e.g. (1, 2)

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name


_ATTN = "model.layers.{i}.self_attn."
_MLP = "model.layers.{i}.mlp."


def leaves(cfg: ModelConfig) -> dict[tuple[str, ...], Leaf]:
    """The jaxlm parameter path -> :class:`Leaf` table for ``cfg``."""
    table = {
        ("embed",): Leaf("model.embed_tokens.weight", False, (1, 1)),
        ("final_norm", "scale"): Leaf("model.norm.weight", False, (1,)),
        ("blocks", "attn_norm", "scale"): Leaf("model.layers.{i}.input_layernorm.weight", False, (1,)),
        ("blocks", "mlp_norm", "scale"): Leaf("model.layers.{i}.post_attention_layernorm.weight", False, (1,)),
        ("blocks", "attn", "wq"): Leaf(_ATTN + "q_proj.weight", True, (1, 2)),
        ("blocks", "attn", "wk"): Leaf(_ATTN + "k_proj.weight", True, (1, 2)),
        ("blocks", "attn", "wv"): Leaf(_ATTN + "v_proj.weight", True, (1, 2)),
        ("blocks", "attn", "wo"): Leaf(_ATTN + "o_proj.weight", True, (2, 1)),
        ("blocks", "mlp", "w_gate"): Leaf(_MLP + "gate_proj.weight", True, (1, 1)),
        ("blocks", "mlp", "w_up"): Leaf(_MLP + "up_proj.weight", True, (1, 1)),
        ("blocks", "mlp", "w_down"): Leaf(_MLP + "down_proj.weight", True, (1, 1)),
    }
    if not cfg.tie_embeddings:
        table[("lm_head",)] = Leaf("lm_head.weight", True, (1, 1))
    if cfg.qkv_bias:
        for p in "qkv":
            table[("blocks", "attn", f"b{p}")] = Leaf(_ATTN + f"{p}_proj.bias", False, (2,))
    return table


def hf_tensor_names(cfg: ModelConfig) -> list[str]:
    """Every Hugging Face tensor name a model of ``cfg`` reads (each layer's spelled out)."""
    names = []
    for leaf in leaves(cfg).values():
        names += [leaf.hf_name.format(i=i) for i in range(cfg.num_layers)] if leaf.stacked else [leaf.hf_name]
    return names


def _key_name(k: Any) -> str:
    return str(getattr(k, "key", getattr(k, "name", k)))


def _path(path: tuple) -> tuple[str, ...]:
    return tuple(_key_name(k) for k in path)


def _normalise(idx: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    out = []
    for s, n in zip(tuple(idx) + (slice(None),) * (len(shape) - len(idx)), shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {s} is not supported")
        out.append(slice(start, stop))
    return tuple(out)


def read_shard(leaf: Leaf, layer: int | None, shape: tuple[int, ...], idx: tuple[slice, ...], read: Reader) -> np.ndarray:
    """The block ``idx`` of one layer's jaxlm parameter (per-layer ``shape``), read from Hugging Face layout.

    For every group of jaxlm axes folded into one Hugging Face axis, only the rows covering the
    group's leading-axis slice are read; the trailing axes of the group are sliced after reshaping.
    """
    ranges, views, k = [], [], 0
    for g in leaf.groups:
        axes, sl = shape[k : k + g], idx[k : k + g]
        inner = math.prod(axes[1:])
        ranges.append(slice(sl[0].start * inner, sl[0].stop * inner))
        views.append((sl[0].stop - sl[0].start, *axes[1:]))
        k += g
    name = leaf.hf_name.format(i=layer)
    block = read(name, tuple(reversed(ranges)) if leaf.transpose else tuple(ranges))
    block = block.T if leaf.transpose else block
    block = block.reshape(tuple(d for v in views for d in v))
    rest, k = [], 0
    for g in leaf.groups:  # leading axis of each group is already cut; cut the others now
        rest.append(slice(None))
        rest.extend(idx[k + 1 : k + g])
        k += g
    return block[tuple(rest)]


def build_state(cfg: ModelConfig, read: Reader, mesh: Mesh | None) -> nnx.Module:
    """A jaxlm Transformer whose every parameter shard is read straight from ``read``.

    Each parameter is created with ``jax.make_array_from_callback`` under its final sharding
    (from the logical axis names, ``jaxlm.build``); a device's callback reads only its shard.
    """
    graphdef, abstract = abstract_model(cfg)
    shardings = state_shardings(abstract, mesh) if mesh is not None else None
    table = leaves(cfg)
    seen = set()

    def make(path: tuple, var: nnx.Variable, sharding: Any) -> nnx.Variable:
        key = _path(path)
        if key not in table:
            raise ConfigError(f"jaxlm parameter '{'.'.join(key)}' has no Hugging Face counterpart")
        seen.add(key)
        leaf, shape, dtype = table[key], tuple(var.shape), var.dtype
        sharding = sharding.get_value() if sharding is not None else SingleDeviceSharding(jax.devices()[0])

        def callback(index: tuple) -> np.ndarray:
            idx = _normalise(index, shape)
            if not leaf.stacked:
                return np.ascontiguousarray(read_shard(leaf, None, shape, idx, read), dtype=dtype)
            per_layer = [read_shard(leaf, i, shape[1:], idx[1:], read) for i in range(idx[0].start, idx[0].stop)]
            return np.ascontiguousarray(np.stack(per_layer), dtype=dtype)

        return var.replace(jax.make_array_from_callback(shape, sharding, callback))

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    if shardings is None:
        state = jax.tree_util.tree_map_with_path(lambda p, v: make(p, v, None), abstract, is_leaf=is_var)
    else:
        state = jax.tree_util.tree_map_with_path(make, abstract, shardings, is_leaf=is_var)
    missing = set(table) - seen
    if missing:
        raise ConfigError(f"jaxlm model has no parameter for {sorted(missing)}")
    return nnx.merge(graphdef, state)


def _host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def to_hf_tensors(model: nnx.Module, cfg: ModelConfig, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, array in Hugging Face layout) for every parameter, one leaf at a time."""
    table = leaves(cfg)
    state = nnx.state(model, nnx.Param)
    flat = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, var in flat:
        key = _path(path)
        leaf, value = table[key], _host(var.get_value())
        value = value if dtype is None else value.astype(dtype)
        for layer, w in enumerate(value) if leaf.stacked else [(None, value)]:
            sizes, k = [], 0
            for g in leaf.groups:
                sizes.append(math.prod(w.shape[k : k + g]))
                k += g
            w = w.reshape(sizes)
            yield leaf.hf_name.format(i=layer), np.ascontiguousarray(w.T if leaf.transpose else w)
