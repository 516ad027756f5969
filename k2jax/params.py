"""Parameter trees without allocation: abstract model, flat views, counting.

Counting follows Hugging Face's ``DeepseekV3ForCausalLM`` (``model.parameters()``):
embedding and LM head included, the routing selection bias excluded (a buffer
there, a non-``Param`` variable here). Active = every non-expert parameter plus
``num_experts_per_tok`` routed experts per MoE layer.
"""

from __future__ import annotations

import jax
from flax import nnx

from k2jax.config import ModelConfig
from optim.partition import ADAMW, MatrixDims, Partition

EXPERT_STACKS = ("w_gate", "w_up", "w_down")  # [E, ...] routed-expert weights in MoE layers


def abstract_model(cfg: ModelConfig):
    """The model with ShapeDtypeStructs for arrays: builds K2 in seconds, allocates nothing."""
    from k2jax.model import Transformer

    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def path_str(path) -> str:
    """('layers', 3, 'moe', 'w_up') -> 'layers.3.moe.w_up': the stable name of a leaf."""
    return ".".join(str(p) for p in path)


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


# The one place that says which parameters Muon owns and how each is a batch of matrices
# (Kimi K2 §2.1 / Moonlight §2: Muon for hidden matrices; AdamW for embeddings, head,
# norms, router). Every model leaf must match a rule; an unmatched one is an error.
MUON_RULES = Partition(rules=(
    (r"embed|lm_head", ADAMW),
    (r".*\.moe\.router", ADAMW),
    (r".*norm\.scale", ADAMW),
    # routed experts [E, in, out]: E separate matrices
    (r".*\.moe\.(w_gate|w_up|w_down)", MatrixDims(fan_in=(1,), fan_out=(2,), batch=(0,))),
    # per-head projections [in, heads, head_dim]: one in x (heads*head_dim) matrix
    (r".*\.attn\.(q_b|q_proj|k_proj|v_proj|kv_b)", MatrixDims(fan_in=(0,), fan_out=(1, 2))),
    # output projection [heads, head_dim, D]: one (heads*head_dim) x D matrix
    (r".*\.attn\.o", MatrixDims(fan_in=(0, 1), fan_out=(2,))),
    (r".*\.attn\.(q_a|kv_a)", MatrixDims()),
    (r".*\.(mlp|shared)\.(gate|up|down)", MatrixDims()),
))


def partition(cfg: ModelConfig | None = None) -> Partition:
    """The Muon / AdamW partition of the model's parameters (config-independent today)."""
    del cfg
    return MUON_RULES


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main(argv=None) -> None:
    """``python -m k2jax.params [PRESET ...] [--set key=value ...]``: print parameter counts."""
    import argparse

    from k2jax import config

    ap = argparse.ArgumentParser(description="Total and active parameter counts of presets.")
    ap.add_argument("presets", nargs="*", default=list(config.PRESETS))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides applied to every preset")
    args = ap.parse_args(argv)
    try:
        cfgs = {name: config.preset(name, *args.set) for name in args.presets}
    except config.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{'preset':<14}{'total':>20}{'active':>20}")
    for name, cfg in cfgs.items():
        total, active = count(cfg)
        print(f"{name:<14}{total:>20,}{active:>20,}")


if __name__ == "__main__":
    main()
