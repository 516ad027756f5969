"""k2jax/optimizer.py: the Muon partition over whole model trees, the QK-Clip layout
slice by slice, and which optimizer the config builds.

What the clip does with the layout (max logits become min(S, τ), untouched slices stay
bit-identical, qk_norm refused) is tested in test_qk_clip.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optim
from k2jax import optimizer, params, presets
from k2jax.model import Transformer
from k2jax.optimizer import qk_layout
from optim import ADAMW, ClipTarget, MatrixDims
from optim.muon import MuonState
from optim.qk_clip import QKClipState, find_state


def _expected_kind(path: str, shape) -> str:
    """What the docs promise, written independently of the partition's regexes."""
    name = path.split(".")[-1]
    parent = path.split(".")[-2] if "." in path else ""
    if path in ("embed", "lm_head") or name == "router" or name == "scale":
        return "adamw"
    if parent == "moe" and name in ("w_gate", "w_up", "w_down"):
        return f"muon-experts-{shape[0]}"
    return "muon"


@pytest.mark.parametrize("preset", ["kimi-k2", "tiny"])
def test_partition_over_the_full_tree(preset):
    cfg = presets.preset(preset)
    state = nnx.state(params.abstract_model(cfg), nnx.Param)
    part = optimizer.partition(cfg)
    n = {"adamw": 0, "muon": 0}
    for path, leaf in optim.paths.flatten(state).items():
        got = part.assign(path, leaf.shape)
        want = _expected_kind(path, leaf.shape)
        if want == "adamw":
            assert got == ADAMW, path
        else:
            assert isinstance(got, MatrixDims), path
            b, fi, fo = got.matrix_shape(leaf.shape)
            assert b == (cfg.n_routed_experts if want.startswith("muon-experts") else 1), path
            assert fi * fo * b == np.prod(leaf.shape)
        n["adamw" if got == ADAMW else "muon"] += 1
    layers = cfg.num_hidden_layers
    assert n["muon"] == 5 * layers + 3 * layers + 3 * cfg.num_moe_layers  # attn, ffn, experts
    text = part.describe(state)
    assert re.search(r"layers\.1\.moe\.w_up\s+\(\d+, \d+, \d+\)\s+muon\s+\d+ x \[", text)


# tiny: 2 layers, 4 heads, hidden 64 (MHA head_dim 16); MLA nope 16, rope 8, v 16.
# Powers: √γ (0.5) on each side of a bilinear no-RoPE logit, γ (1.0) on the RoPE query
# (its key is shared by all heads) and on a GQA query (its key is shared by a group).
LAYOUTS = {
    "mla": (("tiny",), lambda a: [ClipTarget(a + "q_b", -1, 1, ((0, 16, 0.5), (16, 24, 1.0))),
                                  ClipTarget(a + "kv_b", -1, 1, ((0, 16, 0.5),))]),
    "mla-no-q-lora": (("tiny", "q_lora_rank=None"),
                      lambda a: [ClipTarget(a + "q_proj", -1, 1, ((0, 16, 0.5), (16, 24, 1.0))),
                                 ClipTarget(a + "kv_b", -1, 1, ((0, 16, 0.5),))]),
    "mha": (("tiny", "attention=mha"),
            lambda a: [ClipTarget(a + "q_proj", -1, 1, ((0, 16, 0.5),)),
                       ClipTarget(a + "k_proj", -1, 1, ((0, 16, 0.5),))]),
    "gqa": (("tiny", "attention=mha", "num_key_value_heads=2"),
            lambda a: [ClipTarget(a + "q_proj", -1, 1, ((0, 16, 1.0),))]),
}


@pytest.mark.parametrize("variant", sorted(LAYOUTS))
def test_qk_layout_slices(variant):
    changes, per_layer = LAYOUTS[variant]
    cfg = presets.preset(*changes)
    layout = qk_layout(cfg)
    assert (layout.num_layers, layout.num_heads) == (2, 4)
    want = [ClipTarget(t.path, layer, t.head_axis, t.slices) for layer in range(2)
            for t in per_layer(f"layers.{layer}.attn.")]
    assert list(layout.targets) == want
    # every target is a leaf of the model with heads on head_axis and the slices inside its
    # last axis (kv_b's last axis is nope + v: the value columns are never scaled)
    shapes = {k: v.shape for k, v in optim.paths.flatten(
        nnx.state(params.abstract_model(cfg), nnx.Param)).items()}
    for t in layout.targets:
        assert shapes[t.path][t.head_axis] == cfg.num_attention_heads, t.path
        assert t.slices[-1][1] <= shapes[t.path][-1], t.path


def _abstract_state(cfg):
    tx = optimizer.build_optimizer(cfg)
    p = nnx.state(params.abstract_model(cfg.model), nnx.Param)
    return jax.eval_shape(tx.init, p)


@pytest.mark.parametrize("name", ["adamw", "muon"])
@pytest.mark.parametrize("qk_clip", [False, True])
def test_build_optimizer_chains_qk_clip_exactly_when_asked(name, qk_clip):
    cfg = presets.load("tiny", [f"optimizer.name={name}", f"optimizer.qk_clip={qk_clip}"])
    state = _abstract_state(cfg)
    clip = find_state(state)
    assert (clip is not None) == qk_clip
    if qk_clip:
        assert clip.clipped.shape == (cfg.model.num_hidden_layers,
                                      cfg.model.num_attention_heads)
    muon = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, MuonState))
            if isinstance(s, MuonState)]
    assert bool(muon) == (name == "muon")


def test_build_optimizer_clips_at_the_configured_tau():
    """One real step: the head whose max logit is 2τ (τ from ``optimizer.tau``) is the only
    one clipped, with γ = 1/2."""
    cfg = presets.load("tiny", ["optimizer.name=muon", "optimizer.qk_clip=true",
                                "optimizer.tau=5"])
    tx = optimizer.build_optimizer(cfg)
    p = nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(0)), nnx.Param)
    s = jnp.full((2, 4), 4.0).at[1, 2].set(10.0)
    _, state = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p, attn_max_logits=s)
    clip = find_state(state)
    assert isinstance(clip, QKClipState)
    np.testing.assert_array_equal(clip.clipped, np.asarray(s > 5.0))
    assert float(clip.gamma[1, 2]) == pytest.approx(0.5)
