"""The decoder: embedding, pre-norm blocks (first k dense, then MoE), final norm, LM head.

``Transformer(config, rngs=...)(tokens_BT) -> (logits_BTV, aux)``: logits are
float32 whatever the compute dtype; ``aux`` carries what the optimizer and
the training loop read back from the forward pass:

- ``attn_max_logits`` [L, H] f32: per-head max pre-softmax logit (QK-Clip);
- ``expert_load`` [num_moe_layers, E] f32: tokens routed to each expert (balancing, metrics);
- ``balance_loss`` scalar: aux_loss_alpha · Σ of the sequence-wise balance losses.

Layers are stored as two stacks of identical blocks, every leaf with a leading
layer axis: ``dense_layers`` (the first ``first_k_dense_replace``) and
``moe_layers`` (the rest), so ``moe_layers.moe.w_gate`` is [L - k, E, D, F]. Each
stack runs under ``jax.lax.scan`` (``scan_layers``), so the program, and the time to
compile it, does not grow with depth (MaxText and nanodo scan the same way);
``remat`` recomputes each layer's activations in the backward pass instead of
storing them (``full``), or stores only the weight matmuls' outputs (``save_dots``:
``jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims``). With
``scan_layers=false`` the same stacks run in a Python loop (one program per layer;
XLA may fuse across layers). The parameters are drawn layer by layer in order and
then stacked, so a model's initial values do not depend on how it is stacked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.config import ModelConfig
from k2jax.model.attention import make_attention
from k2jax.model.layers import MLP, RMSNorm, dtypes, param
from k2jax.model.moe import MoE

STACKS = ("dense_layers", "moe_layers")  # attribute names, in layer order
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nnx.Module):
    """x + attn(norm(x)), then + ffn(norm(x)); the ffn is dense for the first k layers."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        self.attn = make_attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        if layer < cfg.first_k_dense_replace:
            self.mlp = MLP(cfg, cfg.intermediate_size, rngs=rngs)
        else:
            self.moe = MoE(cfg, rngs=rngs)

    def __call__(self, x_BTD, positions_BT=None):
        h_BTD, max_logit_H = self.attn(self.attn_norm(x_BTD), positions_BT)
        x_BTD = x_BTD + h_BTD
        if hasattr(self, "mlp"):
            return x_BTD + self.mlp(self.ffn_norm(x_BTD)), max_logit_H, None
        y_BTD, stats = self.moe(self.ffn_norm(x_BTD))
        return x_BTD + y_BTD, max_logit_H, stats


def stack_blocks(blocks: list[Block]) -> Block:
    """One Block whose every variable is its blocks' variables stacked on a new leading
    axis, named ``layers`` for the sharding rules (k2jax.sharding: never split)."""
    graphdef, _ = nnx.split(blocks[0])
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731

    def stack(*vs: nnx.Variable) -> nnx.Variable:
        axes = vs[0].get_metadata().get("axes")
        meta = {} if axes is None else {"axes": ("layers", *axes)}
        return vs[0].replace(jnp.stack([v[...] for v in vs]), **meta)

    states = [nnx.state(b) for b in blocks]
    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=is_var))


def run_stack(stack: Block, x_BTD, positions_BT, constrain, cfg: ModelConfig):
    """Apply a stack's layers in order -> (x, max logits [n, H], stacked MoE stats or None)."""
    graphdef, state = nnx.split(stack)

    def layer(x_BTD, layer_state):
        x_BTD, max_logit_H, stats = nnx.merge(graphdef, layer_state)(x_BTD, positions_BT)
        return constrain(x_BTD), (max_logit_H, stats)

    if cfg.remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    if cfg.scan_layers:
        return (lambda x, ys: (x, *ys))(*jax.lax.scan(layer, x_BTD, state))
    outs = []
    for i in range(jax.tree.leaves(state)[0].shape[0]):
        x_BTD, out = layer(x_BTD, jax.tree.map(lambda a: a[i], state))  # noqa: B023
        outs.append(out)
    max_logits_nH, stats = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return x_BTD, max_logits_nH, stats


class Transformer(nnx.Module):
    """A DeepSeek-V3 / Kimi-K2 style decoder-only MoE language model."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.embed = param(rngs, cfg, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        blocks = [Block(cfg, i, rngs=rngs) for i in range(cfg.num_hidden_layers)]
        k = cfg.first_k_dense_replace
        for name, part in zip(STACKS, (blocks[:k], blocks[k:])):
            if part:
                setattr(self, name, stack_blocks(part))
        self.norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, cfg, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))
        self.cfg = cfg

    def layer(self, i: int) -> Block:
        """Layer ``i`` as a Block of its own (a copy: for reading weights and running one
        layer in tests and notebooks; writing to it leaves the model unchanged)."""
        k = self.cfg.first_k_dense_replace
        name, row = (STACKS[0], i) if i < k else (STACKS[1], i - k)
        graphdef, state = nnx.split(getattr(self, name))
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[row], state))

    def __call__(self, tokens_BT, positions_BT=None, constrain=None):
        """``constrain`` (e.g. a sharding constraint) is applied to the residual stream at
        every block boundary."""
        cfg = self.cfg
        dt, _ = dtypes(cfg)
        constrain = constrain or (lambda x: x)
        x_BTD = constrain(jnp.take(self.embed[...], tokens_BT, axis=0).astype(dt))
        max_logits = []
        load_LE = jnp.zeros((0, cfg.n_routed_experts), jnp.float32)
        balance = jnp.zeros((), jnp.float32)
        for name in STACKS:
            if hasattr(self, name):
                x_BTD, max_logits_nH, stats = run_stack(getattr(self, name), x_BTD,
                                                        positions_BT, constrain, cfg)
                max_logits.append(max_logits_nH)
                if stats is not None:
                    load_LE, balance = stats["load"], stats["balance_loss"].sum()
        head_DV = self.embed[...].T if cfg.tie_word_embeddings else self.lm_head[...]
        logits_BTV = jnp.dot(self.norm(x_BTD), head_DV.astype(dt),
                             preferred_element_type=jnp.float32)
        aux = {
            "attn_max_logits": jnp.concatenate(max_logits).astype(jnp.float32),
            "expert_load": load_LE,
            "balance_loss": cfg.aux_loss_alpha * balance,
        }
        return logits_BTV, aux
