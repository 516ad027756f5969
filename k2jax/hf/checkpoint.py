"""Checkpoint directories in and out: config.json plus one or many safetensors shards.

Loading builds each variable with ``jax.make_array_from_callback``: every device
reads only its own slice (for an expert stack, only its experts) from memory-mapped
shards (files.py), so no process ever holds the whole model. Everything is checked
before any tensor is read: a checkpoint that does not match its config is one
:class:`HFError` listing every missing, unexpected and mis-shaped tensor, so nothing
is ever half-loaded. Saving writes into a temporary directory renamed into place,
so an interrupted save leaves nothing that looks like a checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from k2jax import atomic
from k2jax.config import ConfigError, ModelConfig
from k2jax.hf import fp8
from k2jax.hf.config import TRAINING_FIELDS, HFError, config_from_hf, config_to_hf, read_json
from k2jax.hf.files import TensorInfo, read_header, read_tensor, write_safetensors
from k2jax.hf.mapping import Spec, hf_shape, skipped, tensor_specs, to_hf, to_k2jax
from k2jax.params import abstract_model
from k2jax.sharding import variable_shardings
from optim.paths import flatten, path_str


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
    shardings = None if mesh is None else flatten(variable_shardings(ckpt.state, mesh))
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
    if (why := atomic.occupied(path)) is not None:
        raise HFError(f"save: {why}; refusing to overwrite")
    hf_config = config_to_hf(config)
    leaves = flatten(nnx.state(model))
    specs = tensor_specs(config)
    absent = sorted({s.path for s in specs} - set(leaves))
    if absent:
        raise HFError(f"save: the model has no {', '.join(absent)} (does it match config?)")
    plan = _plan_shards(specs, leaves, max_shard_bytes)
    with atomic.directory(path) as tmp:
        _write(tmp, plan, leaves, hf_config)
    return sorted(os.path.join(path, f) for f in os.listdir(path))


# ---------------------------------------------------------------------------
# reading and checking a checkpoint


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
    cfg, hf_config = _read_config(path, overrides)
    block = fp8.block_size(hf_config)
    mtp = int(hf_config.get("num_nextn_predict_layers", hf_config.get("num_mtp_layers", 0)))
    found = _read_headers(path)
    graphdef, state = nnx.split(abstract_model(cfg))
    leaves = flatten(state)
    specs = tensor_specs(cfg)
    uncovered = sorted(set(leaves) - {s.path for s in specs})
    if uncovered:
        raise HFError(f"load: no checkpoint tensor can fill {', '.join(uncovered)}")
    problems = _mismatches(found, specs, leaves, cfg, block, mtp)
    if problems:
        raise HFError(f"load: {path} does not match its config.json: " + "; ".join(problems))
    return _Checkpoint(cfg, found, specs, graphdef, state, block)


def _read_config(path: str, overrides: dict) -> tuple[ModelConfig, dict]:
    """(ModelConfig, config.json as read) of the checkpoint directory ``path``;
    ``overrides`` may set TRAINING_FIELDS only, since config.json decides the rest."""
    if not os.path.isdir(path):
        raise HFError(f"load: {path} is not a directory")
    bad = sorted(set(overrides) - set(TRAINING_FIELDS))
    if bad:
        raise HFError(f"load: {', '.join(bad)} come from config.json and cannot be overridden "
                      f"(overridable: {', '.join(TRAINING_FIELDS)})")
    try:
        hf_config = read_json(os.path.join(path, "config.json"), "load")
        _check_architecture(hf_config, path)
        return config_from_hf(hf_config, **overrides), hf_config
    except HFError:
        raise
    except ConfigError as e:
        raise HFError(f"{path}: {e}") from None


def _check_architecture(hf_config: dict, path: str) -> None:
    archs = hf_config.get("architectures") or []
    if archs and "DeepseekV3ForCausalLM" not in archs:
        raise HFError(f"load: {path}/config.json: unsupported architecture "
                      f"{', '.join(archs)} (supported: DeepseekV3ForCausalLM)")


def _read_headers(path: str) -> dict[str, TensorInfo]:
    """Every tensor of every shard, by name (headers only); a name in two shards is an
    error, since which copy transformers would load is unspecified."""
    found: dict[str, TensorInfo] = {}
    for file in _shard_files(path):
        for name, info in read_header(file)[0].items():
            if name in found:
                raise HFError(f"load: tensor {name!r} is in both {found[name].file} and {file}")
            found[name] = info
    return found


def _shard_files(path: str) -> list[str]:
    """The shards the index names (all must exist), or every *.safetensors file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index, "load").get("weight_map")
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


def _mismatches(found: dict[str, TensorInfo], specs: list[Spec], leaves: dict, cfg: ModelConfig,
                block: tuple[int, int] | None, mtp: int) -> list[str]:
    """One entry per kind of problem (missing, unexpected, mis-shaped), each listing its
    tensors; empty when the shards hold exactly what ``specs`` ask for."""
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
            elif info.shape != fp8.scale_shape(w.shape, block):
                misshaped.append(f"{name} {list(info.shape)} (expected one scale per "
                                 f"{block[0]}×{block[1]} block of {list(w.shape)})")
        elif spec is None:
            if not skipped(name, cfg, mtp):
                unexpected.append(name)
        elif info.shape != (want := hf_shape(spec, leaves[spec.path].shape)):
            misshaped.append(f"{name} {list(info.shape)} (expected {list(want)})")
        elif not (info.dtype.startswith("F") or info.dtype == "BF16"):
            misshaped.append(f"{name} has dtype {info.dtype} (expected floating point)")
        elif info.dtype.startswith("F8") and name + "_scale_inv" not in found:
            misshaped.append(f"{name} is {info.dtype} without {name}_scale_inv")
    return [_listed(what, v) for what, v in (
        ("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if v]


def _listed(what: str, items: list[str], limit: int = 20) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {what}: {', '.join(items[:limit])}{more}"


def _variable(ckpt: _Checkpoint, specs: list[Spec], like, sharding) -> jax.Array:
    """One k2jax variable, built device by device from the memory-mapped checkpoint:
    each device's callback reads only the tensors its slice needs (for a stack of layers
    or experts, only its own), so no process ever holds the whole model."""
    shape, dtype = like.shape, like.dtype

    def tensor(spec: Spec) -> np.ndarray:
        info = ckpt.tensors[spec.hf]
        x = read_tensor(info)
        if info.dtype.startswith("F8"):
            x = fp8.dequantize(x, read_tensor(ckpt.tensors[spec.hf + "_scale_inv"]), ckpt.block)
        return to_k2jax(x, spec, shape)

    def read(index) -> np.ndarray:
        n = len(specs[0].index)  # leading stack axes: one tensor per (layer[, expert])
        by_index = {s.index: s for s in specs}
        ranges = [range(shape[i])[index[i]] for i in range(n)]
        parts = [np.asarray(tensor(by_index[at])[index[n:]], dtype)
                 for at in itertools.product(*ranges)]
        return np.stack(parts).reshape(*map(len, ranges), *parts[0].shape)

    return jax.make_array_from_callback(shape, sharding, read)


# ---------------------------------------------------------------------------
# writing a checkpoint


def _plan_shards(specs: list[Spec], leaves: dict, max_shard_bytes: int) -> list[list[Spec]]:
    """``specs`` cut into consecutive shards of at most ``max_shard_bytes`` (a tensor
    larger than that gets a shard of its own), from shapes alone."""
    plan: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        x = leaves[spec.path]
        nbytes = x.nbytes // math.prod(x.shape[:len(spec.index)])
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(spec)
        size += nbytes
    return plan


def _write(directory: str, plan: list[list[Spec]], leaves: dict, hf_config: dict) -> None:
    """The shards of ``plan`` (transformers' file names), their index when there are
    several, and config.json; one shard in host memory at a time."""
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    weight_map, total = {}, 0
    for name, shard in zip(names, plan):
        tensors = {}
        for spec in shard:
            x = leaves[spec.path]
            x = np.asarray(jax.device_get(x[spec.index] if spec.index else x))
            tensors[spec.hf] = to_hf(x, spec)
            weight_map[spec.hf] = name
            total += x.nbytes
        write_safetensors(os.path.join(directory, name), tensors)
    if len(plan) > 1:
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
