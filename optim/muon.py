"""Muon's direction: momentum, then Newton–Schulz, then an update-scale rule.

Per matrix W of shape fan_in × fan_out (Moonlight, arXiv 2502.16982 §2.2, and its code):

    M_t = μ·M_{t-1} + G_t
    O_t = NS(μ·M_t + G_t)  (Nesterov, ``nesterov=True``, as Moonlight's code runs it)
    O_t = NS(M_t)          (``nesterov=False``: Kimi K2's Algorithm 1 as written,
                            arXiv 2507.20534, has no Nesterov term)
    O_t ← O_t · s(fan_in, fan_out)

A semi-orthogonal fan_in × fan_out matrix has RMS 1/√max(fan_in, fan_out); the
rule ``update_scale`` picks s:

- ``"k2"``: rms_scale·√max(fan_in, fan_out), so the update RMS is rms_scale (0.2
  matches AdamW's typical 0.2-0.4 and AdamW's lr and weight decay carry over;
  Moonlight §2.2, K2 Algorithm 1).
- ``"jordan"``: √max(1, fan_out/fan_in) (K. Jordan's Muon, 2024): update RMS
  1/√fan_in for every shape.
- ``"spectral"``: √(fan_out/fan_in), the spectral-norm scale of the spectral
  condition (Yang, Simon & Bernstein, arXiv 2310.17813) and of the Linear layer's
  duality map under the modular norm (Bernstein & Newhouse, arXiv 2410.21265):
  update RMS 1/√fan_in when wide, √fan_out/fan_in when tall.

The decoupled weight decay and learning rate are chained after this transform.
N-D leaves are viewed through :class:`optim.partition.MatrixDims`: an expert
stack [E, D, F] is E matrices, each orthogonalised on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax

from optim.distributed_ns import Placement, orthogonalize_leaf, orthogonalize_tree
from optim.newton_schulz import Coeffs
from optim.partition import MatrixDims


class MuonState(NamedTuple):
    momentum: optax.Updates


UpdateScale = Literal["k2", "jordan", "spectral"]
UPDATE_SCALES = get_args(UpdateScale)


def scale_factor(rule: UpdateScale, fan_in: int, fan_out: int, rms_scale: float = 0.2) -> float:
    """s(fan_in, fan_out) of the module docstring; ``rms_scale`` is used by "k2" only."""
    if rule == "k2":
        return rms_scale * math.sqrt(max(fan_in, fan_out))
    if rule == "jordan":
        return math.sqrt(max(1.0, fan_out / fan_in))
    if rule == "spectral":
        return math.sqrt(fan_out / fan_in)
    raise ValueError(f"update_scale={rule!r} must be one of {', '.join(UPDATE_SCALES)}")


def orthogonalize(x, dims: MatrixDims, *, steps: int = 5, coeffs: str | Coeffs = "jordan",
                  dtype=jnp.float32, update_scale: UpdateScale = "k2", rms_scale: float = 0.2):
    """NS-orthogonalise every matrix of leaf ``x`` and scale it by the ``update_scale`` rule."""
    return orthogonalize_leaf(
        x, dims, lambda fan_in, fan_out: scale_factor(update_scale, fan_in, fan_out, rms_scale),
        steps=steps, coeffs=coeffs, dtype=dtype)


def scale_by_muon(dims: Callable[[str, tuple[int, ...]], MatrixDims], *, momentum: float = 0.95,
                  nesterov: bool = True, ns_steps: int = 5, ns_coeffs: str | Coeffs = "jordan",
                  ns_dtype=jnp.float32, update_scale: UpdateScale = "k2",
                  rms_scale: float = 0.2, mu_dtype=None,
                  placement: Placement | None = None) -> optax.GradientTransformation:
    """Muon's update direction for every leaf it sees; ``dims(path, shape)`` gives its matrix view.

    Leaves masked out by ``optax.partition`` carry no state and are skipped. ``mu_dtype``
    is the momentum buffer's dtype (None: the parameter's). A ``placement`` (mesh +
    parameter shardings) splits the Newton–Schulz work across the mesh, whole matrices
    per device (optim.distributed_ns).
    """
    scale_factor(update_scale, 1, 1)  # an unknown rule fails here, not inside a trace

    def init(params):
        return MuonState(jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params))

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: (momentum * m + g).astype(m.dtype), state.momentum, updates)
        direction = jax.tree.map(lambda m, g: momentum * m + g, mu, updates) if nesterov else mu

        def scale(fan_in, fan_out):
            return scale_factor(update_scale, fan_in, fan_out, rms_scale)

        out = orthogonalize_tree(direction, dims, scale, placement=placement, steps=ns_steps,
                                 coeffs=ns_coeffs, dtype=ns_dtype)
        return out, MuonState(mu)

    return optax.GradientTransformation(init, update)
