import pytest

from k2jax import params, presets

# transformers' DeepseekV3ForCausalLM counts, computed once by scripts/hf_param_counts.py
# (torch 2.13.0 CPU, transformers 5.24.0, models built on the meta device):
# total = sum(p.numel() for p in model.parameters()); active = total minus the
# (n_routed_experts - num_experts_per_tok) unused routed experts of every MoE layer.
HF_COUNTS = {
    "kimi-k2": (1_026_408_209_408, 32_861_477_888),
    "deepseek-v3": (671_026_404_352, 37_552_282_624),
}


@pytest.mark.parametrize("name", sorted(HF_COUNTS))
def test_count_matches_transformers(name):
    assert params.count(presets.preset(name)) == HF_COUNTS[name]  # abstract: nothing allocated


def test_small_presets_sizes():
    total, _ = params.count(presets.preset("tiny"))
    assert total < 1_000_000
    total, active = params.count(presets.preset("small"))
    assert 1_000_000 < total < 10_000_000 and active < total / 2
    ladder = [params.count(presets.preset(n))[0] for n in presets.PRESETS if n.startswith("ladder")]
    assert len(ladder) >= 4 and ladder == sorted(ladder)


def test_active_counts_topk_experts():
    cfg = presets.preset("tiny")
    total, active = params.count(cfg)
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    unused = (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert * cfg.num_moe_layers
    assert total - active == unused
    # the selection bias is state, not a parameter (a buffer in transformers)
    assert not any("selection_bias" in p for p in params.flat_params(params.abstract_model(cfg)))
