"""Learning-rate schedules: linear warm-up, then constant, cosine, or warmup-stable-decay.

K2 used 500 warm-up steps, a constant 2e-4 for 10T tokens, then cosine to 2e-5
(arXiv 2507.20534 §3.3): ``wsd`` with ``decay_shape="cosine"`` and
``final_ratio=0.1`` is that recipe on a step budget.
"""

from __future__ import annotations

import jax.numpy as jnp

KINDS = ("constant", "cosine", "wsd")


def schedule(peak: float, *, total_steps: int, warmup_steps: int = 0, kind: str = "constant",
             final_ratio: float = 0.1, decay_fraction: float = 0.2,
             decay_shape: str = "linear"):
    """step -> learning rate (an optax schedule).

    - constant: warm-up, then ``peak``.
    - cosine: warm-up, then cosine from ``peak`` to ``final_ratio·peak`` at ``total_steps``.
    - wsd: warm-up, ``peak`` until the last ``decay_fraction`` of training, then a
      linear (or cosine) decay to ``final_ratio·peak``.
    """
    if kind not in KINDS:
        raise ValueError(f"schedule: kind={kind!r} must be one of {', '.join(KINDS)}")
    if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
        raise ValueError(f"schedule: need 0 <= warmup_steps={warmup_steps} <= "
                         f"total_steps={total_steps}, total_steps >= 1")
    if not 0 <= final_ratio <= 1 or not 0 <= decay_fraction <= 1:
        raise ValueError("schedule: final_ratio and decay_fraction must be in [0, 1]")
    if decay_shape not in ("linear", "cosine"):
        raise ValueError(f"schedule: decay_shape={decay_shape!r} must be linear or cosine")
    decay_start = warmup_steps if kind == "cosine" else max(
        warmup_steps, round(total_steps * (1 - decay_fraction)))
    shape = "cosine" if kind == "cosine" else decay_shape

    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum(1.0, (step + 1) / max(warmup_steps, 1))
        if kind == "constant":
            return warm
        frac = jnp.clip((step - decay_start) / max(total_steps - decay_start, 1), 0.0, 1.0)
        if shape == "cosine":
            mult = final_ratio + (1 - final_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
        else:
            mult = 1 - (1 - final_ratio) * frac
        return jnp.where(step < warmup_steps, warm, peak * mult)

    return lr
