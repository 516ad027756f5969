"""adamw | muon | muonclip from one factory, so that an ablation differs in one switch.

All three share the AdamW group (b1 0.9, b2 0.95, decoupled weight decay) and
the learning-rate schedule; Muon replaces AdamW on the leaves the partition
gives it; QK-Clip (``qk_layout``) chains after either optimizer. ``decay_mask``
(a callable params -> bool tree, as ``optax.add_decayed_weights`` takes it)
says which leaves decay, in both groups; None decays every leaf.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import optax

from optim.distributed_ns import Placement
from optim.muon import UpdateScale, scale_by_muon
from optim.partition import DEFAULT, Partition
from optim.qk_clip import QKLayout, clip_qk_logits

LR = float | Callable


def _adamw_chain(lr: LR, *, b1: float, b2: float, eps: float, weight_decay: float,
                 decay_mask: Callable | None, mu_dtype):
    return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
                       optax.add_decayed_weights(weight_decay, decay_mask),
                       optax.scale_by_learning_rate(lr))


def build(kind: str, learning_rate: LR, *, weight_decay: float = 0.1, b1: float = 0.9,
          b2: float = 0.95, eps: float = 1e-8, momentum: float = 0.95, nesterov: bool = True,
          ns_steps: int = 5, ns_coeffs="jordan", ns_dtype=jnp.float32,
          update_scale: UpdateScale = "k2", rms_scale: float = 0.2,
          partition: Partition | None = None, adam_learning_rate: LR | None = None,
          adam_weight_decay: float | None = None, decay_mask: Callable | None = None,
          qk_layout: QKLayout | None = None, tau: float = 100.0, monitor_only: bool = False,
          mu_dtype=None,
          placement: Placement | None = None) -> optax.GradientTransformationExtraArgs:
    """An optimizer: ``kind`` 'adamw' or 'muon', plus QK-Clip when ``qk_layout`` is given.

    Muon's group: W ← W − η(O + λW) (K2 Algorithm 1). AdamW's group gets
    ``adam_learning_rate`` / ``adam_weight_decay``, by default the same as Muon's
    (Moonlight's RMS matching makes them transferable). ``mu_dtype`` is the dtype of
    Muon's momentum and Adam's first moment (None: the parameter's). ``placement`` splits
    Newton–Schulz across a mesh (optim.distributed_ns).
    """
    adam_lr = learning_rate if adam_learning_rate is None else adam_learning_rate
    adam_wd = weight_decay if adam_weight_decay is None else adam_weight_decay
    adamw = _adamw_chain(adam_lr, b1=b1, b2=b2, eps=eps, weight_decay=adam_wd,
                         decay_mask=decay_mask, mu_dtype=mu_dtype)
    if kind == "adamw":
        tx = adamw
    elif kind == "muon":
        part = partition or DEFAULT
        muon = optax.chain(
            scale_by_muon(part.dims, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                          ns_coeffs=ns_coeffs, ns_dtype=ns_dtype, update_scale=update_scale,
                          rms_scale=rms_scale, mu_dtype=mu_dtype, placement=placement),
            optax.add_decayed_weights(weight_decay, decay_mask),
            optax.scale_by_learning_rate(learning_rate))
        tx = optax.partition({"muon": muon, "adamw": adamw}, part.labels)
    else:
        raise ValueError(f"optimizer kind {kind!r} must be 'adamw' or 'muon'")
    links = [tx]
    if qk_layout is not None:
        links.append(clip_qk_logits(qk_layout, tau, monitor_only=monitor_only))
    return optax.chain(*links)


def adamw(learning_rate: LR, **kwargs) -> optax.GradientTransformationExtraArgs:
    """AdamW (b1 0.9, b2 0.95, decoupled wd); add ``qk_layout=`` for AdamW + QK-Clip."""
    return build("adamw", learning_rate, **kwargs)


def muon(learning_rate: LR, **kwargs) -> optax.GradientTransformationExtraArgs:
    """Muon on the partition's matrices, AdamW on the rest; no clip unless ``qk_layout``."""
    return build("muon", learning_rate, **kwargs)


def muonclip(learning_rate: LR, *, qk_layout: QKLayout, tau: float = 100.0,
             weight_decay: float = 0.1, **kwargs) -> optax.GradientTransformationExtraArgs:
    """MuonClip (Kimi K2 Algorithm 1): Muon, then QK-Clip at threshold ``tau``."""
    return build("muon", learning_rate, qk_layout=qk_layout, tau=tau,
                 weight_decay=weight_decay, **kwargs)
