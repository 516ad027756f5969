"""Sigmoid-routed, dropless mixture of experts with shared experts (DeepSeek-V3 / Kimi K2).

Routing (DeepSeek-V3, arXiv 2412.19437, §2.1.2): s = sigmoid(x·W_r) in float32.
Experts are *chosen* by s + b, where b is a per-expert selection bias that
gets no gradient and is nudged toward balanced load after every step
(aux-loss-free balancing); the chosen experts are *weighted* by s alone,
normalised over the top-k (``norm_topk_prob``) and scaled by
``routed_scaling_factor``. With ``n_group > 1`` routing is group-limited: each
of the M groups is scored by the sum of its top-2 biased scores and only
experts in the Y = ``topk_group`` best groups may be chosen.

Dispatch is exact (no token is ever dropped) and its compute grows with the
number of *active* experts. Three implementations compute the same function
(``moe_impl="auto"``, the default, takes ``blocked`` on CPU, ``ragged`` elsewhere):

- ``blocked`` (what ``auto`` picks on CPU; fast there): sort the A = N·X (token, expert)
  assignments by expert, pad each expert's run up to a multiple of W rows, and
  run one batched matmul over the Z blocks, each block with its expert's
  weights. Padding is at most E·(W-1) rows, so cost ≈ active compute; but each
  block gathers its expert's weights, a temporary of Z·D·F per matrix, which
  is fine on CPU and prohibitive at K2 scale.
- ``ragged``: the same sorted layout through ``jax.lax.ragged_dot`` (grouped
  GEMM), the right kernel on accelerators. On the 2-core CPU of
  benchmarks/RESULTS.md a whole-model forward+backward with it takes 1.6× (8
  experts, top-2), 3.1× (preset ``small``) and 10× (64 experts, top-2) as long
  as with ``blocked``.
- ``dense``: every expert on every token, masked: the reference for tests.

When the trace runs under a mesh whose ``expert`` axis has more than one device (the
jitted steps of k2jax.train enter it), the chosen implementation runs on each device
for its own experts, after an all-to-all has brought it their tokens
(k2jax.model.expert_parallel); routing and load statistics stay here, unchanged.

Shape letters (k2jax.model docstring): N tokens, E experts, X experts per
token, A = N·X assignments, M groups, Y groups kept, W rows per block, Z blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.config import ModelConfig
from k2jax.model import expert_parallel
from k2jax.model.layers import MLP, SelectionBias, dtypes, param


def route(logits_NE, bias_E, cfg: ModelConfig):
    """Choose experts -> (indices [N, X] int32, weights [N, X] f32, scores [N, E] f32)."""
    scores_NE = jax.nn.sigmoid(logits_NE.astype(jnp.float32))
    choice_NE = scores_NE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
    if cfg.n_group > 1:
        n, e = choice_NE.shape
        grouped = choice_NE.reshape(n, cfg.n_group, e // cfg.n_group)  # [N, M, E / M]
        group_score_NM = jax.lax.top_k(grouped, 2)[0].sum(-1)
        _, top_groups_NY = jax.lax.top_k(group_score_NM, cfg.topk_group)
        allowed_NM = jax.nn.one_hot(top_groups_NY, cfg.n_group, dtype=jnp.bool_).any(1)
        allowed_NE = jnp.repeat(allowed_NM, e // cfg.n_group, axis=1)
        choice_NE = jnp.where(allowed_NE, choice_NE, -jnp.inf)
    _, idx_NX = jax.lax.top_k(jax.lax.stop_gradient(choice_NE), cfg.num_experts_per_tok)
    w_NX = jnp.take_along_axis(scores_NE, idx_NX, axis=1)
    if cfg.norm_topk_prob:
        w_NX = w_NX / (w_NX.sum(-1, keepdims=True) + 1e-20)
    return idx_NX, w_NX * cfg.routed_scaling_factor, scores_NE


def update_selection_bias(bias_E, load_E, rate: float):
    """b ← b + rate·sign(mean load − load): raise under-loaded experts, lower over-loaded.
    Leading axes (a stack of layers [L, E]) are independent rows."""
    load_E = load_E.astype(jnp.float32)
    return bias_E + rate * jnp.sign(load_E.mean(-1, keepdims=True) - load_E)


def balance_loss(scores_BTE, idx_BTX, n_experts: int):
    """DeepSeek-V3's sequence-wise balance loss Σ_i f_i·P_i (eqs. 17-19), mean over sequences."""
    _, t, k = idx_BTX.shape
    counts_BE = jax.nn.one_hot(idx_BTX, n_experts, dtype=jnp.float32).sum((1, 2))
    f_BE = counts_BE * n_experts / (k * t)
    p_BE = (scores_BTE / scores_BTE.sum(-1, keepdims=True)).mean(1)
    return (f_BE * p_BE).sum(-1).mean()


def _swiglu(x, w_gate, w_up, w_down, eq_in: str, eq_out: str):
    h = jax.nn.silu(jnp.einsum(eq_in, x, w_gate)) * jnp.einsum(eq_in, x, w_up)
    return jnp.einsum(eq_out, h, w_down)


def experts_dense(x_ND, idx_NX, w_NX, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Reference: every expert on every token, then keep the routed ones (weights 0
    elsewhere; an id equal to E, a padding row, has no gate)."""
    y_NED = _swiglu(x_ND, w_gate_EDF, w_up_EDF, w_down_EFD, "nd,edf->nef", "nef,efd->ned")
    gates_NE = jnp.zeros((x_ND.shape[0], w_gate_EDF.shape[0]), jnp.float32)
    gates_NE = gates_NE.at[jnp.arange(x_ND.shape[0])[:, None], idx_NX].add(w_NX, mode="drop")
    return jnp.einsum("ned,ne->nd", y_NED.astype(jnp.float32), gates_NE)


def _sort_assignments(idx_NX, n_experts: int):
    """The A = N·X assignments' experts, their order sorted by expert, each expert's count."""
    expert_A = idx_NX.reshape(-1)
    order_A = jnp.argsort(expert_A, stable=True)
    counts_E = jnp.bincount(expert_A, length=n_experts)
    return expert_A, order_A, counts_E


def auto_block_size(n_assign: int, n_experts: int) -> int:
    """A power of two near half the mean rows per expert, in [8, 256]: padding
    (< E·W rows) stays under ~half the work, while blocks stay big enough
    for efficient matmuls (measured on CPU, benchmarks/RESULTS.md)."""
    target = max(1, n_assign // (2 * n_experts))
    return int(min(256, max(8, 1 << (target.bit_length() - 1))))


def experts_blocked(x_ND, idx_NX, w_NX, w_gate_EDF, w_up_EDF, w_down_EFD, block: int = 0):
    """Exact dispatch as batched matmuls over Z expert-homogeneous blocks of W = ``block``
    rows (0: ``auto_block_size``). An id equal to E marks a padding row (expert
    parallelism's receive buffer): it is given no slot, so it adds nothing."""
    n, k = idx_NX.shape
    e, d = w_gate_EDF.shape[:2]
    a = n * k
    block = block or auto_block_size(a, e)
    n_blocks = (a + e * (block - 1)) // block  # Z: static bound on Σ_e ceil(count_e / W)
    expert_A, order_A, counts_E = _sort_assignments(idx_NX, e)
    padded_E = (counts_E + block - 1) // block * block
    padded_end_E = jnp.cumsum(padded_E)
    padded_start_E = padded_end_E - padded_E
    start_E = jnp.cumsum(counts_E) - counts_E
    sorted_expert_A = jnp.minimum(expert_A[order_A], e - 1)
    rank_A = jnp.arange(a) - start_E[sorted_expert_A]
    slot_of_sorted_A = jnp.where(expert_A[order_A] < e, padded_start_E[sorted_expert_A] + rank_A,
                                 n_blocks * block)  # padding: the zero row past the blocks
    slot_of_A = jnp.zeros(a, jnp.int32).at[order_A].set(slot_of_sorted_A.astype(jnp.int32))
    token_of_slot = jnp.full(n_blocks * block, n, jnp.int32).at[slot_of_A].set(
        jnp.arange(a, dtype=jnp.int32) // k, mode="drop")  # [Z·W]
    block_expert_Z = jnp.minimum(
        jnp.searchsorted(padded_end_E, jnp.arange(n_blocks) * block, side="right"), e - 1)
    x_pad = jnp.concatenate([x_ND, jnp.zeros((1, d), x_ND.dtype)])  # row n: zeros
    x_ZWD = x_pad[token_of_slot].reshape(n_blocks, block, d)
    y_ZWD = _swiglu(x_ZWD, w_gate_EDF[block_expert_Z], w_up_EDF[block_expert_Z],
                    w_down_EFD[block_expert_Z], "zwd,zdf->zwf", "zwf,zfd->zwd")
    y_pad = jnp.concatenate([y_ZWD.reshape(n_blocks * block, d), jnp.zeros((1, d), y_ZWD.dtype)])
    y_AD = y_pad[slot_of_A]
    return jnp.einsum("nxd,nx->nd", y_AD.reshape(n, k, d).astype(jnp.float32), w_NX)


def experts_ragged(x_ND, idx_NX, w_NX, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Exact dispatch through ``jax.lax.ragged_dot`` grouped matmuls. Padding rows (id E)
    sort last, past every group, and are zeroed."""
    n, k = idx_NX.shape
    expert_A, order_A, counts_E = _sort_assignments(idx_NX, w_gate_EDF.shape[0])
    counts_E = counts_E.astype(jnp.int32)
    xs_AD = x_ND[order_A // k]
    h = jax.nn.silu(jax.lax.ragged_dot(xs_AD, w_gate_EDF, counts_E)) * jax.lax.ragged_dot(
        xs_AD, w_up_EDF, counts_E)
    ys_AD = jax.lax.ragged_dot(h, w_down_EFD, counts_E)
    ys_AD = jnp.where((expert_A[order_A] < w_gate_EDF.shape[0])[:, None], ys_AD, 0)
    y_AD = jnp.zeros_like(ys_AD).at[order_A].set(ys_AD)
    return jnp.einsum("nxd,nx->nd", y_AD.reshape(n, k, -1).astype(jnp.float32), w_NX)


def routed_experts(x_ND, idx_NX, w_NX, weights, cfg: ModelConfig):
    """Σ_x w·expert(x) [N, D] f32 by ``cfg.moe_impl``; expert-parallel (tokens to the
    experts' devices, k2jax.model.expert_parallel) when the trace's mesh has ``expert`` > 1."""
    impl = cfg.moe_impl
    if impl == "auto":
        impl = "blocked" if jax.default_backend() == "cpu" else "ragged"
    ep = expert_parallel.plan(x_ND.shape[0], cfg.n_routed_experts)
    block = cfg.moe_block_size
    if ep is not None and impl == "blocked" and not block:
        # W from the rows a device gets when load is balanced, not the worst-case buffer's
        block = auto_block_size(x_ND.shape[0] // ep.n_token_shards * idx_NX.shape[1],
                                cfg.n_routed_experts // ep.n_expert_devices)
    local = {"dense": experts_dense, "ragged": experts_ragged,
             "blocked": functools.partial(experts_blocked, block=block)}[impl]
    if ep is None:
        return local(x_ND, idx_NX, w_NX, *weights)
    return expert_parallel.dispatch(x_ND, idx_NX, w_NX, *weights, local=local, ep=ep)


class MoE(nnx.Module):
    """Routed experts (stacked [E, ...]) plus always-on shared experts."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, e, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        # float32 whatever param_dtype: expert choice is discrete and must not flip with
        # rounding (transformers keeps the DeepSeek-V3 gate in fp32 too).
        self.router = nnx.Param(cfg.initializer_range * jax.random.normal(
            rngs.params(), (d, e), jnp.float32), axes=("embed", None))
        self.selection_bias = SelectionBias(jnp.zeros((e,), jnp.float32), axes=(None,))
        self.w_gate = param(rngs, cfg, (e, d, f), ("expert", "embed", "moe_mlp"))
        self.w_up = param(rngs, cfg, (e, d, f), ("expert", "embed", "moe_mlp"))
        self.w_down = param(rngs, cfg, (e, f, d), ("expert", "moe_mlp", "embed"))
        if cfg.n_shared_experts:
            self.shared = MLP(cfg, cfg.n_shared_experts * f, rngs=rngs)
        self.cfg = cfg

    def __call__(self, x_BTD):
        """-> (y [B, T, D], {"load": tokens per expert [E], "balance_loss": scalar})."""
        cfg = self.cfg
        dt, _ = dtypes(cfg)
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(b * t, d).astype(dt)
        logits_NE = jnp.dot(x_ND.astype(jnp.float32), self.router[...],
                            precision=jax.lax.Precision.HIGHEST)
        idx_NX, w_NX, scores_NE = route(logits_NE, self.selection_bias[...], cfg)
        weights = [w[...].astype(dt) for w in (self.w_gate, self.w_up, self.w_down)]
        y_ND = routed_experts(x_ND, idx_NX, w_NX, weights, cfg)
        y_BTD = y_ND.reshape(b, t, d).astype(dt)
        if cfg.n_shared_experts:
            y_BTD = y_BTD + self.shared(x_BTD)
        stats = {
            "load": jnp.bincount(idx_NX.reshape(-1), length=cfg.n_routed_experts).astype(
                jnp.float32),
            "balance_loss": (balance_loss(scores_NE.reshape(b, t, -1),
                                          idx_NX.reshape(b, t, -1), cfg.n_routed_experts)
                             if cfg.aux_loss_alpha else jnp.zeros((), jnp.float32)),
        }
        return y_BTD, stats
