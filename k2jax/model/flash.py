"""Blockwise causal attention with an online softmax, returning each head's max logit.

Why: the reference path (``attention.causal_attention``) holds the whole [B, H, T, S]
logit matrix, and autodiff keeps its softmax for the backward pass: at Kimi K2's shape
(64 heads, T = 4096) that is 4 GiB of float32 per sequence per layer. Here the logits
exist one [B, H, block_q, block_kv] tile at a time.

Forward (FlashAttention, Dao et al. 2022, arXiv 2205.14135, Algorithm 1): for each query
block, a loop over key/value blocks keeps the running row maximum m, the running sum l of
exp(logit - m) and the un-normalised output; each new block rescales them by
exp(m_old - m_new). Only blocks on or below the causal diagonal are visited, so the
inner trip count depends on the query block (legal because the backward pass is written
by hand, not derived by autodiff, which cannot reverse a loop of dynamic length).

Backward (FlashAttention-2, Dao 2023, arXiv 2307.08691, Algorithm 2): the forward pass
saves only its output and the per-row log-sum-exp lse = m + log l; each tile's
probabilities are recomputed as exp(logit - lse). An outer loop over key/value blocks
carries that block's dK, dV through an inner loop over the query blocks that see it, and
each tile adds its share of dQ into one float32 buffer the size of q; D = rowsum(dO ∘ O)
stands in for the softmax Jacobian. Being a ``jax.custom_vjp``, the kernel has reverse-mode
derivatives only: jvp, jacfwd or a Hessian through it raise (use ``reference`` for those).

QK-Clip's S_h (Kimi K2, arXiv 2507.20534 §2.1) is the max of the final row maxima m over
batch and real query rows: the online softmax computes it anyway. T need not divide by
the block sizes: q, k, v are zero-padded at the end. A padded key sits after every real
query, so the causal mask alone keeps it out of every real row's softmax and maximum;
padded query rows are left out of S_h, sliced off the output, and their zero cotangent
adds nothing to the gradients.

Names: a block of queries is ``q_BHTK`` (its rows are query positions, T; keys S), with
heads before time so that tiles are contiguous matmul operands. Stacks of blocks have an
axis that is no letter of the legend (the block index) and carry a shape comment.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


class Tiling(NamedTuple):
    """What the kernel holds static (hashable, so custom_vjp can keep it out of autodiff)."""

    scale: float  # softmax scale, applied to float32 logits as the reference does
    block_q: int
    block_kv: int
    dtype: np.dtype  # compute dtype: matmul operands, probabilities before the PV matmul
    record_max: bool  # False only to measure what recording S_h costs (benchmarks)


def flash_attention(q_BTHK, k_BSHK, v_BSHU, *, scale: float, block_q: int = 512,
                    block_kv: int = 512, dtype=None, record_max: bool = True):
    """Causal attention softmax(scale · q kᵀ) v by blocks -> (out [B, T, H, U], max_logit [H]).

    Query t attends to keys s <= t (S = T, mask by array index). ``max_logit`` [H] float32
    is the max over batch and causal pairs of the scaled logit, stop-gradient'ed; with
    ``record_max=False`` it is zeros. Blocks larger than T shrink to T.
    """
    t, s = q_BTHK.shape[1], k_BSHK.shape[1]
    assert s == t, f"causal self-attention needs S == T, got {s} != {t}"
    tiling = Tiling(float(scale), min(block_q, t), min(block_kv, t),
                    jnp.dtype(dtype or q_BTHK.dtype), record_max)
    out_BTHU, max_logit_H = _attention(tiling, q_BTHK, k_BSHK, v_BSHU)
    return out_BTHU, jax.lax.stop_gradient(max_logit_H)


def _to_blocks(x_BTHK, rows: int):
    """[B, T, H, K] -> [ceil(T / rows), B, H, rows, K], zero-padded at the end of T."""
    b, t, h, k = x_BTHK.shape
    n = -(-t // rows)
    x_BTHK = jnp.pad(x_BTHK, ((0, 0), (0, n * rows - t), (0, 0), (0, 0)))
    return x_BTHK.reshape(b, n, rows, h, k).transpose(1, 0, 3, 2, 4)


def _from_blocks(blocks, t: int):
    """Inverse of :func:`_to_blocks`: [n, B, H, rows, K] -> [B, T, H, K]."""
    n, b, h, rows, k = blocks.shape
    return blocks.transpose(1, 0, 3, 2, 4).reshape(b, n * rows, h, k)[:, :t]


def _masked_logits(tiling: Tiling, q_BHTK, k_BHSK, i, j):
    """Scaled float32 logits of query block i against key block j; -inf where s > t (which
    also hides padded keys, s >= T, from real rows t < T)."""
    logits_BHTS = jnp.einsum("bhtk,bhsk->bhts", q_BHTK.astype(tiling.dtype),
                             k_BHSK.astype(tiling.dtype), preferred_element_type=F32)
    q_pos = i * tiling.block_q + jnp.arange(tiling.block_q)[:, None]
    k_pos = j * tiling.block_kv + jnp.arange(tiling.block_kv)[None, :]
    return jnp.where(k_pos <= q_pos, logits_BHTS * tiling.scale, -jnp.inf)


def _kv_blocks_below_diagonal(tiling: Tiling, i, n_kv: int):
    """How many key blocks query block i sees: those starting at or before its last row."""
    return jnp.minimum(n_kv, ((i + 1) * tiling.block_q - 1) // tiling.block_kv + 1)


def _forward_step(tiling: Tiling, q_BHTK, k_blocks, v_blocks, i, j, carry):
    """One online-softmax update (arXiv 2205.14135 Algorithm 1, lines 9-12)."""
    m_BHT, l_BHT, acc_BHTU = carry
    logits_BHTS = _masked_logits(tiling, q_BHTK, k_blocks[j], i, j)
    # Key block 0 holds key 0, which every row sees: m is finite from the first step on.
    m_new_BHT = jnp.maximum(m_BHT, logits_BHTS.max(axis=-1))
    p_BHTS = jnp.exp(logits_BHTS - m_new_BHT[..., None])
    rescale_BHT = jnp.exp(m_BHT - m_new_BHT)
    l_BHT = rescale_BHT * l_BHT + p_BHTS.sum(axis=-1)
    pv_BHTU = jnp.einsum("bhts,bhsu->bhtu", p_BHTS.astype(tiling.dtype),
                         v_blocks[j].astype(tiling.dtype), preferred_element_type=F32)
    return m_new_BHT, l_BHT, rescale_BHT[..., None] * acc_BHTU + pv_BHTU


def _forward_query_block(tiling: Tiling, k_blocks, v_blocks, t: int, args):
    """Output, log-sum-exp and per-head row maximum of one query block."""
    i, q_BHTK = args
    b, h, rows, _ = q_BHTK.shape
    u = v_blocks.shape[-1]
    init = (jnp.full((b, h, rows), -jnp.inf, F32), jnp.zeros((b, h, rows), F32),
            jnp.zeros((b, h, rows, u), F32))
    step = functools.partial(_forward_step, tiling, q_BHTK, k_blocks, v_blocks, i)
    n_kv = _kv_blocks_below_diagonal(tiling, i, k_blocks.shape[0])
    m_BHT, l_BHT, acc_BHTU = jax.lax.fori_loop(0, n_kv, step, init)
    out_BHTU = (acc_BHTU / l_BHT[..., None]).astype(tiling.dtype)
    if tiling.record_max:
        real_T = i * tiling.block_q + jnp.arange(rows) < t
        max_H = jnp.max(jnp.where(real_T, m_BHT, -jnp.inf), axis=(0, 2))
    else:
        max_H = jnp.zeros((h,), F32)
    return out_BHTU, m_BHT + jnp.log(l_BHT), max_H


def _forward(tiling: Tiling, q_BTHK, k_BSHK, v_BSHU):
    """(out [B, T, H, U], lse [n_q, B, H, block_q], max_logit [H])."""
    t = q_BTHK.shape[1]
    q_blocks = _to_blocks(q_BTHK, tiling.block_q)  # [n_q, B, H, block_q, K]
    k_blocks = _to_blocks(k_BSHK, tiling.block_kv)  # [n_kv, B, H, block_kv, K]
    v_blocks = _to_blocks(v_BSHU, tiling.block_kv)  # [n_kv, B, H, block_kv, U]
    one = functools.partial(_forward_query_block, tiling, k_blocks, v_blocks, t)
    out_blocks, lse_blocks, max_blocks = jax.lax.map(
        one, (jnp.arange(q_blocks.shape[0]), q_blocks))
    return _from_blocks(out_blocks, t), lse_blocks, max_blocks.max(axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(tiling: Tiling, q_BTHK, k_BSHK, v_BSHU):
    out_BTHU, _, max_logit_H = _forward(tiling, q_BTHK, k_BSHK, v_BSHU)
    return out_BTHU, max_logit_H


def _attention_fwd(tiling: Tiling, q_BTHK, k_BSHK, v_BSHU):
    out_BTHU, lse_blocks, max_logit_H = _forward(tiling, q_BTHK, k_BSHK, v_BSHU)
    return (out_BTHU, max_logit_H), (q_BTHK, k_BSHK, v_BSHU, out_BTHU, lse_blocks)


def _backward_step(tiling: Tiling, q_blocks, do_blocks, lse_blocks, delta_blocks, k_BHSK,
                   v_BHSU, j, i, carry):
    """One tile of arXiv 2307.08691 Algorithm 2 (lines 11-20): query block i, key block j."""
    dq_blocks, dk_BHSK, dv_BHSU = carry
    dt = tiling.dtype
    q_BHTK, do_BHTU = q_blocks[i].astype(dt), do_blocks[i].astype(dt)
    logits_BHTS = _masked_logits(tiling, q_BHTK, k_BHSK, i, j)
    p_BHTS = jnp.exp(logits_BHTS - lse_blocks[i][..., None])
    dv_BHSU = dv_BHSU + jnp.einsum("bhts,bhtu->bhsu", p_BHTS.astype(dt), do_BHTU,
                                   preferred_element_type=F32)
    dp_BHTS = jnp.einsum("bhtu,bhsu->bhts", do_BHTU, v_BHSU.astype(dt),
                         preferred_element_type=F32)
    # d logit = p (dp - D); the scale comes back in through d(scale · q kᵀ).
    ds_BHTS = (p_BHTS * (dp_BHTS - delta_blocks[i][..., None]) * tiling.scale).astype(dt)
    dq_BHTK = jnp.einsum("bhts,bhsk->bhtk", ds_BHTS, k_BHSK.astype(dt),
                         preferred_element_type=F32)
    dk_BHSK = dk_BHSK + jnp.einsum("bhts,bhtk->bhsk", ds_BHTS, q_BHTK,
                                   preferred_element_type=F32)
    return dq_blocks.at[i].add(dq_BHTK), dk_BHSK, dv_BHSU


def _backward_kv_block(tiling: Tiling, q_blocks, do_blocks, lse_blocks, delta_blocks,
                       dq_blocks, args):
    """dK, dV of key block j, and its share of dQ, over the query blocks that see it."""
    j, k_BHSK, v_BHSU = args
    step = functools.partial(_backward_step, tiling, q_blocks, do_blocks, lse_blocks,
                             delta_blocks, k_BHSK, v_BHSU, j)
    first_i = (j * tiling.block_kv) // tiling.block_q  # earlier query blocks see no key of j
    init = (dq_blocks, jnp.zeros(k_BHSK.shape, F32), jnp.zeros(v_BHSU.shape, F32))
    dq_blocks, dk_BHSK, dv_BHSU = jax.lax.fori_loop(first_i, q_blocks.shape[0], step, init)
    return dq_blocks, (dk_BHSK, dv_BHSU)


def _attention_bwd(tiling: Tiling, residuals, cotangents):
    q_BTHK, k_BSHK, v_BSHU, out_BTHU, lse_blocks = residuals
    do_BTHU, _ = cotangents  # max_logit is stop-gradient'ed: its cotangent is dropped
    t = q_BTHK.shape[1]
    delta_BTH = jnp.sum(do_BTHU.astype(F32) * out_BTHU.astype(F32), axis=-1)
    q_blocks = _to_blocks(q_BTHK, tiling.block_q)  # [n_q, B, H, block_q, K]
    do_blocks = _to_blocks(do_BTHU, tiling.block_q)  # [n_q, B, H, block_q, U]
    delta_blocks = _to_blocks(delta_BTH[..., None], tiling.block_q)[..., 0]
    k_blocks = _to_blocks(k_BSHK, tiling.block_kv)  # [n_kv, B, H, block_kv, K]
    v_blocks = _to_blocks(v_BSHU, tiling.block_kv)  # [n_kv, B, H, block_kv, U]
    one = functools.partial(_backward_kv_block, tiling, q_blocks, do_blocks, lse_blocks,
                            delta_blocks)
    dq_blocks, (dk_blocks, dv_blocks) = jax.lax.scan(
        one, jnp.zeros(q_blocks.shape, F32), (jnp.arange(k_blocks.shape[0]), k_blocks,
                                              v_blocks))
    return (_from_blocks(dq_blocks, t).astype(q_BTHK.dtype),
            _from_blocks(dk_blocks, t).astype(k_BSHK.dtype),
            _from_blocks(dv_blocks, t).astype(v_BSHU.dtype))


_attention.defvjp(_attention_fwd, _attention_bwd)
