"""QK-Clip (Kimi K2, arXiv 2507.20534 §2.1): cap each head's attention logits at τ.

The forward pass records S_h, head h's max pre-softmax logit over the batch.
After the optimizer step, each head with S_h > τ is rescaled with γ_h = τ / S_h
so that, on the same batch, its max logit becomes τ:

- MHA: W_q^h × γ^α and W_k^h × γ^(1−α) (the logit is bilinear in them, so it
  scales by γ for any split α; K2 uses α = 1/2, √γ each side, and so does
  Megatron-LM's ``qk_clip_alpha = 0.5``, megatron/core/transformer/transformer_config.py).
- MLA: the head's no-RoPE query slice × γ^α and no-RoPE key slice × γ^(1−α), its
  RoPE query slice × γ, the RoPE key, shared by all heads, untouched.
- GQA (our rule): a key head is shared by a group of query heads, so, as with
  MLA's shared RoPE key, the key is left alone and the whole γ goes on W_q^h.
  Each head's logits then scale by exactly its own γ_h and heads at or below τ
  are untouched, which √γ on a shared key could not promise.

Heads with S_h ≤ τ, or with a non-finite or non-positive S_h (nothing to clip,
or a broken step that the non-finite guard handles), are left bit-identical.
The clip does not change the current step's forward/backward; it is an
elementwise per-head scale, so it runs on sharded weights without gathering.

Where each head's slices live is a :class:`QKLayout` the caller builds from its
model (k2jax: ``k2jax.optimizer.qk_layout(config)``); this module never imports a model.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim.paths import flatten, path_str


@dataclasses.dataclass(frozen=True)
class ClipTarget:
    """One weight touched by the clip of one layer's heads, or of a stack of layers.

    ``slices`` are (start, stop, power) ranges of the *last* axis: entries in
    [start, stop) of head h are multiplied by γ_h ** power. With ``layer_axis`` set,
    the weight is a stack of consecutive layers (a scanned model's ``[L, ...]`` leaf):
    index i of that axis is layer ``layer + i``.
    """

    path: str
    layer: int
    head_axis: int
    slices: tuple[tuple[int, int, float], ...]
    layer_axis: int | None = None


@dataclasses.dataclass(frozen=True)
class QKLayout:
    num_layers: int
    num_heads: int
    targets: tuple[ClipTarget, ...]

    def by_path(self) -> dict[str, ClipTarget]:
        return {t.path: t for t in self.targets}


class QKClipState(NamedTuple):
    """Statistics of the latest step (for the training loop's metrics) and a running count."""

    clipped: jax.Array  # [L, H] bool: clipped at the latest step
    gamma: jax.Array  # [L, H] f32: γ applied at the latest step (1 where not clipped)
    max_logits: jax.Array  # [L, H] f32: S seen at the latest step
    times_clipped: jax.Array  # [L, H] int32: steps at which each head was clipped


def clip_factors(attn_max_logits, tau: float):
    """(clipped mask [L, H], γ [L, H]); γ = 1 exactly wherever the head is not clipped."""
    s = attn_max_logits.astype(jnp.float32)
    clipped = jnp.isfinite(s) & (s > tau)
    gamma = jnp.where(clipped, tau / jnp.where(clipped, s, 1.0), 1.0)
    return clipped, gamma


def _scale(w, target: ClipTarget, clipped_LH, gamma_LH):
    """w with each head's slices multiplied by γ_h^power (per layer for a stack); other
    entries untouched (bit-identical)."""
    rows = target.layer if target.layer_axis is None else slice(
        target.layer, target.layer + w.shape[target.layer_axis])
    clipped, gamma = clipped_LH[rows], gamma_LH[rows]  # [H] or [n, H]
    col = jnp.arange(w.shape[-1])
    factor = jnp.ones((*clipped.shape, w.shape[-1]), jnp.float32)  # [(n,) H, K]
    mask = jnp.zeros(factor.shape, bool)
    for start, stop, power in target.slices:
        sel = clipped[..., None] & ((col >= start) & (col < stop))
        factor = jnp.where(sel, gamma[..., None] ** power, factor)
        mask = mask | sel
    axes = (() if target.layer_axis is None else (target.layer_axis,)) + (
        target.head_axis, w.ndim - 1)
    assert list(axes) == sorted(set(axes)), (target, w.shape)
    shape = [w.shape[a] if a in axes else 1 for a in range(w.ndim)]
    factor, mask = factor.reshape(shape), mask.reshape(shape)
    return jnp.where(mask, (w.astype(jnp.float32) * factor).astype(w.dtype), w), mask


def clip_params(params, attn_max_logits, layout: QKLayout, tau: float):
    """Apply QK-Clip to a parameter tree directly (outside an optax chain)."""
    clipped, gamma = clip_factors(attn_max_logits, tau)
    targets = layout.by_path()

    def one(kp, w):
        t = targets.get(path_str(kp))
        return w if t is None else _scale(w, t, clipped, gamma)[0]

    return jax.tree_util.tree_map_with_path(one, params)


def clip_qk_logits(layout: QKLayout, tau: float = 100.0, *,
                   monitor_only: bool = False) -> optax.GradientTransformationExtraArgs:
    """The clip as the last link of an optax chain: rewrites the updates u so that
    params + u' = clip(params + u). ``update`` needs ``params`` and the extra arg
    ``attn_max_logits`` [num_layers, num_heads]. ``monitor_only`` records, never clips."""
    if tau <= 0:
        raise ValueError(f"clip_qk_logits: tau={tau} must be positive")
    targets = layout.by_path()
    shape = (layout.num_layers, layout.num_heads)

    def init(params):
        found = flatten(params)
        missing = sorted(set(targets) - set(found))
        if missing:
            raise ValueError(f"qk_clip: layout paths not in the parameter tree: {missing}")
        covered = set()
        for t in layout.targets:
            n = 1 if t.layer_axis is None else found[t.path].shape[t.layer_axis]
            covered.update(range(t.layer, t.layer + n))
        if covered != set(range(layout.num_layers)):
            raise ValueError(f"qk_clip: the layout's weights hold layers {sorted(covered)}, "
                             f"its max logits have {layout.num_layers} layers")
        return QKClipState(jnp.zeros(shape, bool), jnp.ones(shape, jnp.float32),
                           jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32))

    def update(updates, state, params=None, *, attn_max_logits=None, **extra):
        del extra
        if params is None or attn_max_logits is None:
            raise ValueError("qk_clip: update() needs params and attn_max_logits=[layers, heads]")
        if attn_max_logits.shape != shape:
            raise ValueError(f"qk_clip: attn_max_logits has shape {attn_max_logits.shape}, "
                             f"layout expects {shape}")
        clipped, gamma = clip_factors(attn_max_logits, tau)
        new_state = QKClipState(clipped, gamma, attn_max_logits.astype(jnp.float32),
                                state.times_clipped + clipped.astype(jnp.int32))
        if monitor_only:
            return updates, new_state

        def one(kp, u, p):
            t = targets.get(path_str(kp))
            if t is None:
                return u
            new_p, mask = _scale(p + u, t, clipped, gamma)
            return jnp.where(mask, new_p - p, u)

        return jax.tree_util.tree_map_with_path(one, updates, params), new_state

    return optax.GradientTransformationExtraArgs(init, update)


def find_state(opt_state) -> QKClipState | None:
    """The QKClipState inside a (nested) optimizer state, or None."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, QKClipState))
             if isinstance(s, QKClipState)]
    return found[0] if found else None


def stats(state: QKClipState) -> dict[str, jax.Array]:
    """Per-step metrics: heads clipped per layer, fraction of heads clipped, min γ,
    fraction of heads ever clipped."""
    return {
        "qk_clip/heads_clipped_per_layer": state.clipped.sum(-1),
        "qk_clip/fraction_clipped": state.clipped.mean(),
        "qk_clip/min_gamma": state.gamma.min(),
        "qk_clip/fraction_ever_clipped": (state.times_clipped > 0).mean(),
    }
