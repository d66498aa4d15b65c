"""Run configuration: typed, frozen dataclasses loaded from YAML plus ``key=value`` overrides.

All validation lives here, so a bad config fails before any array is allocated, with one line
that names the key and says how to fix it::

    cfg = load_config("configs/demo.yaml", ["train.steps=200", "mesh.tensor=2"])

Checks that need the devices (the mesh product) run in :func:`sharding.mesh.make_mesh`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import pathlib
import typing
from typing import Annotated, Any, Iterable, Mapping

import yaml

from sharding.errors import ConfigError

INT_MAX = 2**31 - 1  # sizes and counts index int32 arrays; larger ones cannot be allocated anyway


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric config field, declared on it as ``Annotated[float, Bounds(gt=0)]``.

    Every float must also be finite and every int at most :data:`INT_MAX`; :func:`validate`
    checks them all and names the key, the value and the range in one line.
    """

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def describe(self) -> str:
        if self.gt == 0 and self.ge is None and self.lt is None and self.le is None:
            return "positive"
        if self.lt is None and self.le is None and (self.gt is None) != (self.ge is None):
            return f"> {self.gt:g}" if self.gt is not None else f">= {self.ge:g}"
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else "(-inf"
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else "inf)"
        return f"in {low}, {high}"

    def holds(self, v: float) -> bool:
        return ((self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
                and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le))


PositiveInt = Annotated[int, Bounds(gt=0)]
NonNegativeInt = Annotated[int, Bounds(ge=0)]
PositiveFloat = Annotated[float, Bounds(gt=0)]
NonNegativeFloat = Annotated[float, Bounds(ge=0)]
Beta = Annotated[float, Bounds(ge=0, lt=1)]  # an exponential moving-average decay


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the decoder-only transformer (Llama family)."""

    vocab_size: PositiveInt = 4096
    embed_dim: PositiveInt = 256
    num_layers: PositiveInt = 4
    num_heads: PositiveInt = 8
    num_kv_heads: PositiveInt = 4
    head_dim: PositiveInt = 32
    mlp_dim: PositiveInt = 768
    rope_theta: PositiveFloat = 10000.0
    rope_scaling: str = "none"  # none | llama3 (Llama 3.1 frequency rescaling, below)
    rope_factor: PositiveFloat = 8.0  # llama3: long wavelengths are divided by this
    rope_low_freq_factor: PositiveFloat = 1.0  # llama3: wavelengths above original_max_len / this are scaled
    rope_high_freq_factor: PositiveFloat = 4.0  # llama3: wavelengths below original_max_len / this are kept
    rope_original_max_len: PositiveInt = 8192  # llama3: the pretraining context length
    qkv_bias: bool = False  # learned biases on the q/k/v projections (Qwen2)
    norm_eps: PositiveFloat = 1e-5
    tie_embeddings: bool = True
    init_std: PositiveFloat = 0.02
    param_dtype: str = "float32"  # master weights
    compute_dtype: str = "bfloat16"  # matmul inputs; softmax, norms and loss run in float32
    scan_layers: bool = True  # lax.scan over layers (compile time flat in depth) or a Python loop
    remat: str = "none"  # none | full | save_dots | offload (save_dots kept in host memory)
    attention_impl: str = "auto"  # auto | xla | pallas | cudnn  (see pallas_kernels.dispatch)
    matmul_impl: str = "auto"  # auto | xla | pallas  projections q/k/v/o, gate/up/down (pallas_kernels.dispatch)
    context_impl: str = "all_gather"  # all_gather | ring: attention when mesh.sequence > 1 (sharding.context)
    pipeline_microbatches: PositiveInt = 4  # GPipe microbatches when mesh.stage > 1 (sharding.pipeline)
    # A pretrained source whose architecture and weights the run starts from (jaxlm.init_from): a Hugging
    # Face directory, a .gguf file or a jaxlm run / converted checkpoint directory. Empty: random init.
    init_from: str = ""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; their product must equal the device count. -1 fills the rest."""

    stage: Annotated[int, Bounds(ge=-1)] = 1  # pipeline parallelism: the layers are split into this many stages
    data: Annotated[int, Bounds(ge=-1)] = 1
    fsdp: Annotated[int, Bounds(ge=-1)] = -1
    sequence: Annotated[int, Bounds(ge=-1)] = 1  # context parallelism: the sequence is split this many ways
    tensor: Annotated[int, Bounds(ge=-1)] = 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from. Empty paths mean the corpus and tokenizer shipped in jaxlm."""

    path: str = ""  # a directory written by `jaxlm prepare-data` (memory-mapped); empty: text_path
    text_path: str = ""  # one UTF-8 file tokenized in memory as one document; empty: embedded corpus
    tokenizer_path: str = ""
    seq_len: Annotated[int, Bounds(ge=2)] = 128
    val_fraction: Annotated[float, Bounds(gt=0, lt=1)] = 0.05
    seed: NonNegativeInt = 0
    loss_on: str = "assistant"  # chat data (prepare-data --chat): assistant | all | last_turn tokens are trained


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections an adapter can sit on


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021, arXiv:2106.09685) on the projections; ``rank`` 0 turns them off.

    The update of a projection ``W`` is ``(alpha / rank) * A @ B`` (PEFT's ``scaling = lora_alpha / r``),
    ``A`` kaiming-uniform and ``B`` zero at the start, so step 0 equals the base model.
    """

    rank: NonNegativeInt = 0
    alpha: PositiveFloat = 16.0
    targets: tuple[str, ...] = ("q", "v")  # any of q, k, v, o, gate, up, down
    dropout: Annotated[float, Bounds(ge=0, lt=1)] = 0.0  # on the adapter's input, training only
    base_dtype: str = ""  # the frozen base model's dtype: float32 | bfloat16 (empty: model.param_dtype)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW (or Lion, Adafactor) with linear warmup then cosine decay, global-norm clipping."""

    optimizer: str = "adamw"  # adamw | lion | adafactor
    steps: PositiveInt = 300
    batch_size: PositiveInt = 32  # global, across all devices
    seed: NonNegativeInt = 0
    learning_rate: PositiveFloat = 3e-3
    warmup_steps: NonNegativeInt = 30
    min_lr_ratio: Annotated[float, Bounds(ge=0, le=1)] = 0.1
    weight_decay: NonNegativeFloat = 0.1
    beta1: Beta = 0.9
    beta2: Beta = 0.95
    eps: PositiveFloat = 1e-8
    grad_clip: PositiveFloat = 1.0
    eval_every: PositiveInt = 100
    eval_batches: PositiveInt = 8
    progress: bool = True
    log_every: NonNegativeInt = 0  # print a metrics line every N steps (0: never)
    grad_accum_steps: PositiveInt = 1  # microbatches per step (batch_size is split into this many)
    max_consecutive_skips: PositiveInt = 5  # stop after this many non-finite steps in a row
    loss_scale_init: Annotated[float, Bounds(ge=1)] = 32768.0  # float16 compute only: the first dynamic loss scale
    loss_scale_period: PositiveInt = 200  # float16 compute only: finite steps before the scale doubles
    profile_steps: tuple[int, ...] = ()  # [from, to]: a jax.profiler trace of these steps in <checkpoint.dir>/profile
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)  # low-rank adapters (jaxlm.lora); off by default


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints. An empty ``dir`` disables saving."""

    dir: str = ""
    save_every: PositiveInt = 100
    keep: PositiveInt = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Sampling defaults for ``generate``. temperature 0 means greedy."""

    max_new_tokens: PositiveInt = 128
    temperature: NonNegativeFloat = 0.8
    top_k: NonNegativeInt = 0  # 0 disables
    top_p: Annotated[float, Bounds(gt=0, le=1)] = 1.0  # 1.0 disables
    seed: NonNegativeInt = 0


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


_CHOICES: dict[str, tuple[str, ...]] = {
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "save_dots", "offload"),
    "train.optimizer": ("adamw", "lion", "adafactor"),
    "model.attention_impl": ("auto", "xla", "pallas", "cudnn"),
    "model.matmul_impl": ("auto", "xla", "pallas"),
    "model.context_impl": ("all_gather", "ring"),
    "model.rope_scaling": ("none", "llama3"),
    "data.loss_on": ("assistant", "all", "last_turn"),
}


def _suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(options)}"


def _base_type(typ: Any) -> Any:
    return typing.get_args(typ)[0] if typing.get_origin(typ) is Annotated else typ


def _int_hint(number: float) -> str:
    if not math.isfinite(number) or number != int(number):
        return ""
    return f" (write {int(number)})" if abs(number) <= INT_MAX else f" (at most {INT_MAX})"


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check one leaf value against its dataclass field type; ints widen to float, and a float
    written as text (``1e-3``, which YAML 1.1 reads as a string) is read as one."""
    typ = _base_type(typ)
    if typing.get_origin(typ) is tuple:
        if typing.get_args(typ)[0] is str:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"config key '{key}' must be a list of names such as [q, v], got {value!r}")
            return tuple(value)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"config key '{key}' must be a list of whole numbers such as [10, 20], got {value!r}")
        return tuple(value)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if typ is int and not isinstance(value, bool) and isinstance(value, (float, str)):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None:
            raise ConfigError(f"config key '{key}' must be a whole number, got {value!r}{_int_hint(number)}")
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise ConfigError(
            f"config key '{key}' must be {typ.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}'{_suggest(str(name), sorted(fields))}")
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, typ)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[leaf] = value


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["train.steps=10", "model.tie_embeddings=false"]`` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': the value {raw!r} does not parse (YAML); "
                              "quote a string, e.g. key='text'") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _check_bounds(cfg: Config) -> None:
    """Every numeric field against its declared :class:`Bounds`: finite floats, ints up to INT_MAX."""
    sections = [(s.name, getattr(cfg, s.name)) for s in dataclasses.fields(cfg)]
    sections.append(("train.lora", cfg.train.lora))  # the one nested section
    for name, values in sections:
        check_section(name, values)


def check_section(name: str, values: Any) -> None:
    """One config section's numeric fields against their :class:`Bounds` (ConfigError naming the
    key ``name.field``): for sections built in code, as ``DecodeConfig(...)`` handed to ``generate``."""
    hints = typing.get_type_hints(type(values), include_extras=True)
    for f in dataclasses.fields(values):
        typ, value, key = hints[f.name], getattr(values, f.name), f"{name}.{f.name}"
        base = _base_type(typ)
        if base not in (int, float):
            continue
        bounds = next((b for b in typing.get_args(typ)[1:] if isinstance(b, Bounds)), Bounds())
        allowed = bounds.describe() if bounds != Bounds() else "a number"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a number ({allowed}), got {value!r}")
        if base is float and not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number ({allowed}), got {value}")
        if base is int and abs(value) > INT_MAX:
            raise ConfigError(f"config key '{key}' is {value}, too large to allocate; it must be at most {INT_MAX}")
        if not bounds.holds(value):
            raise ConfigError(f"config key '{key}' must be {allowed}, got {value}")


def validate(cfg: Config) -> Config:
    """Cross-field checks that need no devices. Returns ``cfg`` or raises ConfigError."""
    flat = {
        f"{section}.{k}": v
        for section, values in cfg.to_dict().items()
        for k, v in values.items()
    }
    for key, options in _CHOICES.items():
        if flat[key] not in options:
            raise ConfigError(f"config key '{key}' is {flat[key]!r}; choose one of {', '.join(options)}")
    _check_bounds(cfg)
    profile = cfg.train.profile_steps
    if profile and not (len(profile) == 2 and 1 <= profile[0] <= profile[1] <= INT_MAX):
        raise ConfigError(f"config key 'train.profile_steps' must be [from, to] with 1 <= from <= to, got {list(profile)}")
    if profile and not cfg.checkpoint.dir:
        raise ConfigError("train.profile_steps writes its trace into <checkpoint.dir>/profile; set checkpoint.dir")
    m = cfg.model
    if m.rope_scaling == "llama3" and not (
        m.rope_factor > 0 and 0 < m.rope_low_freq_factor < m.rope_high_freq_factor and m.rope_original_max_len > 0
    ):
        raise ConfigError(
            "model.rope_scaling=llama3 needs rope_factor > 0, 0 < rope_low_freq_factor < rope_high_freq_factor "
            f"and rope_original_max_len > 0, got {m.rope_factor}, {m.rope_low_freq_factor}, "
            f"{m.rope_high_freq_factor}, {m.rope_original_max_len}"
        )
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}; "
            "grouped-query attention needs whole groups"
        )
    if m.head_dim % 2:
        raise ConfigError(f"config key 'model.head_dim' must be even for RoPE, got {m.head_dim}")
    axes = [f.name for f in dataclasses.fields(MeshConfig)]
    for axis in axes:
        size = getattr(cfg.mesh, axis)
        if size == 0 or size < -1:
            raise ConfigError(f"config key 'mesh.{axis}' must be positive or -1 (fill), got {size}")
    if sum(getattr(cfg.mesh, a) == -1 for a in axes) > 1:
        raise ConfigError(f"only one of mesh.{', mesh.'.join(axes)} may be -1")
    if cfg.mesh.stage > 1 and m.num_layers % cfg.mesh.stage:
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by mesh.stage={cfg.mesh.stage}; "
            "every pipeline stage holds the same number of layers"
        )
    sequence = cfg.mesh.sequence
    if sequence > 1 and cfg.data.seq_len % (2 * sequence):
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} must be a multiple of 2 * mesh.sequence={2 * sequence} "
            "(each sequence shard holds two balanced chunks)"
        )
    tensor = cfg.mesh.tensor
    if tensor > 0:
        for name in ("num_heads", "num_kv_heads"):
            if getattr(m, name) % tensor:
                raise ConfigError(
                    f"model.{name}={getattr(m, name)} is not divisible by mesh.tensor={tensor}; "
                    f"pick a tensor size that divides it"
                )
    t = cfg.train
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps={t.grad_accum_steps}; "
            "each microbatch must have the same size"
        )
    if t.warmup_steps > t.steps:
        raise ConfigError(f"config key 'train.warmup_steps' must be in [0, train.steps={t.steps}], got {t.warmup_steps}; "
                          f"set train.warmup_steps={t.steps} or less, or train more steps")
    if cfg.data.path and cfg.data.text_path:
        raise ConfigError("set data.path (prepared tokens) or data.text_path (one text file), not both")
    # with model.init_from the projection sizes are the source's, known once it is read (jaxlm.train checks again)
    check_lora(cfg.train.lora, None if cfg.model.init_from else cfg.model)
    return cfg


def lora_projections(m: ModelConfig) -> dict[str, tuple[int, int]]:
    """(input features, output features) of each projection an adapter can sit on (:data:`LORA_TARGETS`)."""
    E, H, K, D, F = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
    return {"q": (E, H * D), "k": (E, K * D), "v": (E, K * D), "o": (H * D, E), "gate": (E, F), "up": (E, F),
            "down": (F, E)}


def check_lora(lora: LoRAConfig, model: ModelConfig | None) -> None:
    """ConfigError for LoRA settings that cannot be built on ``model`` (None: not known yet, so the
    rank is not checked against its projections; run again once ``model.init_from`` is resolved)."""
    unknown = [t for t in lora.targets if t not in LORA_TARGETS]
    if unknown:
        raise ConfigError(f"config key 'train.lora.targets' has {unknown[0]!r}; choose from {', '.join(LORA_TARGETS)}")
    if lora.rank and not lora.targets:
        raise ConfigError("train.lora.rank > 0 needs at least one of train.lora.targets (q, k, v, o, gate, up, down)")
    if len(set(lora.targets)) != len(lora.targets):
        raise ConfigError(f"config key 'train.lora.targets' names a projection twice: {list(lora.targets)}")
    if lora.base_dtype not in ("", "float32", "bfloat16"):
        raise ConfigError(f"config key 'train.lora.base_dtype' is {lora.base_dtype!r}; choose one of float32, bfloat16 "
                          "(or leave it empty for model.param_dtype)")
    if lora.rank and model is not None:
        shapes = lora_projections(model)
        side, target = min((min(shapes[t]), t) for t in lora.targets)
        if lora.rank > side:
            n_in, n_out = shapes[target]
            raise ConfigError(
                f"train.lora.rank={lora.rank} is larger than the '{target}' projection allows ({n_in} inputs, {n_out} "
                f"outputs): an adapter's rank cannot exceed min(in, out); set train.lora.rank={side} or less"
            )


def config_from_dict(data: Mapping[str, Any]) -> Config:
    return validate(_build(Config, data, ""))


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, refusing a key written twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"has key '{key}' twice (lines {seen[key]} and {key_node.start_mark.line + 1})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _read_yaml(p: pathlib.Path) -> dict[str, Any]:
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise ConfigError(f"config file '{p}' {what}; see configs/ for examples")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{p}' is not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02x}); "
                          "save it as UTF-8 YAML") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as e:
        raise ConfigError(f"config file '{p}' {e}; keep one (YAML would silently keep the last)") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"config file '{p}' is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of sections")
    return data


def load_config(path: str | pathlib.Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides in order.

    An override is ``section.key=value`` or another YAML file (a layout preset such as
    ``configs/layouts/fsdp_tp.yaml``) whose sections are merged over what came before.
    """
    data: dict[str, Any] = {} if path is None else _read_yaml(pathlib.Path(path))
    for item in overrides:
        if item.endswith((".yaml", ".yml")) and "=" not in item:
            data = _merge(data, _read_yaml(pathlib.Path(item)))
        else:
            data = _merge(data, parse_overrides([item]))
    cfg = _build(Config, data, "")
    model_keys = data.get("model") if isinstance(data.get("model"), Mapping) else {}
    if "init_from" in model_keys and not cfg.model.init_from:  # e.g. model.init_from=$UNSET_VARIABLE
        raise ConfigError("model.init_from is empty; give the path of a pretrained model, or leave the key out "
                          "to train from random weights")
    if cfg.model.init_from and model_keys:  # before validate: the source's values explain a mismatch best
        from jaxlm.pretrained import check_given_architecture

        check_given_architecture(cfg, model_keys)
    return validate(cfg)
