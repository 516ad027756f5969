"""Make the tiny Hugging Face checkpoints that tests/test_hf.py loads, and check that
transformers loads what ``k2jax.hf.save`` writes.

A standalone reference script: torch and transformers are NOT k2jax dependencies and
stay out of requirements*.txt. Nothing is downloaded: each model is a randomly
initialised ``DeepseekV3ForCausalLM`` built from the config below.

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors
    /tmp/hfvenv/bin/python scripts/make_hf_fixture.py            # (re)writes the fixtures
    /tmp/hfvenv/bin/python scripts/make_hf_fixture.py --check DIR NAME
        # DIR: a checkpoint written by k2jax.hf.save from fixture NAME; transformers
        # loads it and its logits must equal the fixture's expected logits.

Versions used for the committed fixtures: torch 2.13.0+cpu, transformers 5.24.0.

Each fixture directory (tests/fixtures/hf_tiny_{NAME}/) holds what ``save_pretrained``
wrote (config.json, several safetensors shards and model.safetensors.index.json, so
that loading must follow the index) and ``expected.npz``: ``tokens`` [2, 12],
``logits`` [2, 12, V] (float32, eager attention) and ``attn_max_logits`` [L, H], each
head's max pre-softmax logit q·k·scale over the causal positions of the batch, recorded
by an attention function registered with transformers' AttentionInterface.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")

COMMON = dict(
    vocab_size=272, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=3, first_k_dense_replace=1,
    routed_scaling_factor=2.5, n_group=4, topk_group=2, norm_topk_prob=True,
    max_position_embeddings=64, initializer_range=0.2, attention_bias=False,
    rope_interleave=True, rms_norm_eps=1e-5)  # vocab >= the byte tokenizer's 258
VARIANTS = {
    # Kimi-K2-like: low-rank q path and YaRN (mscale / mscale_all_dim set).
    "k2": dict(COMMON, q_lora_rank=16, tie_word_embeddings=False,
               rope_parameters=dict(rope_type="yarn", rope_theta=50000.0, factor=8.0,
                                    original_max_position_embeddings=8, beta_fast=32.0,
                                    beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)),
    # DeepSeek-V2-Lite-like: full-rank q_proj, plain RoPE, tied embeddings.
    "qproj": dict(COMMON, q_lora_rank=None, tie_word_embeddings=True,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
}


def _record_max_logits(store: dict):
    """Causal softmax attention that also records each head's max logit. It masks by
    itself: transformers builds no mask for an implementation it does not know."""
    import torch

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        logits = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, H, T, S]
        t, s = logits.shape[-2:]
        causal = torch.ones(t, s, dtype=torch.bool).tril(s - t)
        masked = logits.masked_fill(~causal, float("-inf"))
        store[module.layer_idx] = masked.amax(dim=(0, 2, 3)).detach().numpy()
        probs = torch.softmax(masked, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs

    return attention


def _model(name: str):
    import torch
    from transformers import AttentionInterface, DeepseekV3Config, DeepseekV3ForCausalLM

    store: dict[int, np.ndarray] = {}
    AttentionInterface.register(f"k2jax_record_{name}", _record_max_logits(store))
    cfg = DeepseekV3Config(**VARIANTS[name])
    cfg._attn_implementation = f"k2jax_record_{name}"
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # larger than the default init, so routing and logits matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
        for n, b in model.named_buffers():
            if "e_score_correction_bias" in n:
                b.copy_(0.05 * torch.randn_like(b))
    return model, store


def _forward(model, store, tokens):
    import torch

    with torch.no_grad():
        logits = model(torch.as_tensor(tokens)).logits.numpy()
    return logits, (np.stack([store[i] for i in sorted(store)]) if store else None)


def make(name: str) -> None:
    import torch

    model, store = _model(name)
    out = os.path.join(FIXTURES, f"hf_tiny_{name}")
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, max_shard_size="40KB")
    os.remove(os.path.join(out, "generation_config.json"))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=g).numpy()
    logits, max_logits = _forward(model, store, tokens)
    model.config._attn_implementation = "eager"  # transformers' own path must agree
    eager, _ = _forward(model, {}, tokens)
    assert np.abs(eager - logits).max() < 1e-5 * np.abs(logits).max(), "recording != eager"
    np.savez(os.path.join(out, "expected.npz"), tokens=tokens.astype(np.int32),
             logits=logits.astype(np.float32), attn_max_logits=max_logits.astype(np.float32))
    print(f"{out}: {len(os.listdir(out))} files, logits {logits.shape}, "
          f"max logits {max_logits.max():.2f}")


def check(directory: str, name: str) -> int:
    """transformers loads a k2jax-written checkpoint; its logits equal the fixture's."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    store: dict[int, np.ndarray] = {}
    AttentionInterface.register("k2jax_record_check", _record_max_logits(store))
    model = AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="k2jax_record_check", dtype="float32").eval()
    want = np.load(os.path.join(FIXTURES, f"hf_tiny_{name}", "expected.npz"))
    logits, max_logits = _forward(model, store, want["tokens"])
    err = np.abs(logits - want["logits"]).max()
    err_max = np.abs(max_logits - want["attn_max_logits"]).max()
    print(f"{directory}: {type(model).__name__}, max |Δlogits| = {err:.3g}, "
          f"max |Δ max logits| = {err_max:.3g}")
    return 0 if err == 0 and err_max == 0 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", nargs=2, metavar=("DIR", "NAME"))
    args = ap.parse_args()
    if args.check:
        return check(*args.check)
    for name in VARIANTS:
        make(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
