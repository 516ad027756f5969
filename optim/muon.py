"""Muon's direction: momentum, then Newton–Schulz, then update-RMS matching.

Kimi K2 Algorithm 1 (arXiv 2507.20534) / Moonlight (arXiv 2502.16982 §2.2), per
matrix W of shape fan_in × fan_out:

    M_t = μ·M_{t-1} + G_t
    O_t = NS(μ·M_t + G_t)  (Nesterov, as Moonlight runs it; NS(M_t) without)
    O_t ← O_t · rms_scale · √max(fan_in, fan_out)

A full-rank orthogonal fan_in × fan_out matrix has RMS √(1/max(fan_in, fan_out)),
so with rms_scale = 0.2 the update RMS matches AdamW's typical 0.2-0.4 and
AdamW's learning rate and weight decay carry over (Moonlight §2.2). The
decoupled weight decay and learning rate are chained after this transform.

N-D leaves are viewed through :class:`optim.partition.MatrixDims`: an expert
stack [E, D, F] is E matrices, each orthogonalised on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim.newton_schulz import Coeffs, newton_schulz
from optim.partition import MatrixDims
from optim.paths import path_str


class MuonState(NamedTuple):
    momentum: optax.Updates


def orthogonalize(x, dims: MatrixDims, *, steps: int = 5, coeffs: str | Coeffs = "jordan",
                  dtype=jnp.float32, rms_scale: float | None = 0.2):
    """NS-orthogonalise every matrix of leaf ``x`` and scale for consistent update RMS.

    ``rms_scale=None`` uses Jordan's scale √max(1, fan_out / fan_in) instead.
    """
    _, fan_in, fan_out = dims.matrix_shape(x.shape)
    o = newton_schulz(dims.to_matrices(x), steps=steps, coeffs=coeffs, dtype=dtype)
    o = dims.from_matrices(o, x.shape)
    if rms_scale is None:
        return o * math.sqrt(max(1.0, fan_out / fan_in))
    return o * (rms_scale * math.sqrt(max(fan_in, fan_out)))


def scale_by_muon(dims: Callable[[str, tuple[int, ...]], MatrixDims], *, momentum: float = 0.95,
                  nesterov: bool = True, ns_steps: int = 5, ns_coeffs: str | Coeffs = "jordan",
                  ns_dtype=jnp.float32, rms_scale: float | None = 0.2,
                  mu_dtype=None) -> optax.GradientTransformation:
    """Muon's update direction for every leaf it sees; ``dims(path, shape)`` gives its matrix view.

    Leaves masked out by ``optax.partition`` carry no state and are skipped.
    """

    def init(params):
        return MuonState(jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params))

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: (momentum * m + g).astype(m.dtype), state.momentum, updates)
        direction = jax.tree.map(lambda m, g: momentum * m + g, mu, updates) if nesterov else mu

        def one(kp, d):
            return orthogonalize(d, dims(path_str(kp), d.shape), steps=ns_steps, coeffs=ns_coeffs,
                                 dtype=ns_dtype, rms_scale=rms_scale).astype(d.dtype)

        return jax.tree_util.tree_map_with_path(one, direction), MuonState(mu)

    return optax.GradientTransformation(init, update)
