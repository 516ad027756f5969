"""Newton–Schulz for a whole tree of matrices: batched by shape, split across the mesh.

Orthogonalising each leaf where it lies (fsdp over its rows, tensor over its
columns) lets GSPMD partition the Gram matrices XXᵀ, which costs an all-gather
or all-reduce inside every one of the quintic steps: measured on this codebase's
``tiny`` model, each extra step added 45 all-gathers, and each of 4 chips still did
0.42× one chip's work. A user of optax.contrib.muon measured the same pattern at
3.3× the step time (goodfire-ai/spd PR #978).

Here, as in levanter's ``grug_muon`` and Moonlight's ZeRO-1 scheme, each device
orthogonalises *whole* matrices of its share, and only the moves before and after
touch the network:

1. every Muon leaf is viewed as a batch of b matrices (its :class:`MatrixDims`),
   turned short side first, so a [D, F] and an [F, D] leaf share a shape;
2. the k leaves that share (b, shape, dtype, sharding) are stacked on a new
   axis after the batch, [b, k, m, n], which needs no communication, and padded
   with zero matrices until each shard of the batch axis holds a multiple of the
   devices per shard (a zero matrix stays zero under Newton–Schulz, so padding
   changes nothing);
3. merged to [b·k, m, n], the stack is resharded so that its first axis is split
   over every mesh axis, those already splitting b first: one all-to-all per mesh
   axis that splits the rows or columns (one under fsdp alone, two under
   fsdp × tensor), after which each device holds b·k/devices whole matrices
   (expert stacks split over ``expert`` keep that split and move only over the
   other axes);
4. one batched Newton–Schulz runs on each device's matrices, with no collective;
5. the reverse all-to-all returns each leaf's slice to its parameter's sharding.

On one device there is nothing to split, and leaves are orthogonalised one by one, as
they lie: XLA:CPU runs a batched matmul slower than the same matmuls one at a time
(Newton–Schulz of 768 matrices 256 × 256 as one batch: 3.5 s, one by one: 2.1 s), so
stacking would only cost there.

The cost of whole matrices: a shape with fewer matrices than devices leaves the
devices past its count computing on zero padding, so each device pays for about
Σ_shapes ⌈count/devices⌉ matrices instead of 1/devices of the total. A scanned
model's leaves are stacks of layers, so every count is at least the depth, and
expert stacks (K2: 3 × 60 × 384 matrices) are large; a shallow model on a large pod
(DeepSeek-V3 at 4 layers on 256 chips) still does several times GSPMD's per-chip
FLOPs, without GSPMD's collectives in every step (benchmarks/RESULTS.md has both).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optim.newton_schulz import polar_factor
from optim.partition import MatrixDims
from optim.paths import path_str


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where Newton–Schulz runs: the ``mesh`` whose devices split the stacks, and each Muon
    leaf's own sharding by dotted path (``shardings``), where its update returns to.

    The optimizer never sees the model: the caller (k2jax.optimizer) derives both from the
    parameters' logical axes.
    """

    mesh: jax.sharding.Mesh
    shardings: Mapping[str, NamedSharding] = dataclasses.field(default_factory=dict)


Axes = tuple[str, ...]  # mesh axes splitting one array axis, major first


def _axes(entry) -> Axes:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _matrix_axes(spec: P | None, d: MatrixDims, ndim: int, mesh) -> tuple[Axes, Axes, Axes]:
    """Mesh axes (of size > 1) splitting the (batch, fan_in, fan_out) axes of a leaf's
    matrix view. Merging leaf axes concatenates their mesh axes, which is the merged
    axis's layout when the split axes are the major ones (true of every k2jax leaf; a
    split minor axis would cost XLA a reshuffle, not a wrong result)."""
    entries = list(spec or ()) + [None] * (ndim - len(spec or ()))
    merged = lambda group: tuple(a for i in group for a in _axes(entries[i])  # noqa: E731
                                 if mesh.shape[a] > 1)
    return merged(d.batch), merged(d.fan_in), merged(d.fan_out)


def _spec(*axes: Axes) -> P:
    return P(*[None if not a else a[0] if len(a) == 1 else a for a in axes])


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One Muon leaf: its matrix view, whether it is tall (then transposed), and the mesh
    axes splitting its wide view's (batch, rows, columns)."""

    index: int
    path: str
    shape: tuple[int, ...]
    dims: MatrixDims
    tall: bool
    axes: tuple[Axes, Axes, Axes]

    def key(self, dtype) -> tuple:
        b, m, n = self.dims.matrix_shape(self.shape)
        return (b, min(m, n), max(m, n), jnp.dtype(dtype), self.axes)


def _leaf(i, path, x, dims, placement: Placement) -> _Leaf:
    d = dims(path, x.shape)
    _, m, n = d.matrix_shape(x.shape)
    if placement.shardings and path not in placement.shardings:
        raise ValueError(f"{path}: no sharding in the Newton–Schulz placement (a Muon leaf "
                         "the placement's parameter shardings do not name)")
    sh = placement.shardings.get(path)
    batch, rows, cols = _matrix_axes(sh.spec if sh is not None else None, d, x.ndim,
                                     placement.mesh)
    return _Leaf(i, path, tuple(x.shape), d, m > n, (batch, *((cols, rows) if m > n else
                                                              (rows, cols))))


def _to_wide(x, leaf: _Leaf):
    m = leaf.dims.to_matrices(x)
    return jnp.swapaxes(m, -1, -2) if leaf.tall else m


def _from_wide(o, leaf: _Leaf):
    return leaf.dims.from_matrices(jnp.swapaxes(o, -1, -2) if leaf.tall else o, leaf.shape)


def _constrain(x, mesh, spec: P):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _reshard_path(mesh, axes: tuple[Axes, Axes, Axes]) -> list[P]:
    """Specs that take a [b·k, m, n] stack from its leaves' sharding to whole matrices per
    device, one move at a time (a move XLA's partitioner does without a full gather): the
    mesh axes the leaves are replicated over split the stack axis first (a local slice),
    then each axis splitting rows or columns moves onto the stack axis (an all-to-all)."""
    batch, rows, cols = (list(a) for a in axes)
    stack = batch + [a for a in mesh.axis_names if a not in batch + rows + cols]
    path = [_spec(*map(tuple, (batch, rows, cols))), _spec(*map(tuple, (stack, rows, cols)))]
    for dim in (rows, cols):
        while dim:
            stack.append(dim.pop())
            path.append(_spec(tuple(stack), tuple(rows), tuple(cols)))
    return path


def orthogonalize_group(mats: list, axes: tuple[Axes, Axes, Axes], mesh, **ns) -> list:
    """Newton–Schulz of k same-shape, same-sharding batches [b, m, n] (m ≤ n) as one stack
    split over ``mesh`` (steps 2-5 of the module docstring).

    The b·k matrices are counted per shard of the batch axes (s of them: the mesh axes
    already splitting b) and each shard's count padded up to a multiple of the devices
    per shard, so a batch of 7 layers on 8 devices is padded by one matrix, not by 7."""
    b, m, n = mats[0].shape
    k = len(mats)
    s = math.prod(mesh.shape[a] for a in axes[0])
    inner = b // s * k
    inner_pad = inner + -inner % (mesh.size // s)
    stack = _constrain(jnp.stack(mats, axis=1), mesh, _spec(axes[0], (), axes[1], axes[2]))
    flat = stack.reshape(s, inner, m, n)  # [s, b/s·k, m, n]: each batch shard's matrices
    flat = jnp.pad(flat, ((0, 0), (0, inner_pad - inner), (0, 0), (0, 0)))
    flat = flat.reshape(s * inner_pad, m, n)
    # The padded stack never takes the leaves' own layout (path[0]): there its stack axis
    # is whole on every device, which for a replicated leaf (K2's q_b, 60 matrices padded
    # to 1,024) is the full padded stack per device. It goes straight to the first split.
    path = _reshard_path(mesh, axes)[1:]
    for spec in path:
        flat = _constrain(flat, mesh, spec)
    out = polar_factor(flat, **ns)
    for spec in path[::-1]:
        out = _constrain(out, mesh, spec)
    out = out.reshape(s, inner_pad, m, n)[:, :inner].reshape(b, k, m, n)
    out = _constrain(out, mesh, _spec(axes[0], (), axes[1], axes[2]))
    return [out[:, j] for j in range(k)]


def orthogonalize_leaf(x, d: MatrixDims, scale: Callable[[int, int], float], **ns):
    """One leaf's matrices (``d``) orthogonalised where they lie, times
    ``scale(fan_in, fan_out)``."""
    _, fan_in, fan_out = d.matrix_shape(x.shape)
    o = d.from_matrices(polar_factor(d.to_matrices(x), **ns), x.shape)
    return (o * scale(fan_in, fan_out)).astype(x.dtype)


def orthogonalize_tree(tree, dims: Callable[[str, tuple[int, ...]], MatrixDims],
                       scale: Callable[[int, int], float], *,
                       placement: Placement | None = None, **ns):
    """Every leaf of ``tree`` Newton–Schulz-orthogonalised as its matrices
    (``dims(path, shape)``) and multiplied by ``scale(fan_in, fan_out)``.

    ``ns`` are :func:`optim.newton_schulz.polar_factor`'s keywords (steps, coeffs,
    dtype). With a ``placement`` over several devices, same-shape matrices are stacked
    and split across its mesh as the module docstring describes, and each result is
    constrained to its leaf's sharding; otherwise each leaf is done on its own.
    """
    if placement is None or placement.mesh.size == 1:
        return jax.tree_util.tree_map_with_path(
            lambda kp, x: orthogonalize_leaf(x, dims(path_str(kp), x.shape), scale, **ns),
            tree)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    xs = [x for _, x in flat]
    groups: dict[tuple, list[_Leaf]] = {}
    for i, (kp, x) in enumerate(flat):
        leaf = _leaf(i, path_str(kp), x, dims, placement)
        groups.setdefault(leaf.key(x.dtype), []).append(leaf)
    out: list = [None] * len(xs)
    for members in groups.values():
        mats = [_to_wide(xs[leaf.index], leaf) for leaf in members]
        outs = orthogonalize_group(mats, members[0].axes, placement.mesh, **ns)
        for leaf, o in zip(members, outs):
            _, fan_in, fan_out = leaf.dims.matrix_shape(leaf.shape)
            y = (_from_wide(o, leaf) * scale(fan_in, fan_out)).astype(xs[leaf.index].dtype)
            target = placement.shardings.get(leaf.path)
            out[leaf.index] = y if target is None else jax.lax.with_sharding_constraint(y, target)
    return jax.tree_util.tree_unflatten(treedef, out)
