"""Which leaves Muon owns, and how each N-D leaf is viewed as a batch of matrices.

A :class:`Partition` is an ordered table of (path regex, assignment) rules; the
first rule whose regex fully matches a leaf's dotted path wins, and a leaf no
rule matches is an error (a silent default is how expert stacks end up
orthogonalised as one matrix). ``str(partition)`` prints the rules;
``partition.describe(params)`` prints where every leaf went.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

import jax

from optim.paths import flatten, path_str

ADAMW: Literal["adamw"] = "adamw"
AUTO: Literal["auto"] = "auto"  # 2-D -> Muon [fan_in, fan_out]; 1-D -> AdamW; N-D -> error


@dataclasses.dataclass(frozen=True)
class MatrixDims:
    """Axes of a leaf that form a batch, the fan-in side and the fan-out side of its matrices.

    E.g. an expert stack [E, D, F] is ``MatrixDims(fan_in=(1,), fan_out=(2,), batch=(0,))``:
    E separate D×F matrices; a per-head projection [D, H, K] is
    ``MatrixDims(fan_in=(0,), fan_out=(1, 2))``: one D×(H·K) matrix.
    """

    fan_in: tuple[int, ...] = (0,)
    fan_out: tuple[int, ...] = (1,)
    batch: tuple[int, ...] = ()

    def check(self, shape: tuple[int, ...], path: str = "") -> None:
        axes = sorted(self.batch + self.fan_in + self.fan_out)
        if axes != list(range(len(shape))) or not self.fan_in or not self.fan_out:
            raise ValueError(f"{path}: {self} does not cover the axes of shape {shape} "
                             "exactly once with non-empty fan_in and fan_out")

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(batch, fan_in, fan_out) sizes of the matrix view."""
        size = lambda axes: math.prod(shape[a] for a in axes)  # noqa: E731
        return size(self.batch), size(self.fan_in), size(self.fan_out)

    def to_matrices(self, x):
        """x -> [batch, fan_in, fan_out]."""
        perm = self.batch + self.fan_in + self.fan_out
        return x.transpose(perm).reshape(self.matrix_shape(x.shape))

    def from_matrices(self, m, shape: tuple[int, ...]):
        """Inverse of :meth:`to_matrices` for a leaf of ``shape``."""
        perm = self.batch + self.fan_in + self.fan_out
        inverse = [perm.index(i) for i in range(len(shape))]
        return m.reshape([shape[a] for a in perm]).transpose(inverse)


Assignment = MatrixDims | Literal["adamw", "auto"]


@dataclasses.dataclass(frozen=True)
class Partition:
    """Ordered (regex, assignment) rules mapping leaf paths to Muon (MatrixDims) or AdamW."""

    rules: tuple[tuple[str, Assignment], ...]

    def assign(self, path: str, shape: tuple[int, ...]) -> MatrixDims | Literal["adamw"]:
        for pattern, target in self.rules:
            if re.fullmatch(pattern, path):
                if target == AUTO:
                    if len(shape) == 2:
                        return MatrixDims()
                    if len(shape) <= 1:
                        return ADAMW
                    raise ValueError(f"{path}: shape {shape} has {len(shape)} axes; add a "
                                     "MatrixDims rule saying which are batch / fan-in / fan-out")
                if isinstance(target, MatrixDims):
                    target.check(tuple(shape), path)
                return target
        raise ValueError(f"{path}: no partition rule matches this parameter")

    def dims(self, path: str, shape: tuple[int, ...]) -> MatrixDims:
        target = self.assign(path, shape)
        if not isinstance(target, MatrixDims):
            raise ValueError(f"{path}: assigned to {target}, not Muon")
        return target

    def labels(self, params):
        """Tree of 'muon' / 'adamw' with the structure of ``params`` (for optax.partition)."""
        return jax.tree_util.tree_map_with_path(
            lambda kp, x: "adamw" if self.assign(path_str(kp), x.shape) == ADAMW else "muon",
            params)

    def describe(self, params) -> str:
        """One line per leaf: path, shape, and where it goes."""
        rows = []
        for path, x in flatten(params).items():
            target = self.assign(path, tuple(x.shape))
            if isinstance(target, MatrixDims):
                b, m, n = target.matrix_shape(tuple(x.shape))
                what = f"muon   {b} x [{m} x {n}]" if target.batch else f"muon   [{m} x {n}]"
            else:
                what = "adamw"
            rows.append(f"{path:<40} {str(tuple(x.shape)):<22} {what}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return "\n".join(f"{pattern:<48} -> {target}" for pattern, target in self.rules)


DEFAULT = Partition(rules=(
    (r"(.*\.)?(embed|embedding|wte|lm_head|head|router|gate_weight)(\..*)?", ADAMW),
    (r".*(norm|scale|bias)(\..*)?", ADAMW),
    (r".*", AUTO),
))
