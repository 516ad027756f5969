"""The decoder: embedding, pre-norm blocks (first k dense, then MoE), final norm, LM head.

``Transformer(config, rngs=...)(tokens_BT) -> (logits_BTV, aux)``: logits are
float32 whatever the compute dtype; ``aux`` carries what the optimizer and
the training loop read back from the forward pass:

- ``attn_max_logits`` [L, H] f32: per-head max pre-softmax logit (QK-Clip);
- ``expert_load`` [num_moe_layers, E] f32: tokens routed to each expert (balancing, metrics);
- ``balance_loss`` scalar: aux_loss_alpha · Σ of the sequence-wise balance losses.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from k2jax.config import ModelConfig
from k2jax.model.attention import make_attention
from k2jax.model.layers import MLP, RMSNorm, dtypes, param
from k2jax.model.moe import MoE


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


class Transformer(nnx.Module):
    """A DeepSeek-V3 / Kimi-K2 style decoder-only MoE language model."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.embed = param(rngs, cfg, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, cfg, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))
        self.cfg = cfg

    def __call__(self, tokens_BT, positions_BT=None, constrain=None):
        """``constrain`` (e.g. a sharding constraint) is applied to the residual stream at
        every block boundary."""
        cfg = self.cfg
        dt, _ = dtypes(cfg)
        constrain = constrain or (lambda x: x)
        x_BTD = constrain(jnp.take(self.embed[...], tokens_BT, axis=0).astype(dt))
        max_logits, loads, balance = [], [], jnp.zeros((), jnp.float32)
        for block in self.layers:
            x_BTD, max_logit_H, stats = block(x_BTD, positions_BT)
            x_BTD = constrain(x_BTD)
            max_logits.append(max_logit_H)
            if stats is not None:
                loads.append(stats["load"])
                balance = balance + stats["balance_loss"]
        head_DV = self.embed[...].T if cfg.tie_word_embeddings else self.lm_head[...]
        logits_BTV = jnp.dot(self.norm(x_BTD), head_DV.astype(dt),
                             preferred_element_type=jnp.float32)
        aux = {
            "attn_max_logits": jnp.stack(max_logits).astype(jnp.float32),
            "expert_load": (jnp.stack(loads) if loads
                            else jnp.zeros((0, cfg.n_routed_experts), jnp.float32)),
            "balance_loss": cfg.aux_loss_alpha * balance,
        }
        return logits_BTV, aux
