"""Device mesh and the one table that maps logical parameter axes to mesh axes.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with
parameters sharded, ZeRO-3 style), ``expert`` (expert parallel), ``tensor``
(Megatron-style head / hidden sharding). A new parallelism layout is a new
rules table, never new model code.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from optim.paths import flatten, path_str

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    # expert doubles as data parallelism outside the experts (as in MaxText): every device
    # holds its own tokens, which expert parallelism (k2jax.model.expert_parallel) sends
    # to the devices owning their experts
    "batch": ("data", "fsdp", "expert"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "moe_mlp": "tensor",
    "expert": "expert",
    "q_lora": None,
    "kv_lora": None,
    "qk_head": None,
    "kv_head": None,
    "v_head": None,
    "norm": None,
    "layers": None,  # a stack of scanned layers: each device holds its share of every layer
}


def make_mesh(data: int = 1, fsdp: int = -1, expert: int = 1, tensor: int = 1,
              devices=None) -> Mesh:
    """A mesh over ``devices`` (default: all); one size may be -1 = the remaining devices.

    Sizes whose product is less than the device count use the first devices (single
    process only), so ``data=1 fsdp=1`` is the one-device baseline of any sharded run.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, expert, tensor]
    if -1 not in sizes and math.prod(sizes) < len(devices) and jax.process_count() == 1:
        devices = devices[:math.prod(sizes)]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs a device count "
                             f"divisible by {known}, have {len(devices)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                         f"devices, have {len(devices)}")
    return Mesh(np.array(devices).reshape(sizes), MESH_AXES)


class ShardingWarning(UserWarning):
    """A mesh axis left out of a parameter's sharding because it does not divide the
    dimension it was meant for: every device along it holds that dimension whole."""


def logical_to_spec(axes, shape, mesh: Mesh, rules=None, *, name: str | None = None) -> P:
    """PartitionSpec for a leaf with logical ``axes``; a mesh axis that does not divide
    its dimension, or is already used by an earlier dimension, is dropped (replicated).

    Given the leaf's ``name`` (a parameter path), an axis of size > 1 dropped for not
    dividing is reported as a :class:`ShardingWarning`: a silently replicated expert
    stack costs memory the mesh was chosen to save. The warnings module shows each
    distinct message once per process."""
    rules = RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for logical, dim in zip(axes, shape):
        if logical is not None and logical not in rules:
            raise KeyError(f"logical axis {logical!r} has no sharding rule (add it to RULES)")
        target = rules.get(logical) if logical is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        keep = []
        for ax in targets:
            size = mesh.shape[ax]
            if ax in used:
                continue
            if dim % (size * math.prod(mesh.shape[a] for a in keep)) == 0:
                keep.append(ax)
            elif name is not None and size > 1:
                warnings.warn(f"{name}: mesh.{ax}={size} does not divide its {logical!r} "
                              f"dimension of {dim}; replicated over {ax!r}", ShardingWarning,
                              stacklevel=2)
        used.update(keep)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*spec)


def variable_shardings(state: nnx.State, mesh: Mesh, rules=None):
    """NamedShardings for every variable of ``state`` from its ``axes`` metadata."""

    def one(kp, var):
        axes = var.get_metadata().get("axes")
        spec = P() if axes is None else logical_to_spec(axes, var.shape, mesh, rules,
                                                          name=path_str(kp))
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, state,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))


def mirrored_shardings(tree, like, like_shardings, mesh: Mesh):
    """Shardings for ``tree`` (an optimizer state): a leaf whose dotted path ends with the
    path of a leaf of ``like`` (the params) and has its shape (Adam moments, Muon momentum)
    is sharded like it; everything else (counts, QK-Clip statistics) is replicated."""
    by_path = {path: (x.shape, s) for (path, x), s in zip(
        flatten(like).items(), jax.tree.leaves(like_shardings))}
    replicated = NamedSharding(mesh, P())

    def one(kp, x):
        parts = path_str(kp).split(".")
        for i in range(len(parts)):
            hit = by_path.get(".".join(parts[i:]))
            if hit is not None and hit[0] == x.shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=None, size: int | None = None
                   ) -> NamedSharding:
    """Batch-major arrays [B, ...]: B over the data-parallel axes; given the batch
    ``size``, only over those that divide it (as :func:`logical_to_spec`: a batch of 4
    on data 2 × fsdp 2 × expert 2 is split 4 ways and repeated over ``expert``)."""
    rules = RULES if rules is None else rules
    spec = rules["batch"] if size is None else logical_to_spec(("batch",), (size,), mesh,
                                                               rules)[0]
    return NamedSharding(mesh, P(spec, *([None] * (ndim - 1))))


def under_mesh(fn, mesh: Mesh):
    """``fn`` traced under ``mesh`` as the context (abstract) mesh: what the model reads to
    choose expert-parallel dispatch (k2jax.model.expert_parallel.plan), with no mesh
    threaded through its modules. Wrap the function given to ``jax.jit``; the devices come
    from the jit's shardings."""
    return functools.partial(_call_under_mesh, fn, mesh)


def _call_under_mesh(fn, mesh: Mesh, *args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return fn(*args, **kwargs)
