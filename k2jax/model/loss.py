"""Next-token cross-entropy with optional z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_BTV, targets_BT, *, z_loss: float = 0.0, mask_BT=None):
    """Mean token cross-entropy in float32, plus z_loss · mean(log Z)².

    The z-loss keeps the softmax normaliser near 1 and so stops output-logit
    divergence (PaLM, arXiv 2204.02311 §5; Wortsman et al. 2023, arXiv
    2309.14322 §3.2, weight 1e-4). Returns (loss, {"ce": ..., "z_loss": ...}).
    """
    logits = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits, axis=-1)
    safe_targets = jnp.clip(targets_BT, 0, logits.shape[-1] - 1)  # masked ids may be -100
    target_logit_BT = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
    nll_BT = log_z_BT - target_logit_BT
    mask = jnp.ones_like(nll_BT) if mask_BT is None else mask_BT.astype(jnp.float32)
    denom = jnp.maximum(mask.sum(), 1.0)
    ce = jnp.where(mask > 0, nll_BT, 0.0).sum() / denom
    zl = jnp.where(mask > 0, jnp.square(log_z_BT), 0.0).sum() / denom
    return ce + z_loss * zl, {"ce": ce, "z_loss": zl}
