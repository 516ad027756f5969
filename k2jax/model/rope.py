"""Rotary position embedding (Su et al. 2021) with YaRN frequency scaling.

Layout: *interleaved* pairs, i.e. dims (2i, 2i+1) rotate together by angle
pos·θ_i. This is the layout of DeepSeek-V3 / Kimi-K2 checkpoints
(transformers' ``rope_interleave=True``), so their weights need no permutation.

YaRN (Peng et al. 2023, arXiv 2309.00071, §3.2-3.4), in DeepSeek-V3's form
(its reference ``yarn_find_correction_range`` / ``yarn_linear_ramp_mask``):
frequencies whose wavelength is short compared with the original context keep
their value, long-wavelength ones are divided by the extension factor s, and
a linear ramp over *dimension index* between the correction dims of
``beta_fast`` and ``beta_slow`` blends the two. The attention temperature
mscale = 0.1·ln(s) + 1 multiplies the softmax scale twice (once per q and k),
via ``mscale_all_dim``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from k2jax.config import YarnConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's temperature factor √(1/t) = 0.1·m·ln(s) + 1 (s > 1), else 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The dimension index whose frequency turns ``num_rotations`` times over ``max_pos``."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(dim: int, base: float, yarn: YarnConfig | None = None) -> np.ndarray:
    """Inverse frequencies θ_i, i < dim/2 ([R / 2] for dim = R), float64 on the host
    (exact, then cast)."""
    extrapolation = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if yarn is None or yarn.factor <= 1.0:
        return extrapolation
    interpolation = extrapolation / yarn.factor
    orig = yarn.original_max_position_embeddings
    low = max(math.floor(_correction_dim(yarn.beta_fast, dim, base, orig)), 0)
    high = min(math.ceil(_correction_dim(yarn.beta_slow, dim, base, orig)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp, as the reference does
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1: keep the original frequency, 0: interpolate
    return interpolation * (1.0 - keep) + extrapolation * keep


def softmax_scale(qk_head_dim: int, yarn: YarnConfig | None) -> float:
    """1/√d, times mscale(s, mscale_all_dim)² when mscale_all_dim is given (DeepSeek-V3's MLA)."""
    scale = qk_head_dim ** -0.5
    if yarn is not None and yarn.mscale_all_dim:
        m = yarn_mscale(yarn.factor, yarn.mscale_all_dim)
        scale *= m * m
    return scale


def cos_sin_scale(yarn: YarnConfig | None) -> float:
    """Factor on cos/sin: mscale(s, mscale) / mscale(s, mscale_all_dim) when both are given
    (1 for K2 and DeepSeek-V3, whose temperature is in the softmax scale), otherwise the
    plain YaRN temperature mscale(s, 1), as transformers' ``_compute_yarn_parameters``."""
    if yarn is None or yarn.factor <= 1:
        return 1.0
    if yarn.mscale and yarn.mscale_all_dim:
        return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor,
                                                                   yarn.mscale_all_dim)
    return yarn_mscale(yarn.factor, 1.0)


def apply_rope(x_BTHR, positions_BT, inv_freq: np.ndarray, scale: float = 1.0):
    """Rotate interleaved pairs of the last axis of x [B, T, H, R] by pos·θ.

    ``inv_freq`` is [R / 2] (``inv_frequencies(R, ...)``); H may be 1, broadcast over heads.
    """
    angles = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(
        inv_freq, jnp.float32)  # [B, T, R / 2]
    cos = (jnp.cos(angles) * scale)[:, :, None, :]
    sin = (jnp.sin(angles) * scale)[:, :, None, :]
    x = x_BTHR.astype(jnp.float32)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    out_even = x_even * cos - x_odd * sin
    out_odd = x_even * sin + x_odd * cos
    out = jnp.stack([out_even, out_odd], axis=-1).reshape(x.shape)
    return out.astype(x_BTHR.dtype)
