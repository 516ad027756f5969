"""Parameters with logical axis names, RMSNorm and SwiGLU: the shared building blocks.

Every parameter carries ``axes`` metadata (one logical name per dimension).
``k2jax.sharding`` maps those names to mesh axes; the model never names a
mesh axis itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.config import ModelConfig

Axes = tuple[str | None, ...]


class SelectionBias(nnx.Variable):
    """Per-expert routing bias of aux-loss-free balancing: state, not a parameter.

    It receives no gradient and is not an optimizer target; the training step
    nudges it toward balanced load (DeepSeek-V3, arXiv 2412.19437, §2.1.2).
    """


def dtypes(cfg: ModelConfig) -> tuple[jnp.dtype, jnp.dtype]:
    """(compute dtype, parameter dtype)."""
    return jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)


def param(rngs: nnx.Rngs, cfg: ModelConfig, shape: tuple[int, ...], axes: Axes,
          init: str = "normal") -> nnx.Param:
    """A parameter of ``shape`` named by ``axes``: normal(initializer_range) or ones."""
    assert len(shape) == len(axes), (shape, axes)
    _, pdt = dtypes(cfg)
    if init == "ones":
        value = jnp.ones(shape, pdt)
    else:
        value = cfg.initializer_range * jax.random.normal(rngs.params(), shape, pdt)
    return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
    """RMSNorm (Zhang & Sennrich 2019), statistics in float32 as in DeepSeek-V3."""

    def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs, axis_name: str = "norm",
                 eps: float | None = None):
        self.scale = param(rngs, cfg, (dim,), (axis_name,), init="ones")
        self.eps = cfg.rms_norm_eps if eps is None else eps

    def __call__(self, x):
        dt = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(dt) * x32.astype(dt)  # cast, then scale: as transformers


class MLP(nnx.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(x·gate) ⊙ x·up).

    Used for the first ``first_k_dense_replace`` layers and for shared experts
    (a shared expert of width n_shared·F is n_shared experts of width F summed).
    """

    def __init__(self, cfg: ModelConfig, width: int, *, rngs: nnx.Rngs, axis_name: str = "mlp"):
        d = cfg.hidden_size
        self.gate = param(rngs, cfg, (d, width), ("embed", axis_name))
        self.up = param(rngs, cfg, (d, width), ("embed", axis_name))
        self.down = param(rngs, cfg, (width, d), (axis_name, "embed"))
        self.dtype = dtypes(cfg)[0]

    def __call__(self, x_BTD):
        dt = self.dtype
        x = x_BTD.astype(dt)
        h = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
        return h @ self.down[...].astype(dt)
