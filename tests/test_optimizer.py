"""k2jax/optimizer.py: the Muon partition over whole model trees, the QK-Clip layout
slice by slice, and which optimizer the config builds: every optimizer.* key reaches
the update and changes what it claims to.

What the clip does with the layout (max logits become min(S, τ), untouched slices stay
bit-identical, qk_norm refused) is tested in test_qk_clip.py.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
        return f"muon-experts-{shape[1]}"
    return "muon"


@pytest.mark.parametrize("preset", ["kimi-k2", "tiny"])
def test_partition_over_the_full_tree(preset):
    cfg = presets.preset(preset)
    state = nnx.state(params.abstract_model(cfg), nnx.Param)
    part = optimizer.partition()
    n = {"adamw": 0, "muon": 0}
    k, layers = cfg.first_k_dense_replace, cfg.num_hidden_layers
    for path, leaf in optim.paths.flatten(state).items():
        got = part.assign(path, leaf.shape)
        want = _expected_kind(path, leaf.shape)
        if want == "adamw":
            assert got == ADAMW, path
        else:  # every layer leaf is a stack [L, ...]: one matrix (or E) per layer
            assert isinstance(got, MatrixDims), path
            b, fi, fo = got.matrix_shape(leaf.shape)
            rows = k if path.startswith("dense_layers.") else layers - k
            experts = cfg.n_routed_experts if want.startswith("muon-experts") else 1
            assert b == rows * experts and leaf.shape[0] == rows, path
            assert fi * fo * b == np.prod(leaf.shape)
        n["adamw" if got == ADAMW else "muon"] += 1
    stacks = (k > 0) + (layers > k)  # attn and ffn leaves per stack, experts in the MoE one
    assert n["muon"] == 5 * stacks + 3 * stacks + 3 * (layers > k)
    text = part.describe(state)
    assert re.search(r"moe_layers\.moe\.w_up\s+\(\d+, \d+, \d+, \d+\)\s+muon\s+\d+ x \[", text)


# tiny: 2 layers, 4 heads, hidden 64 (MHA head_dim 16); MLA nope 16, rope 8, v 16.
# Powers: α on the query and 1 − α on the key side of a bilinear no-RoPE logit (√γ each
# at α = 1/2), γ (1.0) on the RoPE query (its key is shared by all heads) and on a GQA
# query (its key is shared by a group).
LAYOUTS = {
    "mla": (("tiny",), lambda a, al: [
        ClipTarget(a + "q_b", -1, 1, ((0, 16, al), (16, 24, 1.0))),
        ClipTarget(a + "kv_b", -1, 1, ((0, 16, 1 - al),))]),
    "mla-no-q-lora": (("tiny", "q_lora_rank=None"), lambda a, al: [
        ClipTarget(a + "q_proj", -1, 1, ((0, 16, al), (16, 24, 1.0))),
        ClipTarget(a + "kv_b", -1, 1, ((0, 16, 1 - al),))]),
    "mha": (("tiny", "attention=mha"), lambda a, al: [
        ClipTarget(a + "q_proj", -1, 1, ((0, 16, al),)),
        ClipTarget(a + "k_proj", -1, 1, ((0, 16, 1 - al),))]),
    "gqa": (("tiny", "attention=mha", "num_key_value_heads=2"), lambda a, al: [
        ClipTarget(a + "q_proj", -1, 1, ((0, 16, 1.0),))]),
}


@pytest.mark.parametrize("alpha", [0.5, 0.25])
@pytest.mark.parametrize("variant", sorted(LAYOUTS))
def test_qk_layout_slices(variant, alpha):
    changes, per_layer = LAYOUTS[variant]
    cfg = presets.preset(*changes)
    layout = qk_layout(cfg, alpha)
    assert (layout.num_layers, layout.num_heads) == (2, 4)
    # the layers are two stacks (dense, then MoE) with a leading layer axis
    want = [ClipTarget(t.path, first, 2, t.slices, layer_axis=0)
            for stack, first in (("dense_layers", 0), ("moe_layers", 1))
            for t in per_layer(f"{stack}.attn.", alpha)]
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


@pytest.mark.parametrize("monitor_only", [False, True])
def test_build_optimizer_clips_at_the_configured_tau_and_alpha(monitor_only):
    """One real step with zero gradients and no decay, so the update is the clip alone:
    the head whose max logit is 2τ (τ from ``optimizer.tau``) is the only one clipped,
    with γ = 1/2, its no-RoPE query ×γ^α and key ×γ^(1−α) (α from
    ``optimizer.qk_clip_alpha``); ``monitor_only`` records the same and changes nothing."""
    cfg = presets.load("tiny", ["optimizer.name=muon", "optimizer.qk_clip=true",
                                "optimizer.tau=5", "optimizer.weight_decay=0",
                                "optimizer.qk_clip_alpha=0.25",
                                f"optimizer.monitor_only={monitor_only}"])
    tx = optimizer.build_optimizer(cfg)
    p = nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(0)), nnx.Param)
    s = jnp.full((2, 4), 4.0).at[1, 2].set(10.0)
    u, state = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p, attn_max_logits=s)
    clip = find_state(state)
    assert isinstance(clip, QKClipState)
    np.testing.assert_array_equal(clip.clipped, np.asarray(s > 5.0))
    assert float(clip.gamma[1, 2]) == pytest.approx(0.5)
    old, new = optim.paths.flatten(p), optim.paths.flatten(optax.apply_updates(p, u))
    changed = sorted(k for k in old if not np.array_equal(old[k], new[k]))
    assert changed == ([] if monitor_only else ["moe_layers.attn.kv_b",
                                                 "moe_layers.attn.q_b"])  # layer 1 = MoE row 0
    if not monitor_only:
        q, k = (np.asarray(new[f"moe_layers.attn.{n}"][0, :, 2, :16]) for n in ("q_b", "kv_b"))
        np.testing.assert_allclose(q, old["moe_layers.attn.q_b"][0, :, 2, :16] * 0.5 ** 0.25,
                                   rtol=1e-6)
        np.testing.assert_allclose(k, old["moe_layers.attn.kv_b"][0, :, 2, :16] * 0.5 ** 0.75,
                                   rtol=1e-6)


# What each switch moves to Muon, by name (independent of the partition's regexes).
MUON_SWITCHES = {
    "muon_router": lambda path: path.endswith(".moe.router"),
    "muon_embeddings": lambda path: path == "embed",
    "muon_lm_head": lambda path: path == "lm_head",
}


@pytest.mark.parametrize("key", sorted(MUON_SWITCHES))
def test_muon_switches_move_exactly_their_leaves(key):
    """Over the whole tree: the switched leaves go from AdamW to Muon as one fan_in x
    fan_out matrix (rows are fan-in), every other leaf keeps its assignment, and the built
    optimizer keeps Muon momentum for them."""
    cfg = presets.load("tiny", [f"optimizer.{key}=true"])
    tree = nnx.state(params.abstract_model(cfg.model), nnx.Param)
    default, switched = optimizer.partition(), optimizer.partition(cfg.optimizer)
    moved = []
    for path, leaf in optim.paths.flatten(tree).items():
        before, after = default.assign(path, leaf.shape), switched.assign(path, leaf.shape)
        if MUON_SWITCHES[key](path):
            assert before == ADAMW and isinstance(after, MatrixDims), path
            rows = leaf.shape[0] if path.startswith(("dense_layers.", "moe_layers.")) else 1
            assert after.matrix_shape(leaf.shape) == (rows, *leaf.shape[-2:]), path
            moved.append(path)
        else:
            assert after == before, path
    assert len(moved) == 1  # one leaf; the router's is a stack of the MoE layers
    muon = [s for s in jax.tree.leaves(_abstract_state(cfg),
                                       is_leaf=lambda x: isinstance(x, MuonState))
            if isinstance(s, MuonState)]
    assert set(moved) <= set(optim.paths.flatten(muon[0].momentum))


def _zero_grad_step(cfg):
    """(old, new) flat params after one update with zero gradients: the update is the
    weight decay alone (Adam's 0/(0+eps) and NS(0) are 0)."""
    tx = optimizer.build_optimizer(cfg)
    p = nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(0)), nnx.Param)
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    return optim.paths.flatten(p), optim.paths.flatten(optax.apply_updates(p, u))


CONSTANT_LR = ["optimizer.schedule=constant", "optimizer.warmup_steps=0",
               "optimizer.lr=0.01", "optimizer.weight_decay=0.5"]


@pytest.mark.parametrize("norms, embeddings", [(True, True), (False, True), (True, False),
                                               (False, False)])
def test_decay_mask_spares_exactly_the_chosen_leaves(norms, embeddings):
    """A spared leaf keeps every bit; every other leaf, in either group, becomes
    (1 − lr·wd)·p. There are no bias parameters to spare."""
    cfg = presets.load("tiny", [*CONSTANT_LR, f"optimizer.decay_norms={norms}",
                                f"optimizer.decay_embeddings={embeddings}"])
    old, new = _zero_grad_step(cfg)
    assert not any("bias" in path for path in old)
    for path, x in old.items():
        spared = ((not norms and path.endswith("norm.scale"))
                  or (not embeddings and path in ("embed", "lm_head")))
        if spared:
            np.testing.assert_array_equal(new[path], x, err_msg=path)
        else:
            np.testing.assert_allclose(new[path], x * (1 - 0.01 * 0.5), rtol=1e-6,
                                       err_msg=path)


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_adam_lr_ratio_sets_the_adamw_group_lr_under_muon(name):
    """Under Muon the AdamW group's peak lr is adam_lr_ratio × lr (an injected
    hyperparameter); under AdamW every leaf takes lr."""
    cfg = presets.load("tiny", [*CONSTANT_LR, f"optimizer.name={name}",
                                "optimizer.adam_lr_ratio=0.25"])
    adam_lr = 0.0025 if name == "muon" else 0.01
    state = optimizer.build_optimizer(cfg).init(
        nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(0)), nnx.Param))
    assert float(state.hyperparams["adam_lr"]) == pytest.approx(adam_lr)
    old, new = _zero_grad_step(cfg)
    for path, x in old.items():
        lr = adam_lr if name == "adamw" or _expected_kind(path, x.shape) == "adamw" else 0.01
        np.testing.assert_allclose(new[path], x * (1 - lr * 0.5), rtol=1e-6, err_msg=path)


def _init_params(cfg):
    return nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(0)), nnx.Param)


@functools.cache
def _two_steps(*overrides):
    """Flat params after two updates with fixed non-zero gradients (a second step, so
    momentum and Nesterov matter)."""
    cfg = presets.load("tiny", [f"optimizer.{o}" for o in overrides])
    tx = optimizer.build_optimizer(cfg)
    p = _init_params(cfg)
    state = tx.init(p)
    for k in range(2):
        u, state = tx.update(jax.tree.map(lambda x: jnp.cos(x * (7.0 + k)), p), state, p)  # noqa: B023
        p = optax.apply_updates(p, u)
    return {k: np.asarray(v) for k, v in optim.paths.flatten(p).items()}


@pytest.mark.parametrize("override", [
    "name=adamw", "lr=0.01", "warmup_steps=1", "weight_decay=0.3", "adam_weight_decay=0.3",
    "b1=0.8", "b2=0.9", "eps=1e-3", "ns_steps=3", "ns_coeffs=polar_express",
    "ns_dtype=bfloat16", "nesterov=false", "momentum=0.8", "mu_dtype=bfloat16",
    "update_scale=jordan", "update_scale=spectral", "rms_scale=0.3", "adam_lr_ratio=0.5",
    "muon_router=true", "muon_embeddings=true", "muon_lm_head=true", "decay_norms=false",
    "decay_embeddings=false"])
def test_every_optimizer_key_reaches_the_update(override):
    """The keys that shape the first two updates; the QK-Clip keys are checked above,
    grad_clip_norm below, the schedule's later phases in test_schedules.py."""
    base, changed = _two_steps(), _two_steps(override)
    assert any(not np.array_equal(base[k], changed[k]) for k in base), override


def test_grad_clip_norm_clips_the_global_gradient_norm_first():
    """With eps = 1 Adam is not scale-invariant: its first update g/(|g| + 1) shows the
    gradient it saw, g·c/‖g‖ for c = grad_clip_norm < ‖g‖."""
    cfg = presets.load("tiny", [*CONSTANT_LR, "optimizer.name=adamw", "optimizer.eps=1",
                                "optimizer.weight_decay=0", "optimizer.grad_clip_norm=0.5"])
    tx, p = optimizer.build_optimizer(cfg), _init_params(cfg)
    g = optim.paths.flatten(jax.tree.map(lambda x: jnp.cos(x * 7.0), p))
    u, _ = tx.update(jax.tree.map(lambda x: jnp.cos(x * 7.0), p), tx.init(p), p)
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in g.values()))
    assert norm > 0.5
    for path, ux in optim.paths.flatten(u).items():
        gc = np.asarray(g[path], np.float64) * 0.5 / norm
        np.testing.assert_allclose(ux, -0.01 * gc / (np.abs(gc) + 1), rtol=1e-5, atol=1e-10,
                                   err_msg=path)


def test_ns_dtype_bfloat16_is_close_to_float32_but_not_equal():
    """Newton–Schulz in bfloat16 changes every Muon leaf's two-step change, but keeps its
    direction (cosine > 0.98 to float32's; Jordan's quintic does not converge, so bf16
    rounding moves singular values within its band: the changes differ by ~15% in norm)."""
    init = optim.paths.flatten(_init_params(presets.load("tiny")))
    base, bf16 = _two_steps(), _two_steps("ns_dtype=bfloat16")
    for path, x in base.items():
        if _expected_kind(path, x.shape) != "adamw":
            a, b = (x - init[path]).ravel(), (bf16[path] - init[path]).ravel()
            cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            assert not np.array_equal(a, b) and cos > 0.98, (path, cos)


@pytest.mark.parametrize("mu_dtype", ["float32", "bfloat16"])
def test_mu_dtype_sets_muon_momentum_and_adam_first_moment(mu_dtype):
    state = _abstract_state(presets.load("tiny", [f"optimizer.mu_dtype={mu_dtype}"]))
    found = {}
    for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
            x, MuonState | optax.ScaleByAdamState)):
        if isinstance(s, MuonState | optax.ScaleByAdamState):
            found[type(s)] = s
    assert {x.dtype for x in jax.tree.leaves(found[MuonState].momentum)} == {jnp.dtype(mu_dtype)}
    adam = found[optax.ScaleByAdamState]
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(mu_dtype)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype("float32")}
