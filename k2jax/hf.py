"""Hugging Face DeepseekV3 / Kimi-K2 checkpoints in and out.

    cfg, model = hf.load("path/to/Kimi-K2-Base")      # config.json + *.safetensors
    hf.save(model, cfg, "path/to/out")                # loadable by transformers

Tensor names and layouts are transformers' ``DeepseekV3ForCausalLM`` checkpoint
format (also Kimi K2's and DeepSeek-V3's published weights): torch ``Linear``
weights are [out, in] and become k2jax's [in..., out...] by a transpose and a
reshape (q_b_proj → q_b [q_lora, H, nope+rope], o_proj → o [H, v, D], ...);
experts ``mlp.experts.{j}.{gate,up,down}_proj`` are stacked into [E, ...];
``mlp.gate.e_score_correction_bias`` is the routing selection bias. RoPE needs
no permutation: k2jax rotates interleaved pairs, as those checkpoints'
``rope_interleave: true`` does. Published DeepSeek-V3 / Kimi-K2 weights are fp8
(e4m3) with a ``weight_scale_inv`` per 128×128 block (``quantization_config``);
they are dequantised on load (other quantizations are refused). The
multi-token-prediction layers those checkpoints carry after the decoder
(``num_nextn_predict_layers``) are skipped, as transformers does.

Loading builds each variable with ``jax.make_array_from_callback``: every device
reads only its own slice (for an expert stack, only its experts) from memory-mapped
shards, so no process ever holds the whole model. The reader
decodes the safetensors format (an 8-byte header length, a JSON header, raw
little-endian data; https://github.com/huggingface/safetensors#format) itself
because safetensors' numpy API cannot decode BF16 or F8 tensors; the tests check
it against the safetensors library. A checkpoint that does not match its
config is one :class:`HFError` listing every missing, unexpected and mis-shaped
tensor; nothing is half-loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from k2jax.config import ConfigError, ModelConfig, YarnConfig
from optim.partition import path_str


class HFError(ConfigError):
    """A Hugging Face checkpoint cannot be read or does not match its config (a
    ConfigError too: the checkpoint is what configures the model)."""


# ---------------------------------------------------------------------------
# config.json

MODEL_TYPES = ("deepseek_v3", "kimi_k2")
# Keys of a config.json that carry nothing k2jax models (tokens, runtime, bookkeeping).
_IGNORED = {
    "architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id",
    "torch_dtype", "dtype", "transformers_version", "use_cache", "pretraining_tp",
    "attention_dropout", "num_nextn_predict_layers", "seq_aux", "ep_size",
    "quantization_config", "model_type", "rope_interleave", "moe_layer_freq",
    "hidden_act", "scoring_func", "topk_method", "attention_bias", "head_dim",
    "qk_head_dim", "num_key_value_heads", "tie_word_embeddings", "rope_scaling",
    "rope_parameters", "id2label", "label2id", "output_attentions",
    "output_hidden_states", "output_router_logits", "return_dict", "num_mtp_layers",
}
# transformers' DeepseekV3Config defaults (v5.24), for keys a config.json leaves out:
# a missing key means what it means to transformers, not k2jax's own default.
_HF_DEFAULTS = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "max_position_embeddings": 4096,
    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
}
# Values k2jax requires, since the model implements only these.
_REQUIRED = {
    "hidden_act": "silu", "scoring_func": "sigmoid", "moe_layer_freq": 1,
    "attention_bias": False, "rope_interleave": True, "topk_method": "noaux_tc",
}
_YARN_FIELDS = {f.name for f in dataclasses.fields(YarnConfig)}


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: no {os.path.basename(path)} at {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what}: {path} is not valid JSON ({e})") from None


def _rope(config: dict) -> tuple[float, YarnConfig | None]:
    """(rope_theta, YaRN) from the legacy ``rope_theta`` + ``rope_scaling`` keys (the
    published configs) or transformers 5's ``rope_parameters``. A key k2jax does not
    implement (e.g. ``attention_factor``) is an error, not silently dropped."""
    rs = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta", rs.get("rope_theta", _HF_DEFAULTS["rope_theta"]))
    kind = rs.get("rope_type", rs.get("type", "default"))
    known = {"rope_type", "type", "rope_theta"} | (_YARN_FIELDS if kind == "yarn" else set())
    bad = [f"{k}={v!r}" for k, v in rs.items() if k not in known or v is None]
    if kind not in ("default", "yarn") or bad:
        raise ConfigError(f"from_hf: rope_scaling {', '.join(bad) or f'type {kind!r}'} is not "
                          f"supported (need 'yarn' with {', '.join(sorted(_YARN_FIELDS))})")
    if kind == "default":
        return theta, None
    return theta, YarnConfig(**{k: v for k, v in rs.items() if k in _YARN_FIELDS})


def config_from_hf(config: dict | str | os.PathLike, **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a DeepseekV3 / Kimi-K2 ``config.json`` (the dict, the
    file, or its directory). ``overrides`` set k2jax-only fields (e.g. ``dtype``,
    ``moe_impl``). Multi-token-prediction layers are not modelled, as transformers'
    ``DeepseekV3ForCausalLM`` does not build them either."""
    if not isinstance(config, dict):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        config = _read_json(path, "from_hf")
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"from_hf: unsupported model_type {model_type!r} "
                          f"(supported: {', '.join(MODEL_TYPES)})")
    for key, want in _REQUIRED.items():
        if key in config and config[key] != want:
            raise ConfigError(f"from_hf: {key}={config[key]!r} is not supported (need {want!r})")
    if config.get("num_key_value_heads", config.get("num_attention_heads")) != config.get(
            "num_attention_heads"):
        raise ConfigError("from_hf: num_key_value_heads must equal num_attention_heads for MLA")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    kwargs: dict[str, Any] = {k: v for k, v in _HF_DEFAULTS.items() if k != "rope_theta"}
    for key, value in config.items():
        if key in _IGNORED or key.startswith("_"):
            continue
        if key not in names:
            raise ConfigError(f"from_hf: unknown config.json key {key!r}")
        kwargs[key] = value
    kwargs["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    kwargs["rope_theta"], kwargs["rope_scaling"] = _rope(config)
    kwargs["dtype"] = "float32"
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


# Fields of ModelConfig that are k2jax's (training, dispatch, numerics), not the architecture.
_K2JAX_ONLY = {"attention", "num_key_value_heads", "head_dim", "qk_norm", "rope_scaling",
               "router_bias_update_rate", "moe_impl", "moe_block_size", "dtype",
               "param_dtype"}


def config_to_hf(cfg: ModelConfig) -> dict:
    """The ``config.json`` of ``cfg`` in the published configs' (legacy) form, which
    transformers 4 and 5 both read. Raises HFError for what the HF architecture lacks."""
    if cfg.attention != "mla" or cfg.qk_norm:
        raise HFError("save: DeepseekV3ForCausalLM has MLA attention without qk_norm; this "
                      f"model has attention={cfg.attention!r}, qk_norm={cfg.qk_norm}")
    out: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"],
                           "model_type": "deepseek_v3"}
    out.update({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                if f.name not in _K2JAX_ONLY})
    rs = cfg.rope_scaling
    if rs is not None and cfg.max_position_embeddings != rs.factor * (
            rs.original_max_position_embeddings):
        # some transformers versions re-derive the factor from these two
        raise HFError(f"save: max_position_embeddings={cfg.max_position_embeddings} must equal "
                      f"rope_scaling.factor × original_max_position_embeddings = "
                      f"{rs.factor * rs.original_max_position_embeddings:g} for transformers")
    out["rope_scaling"] = None if rs is None else {
        "type": "yarn", "rope_type": "yarn",
        **{k: v for k, v in dataclasses.asdict(rs).items() if v or not k.startswith("mscale")}}
    out.update(_REQUIRED, num_key_value_heads=cfg.num_attention_heads,
               num_nextn_predict_layers=0, torch_dtype=cfg.param_dtype)
    return out


# ---------------------------------------------------------------------------
# safetensors files

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(file: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(name -> TensorInfo, ``__metadata__``) of one .safetensors file; checks that every
    tensor's byte range fits its dtype, shape and the file."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n < 2 or 8 + n > size:
            raise HFError(f"{file}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HFError(f"{file}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise HFError(f"{file}: not a safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    out = {}
    for name, h in header.items():
        try:
            dtype, shape, (b, e) = h["dtype"], tuple(h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise HFError(f"{file}: malformed header entry for {name!r}") from None
        if dtype not in _DTYPES:
            raise HFError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        if e - b != math.prod(shape) * _DTYPES[dtype].itemsize or b < 0 or 8 + n + e > size:
            raise HFError(f"{file}: tensor {name!r} {dtype}{list(shape)} does not fit bytes "
                          f"[{b}, {e}) of the data (file truncated or corrupt)")
        out[name] = TensorInfo(file, dtype, shape, 8 + n + b, 8 + n + e)
    return out, meta


def read_tensor(info: TensorInfo) -> np.ndarray:
    """The tensor, as a read-only view of the memory-mapped file (no copy)."""
    mm = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.start,
                   shape=(info.end - info.start,))
    return mm.view(_DTYPES[info.dtype]).reshape(info.shape)


def write_safetensors(file: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` in the safetensors format (header padded to 8 bytes)."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, x in tensors.items():
        if x.dtype not in _NAMES:
            raise HFError(f"save: tensor {name!r} has unsupported dtype {x.dtype}")
        header[name] = {"dtype": _NAMES[x.dtype], "shape": list(x.shape),
                        "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for x in tensors.values():
            f.write(np.ascontiguousarray(x).tobytes())


# ---------------------------------------------------------------------------
# names and layouts


@dataclasses.dataclass(frozen=True)
class Spec:
    """One checkpoint tensor: where it lives in k2jax and how its layout differs."""

    hf: str  # checkpoint name
    path: str  # k2jax variable path, e.g. "layers.1.moe.w_gate"
    n_in: int | None  # leading k2jax dims that form torch's "in"; None: same layout
    expert: int | None = None  # index into a stacked [E, ...] variable


def tensor_specs(cfg: ModelConfig) -> list[Spec]:
    """Every tensor of ``cfg``'s checkpoint, in transformers' order."""
    specs = [Spec("model.embed_tokens.weight", "embed", None)]
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        specs += [Spec(p + "input_layernorm.weight", q + "attn_norm.scale", None),
                  Spec(p + "post_attention_layernorm.weight", q + "ffn_norm.scale", None)]
        a = p + "self_attn."
        if cfg.q_lora_rank:
            specs += [Spec(a + "q_a_proj.weight", q + "attn.q_a", 1),
                      Spec(a + "q_a_layernorm.weight", q + "attn.q_a_norm.scale", None),
                      Spec(a + "q_b_proj.weight", q + "attn.q_b", 1)]
        else:
            specs.append(Spec(a + "q_proj.weight", q + "attn.q_proj", 1))
        specs += [Spec(a + "kv_a_proj_with_mqa.weight", q + "attn.kv_a", 1),
                  Spec(a + "kv_a_layernorm.weight", q + "attn.kv_a_norm.scale", None),
                  Spec(a + "kv_b_proj.weight", q + "attn.kv_b", 1),
                  Spec(a + "o_proj.weight", q + "attn.o", 2)]
        if i < cfg.first_k_dense_replace:
            specs += [Spec(f"{p}mlp.{n}_proj.weight", f"{q}mlp.{n}", 1)
                      for n in ("gate", "up", "down")]
            continue
        specs += [Spec(p + "mlp.gate.weight", q + "moe.router", 1),
                  Spec(p + "mlp.gate.e_score_correction_bias", q + "moe.selection_bias", None)]
        for j in range(cfg.n_routed_experts):
            specs += [Spec(f"{p}mlp.experts.{j}.{n}_proj.weight", f"{q}moe.w_{n}", 1, j)
                      for n in ("gate", "up", "down")]
        if cfg.n_shared_experts:
            specs += [Spec(f"{p}mlp.shared_experts.{n}_proj.weight", f"{q}moe.shared.{n}", 1)
                      for n in ("gate", "up", "down")]
    specs.append(Spec("model.norm.weight", "norm.scale", None))
    if not cfg.tie_word_embeddings:
        specs.append(Spec("lm_head.weight", "lm_head", 1))
    return specs


def _hf_shape(spec: Spec, shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = shape[1:] if spec.expert is not None else shape
    if spec.n_in is None:
        return shape
    return math.prod(shape[spec.n_in:]), math.prod(shape[:spec.n_in])


def _to_k2jax(x: np.ndarray, spec: Spec, shape: tuple[int, ...]) -> np.ndarray:
    shape = shape[1:] if spec.expert is not None else shape
    return x if spec.n_in is None else x.T.reshape(shape)


def _to_hf(x: np.ndarray, spec: Spec) -> np.ndarray:
    if spec.n_in is None:
        return x
    return x.reshape(math.prod(x.shape[:spec.n_in]), -1).T


def _skipped(name: str, cfg: ModelConfig, mtp_layers: int) -> bool:
    """Checkpoint tensors k2jax does not model: the multi-token-prediction layers that
    follow the decoder (``num_nextn_predict_layers``) and cached RoPE tables."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    parts = name.split(".")
    return (len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
            and cfg.num_hidden_layers <= int(parts[2]) < cfg.num_hidden_layers + mtp_layers)


def _fp8_block(hf_config: dict) -> tuple[int, int] | None:
    """The fp8 block size of a DeepSeek-V3-style ``quantization_config``, None when the
    checkpoint is not quantized; any other quantization is an error."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method, fmt = qc.get("quant_method"), qc.get("fmt", "e4m3")
    block = qc.get("weight_block_size", [128, 128])
    bad = [f"{k}={v!r}" for k, v, ok in (("quant_method", method, method == "fp8"),
                                         ("fmt", fmt, fmt == "e4m3"),
                                         ("weight_block_size", block, len(block) == 2)) if not ok]
    if bad:
        raise HFError(f"load: quantization_config {', '.join(bad)} is not supported (fp8 "
                      "e4m3 with a per-block weight_scale_inv, as DeepSeek-V3 / Kimi K2 publish)")
    return int(block[0]), int(block[1])


def _dequantize(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """fp8 weight × its per-block inverse scale (DeepSeek-V3 fp8 format, 128×128 blocks)."""
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], 0), block[1], 1)
    return w.astype(np.float32) * s[:w.shape[0], :w.shape[1]]


def _listed(what: str, items: list[str], limit: int = 20) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {what}: {', '.join(items[:limit])}{more}"


# ---------------------------------------------------------------------------
# load / save


def _shard_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(index, "load").get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFError(f"load: {index} has no weight_map")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if absent:
            raise HFError(f"load: shards named in {index} are missing: {', '.join(absent)}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise HFError(f"load: no *.safetensors files in {path}")
    return [os.path.join(path, f) for f in files]


def _check_architecture(hf_config: dict, path: str) -> None:
    archs = hf_config.get("architectures") or []
    if archs and "DeepseekV3ForCausalLM" not in archs:
        raise HFError(f"load: {path}/config.json: unsupported architecture "
                      f"{', '.join(archs)} (supported: DeepseekV3ForCausalLM)")


def _abstract_state(cfg: ModelConfig):
    from k2jax.params import abstract_model
    return nnx.split(abstract_model(cfg))


@dataclasses.dataclass(frozen=True)
class _Checkpoint:
    config: ModelConfig
    tensors: dict[str, TensorInfo]  # every tensor in every shard
    specs: list[Spec]
    graphdef: Any
    state: Any  # abstract nnx.State
    block: tuple[int, int] | None  # fp8 block size


def _open(path: str | os.PathLike, overrides: dict) -> _Checkpoint:
    """Read config.json and every shard's header and check them against each other;
    every problem found is reported in one HFError."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise HFError(f"load: {path} is not a directory")
    bad = sorted(set(overrides) - set(TRAINING_FIELDS))
    if bad:
        raise HFError(f"load: {', '.join(bad)} come from config.json and cannot be overridden "
                      f"(overridable: {', '.join(TRAINING_FIELDS)})")
    try:
        hf_config = _read_json(os.path.join(path, "config.json"), "load")
        _check_architecture(hf_config, path)
        cfg = config_from_hf(hf_config, **overrides)
    except HFError:
        raise
    except ConfigError as e:
        raise HFError(f"{path}: {e}") from None
    block = _fp8_block(hf_config)
    mtp = int(hf_config.get("num_nextn_predict_layers", hf_config.get("num_mtp_layers", 0)))
    found: dict[str, TensorInfo] = {}
    for file in _shard_files(path):
        for name, info in read_header(file)[0].items():
            if name in found:
                raise HFError(f"load: tensor {name!r} is in both {found[name].file} and {file}")
            found[name] = info

    graphdef, state = _abstract_state(cfg)
    leaves = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    specs = tensor_specs(cfg)
    uncovered = sorted(set(leaves) - {s.path for s in specs})
    if uncovered:
        raise HFError(f"load: no checkpoint tensor can fill {', '.join(uncovered)}")
    by_name = {s.hf: s for s in specs}
    if cfg.tie_word_embeddings:  # transformers drops a stored head and re-ties it
        by_name["lm_head.weight"] = Spec("lm_head.weight", "embed", None)
    missing = [s.hf for s in specs if s.hf not in found]
    misshaped, unexpected = [], []
    for name, info in found.items():
        spec = by_name.get(name)
        if name.endswith(".weight_scale_inv"):
            w = found.get(name[:-len("_scale_inv")])
            if w is None or not w.dtype.startswith("F8") or block is None or len(w.shape) != 2:
                unexpected.append(name)
            elif info.shape != (-(-w.shape[0] // block[0]), -(-w.shape[1] // block[1])):
                misshaped.append(f"{name} {list(info.shape)} (expected one scale per "
                                 f"{block[0]}×{block[1]} block of {list(w.shape)})")
        elif spec is None:
            if not _skipped(name, cfg, mtp):
                unexpected.append(name)
        elif info.shape != (want := _hf_shape(spec, leaves[spec.path].shape)):
            misshaped.append(f"{name} {list(info.shape)} (expected {list(want)})")
        elif not (info.dtype.startswith("F") or info.dtype == "BF16"):
            misshaped.append(f"{name} has dtype {info.dtype} (expected floating point)")
        elif info.dtype.startswith("F8") and name + "_scale_inv" not in found:
            misshaped.append(f"{name} is {info.dtype} without {name}_scale_inv")
    problems = [_listed(what, v) for what, v in (
        ("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if v]
    if problems:
        raise HFError(f"load: {path} does not match its config.json: " + "; ".join(problems))
    return _Checkpoint(cfg, found, specs, graphdef, state, block)


# ModelConfig fields a checkpoint does not determine: dispatch, dtypes, balancing, init.
TRAINING_FIELDS = ("router_bias_update_rate", "aux_loss_alpha", "moe_impl", "moe_block_size",
                   "dtype", "param_dtype", "initializer_range")


def check(path: str | os.PathLike, model: ModelConfig | None = None,
          **overrides: Any) -> ModelConfig:
    """The checkpoint's config after every check :func:`load` makes, reading headers
    only (no tensor data): what a CLI runs before it writes anything. With ``model``,
    also that the checkpoint has ``model``'s architecture (its TRAINING_FIELDS are
    taken from ``model``); a difference is one error naming every field."""
    if model is not None:
        overrides = {**{f: getattr(model, f) for f in TRAINING_FIELDS}, **overrides}
    cfg = _open(path, overrides).config
    if model is not None and cfg != model:
        diff = [f"model.{f.name}={getattr(model, f.name)!r} (checkpoint: "
                f"{getattr(cfg, f.name)!r})" for f in dataclasses.fields(cfg)
                if getattr(cfg, f.name) != getattr(model, f.name)]
        raise HFError(f"{os.fspath(path)}: the model config differs from the checkpoint's: "
                      + ", ".join(diff))
    return cfg


def _variable(ckpt: _Checkpoint, specs: list[Spec], like, sharding) -> jax.Array:
    """One k2jax variable, built device by device from the memory-mapped checkpoint:
    each device's callback reads only the tensors its slice needs (for a stacked expert
    variable, only its experts), so no process ever holds the whole model."""
    shape, dtype = like.shape, like.dtype

    def tensor(spec: Spec) -> np.ndarray:
        info = ckpt.tensors[spec.hf]
        x = read_tensor(info)
        if info.dtype.startswith("F8"):
            x = _dequantize(x, read_tensor(ckpt.tensors[spec.hf + "_scale_inv"]), ckpt.block)
        return _to_k2jax(x, spec, shape)

    def read(index) -> np.ndarray:
        if specs[0].expert is None:
            return np.asarray(tensor(specs[0])[index], dtype)
        by_expert = {s.expert: s for s in specs}
        return np.stack([np.asarray(tensor(by_expert[j])[index[1:]], dtype)
                         for j in range(shape[0])[index[0]]])

    return jax.make_array_from_callback(shape, sharding, read)


def load(path: str | os.PathLike, *, mesh=None, **overrides: Any):
    """``(ModelConfig, Transformer)`` from a checkpoint directory (config.json and one or
    many safetensors shards). ``overrides`` set the k2jax-only fields (TRAINING_FIELDS,
    e.g. ``param_dtype="bfloat16"``, ``moe_impl="ragged"``; the rest comes from
    config.json). With ``mesh`` each variable is built in its shards (k2jax.sharding's
    rules), each device reading only its slice; without, on the default device.
    Parameters are float32 unless ``param_dtype="bfloat16"`` (half the memory of a
    bf16 or fp8 checkpoint read as float32)."""
    ckpt = _open(path, overrides)
    by_path: dict[str, list[Spec]] = {}
    for spec in ckpt.specs:
        by_path.setdefault(spec.path, []).append(spec)
    shardings = None
    if mesh is not None:
        from k2jax.sharding import state_shardings
        shardings = {path_str(kp): s for kp, s in jax.tree_util.tree_flatten_with_path(
            state_shardings(ckpt.state, mesh))[0]}
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def place(kp, like):
        p = path_str(kp)
        return _variable(ckpt, by_path[p], like, device if shardings is None else shardings[p])

    state = jax.tree_util.tree_map_with_path(place, ckpt.state)
    return ckpt.config, nnx.merge(ckpt.graphdef, state)


def save(model, config: ModelConfig, path: str | os.PathLike, *,
         max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write ``model`` as a transformers checkpoint in the new directory ``path`` (an
    existing non-empty directory is refused, never overwritten): config.json plus
    safetensors shards of at most ``max_shard_bytes`` (and an index when there are
    several). Tensors keep the model's dtypes. Single-process: every array must be
    addressable here. Returns the files written."""
    path = os.fspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise HFError(f"save: {path} exists and is not empty; refusing to overwrite")
    hf_config = config_to_hf(config)
    state = nnx.state(model)
    leaves = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    specs = tensor_specs(config)
    absent = sorted({s.path for s in specs} - set(leaves))
    if absent:
        raise HFError(f"save: the model has no {', '.join(absent)} (does it match config?)")
    plan: list[list[Spec]] = [[]]  # shard by shard, from shapes alone
    size = 0
    for spec in specs:
        x = leaves[spec.path]
        nbytes = x.nbytes // (x.shape[0] if spec.expert is not None else 1)
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(spec)
        size += nbytes
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".k2jax-save-", dir=parent)
    try:
        weight_map, total = {}, 0
        for name, shard in zip(names, plan):  # one shard in host memory at a time
            tensors = {}
            for spec in shard:
                x = leaves[spec.path]
                x = np.asarray(jax.device_get(x if spec.expert is None else x[spec.expert]))
                tensors[spec.hf] = _to_hf(x, spec)
                weight_map[spec.hf] = name
                total += x.nbytes
            write_safetensors(os.path.join(tmp, name), tensors)
        if len(plan) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                          indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        if os.path.isdir(path):
            os.rmdir(path)  # empty (checked above)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide it from other users
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(os.path.join(path, f) for f in os.listdir(path))
