"""Optimizer cost: orthogonalisation vs optax.contrib.muon, step time and state bytes.

    python -m benchmarks.bench_optim [--preset small] [--iters 20]

1. Newton–Schulz (5 Jordan steps, float32) on the same shapes: ``optim.polar_factor``
   vs ``optax.contrib``'s ``orthogonalize_via_newton_schulz``.
2. One jitted optimizer update + apply on the preset's full parameter tree with random
   gradients: optax.contrib.muon (same Muon/AdamW split, same matrix views, Moonlight
   RMS scaling 0.2) vs ours: adamw, muon, muonclip.
3. Optimizer-state bytes of each.

Median of ``--iters`` calls after a compile call, each ``block_until_ready``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
import optax.contrib
from flax import nnx

import optim
from k2jax import optimizer, params, presets
from k2jax.model import Transformer
from k2jax.optimizer import qk_layout
from optim.newton_schulz import JORDAN


def timeit(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_ns(iters: int):
    from optax.contrib._muon import orthogonalize_via_newton_schulz as optax_ns

    print("\n| shape | ours ms | optax.contrib ms | ratio |")
    print("|---|---|---|---|")
    coeffs = jnp.asarray(JORDAN)
    for shape in [(256, 1024), (1024, 256), (768, 768), (16, 128, 512)]:
        x = jax.random.normal(jax.random.key(0), shape)
        ours = jax.jit(lambda x: optim.polar_factor(x))
        if len(shape) == 2:
            theirs = jax.jit(lambda x: optax_ns(x, coeffs, 5))
        else:
            theirs = jax.jit(jax.vmap(lambda x: optax_ns(x, coeffs, 5)))
        a, b = timeit(ours, x, iters=iters), timeit(theirs, x, iters=iters)
        print(f"| {shape} | {a * 1e3:.2f} | {b * 1e3:.2f} | {a / b:.2f} |", flush=True)


def optax_contrib_muon(lr, part: optim.Partition, p):
    def dimnums(kp, x):
        target = part.assign(optim.paths.path_str(kp), x.shape)
        if target == optim.ADAMW:
            return None
        return optax.contrib.MuonDimensionNumbers(target.fan_in, target.fan_out)

    dims = jax.tree_util.tree_map_with_path(dimnums, p)
    return optax.contrib.muon(lr, weight_decay=0.1, adam_b2=0.95, adam_weight_decay=0.1,
                              consistent_rms=0.2, muon_weight_dimension_numbers=dims)


def bench_step(preset: str, iters: int):
    cfg = presets.preset(preset)
    p = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), p)
    s = jnp.full((cfg.num_hidden_layers, cfg.num_attention_heads), 150.0)
    part = optimizer.partition()
    txs = {
        "optax.contrib.muon": optax_contrib_muon(1e-3, part, p),
        "adamw": optim.adamw(1e-3),
        "muon": optim.muon(1e-3, partition=part),
        "muonclip": optim.muonclip(1e-3, qk_layout=qk_layout(cfg), partition=part),
    }
    param_bytes = params.tree_bytes(p)
    print(f"\n{preset}: {sum(x.size for x in jax.tree.leaves(p)):,} parameters, "
          f"{param_bytes / 2**20:.2f} MiB")
    print("| optimizer | update+apply ms | state bytes | state / adamw |")
    print("|---|---|---|---|")
    results = {}
    for name, tx in txs.items():
        state = tx.init(p)
        extra = {"attn_max_logits": s} if name == "muonclip" else {}

        @jax.jit
        def step(p, state, g, tx=tx, extra=extra):
            u, state = tx.update(g, state, p, **extra)
            return optax.apply_updates(p, u), state

        t = timeit(step, p, state, grads, iters=iters)
        results[name] = (t, params.tree_bytes(state))
    adamw_bytes = results["adamw"][1]
    for name, (t, b) in results.items():
        print(f"| {name} | {t * 1e3:.2f} | {b:,} | {b / adamw_bytes:.3f} |", flush=True)
    ref = results["optax.contrib.muon"][0]
    print(f"\nmuon / optax.contrib.muon = {results['muon'][0] / ref:.3f}; "
          f"muonclip / muon = {results['muonclip'][0] / results['muon'][0]:.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__}, optax {optax.__version__}, backend {jax.default_backend()}")
    bench_ns(args.iters)
    bench_step(args.preset, args.iters)


if __name__ == "__main__":
    main()
