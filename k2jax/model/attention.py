"""Multi-head latent attention (MLA) and MHA/GQA, both recording per-head max logits.

MLA follows DeepSeek-V2/V3 (arXiv 2405.04434 §2.1, 2412.19437 §2.1.1):
queries optionally pass a low-rank bottleneck (q_a → RMSNorm → q_b); keys and
values come from a shared latent c_kv (kv_a → RMSNorm → kv_b), and position
enters only through a decoupled RoPE part: a per-head RoPE query q^R_h and
one RoPE key k^R shared by all heads, produced by kv_a alongside c_kv.

Per-head weights are stored with an explicit ``heads`` axis (e.g. q_b is
[Q, H, P + R]: q-LoRA rank, heads, no-RoPE + RoPE width; letters as in the
k2jax.model docstring) so that QK-Clip and tensor parallelism address a head
by index rather than by reshaping a flat matrix.

The causal mask is by array index: ``positions_BT`` moves RoPE only (packed
documents attend across their boundaries, as in nanoGPT-style training).

Every call returns, besides the output, S_h = max over batch and causal
(query, key) pairs of the pre-softmax logit, exactly the value the softmax
sees (scale and YaRN mscale included). QK-Clip (Kimi K2, arXiv 2507.20534
§2.1) consumes it after the optimizer step (k2jax/optimizer.py says where each
head's weights live). ``cfg.attention_impl`` picks how it is computed:

- ``reference``: :func:`causal_attention` on the whole [B, H, T, S] logit matrix, which
  autodiff keeps for the backward pass; S_h is one more max-reduction over it. Simple,
  and the tests' reference, but O(T²) memory per head.
- ``chunked`` (the default): k2jax/model/flash.py, blockwise with an online softmax and
  a hand-written backward pass, O(T) memory; S_h is the max of the online softmax's row
  maxima. MLA feeds it q = [q^C; q^R] and k = [k^C; k^R broadcast over heads], whose dot
  product is the sum of the two logit terms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.config import ModelConfig
from k2jax.model import flash, rope
from k2jax.model.layers import RMSNorm, dtypes, param


def causal_attention(logits_BHTS, v_BSHU, dtype):
    """Causal softmax attention on precomputed logits -> (out [B, T, H, U], max_logit [H])."""
    t, s = logits_BHTS.shape[-2:]
    mask_TS = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
    masked = jnp.where(mask_TS, logits_BHTS, -jnp.inf)
    max_logit_H = jax.lax.stop_gradient(jnp.max(masked, axis=(0, 2, 3)))
    probs_BHTS = jax.nn.softmax(masked, axis=-1).astype(dtype)
    out_BTHU = jnp.einsum("bhts,bshu->bthu", probs_BHTS, v_BSHU.astype(dtype))
    return out_BTHU, max_logit_H


def _positions(x_BTD, positions_BT):
    if positions_BT is not None:
        return positions_BT
    b, t = x_BTD.shape[:2]
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _chunked(cfg: ModelConfig, q_BTHK, k_BSHK, v_BSHU, scale: float, dt):
    return flash.flash_attention(q_BTHK, k_BSHK, v_BSHU, scale=scale, dtype=dt,
                                 block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv)


def _mla_attend(cfg: ModelConfig, q_nope_BTHP, qr_BTHR, k_nope_BSHP, kr_BSHR, v_BSHU, dt):
    """MLA's logit q^C·k^C + q^R·k^R (kr's head axis may be 1: shared by all heads)."""
    scale = rope.softmax_scale(cfg.qk_head_dim, cfg.rope_scaling)
    if cfg.attention_impl == "chunked":
        kr_BSHR = jnp.broadcast_to(kr_BSHR, (*k_nope_BSHP.shape[:3], kr_BSHR.shape[-1]))
        q_BTHK = jnp.concatenate([q_nope_BTHP, qr_BTHR], axis=-1)
        k_BSHK = jnp.concatenate([k_nope_BSHP, kr_BSHR], axis=-1)
        return _chunked(cfg, q_BTHK, k_BSHK, v_BSHU, scale, dt)
    f32 = jnp.float32
    logits_BHTS = (
        jnp.einsum("bthp,bshp->bhts", q_nope_BTHP, k_nope_BSHP, preferred_element_type=f32)
        + jnp.einsum("bthr,bshr->bhts", qr_BTHR, kr_BSHR, preferred_element_type=f32)
    ) * scale
    return causal_attention(logits_BHTS, v_BSHU, dt)


# The latent norms use a fixed eps, whatever rms_norm_eps: DeepSeek-V3's reference code
# and transformers' DeepseekV3Attention both build them with the default 1e-6.
LATENT_NORM_EPS = 1e-6


class MLA(nnx.Module):
    """Multi-head latent attention with decoupled RoPE (DeepSeek-V3 / Kimi K2)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.num_attention_heads
        nope, rdim, vdim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if cfg.q_lora_rank:
            self.q_a = param(rngs, cfg, (d, cfg.q_lora_rank), ("embed", "q_lora"))
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg, rngs=rngs, axis_name="q_lora",
                                    eps=LATENT_NORM_EPS)
            self.q_b = param(rngs, cfg, (cfg.q_lora_rank, h, nope + rdim),
                             ("q_lora", "heads", "qk_head"))
        else:
            self.q_proj = param(rngs, cfg, (d, h, nope + rdim), ("embed", "heads", "qk_head"))
        self.kv_a = param(rngs, cfg, (d, cfg.kv_lora_rank + rdim), ("embed", "kv_lora"))
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, cfg, rngs=rngs, axis_name="kv_lora",
                                 eps=LATENT_NORM_EPS)
        self.kv_b = param(rngs, cfg, (cfg.kv_lora_rank, h, nope + vdim),
                          ("kv_lora", "heads", "kv_head"))
        self.o = param(rngs, cfg, (h, vdim, d), ("heads", "v_head", "embed"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(nope + rdim, cfg, rngs=rngs, axis_name="qk_head")
            self.k_norm = RMSNorm(nope + rdim, cfg, rngs=rngs, axis_name="qk_head")
        self.cfg = cfg

    def __call__(self, x_BTD, positions_BT=None):
        cfg = self.cfg
        dt, _ = dtypes(cfg)
        nope, lora = cfg.qk_nope_head_dim, cfg.kv_lora_rank
        x = x_BTD.astype(dt)
        if cfg.q_lora_rank:
            cq_BTQ = self.q_a_norm(x @ self.q_a[...].astype(dt))
            q_BTHK = jnp.einsum("btq,qhk->bthk", cq_BTQ, self.q_b[...].astype(dt))
        else:
            q_BTHK = jnp.einsum("btd,dhk->bthk", x, self.q_proj[...].astype(dt))
        kv_a_out = x @ self.kv_a[...].astype(dt)  # [B, T, C + R]
        ckv_BTC, kr_BTR = kv_a_out[..., :lora], kv_a_out[..., lora:]
        kv_b_out = jnp.einsum("btc,chj->bthj", self.kv_a_norm(ckv_BTC),
                              self.kv_b[...].astype(dt))  # [B, T, H, P + U]
        k_nope_BTHP, v_BTHU = kv_b_out[..., :nope], kv_b_out[..., nope:]
        if cfg.qk_norm:
            # Normalise the whole head (no-RoPE and RoPE parts) before rotation.
            h = cfg.num_attention_heads
            q_BTHK = self.q_norm(q_BTHK)
            kr_BTHR = jnp.broadcast_to(kr_BTR[:, :, None, :], (*kr_BTR.shape[:2], h,
                                                               kr_BTR.shape[-1]))
            k_BTHK = self.k_norm(jnp.concatenate([k_nope_BTHP, kr_BTHR], axis=-1))
            k_nope_BTHP, kr_BTHR = k_BTHK[..., :nope], k_BTHK[..., nope:]
        else:
            kr_BTHR = kr_BTR[:, :, None, :]  # [B, T, 1, R]: one RoPE key shared by all heads
        q_nope_BTHP, qr_BTHR = q_BTHK[..., :nope], q_BTHK[..., nope:]
        pos = _positions(x_BTD, positions_BT)
        inv_freq = rope.inv_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        cs = rope.cos_sin_scale(cfg.rope_scaling)
        qr_BTHR = rope.apply_rope(qr_BTHR, pos, inv_freq, cs)
        kr_BTHR = rope.apply_rope(kr_BTHR, pos, inv_freq, cs)
        out_BTHU, max_logit_H = _mla_attend(cfg, q_nope_BTHP, qr_BTHR, k_nope_BTHP, kr_BTHR,
                                            v_BTHU, dt)
        y_BTD = jnp.einsum("bthu,hud->btd", out_BTHU, self.o[...].astype(dt))
        return y_BTD, max_logit_H


class MHA(nnx.Module):
    """Multi-head attention with RoPE on the whole head; GQA when kv heads G < heads H.

    Query head h reads key/value head h // (H / G), the usual grouping. Here the
    value width U equals the q/k width K (both ``head_dim``).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.mha_head_dim
        self.q_proj = param(rngs, cfg, (d, h, hd), ("embed", "heads", "qk_head"))
        self.k_proj = param(rngs, cfg, (d, hkv, hd), ("embed", "kv_heads", "qk_head"))
        self.v_proj = param(rngs, cfg, (d, hkv, hd), ("embed", "kv_heads", "v_head"))
        self.o = param(rngs, cfg, (h, hd, d), ("heads", "v_head", "embed"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg, rngs=rngs, axis_name="qk_head")
            self.k_norm = RMSNorm(hd, cfg, rngs=rngs, axis_name="qk_head")
        self.cfg = cfg

    def __call__(self, x_BTD, positions_BT=None):
        cfg = self.cfg
        dt, _ = dtypes(cfg)
        group = cfg.num_attention_heads // cfg.kv_heads
        x = x_BTD.astype(dt)
        q_BTHK = jnp.einsum("btd,dhk->bthk", x, self.q_proj[...].astype(dt))
        k_BTGK = jnp.einsum("btd,dgk->btgk", x, self.k_proj[...].astype(dt))
        v_BTGU = jnp.einsum("btd,dgu->btgu", x, self.v_proj[...].astype(dt))
        if cfg.qk_norm:
            q_BTHK, k_BTGK = self.q_norm(q_BTHK), self.k_norm(k_BTGK)
        pos = _positions(x_BTD, positions_BT)
        inv_freq = rope.inv_frequencies(cfg.mha_head_dim, cfg.rope_theta, cfg.rope_scaling)
        cs = rope.cos_sin_scale(cfg.rope_scaling)
        q_BTHK = rope.apply_rope(q_BTHK, pos, inv_freq, cs)
        k_BTGK = rope.apply_rope(k_BTGK, pos, inv_freq, cs)
        k_BTHK = jnp.repeat(k_BTGK, group, axis=2)
        v_BTHU = jnp.repeat(v_BTGU, group, axis=2)
        scale = rope.softmax_scale(cfg.qk_head_dim, cfg.rope_scaling)
        if cfg.attention_impl == "chunked":
            out_BTHU, max_logit_H = _chunked(cfg, q_BTHK, k_BTHK, v_BTHU, scale, dt)
        else:
            logits_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BTHK,
                                     preferred_element_type=jnp.float32)
            out_BTHU, max_logit_H = causal_attention(logits_BHTS * scale, v_BTHU, dt)
        y_BTD = jnp.einsum("bthu,hud->btd", out_BTHU, self.o[...].astype(dt))
        return y_BTD, max_logit_H


def make_attention(cfg: ModelConfig, *, rngs: nnx.Rngs) -> MLA | MHA:
    return MLA(cfg, rngs=rngs) if cfg.attention == "mla" else MHA(cfg, rngs=rngs)
