"""The Kimi-K2 / DeepSeek-V3 style MoE transformer (Flax NNX)."""

from k2jax.model.attention import qk_layout
from k2jax.model.loss import cross_entropy
from k2jax.model.transformer import Block, Transformer

__all__ = ["Block", "Transformer", "cross_entropy", "qk_layout"]
