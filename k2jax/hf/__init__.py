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
shards (k2jax/hf/files.py), so no process ever holds the whole model. config.json
translation lives in k2jax/hf/config.py. A checkpoint that does not match its
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
import numpy as np
from flax import nnx

from k2jax.config import ConfigError, ModelConfig
from k2jax.hf.config import HFError, _read_json, config_from_hf, config_to_hf
from k2jax.hf.files import TensorInfo, read_header, read_tensor, write_safetensors
from optim.partition import path_str

__all__ = ["HFError", "Spec", "TRAINING_FIELDS", "TensorInfo", "check", "config_from_hf",
           "config_to_hf", "load", "read_header", "read_tensor", "save", "tensor_specs",
           "write_safetensors"]


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
