"""Typed, frozen, validated configs; presets; dotted overrides; Hugging Face import.

Field names follow Hugging Face's ``DeepseekV3Config`` wherever one exists, so a
published ``config.json`` maps onto :class:`ModelConfig` key for key
(:func:`from_hf`). Every config validates itself on construction, and every
error names the offending field, so a bad sweep fails before any compute.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A config field has a bad name or value; the message names the field."""


# ---------------------------------------------------------------------------
# dataclasses


@dataclasses.dataclass(frozen=True)
class YarnConfig:
    """YaRN context extension (Peng et al. 2023, arXiv 2309.00071), as DeepSeek-V3 uses it.

    ``factor`` is the context-extension ratio s; ``beta_fast`` / ``beta_slow``
    bound the interpolation ramp in rotations-per-original-context; ``mscale``
    and ``mscale_all_dim`` set the attention temperature 0.1·m·ln(s) + 1. As in
    transformers, 0 means "not given": with ``mscale_all_dim`` unset the softmax
    scale is plain and cos/sin carry the temperature instead (see model/rope.py).
    """

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0

    def __post_init__(self):
        _check(self.factor >= 1.0, "rope_scaling.factor", self.factor, "must be >= 1")
        _check(self.original_max_position_embeddings > 0,
               "rope_scaling.original_max_position_embeddings",
               self.original_max_position_embeddings, "must be positive")
        _check(self.beta_fast > 0 and self.beta_slow > 0, "rope_scaling.beta_fast",
               self.beta_fast, "beta_fast and beta_slow must be positive")
        _check(self.mscale >= 0 and self.mscale_all_dim >= 0, "rope_scaling.mscale",
               self.mscale, "mscale and mscale_all_dim must be >= 0 (0 = not given)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A DeepSeek-V3 / Kimi-K2 style MoE transformer.

    Shapes: D = hidden_size, H = num_attention_heads, E = n_routed_experts,
    F = moe_intermediate_size. Layers ``< first_k_dense_replace`` use a dense
    SwiGLU of width ``intermediate_size``; the rest are MoE layers.
    """

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 384
    moe_intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # attention
    attention: Literal["mla", "mha"] = "mla"
    num_key_value_heads: int | None = None  # mha only: GQA when < heads
    head_dim: int | None = None  # mha only: default hidden_size // heads
    q_lora_rank: int | None = 64  # None: no query compression (q_proj)
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    qk_norm: bool = False  # per-head RMSNorm on q and k (ablation vs QK-Clip)
    rope_theta: float = 50000.0
    rope_scaling: YarnConfig | None = None
    max_position_embeddings: int = 4096
    # mixture of experts
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 2.827
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    router_bias_update_rate: float = 1e-3  # DeepSeek-V3's gamma, aux-loss-free balancing
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (DeepSeek-V3 eq. 17)
    moe_impl: Literal["auto", "blocked", "ragged", "dense"] = "auto"
    moe_block_size: int = 0  # rows per expert block in "blocked"; 0 = auto
    # numerics
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute
    param_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self):
        pos = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
               "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
               "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
               "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings")
        for name in pos:
            _check(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        for name in ("q_lora_rank", "num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            _check(v is None or v > 0, name, v, "must be positive or None")
        _check(self.n_shared_experts >= 0, "n_shared_experts", self.n_shared_experts,
               "must be >= 0")
        _check(self.attention in ("mla", "mha"), "attention", self.attention,
               "must be 'mla' or 'mha'")
        _check(self.moe_impl in ("auto", "blocked", "ragged", "dense"), "moe_impl",
               self.moe_impl, "must be 'auto', 'blocked', 'ragged' or 'dense'")
        _check(self.moe_block_size >= 0, "moe_block_size", self.moe_block_size, "must be >= 0")
        for name in ("dtype", "param_dtype"):
            _check(getattr(self, name) in ("float32", "bfloat16"), name, getattr(self, name),
                   "must be 'float32' or 'bfloat16'")
        _check(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
               "first_k_dense_replace", self.first_k_dense_replace,
               f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        _check(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
               self.num_experts_per_tok,
               f"must be <= n_routed_experts={self.n_routed_experts}")
        _check(self.n_routed_experts % self.n_group == 0, "n_group", self.n_group,
               f"must divide n_routed_experts={self.n_routed_experts}")
        _check(self.topk_group <= self.n_group, "topk_group", self.topk_group,
               f"must be <= n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        _check(self.topk_group * per_group >= self.num_experts_per_tok, "topk_group",
               self.topk_group, f"topk_group * experts per group ({per_group}) must be >= "
               f"num_experts_per_tok={self.num_experts_per_tok}")
        _check(self.n_group == 1 or per_group >= 2, "n_group", self.n_group,
               "group scores sum each group's top-2 experts: need >= 2 experts per group")
        _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", self.qk_rope_head_dim,
               "must be even (RoPE rotates pairs)")
        _check(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "must be positive")
        _check(self.initializer_range > 0, "initializer_range", self.initializer_range,
               "must be positive")
        _check(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be positive")
        if self.attention == "mha":
            _check(self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0,
                   "num_attention_heads", self.num_attention_heads,
                   f"must divide hidden_size={self.hidden_size} (or set head_dim)")
            _check(self.mha_head_dim % 2 == 0, "head_dim", self.mha_head_dim,
                   "must be even (RoPE rotates pairs)")
            _check(self.num_attention_heads % self.kv_heads == 0, "num_key_value_heads",
                   self.num_key_value_heads,
                   f"must divide num_attention_heads={self.num_attention_heads}")

    # derived shapes, named once so model, counting and optimizer agree
    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def mha_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        """Width of one query/key head: what the softmax scale 1/sqrt(d) uses."""
        if self.attention == "mha":
            return self.mha_head_dim
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from and how they are cut into batches (k2jax/data)."""

    source: Literal["stdlib", "text", "shards"] = "stdlib"
    paths: tuple[str, ...] = ()  # text: files/globs; shards: train .bin globs
    val_paths: tuple[str, ...] = ()  # shards: validation .bin globs
    tokenizer: Literal["byte", "bpe"] = "byte"
    bpe_vocab_size: int = 4096
    seq_len: int = 128
    global_batch_size: int = 32
    seed: int = 0
    val_fraction: float = 0.02  # stdlib / text: share of files held out, chosen by name
    cache_dir: str = "~/.cache/k2jax"
    num_threads: int = 2  # grain prefetch threads
    prefetch: int = 8  # batches read ahead

    def __post_init__(self):
        for name in ("bpe_vocab_size", "seq_len", "global_batch_size", "num_threads"):
            _check(getattr(self, name) > 0, f"data.{name}", getattr(self, name),
                   "must be positive")
        _check(self.bpe_vocab_size >= 258, "data.bpe_vocab_size", self.bpe_vocab_size,
               "must be >= 258 (256 bytes + specials)")
        _check(self.prefetch >= 0, "data.prefetch", self.prefetch, "must be >= 0")
        _check(0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction,
               "must be in (0, 1)")
        _check(self.source in ("stdlib", "text", "shards"), "data.source", self.source,
               "must be 'stdlib', 'text' or 'shards'")
        _check(self.tokenizer in ("byte", "bpe"), "data.tokenizer", self.tokenizer,
               "must be 'byte' or 'bpe'")
        _check(self.source == "stdlib" or bool(self.paths), "data.paths", self.paths,
               f"source={self.source!r} needs paths")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """optim.build arguments (optim/factory.py) plus the learning-rate schedule."""

    name: Literal["adamw", "muon", "muonclip"] = "muonclip"
    lr: float = 3e-3
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coeffs: Literal["jordan", "polar_express"] = "jordan"
    ns_dtype: Literal["float32", "bfloat16"] = "float32"
    rms_scale: float = 0.2
    adam_lr: float | None = None  # AdamW group under Muon; None = lr
    adam_weight_decay: float | None = None  # None = weight_decay
    qk_clip: bool | None = None  # None: on for muonclip only; true adds it to any optimizer
    tau: float = 100.0
    monitor_only: bool = False  # QK-Clip records statistics but never rescales
    schedule: Literal["constant", "cosine", "wsd"] = "cosine"
    warmup_steps: int = 100
    final_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    grad_clip_norm: float | None = None  # global-norm clipping before the optimizer

    def __post_init__(self):
        _check(self.lr > 0, "optimizer.lr", self.lr, "must be positive")
        _check(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "must be >= 0")
        _check(0 <= self.momentum < 1, "optimizer.momentum", self.momentum, "must be in [0, 1)")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optimizer.b1", self.b1,
               "b1 and b2 must be in [0, 1)")
        _check(self.ns_steps > 0, "optimizer.ns_steps", self.ns_steps, "must be positive")
        _check(self.tau > 0, "optimizer.tau", self.tau, "must be positive")
        _check(self.warmup_steps >= 0, "optimizer.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(0 <= self.final_lr_ratio <= 1, "optimizer.final_lr_ratio", self.final_lr_ratio,
               "must be in [0, 1]")
        _check(self.grad_clip_norm is None or self.grad_clip_norm > 0, "optimizer.grad_clip_norm",
               self.grad_clip_norm, "must be positive or None")

    @property
    def clip_enabled(self) -> bool:
        return self.name == "muonclip" if self.qk_clip is None else self.qk_clip


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (-1 = the remaining devices) and multi-host start-up."""

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1
    distributed: bool = False  # call jax.distributed.initialize (arguments below, or auto)
    coordinator_address: str | None = None  # e.g. 127.0.0.1:1234; None = auto (TPU pods)
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.expert, self.tensor)
        _check(all(v == -1 or v > 0 for v in sizes), "mesh.data", sizes,
               "mesh sizes must be positive or -1")
        _check(sizes.count(-1) <= 1, "mesh.fsdp", sizes, "at most one mesh axis may be -1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    micro_batches: int = 1  # gradient accumulation: global batch split into this many
    z_loss: float = 0.0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    histogram_every: int = 100  # per-head max-logit histogram / image
    checkpoint_every: int = 500
    final_checkpoint: bool = True  # also save at the last step (sweeps may not need it)
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 5  # consecutive skipped steps before the run stops
    peak_flops: float | None = None  # per device, for MFU; None = measured once and cached
    init_from: str = ""  # a Hugging Face checkpoint directory (k2jax.hf) to start from

    def __post_init__(self):
        for name in ("steps", "micro_batches", "log_every", "eval_every", "histogram_every",
                     "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps"):
            _check(getattr(self, name) > 0, f"train.{name}", getattr(self, name),
                   "must be positive")
        _check(self.eval_batches >= 0, "train.eval_batches", self.eval_batches, "must be >= 0")
        _check(self.z_loss >= 0, "train.z_loss", self.z_loss, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything one run needs; ``config.json`` in a run directory is this, resolved."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self):
        _check(self.data.global_batch_size % self.train.micro_batches == 0,
               "train.micro_batches", self.train.micro_batches,
               f"must divide data.global_batch_size={self.data.global_batch_size}")


def load(preset_or_file: str, overrides: typing.Iterable[str] = ()) -> Config:
    """A run config from a model preset name, a JSON file, or a Hugging Face checkpoint
    directory (its architecture, and ``train.init_from`` = its weights), then dotted
    overrides (``model.hidden_size=256``, ``optimizer.lr=1e-2``, ``data.seq_len=256``)."""
    if preset_or_file in PRESETS:
        cfg = Config(model=preset(preset_or_file))
    elif os.path.isdir(preset_or_file):
        cfg = Config(model=from_hf(preset_or_file),
                     train=TrainConfig(init_from=os.path.abspath(preset_or_file)))
    elif os.path.isfile(preset_or_file):
        try:
            with open(preset_or_file) as f:
                values = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{preset_or_file}: not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{preset_or_file}: expected a JSON object")
        cfg = from_dict(Config, values)
    else:
        close = difflib.get_close_matches(preset_or_file, PRESETS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"--config {preset_or_file!r} is neither a preset "
                          f"({', '.join(PRESETS)}), a file nor a checkpoint directory{hint}")
    return override(cfg, overrides)


# ---------------------------------------------------------------------------
# validation and overrides


def _check(ok: bool, field: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{field}={value!r}: {why}")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse(tp, text: str, key: str):
    """Parse the text of an override value as field type ``tp``."""
    inner, optional = _unwrap_optional(tp)
    if optional and text.strip().lower() in ("none", "null"):
        return None
    if typing.get_origin(inner) is Literal:
        if text not in typing.get_args(inner):
            raise ConfigError(f"{key}={text!r}: must be one of "
                              f"{', '.join(map(repr, typing.get_args(inner)))}")
        return text
    try:
        if inner is bool:
            low = text.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if inner is int:
            return int(text)
        if inner is float:
            return float(text)
        if inner is str:
            return text
        if typing.get_origin(inner) is tuple:
            return tuple(v.strip() for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{key}={text!r}: expected {getattr(inner, '__name__', inner)}") from None
    if dataclasses.is_dataclass(inner):
        return from_dict(inner, json.loads(text), prefix=key + ".")
    raise ConfigError(f"{key}: cannot parse {text!r} as {inner}")


def _unknown(cls, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def from_dict(cls, values: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a (nested) dict; unknown keys are errors."""
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise _unknown(cls, key, prefix)
        inner, _ = _unwrap_optional(types_[key])
        if dataclasses.is_dataclass(inner) and isinstance(value, dict):
            value = from_dict(inner, value, prefix=f"{prefix}{key}.")
        elif typing.get_origin(inner) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def override(cfg, overrides: typing.Iterable[str]):
    """Apply dotted ``key=value`` overrides, e.g. ``rope_scaling.factor=8``.

    All overrides are applied together and validated once, so ``data.source=text
    data.paths=a.txt`` works in either order. A nested dataclass that is None is
    created with its defaults before its field is set. Unknown keys suggest the
    closest valid key.
    """
    overrides = list(overrides)
    if not overrides:
        return cfg
    values = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        _set(type(cfg), values, key.strip().split("."), text, prefix="")
    return from_dict(type(cfg), values)


def _set(cls, values: dict, path: list[str], text: str, prefix: str) -> None:
    head, rest = path[0], path[1:]
    types_ = _field_types(cls)
    if head not in types_:
        raise _unknown(cls, head, prefix)
    if not rest:
        values[head] = _parse(types_[head], text, prefix + head)
        return
    inner, _ = _unwrap_optional(types_[head])
    if not dataclasses.is_dataclass(inner):
        raise ConfigError(f"{prefix}{head} has no sub-keys (got '{'.'.join(path)}')")
    if values.get(head) is None:
        values[head] = to_dict(inner())
    elif dataclasses.is_dataclass(values[head]):
        values[head] = to_dict(values[head])
    _set(inner, values[head], rest, text, prefix=f"{prefix}{head}.")


# ---------------------------------------------------------------------------
# presets

# Published shapes. Kimi K2: tech report (arXiv 2507.20534) Table 2 and the
# released config.json; DeepSeek-V3: arXiv 2412.19437 §4.2 and its config.json.
_KIMI_K2 = dict(
    vocab_size=163840, hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=64,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8,
    first_k_dense_replace=1, routed_scaling_factor=2.827, n_group=1, topk_group=1,
    norm_topk_prob=True, rope_theta=50000.0, max_position_embeddings=131072,
    rope_scaling=YarnConfig(factor=32.0, original_max_position_embeddings=4096,
                            beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    rms_norm_eps=1e-6, initializer_range=0.02, aux_loss_alpha=0.001, dtype="bfloat16",
)
_DEEPSEEK_V3 = dict(
    _KIMI_K2, vocab_size=129280, num_attention_heads=128, n_routed_experts=256,
    first_k_dense_replace=3, routed_scaling_factor=2.5, n_group=8, topk_group=4,
    rope_theta=10000.0, max_position_embeddings=163840, aux_loss_alpha=0.0,
    rope_scaling=YarnConfig(factor=40.0, original_max_position_embeddings=4096,
                            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
)


def _ladder(d: int, layers: int) -> dict:
    """A scaling-ladder rung with K2's ratios: head dims 32/16/32, heads = d/32,
    ffn ~2.5d dense and d experts' width, 32 experts top-4 + 1 shared."""
    heads = max(2, d // 32)
    return dict(
        hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=3 * d, moe_intermediate_size=d, q_lora_rank=d // 2,
        kv_lora_rank=max(32, d // 4), qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=32, num_experts_per_tok=4,
    )


PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32,
                 kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                 v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2),
    "small": dict(),  # the ModelConfig defaults: ~3M total, <1M active
    "ladder-d64": _ladder(64, 2),
    "ladder-d128": _ladder(128, 4),
    "ladder-d192": _ladder(192, 6),
    "ladder-d256": _ladder(256, 8),
    "ladder-d384": _ladder(384, 10),
    "kimi-k2": _KIMI_K2,
    "deepseek-v3": _DEEPSEEK_V3,
}


def preset(name: str, *overrides: str) -> ModelConfig:
    """The named preset, with optional ``key=value`` overrides applied."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown preset {name!r} (have {', '.join(PRESETS)}){hint}")
    return override(ModelConfig(**PRESETS[name]), overrides)


# ---------------------------------------------------------------------------
# Hugging Face config.json


def from_hf(config: dict | str | os.PathLike, **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a Hugging Face DeepseekV3 / Kimi-K2 ``config.json``
    (the dict, the file or its directory): :func:`k2jax.hf.config_from_hf`."""
    from k2jax import hf

    return hf.config_from_hf(config, **overrides)
