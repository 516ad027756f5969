"""Parameter trees without allocation: the abstract model, its named leaves, counts.

Counting follows Hugging Face's ``DeepseekV3ForCausalLM`` (``model.parameters()``):
embedding and LM head included, the routing selection bias excluded (a buffer
there, a non-``Param`` variable here). Active = every non-expert parameter plus
``num_experts_per_tok`` routed experts per MoE layer.
"""

from __future__ import annotations

import jax
from flax import nnx

from k2jax.config import ModelConfig
from k2jax.model import Transformer
from optim.paths import path_str

EXPERT_STACKS = ("w_gate", "w_up", "w_down")  # [E, ...] routed-expert weights in MoE layers


def abstract_model(cfg: ModelConfig):
    """The model with ShapeDtypeStructs for arrays: builds K2 in seconds, allocates nothing."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def flat_params(model_or_state) -> dict[str, nnx.Variable]:
    """{dotted path: Param variable} over the trainable parameters."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(
        model_or_state, nnx.Param)
    return {path_str(p): v for p, v in nnx.to_flat_state(state) if isinstance(v, nnx.Param)}


def is_expert_stack(path: str) -> bool:
    parts = path.split(".")
    return len(parts) >= 2 and parts[-2] == "moe" and parts[-1] in EXPERT_STACKS


def count(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameter counts, as transformers counts DeepseekV3ForCausalLM."""
    total = active = 0
    for path, var in flat_params(abstract_model(cfg)).items():
        size = int(var.size)
        total += size
        active += (size // cfg.n_routed_experts * cfg.num_experts_per_tok
                   if is_expert_stack(path) else size)
    return total, active


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
