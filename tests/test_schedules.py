"""optim/schedules.py: every kind against numbers computed by hand from its definition.

Warm-up is peak·min(1, (step+1)/warmup_steps), so step 0 already trains at peak/warmup.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optim


def _values(s, steps):
    return [float(s(t)) for t in steps]


def test_constant():
    # peak 2, 4 warm-up steps: 2·1/4, 2·2/4, 2·3/4, then 2 for ever (past total_steps too)
    s = optim.schedule(2.0, total_steps=10, warmup_steps=4, kind="constant")
    assert _values(s, [0, 1, 2, 3, 4, 9, 10, 50]) == pytest.approx(
        [0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0])
    assert _values(optim.schedule(2.0, total_steps=5), [0, 3]) == [2.0, 2.0]  # no warm-up


def test_cosine():
    # peak 1, warm-up 10 then cosine over steps 10..110: mult = r + (1-r)·(1+cos(π·f))/2,
    # f = (step-10)/100
    s = optim.schedule(1.0, total_steps=110, warmup_steps=10, kind="cosine", final_ratio=0.0)
    half_sqrt2 = math.sqrt(2) / 2
    assert _values(s, [0, 4, 9, 10, 35, 60, 85, 110, 200]) == pytest.approx(
        [0.1, 0.5, 1.0, 1.0, (1 + half_sqrt2) / 2, 0.5, (1 - half_sqrt2) / 2, 0.0, 0.0],
        abs=1e-6)
    r = optim.schedule(3.0, total_steps=110, warmup_steps=10, kind="cosine", final_ratio=0.1)
    # 3·(0.1 + 0.9·0.5) = 1.65 half-way; 3·0.1 = 0.3 at the end
    assert _values(r, [60, 110]) == pytest.approx([1.65, 0.3])


def test_wsd_linear_and_cosine_decay():
    # peak 1, warm-up 10, stable until round(100·0.8) = 80, then 80..100 down to 0.1
    s = optim.schedule(1.0, total_steps=100, warmup_steps=10, kind="wsd", final_ratio=0.1,
                       decay_fraction=0.2)
    assert _values(s, [0, 4, 9, 10, 50, 79, 80, 85, 90, 95, 100, 150]) == pytest.approx(
        [0.1, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1])
    c = optim.schedule(1.0, total_steps=100, warmup_steps=10, kind="wsd", final_ratio=0.1,
                       decay_fraction=0.2, decay_shape="cosine")
    # 0.1 + 0.9·(1 + cos(π/4))/2 at step 85; the mid-point and the end match the linear decay
    assert _values(c, [79, 85, 90, 100]) == pytest.approx(
        [1.0, 0.1 + 0.9 * (1 + math.sqrt(2) / 2) / 2, 0.55, 0.1])
    # the decay never starts inside the warm-up: 60 % decay after a 50-step warm-up of 100
    late = optim.schedule(1.0, total_steps=100, warmup_steps=50, kind="wsd", final_ratio=0.0,
                          decay_fraction=0.6)
    assert _values(late, [49, 50, 75, 100]) == pytest.approx([1.0, 1.0, 0.5, 0.0])


def test_traced_peak_and_step():
    """The train step injects the peak as a traced scalar and passes a traced step."""
    f = jax.jit(lambda peak, step: optim.schedule(
        peak, total_steps=100, warmup_steps=10, kind="wsd", final_ratio=0.1,
        decay_fraction=0.2)(step))
    assert float(f(jnp.float32(2.0), jnp.int32(90))) == pytest.approx(1.1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        optim.schedule(1.0, total_steps=5, kind="linear")
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.schedule(1.0, total_steps=5, warmup_steps=6)
    with pytest.raises(ValueError, match="final_ratio"):
        optim.schedule(1.0, total_steps=5, final_ratio=1.5)
    with pytest.raises(ValueError, match="decay_shape"):
        optim.schedule(1.0, total_steps=5, kind="wsd", decay_shape="step")


def test_optimizer_reads_the_schedule_at_its_step_count():
    """Muon and AdamW updates are linear in the lr and their moments do not depend on it,
    so with a schedule each step's update is lr(t)/c times the constant-lr-c update."""
    rng = np.random.default_rng(0)
    p = {"w": jnp.asarray(rng.normal(size=(16, 24)), jnp.float32),
         "b": jnp.asarray(rng.normal(size=(24,)), jnp.float32)}
    sched = optim.schedule(1e-2, total_steps=10, warmup_steps=5)
    for make in (optim.muon, optim.adamw):
        tx, ref = make(sched), make(1e-2)
        s, s_ref = tx.init(p), ref.init(p)
        for t in range(3):
            g = jax.tree.map(lambda x, t=t: jnp.cos(x * (t + 1)), p)
            u, s = tx.update(g, s, p)
            u_ref, s_ref = ref.update(g, s_ref, p)
            for k in p:  # lr(t) = 1e-2·(t+1)/5
                np.testing.assert_allclose(u[k], u_ref[k] * (t + 1) / 5, rtol=1e-5,
                                           err_msg=f"{make.__name__} step {t} {k}")
