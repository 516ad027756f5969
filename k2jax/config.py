"""Typed, frozen, validated configs, and their dict / JSON form.

Field names follow Hugging Face's ``DeepseekV3Config`` wherever one exists, so a published
``config.json`` maps onto :class:`ModelConfig` key for key (``k2jax.hf.config_from_hf``).
Every config validates itself on construction, and every error names the offending field,
so a bad sweep fails before any compute. Named model shapes live in ``k2jax/presets.py``,
dotted ``key=value`` overrides in ``k2jax/overrides.py``. This module is the root of the
import graph: it imports nothing from the project.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A config field has a bad name or value; the message names the field."""


@dataclasses.dataclass(frozen=True)
class YarnConfig:
    """YaRN context extension (Peng et al. 2023, arXiv 2309.00071), as DeepSeek-V3 uses it.

    ``factor`` is the context-extension ratio s; ``beta_fast`` / ``beta_slow`` bound the
    interpolation ramp in rotations-per-original-context; ``mscale`` / ``mscale_all_dim`` set
    the attention temperature 0.1·m·ln(s) + 1. As in transformers, 0 means "not given": with
    ``mscale_all_dim`` unset the softmax scale is plain and cos/sin carry it (model/rope.py).
    """

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0

    def __post_init__(self):
        _check_fields(self, "rope_scaling.", non_negative=("mscale", "mscale_all_dim"),
                      positive=("original_max_position_embeddings", "beta_fast", "beta_slow"))
        _check(self.factor >= 1.0, "rope_scaling.factor", self.factor, "must be >= 1")


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
    scan_layers: bool = True  # execution (same function): lax.scan over each layer stack
    remat: Literal["none", "full", "save_dots"] = "none"  # per layer, in the backward pass
    attention_impl: Literal["reference", "chunked"] = "chunked"  # memory O(T), not O(T^2)
    attention_block_q: int = 512  # query rows per block of chunked attention
    attention_block_kv: int = 512  # key/value rows per block of chunked attention
    # numerics
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute
    param_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self):
        _check_fields(self, "", positive=(
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
            "n_group", "topk_group", "max_position_embeddings", "q_lora_rank", "head_dim",
            "num_key_value_heads", "rms_norm_eps", "initializer_range", "rope_theta",
            "attention_block_q", "attention_block_kv"), non_negative=(
            "n_shared_experts", "moe_block_size"))
        _check(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
               "first_k_dense_replace", self.first_k_dense_replace,
               f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        _check(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
               self.num_experts_per_tok, f"must be <= n_routed_experts={self.n_routed_experts}")
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
        _check_fields(self, "data.", positive=("bpe_vocab_size", "seq_len", "global_batch_size",
                                               "num_threads"), non_negative=("prefetch",))
        _check(self.bpe_vocab_size >= 258, "data.bpe_vocab_size", self.bpe_vocab_size,
               "must be >= 258 (256 bytes + specials)")
        _check(0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction,
               "must be in (0, 1)")
        _check(self.source == "stdlib" or bool(self.paths), "data.paths", self.paths,
               f"source={self.source!r} needs paths")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """optim.build arguments (optim/factory.py) and the lr schedule; the README's optimizer
    table gives each key's meaning and source. ``name`` picks the update rule, ``qk_clip``
    whether QK-Clip follows it (MuonClip: ``name=muon qk_clip=true``), so a 2x2 sweep is a
    grid over both. ``nesterov`` follows Moonlight's code (Kimi K2's Algorithm 1 as written
    has none). The model has no bias parameters (the router's selection bias is not one).
    """

    name: Literal["adamw", "muon"] = "muon"
    lr: float = 3e-3
    weight_decay: float = 0.1
    decay_norms: bool = True  # weight decay on RMSNorm scales
    decay_embeddings: bool = True  # weight decay on the embedding and LM head
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.95
    nesterov: bool = True
    mu_dtype: Literal["float32", "bfloat16"] = "float32"  # Muon momentum, Adam first moment
    ns_steps: int = 5
    ns_coeffs: Literal["jordan", "polar_express"] = "jordan"
    ns_dtype: Literal["float32", "bfloat16"] = "float32"
    update_scale: Literal["k2", "jordan", "spectral"] = "k2"  # rules: optim/muon.py
    rms_scale: float = 0.2  # update_scale=k2: the Muon update's RMS
    muon_router: bool = False  # Muon instead of AdamW for the MoE router,
    muon_embeddings: bool = False  # the embedding,
    muon_lm_head: bool = False  # the LM head (Kimi K2 / Moonlight: AdamW for all three)
    adam_lr_ratio: float = 1.0  # name=muon: the AdamW group's peak lr = this x lr
    adam_weight_decay: float | None = None  # None = weight_decay
    qk_clip: bool = False  # rescale q/k weights of heads whose max logit passed tau
    tau: float = 100.0
    qk_clip_alpha: float = 0.5  # query side x gamma^alpha, key side x gamma^(1-alpha)
    monitor_only: bool = False  # QK-Clip records statistics but never rescales
    schedule: Literal["constant", "cosine", "wsd"] = "cosine"
    warmup_steps: int = 100
    final_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    grad_clip_norm: float | None = None  # global-norm clipping before the optimizer

    def __post_init__(self):
        _check_fields(self, "optimizer.", positive=(
            "lr", "ns_steps", "tau", "grad_clip_norm", "rms_scale", "adam_lr_ratio"),
            non_negative=("weight_decay", "adam_weight_decay", "warmup_steps"),
            below_one=("momentum", "b1", "b2"), unit=("final_lr_ratio", "qk_clip_alpha"))


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
        _check_fields(self, "mesh.", non_negative=("num_processes", "process_id"))
        sizes = (self.data, self.fsdp, self.expert, self.tensor)
        _check(all(v == -1 or v > 0 for v in sizes), "mesh", sizes, "sizes must be > 0 or -1")
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
        _check_fields(self, "train.", positive=(
            "steps", "micro_batches", "log_every", "eval_every", "histogram_every",
            "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps", "peak_flops"),
            non_negative=("eval_batches", "z_loss"))


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


# validation, dicts and JSON files ---------------------------------------------


def _check(ok: bool, field: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{field}={value!r}: {why}")


def suggest(name: str, choices: typing.Iterable[str], prefix: str = "") -> str:
    """"; did you mean 'PREFIX+closest'?" for an unknown ``name``, or "" if none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


# Spellings that once worked, and what to write now.
RENAMED = {
    ("optimizer.name", "muonclip"): "optimizer.name=muon optimizer.qk_clip=true",
    # configs written before the split: null meant "on for muonclip only", so off here
    ("optimizer.qk_clip", None): "optimizer.qk_clip=false",
}
# Keys that are gone: (the old value, still read as today's default; what to use instead).
RETIRED = {"optimizer.adam_lr": (None, "optimizer.adam_lr_ratio (= AdamW-group lr / optimizer.lr)")}
to_dict = dataclasses.asdict
field_types = functools.cache(typing.get_type_hints)  # {field name: type} of a config class


def _check_fields(cfg, prefix: str, positive=(), non_negative=(), below_one=(), unit=()) -> None:
    """The checks every config shares: a Literal holds one of its choices (an old spelling
    names the new one), a bool is a bool, named fields lie in range (None passes if allowed)."""
    for name, tp in field_types(type(cfg)).items():
        key, value = prefix + name, getattr(cfg, name)
        inner, optional = unwrap_optional(tp)
        if optional and value is None:
            continue
        if isinstance(value, str | None) and (key, value) in RENAMED:
            raise ConfigError(f"{key}={value!r}: now spelled {RENAMED[key, value]}")
        if typing.get_origin(inner) is Literal:
            choices = typing.get_args(inner)
            _check(value in choices, key, value, f"must be one of {', '.join(map(repr, choices))}")
        elif inner is bool:
            _check(isinstance(value, bool), key, value, "must be true or false")
        elif inner in (int, float):  # a JSON file can hold anything, Infinity included
            kinds = int if inner is int else int | float
            _check(isinstance(value, kinds) and not isinstance(value, bool), key, value,
                   f"must be {'an integer' if inner is int else 'a number'}")
            _check(isinstance(value, int) or math.isfinite(value), key, value, "must be finite")
        elif inner is str:
            _check(isinstance(value, str), key, value, "must be a string")
        elif typing.get_origin(inner) is tuple:
            _check(isinstance(value, tuple) and all(isinstance(v, str) for v in value), key,
                   value, "must be a list of strings")
    for names, ok, why in ((positive, lambda v: v > 0, "must be positive"),
                           (non_negative, lambda v: v >= 0, "must be >= 0"),
                           (below_one, lambda v: 0 <= v < 1, "must be in [0, 1)"),
                           (unit, lambda v: 0 <= v <= 1, "must be in [0, 1]")):
        for name, value in ((n, getattr(cfg, n)) for n in names):
            _check(value is None or ok(value), prefix + name, value, why)


def unwrap_optional(tp):
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    if union and len(args := [a for a in typing.get_args(tp) if a is not type(None)]) == 1:
        return args[0], True
    return tp, False


def unknown_key(cls, key: str, prefix: str) -> ConfigError:
    if prefix + key in RETIRED:
        return ConfigError(f"config key '{prefix}{key}' is gone: use {RETIRED[prefix + key][1]}")
    hint = suggest(key, (f.name for f in dataclasses.fields(cls)), prefix)
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def from_dict(cls, values: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a (nested) dict; unknown keys are errors."""
    types_ = field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            if prefix + key in RETIRED and value == RETIRED[prefix + key][0]:
                continue  # an old config.json's default: what today's default means
            raise unknown_key(cls, key, prefix)
        inner, optional = unwrap_optional(types_[key])
        if dataclasses.is_dataclass(inner) and isinstance(value, dict):
            value = from_dict(inner, value, prefix=f"{prefix}{key}.")
        elif dataclasses.is_dataclass(inner):  # a JSON file can hold anything
            _check(isinstance(value, inner) or optional and value is None, prefix + key, value,
                   f"expected an object of {inner.__name__} fields")
        elif typing.get_origin(inner) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def from_file(path: str | os.PathLike) -> Config:
    """A run config from a JSON file (every run writes its resolved ``config.json``)."""
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return from_dict(Config, values)
