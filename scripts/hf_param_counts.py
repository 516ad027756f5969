"""Exact parameter counts of Hugging Face transformers' DeepseekV3ForCausalLM for the
published Kimi-K2 (moonshotai/Kimi-K2-Instruct / -Base) and DeepSeek-V3 configs.

This is a standalone reference script. It is NOT part of k2jax and torch/transformers are
NOT project dependencies. It downloads nothing: both config.json dicts are embedded below,
and the models are built on torch's "meta" device (no memory, no weights).

How to run (throwaway venv; torch pinned to the CPU build):

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors
    /tmp/hfvenv/bin/python scripts/hf_param_counts.py            # counts + layer listings
    /tmp/hfvenv/bin/python scripts/hf_param_counts.py --json     # counts only, as JSON

Versions used when the numbers in k2jax were recorded: torch 2.13.0+cpu, transformers 5.24.0.

What is counted:
  * total  = sum(p.numel() for p in model.parameters())  -- nn.Parameters only. Buffers are
    excluded: the router's e_score_correction_bias (an nn.Buffer in transformers 5.x,
    n_routed_experts floats per MoE layer) and the rotary inv_freq / original_inv_freq.
  * active = total - (n_routed_experts - num_experts_per_tok) * expert_params * n_moe_layers,
    where expert_params = 3 * hidden_size * moe_intermediate_size (gate, up, down of ONE
    routed expert; transformers 5.x stores all experts fused as
    experts.gate_up_proj [E, 2*I, H] and experts.down_proj [E, H, I]).
  * The MTP / nextn layer (DeepSeek-V3 checkpoint layer 61) is not built by
    DeepseekV3ForCausalLM and is not counted. fp8 weight_scale_inv tensors are not counted
    (quantization_config is dropped before building; counts are of the bf16 model).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

# --------------------------------------------------------------------------------------
# Published config.json values.
#
# Kimi-K2-Instruct (moonshotai/Kimi-K2-Instruct, July 2025 release; Kimi-K2-Base has the same
# architecture fields). Note: the later Kimi-K2-Instruct-0905 / K2-Thinking releases change
# max_position_embeddings to 262144 and rope_scaling.factor to 64.0 (parameter count unchanged).
# --------------------------------------------------------------------------------------
KIMI_K2_CONFIG: dict = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 131072,
    "model_type": "kimi_k2",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 50000.0,
    "routed_scaling_factor": 2.827,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.48.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 163840,
}

# DeepSeek-V3 (deepseek-ai/DeepSeek-V3 config.json).
DEEPSEEK_V3_CONFIG: dict = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

MODELS = {"kimi-k2": KIMI_K2_CONFIG, "deepseek-v3": DEEPSEEK_V3_CONFIG}


def build_meta_model(cfg: dict):
    """DeepseekV3ForCausalLM on the meta device from a published config dict.

    Kimi's model_type "kimi_k2" is not a transformers model type, so the dict is passed to
    DeepseekV3Config directly (it accepts and keeps the extra keys). quantization_config is
    dropped so the (bf16) architecture is what gets built.
    """
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = copy.deepcopy(cfg)
    cfg.pop("quantization_config", None)
    config = DeepseekV3Config(**cfg)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    return config, model


def count(cfg: dict) -> dict:
    config, model = build_meta_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    buffers = {name: tuple(b.shape) for name, b in model.named_buffers()}

    n_layers = config.num_hidden_layers
    n_moe = n_layers - config.first_k_dense_replace
    expert = 3 * config.hidden_size * config.moe_intermediate_size

    # Cross-check the per-expert number against the fused expert tensors actually built.
    experts = model.model.layers[config.first_k_dense_replace].mlp.experts
    fused = experts.gate_up_proj.numel() + experts.down_proj.numel()
    assert fused == expert * config.n_routed_experts, (fused, expert)
    # e_score_correction_bias must be a buffer, not a parameter.
    assert not any("e_score_correction_bias" in n for n, _ in model.named_parameters())
    assert any("e_score_correction_bias" in n for n in buffers)

    inactive = (config.n_routed_experts - config.num_experts_per_tok) * expert * n_moe
    return {
        "total": total,
        "active": total - inactive,
        "routed_expert_params": expert,
        "n_moe_layers": n_moe,
        "n_dense_layers": config.first_k_dense_replace,
        "e_score_correction_bias_buffer_elems": config.n_routed_experts * n_moe,
        "buffers_sample": {k: v for k, v in buffers.items() if ".layers." not in k
                           or ".layers.%d." % config.first_k_dense_replace in k},
    }


def layer_listing(cfg: dict, layer: int) -> list[tuple[str, tuple[int, ...]]]:
    _, model = build_meta_model(cfg)
    prefix = "model.layers.%d." % layer
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if n.startswith(prefix)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print counts only, as JSON")
    ap.add_argument("--list-model", default="kimi-k2", choices=sorted(MODELS))
    args = ap.parse_args(argv)

    import torch
    import transformers

    results = {name: count(cfg) for name, cfg in MODELS.items()}
    if args.json:
        out = {k: {kk: vv for kk, vv in v.items() if kk != "buffers_sample"}
               for k, v in results.items()}
        out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
        print(json.dumps(out, indent=2))
        return 0

    print("torch %s, transformers %s" % (torch.__version__, transformers.__version__))
    for name, r in results.items():
        print("\n== %s ==" % name)
        print("total params        : %d" % r["total"])
        print("active params       : %d" % r["active"])
        print("one routed expert   : %d" % r["routed_expert_params"])
        print("dense / MoE layers  : %d / %d" % (r["n_dense_layers"], r["n_moe_layers"]))
        print("excluded buffer e_score_correction_bias elems: %d"
              % r["e_score_correction_bias_buffer_elems"])
        print("buffers (non-layer + first MoE layer): %s" % r["buffers_sample"])

    cfg = MODELS[args.list_model]
    for layer in (0, cfg["first_k_dense_replace"]):
        print("\n== %s parameters of model.layers.%d ==" % (args.list_model, layer))
        for n, shape in layer_listing(cfg, layer):
            print("%-60s %s" % (n, list(shape)))
    _, model = build_meta_model(cfg)
    print("\n== %s non-layer parameters ==" % args.list_model)
    for n, p in model.named_parameters():
        if ".layers." not in n:
            print("%-60s %s" % (n, list(p.shape)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
