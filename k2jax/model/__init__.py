"""The Kimi-K2 / DeepSeek-V3 style MoE transformer (Flax NNX).

Shape suffixes: an array's name ends in one upper-case letter per axis, so
``q_BTHK`` is [batch, query position, query head, q/k head width]. Each letter
has one meaning throughout k2jax/model (einsum subscripts use the same letters
in lower case). An axis that joins two of these (kv_a's output, C + R) gets a
plain name and a ``# [B, T, C + R]`` comment instead of a letter.

=     ====================================  ================================================
      meaning                               config field
=     ====================================  ================================================
B     batch                                 --
T     query positions (sequence)            --
S     key/value positions (= T here)        --
D     model width                           ``hidden_size``
V     vocabulary                            ``vocab_size``
L     layers (expert loads: MoE layers)     ``num_hidden_layers``
H     query heads                           ``num_attention_heads``
G     key/value heads (GQA; = H in MHA)     ``num_key_value_heads``
K     q/k head width (P + R in MLA)         ``qk_head_dim``; MHA: ``head_dim``
P     no-RoPE part of a q/k head (MLA)      ``qk_nope_head_dim``
R     RoPE part of a q/k head (MHA: all K)  ``qk_rope_head_dim``; MHA: ``head_dim``
U     value head width                      ``v_head_dim``; MHA: ``head_dim``
Q     q-LoRA rank (latent c_q)              ``q_lora_rank``
C     kv-LoRA rank (latent c_kv)            ``kv_lora_rank``
E     routed experts                        ``n_routed_experts``
F     FFN width (expert; dense MLP)         ``moe_intermediate_size``; ``intermediate_size``
N     tokens, B·T flattened                 --
X     experts per token (top-k)             ``num_experts_per_tok``
A     (token, expert) assignments, N·X      --
M     expert groups                         ``n_group``
Y     groups kept per token                 ``topk_group``
W     rows per block (blocked dispatch)     ``moe_block_size``
Z     blocks (blocked dispatch)             --
J     devices on the ``expert`` mesh axis   ``mesh.expert``
=     ====================================  ================================================
"""

from k2jax.model.loss import cross_entropy
from k2jax.model.transformer import Block, Transformer

__all__ = ["Block", "Transformer", "cross_entropy"]
