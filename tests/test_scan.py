"""Stacked, scanned layers: how the decoder runs changes nothing it computes, and the
program does not grow with depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2jax import presets
from k2jax.model import Transformer


def _loss_and_grads(cfg, tokens):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, p, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits, aux = nnx.merge(graphdef, p, rest)(tokens)
        return jnp.mean(logits ** 2) + aux["balance_loss"], aux

    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(p)
    return value, aux, grads


@pytest.mark.parametrize("extra", [("scan_layers=false",), ("remat=full",),
                                   ("remat=save_dots",), ("scan_layers=false", "remat=full")])
def test_execution_options_compute_the_same_function(extra):
    """Scanned or unrolled, with or without rematerialisation: the same loss, max logits,
    expert loads and gradients (same parameters: they are drawn before stacking)."""
    base = ("num_hidden_layers=4", "first_k_dense_replace=2", "initializer_range=0.1",
            "aux_loss_alpha=0.01")
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    want = _loss_and_grads(presets.preset("tiny", *base), tokens)
    got = _loss_and_grads(presets.preset("tiny", *base, *extra), tokens)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_layer_view_reads_the_stacks_in_layer_order():
    cfg = presets.preset("tiny", "num_hidden_layers=3")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    k = cfg.first_k_dense_replace
    assert model.dense_layers.attn.q_b.shape[0] == k
    assert model.moe_layers.moe.w_gate.shape[:2] == (3 - k, cfg.n_routed_experts)
    for i in range(3):
        stack, row = (model.dense_layers, i) if i < k else (model.moe_layers, i - k)
        np.testing.assert_array_equal(model.layer(i).attn.q_b[...], stack.attn.q_b[...][row])
    assert hasattr(model.layer(0), "mlp") and hasattr(model.layer(2), "moe")


def _program_size(layers: int, scan: bool) -> int:
    cfg = presets.preset("tiny", f"num_hidden_layers={layers}", f"scan_layers={scan}")
    graphdef, p, rest = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))),
                                  nnx.Param, ...)
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    grad = jax.grad(lambda p, rest, t: nnx.merge(graphdef, p, rest)(t)[0].mean())
    return len(jax.jit(grad).lower(p, rest, tokens).as_text())


def test_scanned_program_does_not_grow_with_depth():
    """The lowered forward+backward at 12 layers is the size of the one at 3 (one layer
    body in a loop), where the unrolled program grows with every layer."""
    assert _program_size(12, True) < 1.05 * _program_size(3, True)
    assert _program_size(12, False) > 2 * _program_size(3, False)
