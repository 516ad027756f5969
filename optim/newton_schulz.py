"""Newton–Schulz orthogonalisation: the approximate polar factor U·Vᵀ of M = U·S·Vᵀ.

Each step applies an odd quintic to the singular values,
X ← a·X + b·(XXᵀ)X + c·(XXᵀ)²X, after X₀ = M / (‖M‖_F + eps) puts them in
[0, 1]. Working on the short side (transposing tall matrices) makes XXᵀ the
smaller Gram matrix.

Coefficient presets:
- ``"jordan"``: (3.4445, −4.7750, 2.0315) at every step (K. Jordan, "Muon: An
  optimizer for hidden layers", 2024; Moonlight arXiv 2502.16982 §2). It does
  not converge to 1 but sends singular values into ≈ [0.7, 1.2] in 5 steps.
- ``"polar_express"``: per-step minimax-optimal quintics (Amsel et al. 2025,
  arXiv 2505.16932, Algorithm 1), with that algorithm's safety factor 1.01 on
  the normalisation and on every step but the last listed one.
"""

from __future__ import annotations

import jax.numpy as jnp

Coeffs = tuple[tuple[float, float, float], ...]

JORDAN: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

_POLAR_EXPRESS_RAW: Coeffs = (  # Amsel et al. 2025, Algorithm 1
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),  # later steps repeat this one
)
_SAFETY = 1.01
POLAR_EXPRESS: Coeffs = tuple(
    (a / _SAFETY, b / _SAFETY**3, c / _SAFETY**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]
) + (_POLAR_EXPRESS_RAW[-1],)

PRESETS = ("jordan", "polar_express")


def coefficients(coeffs: str | Coeffs, steps: int) -> tuple[Coeffs, float]:
    """(one (a, b, c) per step, Frobenius-norm safety factor) for a preset or explicit list."""
    if steps < 1:
        raise ValueError(f"newton_schulz: steps={steps} must be >= 1")
    if coeffs == "jordan":
        return (JORDAN,) * steps, 1.0
    if coeffs == "polar_express":
        table = POLAR_EXPRESS[:steps]
        return table + (POLAR_EXPRESS[-1],) * (steps - len(table)), _SAFETY
    if isinstance(coeffs, str):
        raise ValueError(f"newton_schulz: unknown coeffs {coeffs!r} (have {', '.join(PRESETS)})")
    table = tuple(tuple(float(v) for v in c) for c in coeffs)
    if len(table) == 1:
        table = table * steps
    if len(table) != steps or any(len(c) != 3 for c in table):
        raise ValueError(f"newton_schulz: need 1 or {steps} (a, b, c) triples, got {coeffs}")
    return table, 1.0


def polar_factor(x, *, steps: int = 5, coeffs: str | Coeffs = "jordan", eps: float = 1e-7,
                 dtype=jnp.float32):
    """The Newton–Schulz approximation of the polar factor of the last two axes of ``x``
    [..., m, n]; leading axes are a batch.

    ``dtype`` is the compute dtype (bfloat16 is ~2x cheaper on accelerators and
    what Jordan and Moonlight use); the result has ``x``'s dtype.
    """
    if x.ndim < 2:
        raise ValueError(f"polar_factor: need a matrix, got shape {x.shape}")
    table, safety = coefficients(coeffs, steps)
    tall = x.shape[-2] > x.shape[-1]
    X = jnp.swapaxes(x, -1, -2) if tall else x
    X = X.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(X), axis=(-2, -1), keepdims=True))
    X = (X / (norm * safety + eps)).astype(dtype)
    for a, b, c in table:
        A = X @ jnp.swapaxes(X, -1, -2)
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    X = jnp.swapaxes(X, -1, -2) if tall else X
    return X.astype(x.dtype)
