"""Chunked (flash-style) vs reference attention: compiled memory, step time, max-logit cost.

    python -m benchmarks.bench_attention                       # all sections
    python -m benchmarks.bench_attention --section memory --seqs 1024 4096 8192
    python -m benchmarks.bench_attention --section speed --rounds 21

memory: the compiler's figures (``memory_analysis``; nothing is allocated or run) for
value_and_grad of one attention layer of ``--preset`` (B = 1), w.r.t. its parameters and
input: temp bytes, argument bytes, their sum, and chunked / reference.

speed: forward+backward of the whole ``--preset`` model (as benchmarks/bench_model.py
times it) with reference attention, chunked attention, and chunked attention that skips
S_h (``record_max=False``, reachable only from here), and S_h's cost in one attention
layer alone (an upper bound on its share of a step). Every variant is compiled first, then
the variants take turns, one call each per round, so that a slow spell of a shared
machine hits all of them alike; each time is a median over rounds, and each comparison
the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax import presets
from k2jax.model import Transformer, cross_entropy, flash
from k2jax.model.attention import make_attention


def _attention_loss(graphdef, state, x_BTD):
    y_BTD, _ = nnx.merge(graphdef, state)(x_BTD)
    return jnp.sum(y_BTD.astype(jnp.float32))


def layer_memory(cfg, seq: int) -> dict[str, int]:
    """Compiled temp and argument bytes of one attention layer's forward+backward, B = 1."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make_attention(cfg, rngs=nnx.Rngs(0))))
    x_BTD = jax.ShapeDtypeStruct((1, seq, cfg.hidden_size), jnp.dtype(cfg.dtype))
    grad_fn = jax.value_and_grad(functools.partial(_attention_loss, graphdef), argnums=(0, 1))
    m = jax.jit(grad_fn).lower(state, x_BTD).compile().memory_analysis()
    return {"temp": m.temp_size_in_bytes, "args": m.argument_size_in_bytes}


def memory_section(preset: str, seqs: list[int]) -> None:
    mib = 2 ** 20
    print("\n| T | reference temp MiB | reference args MiB | chunked temp MiB | "
          "chunked args MiB | chunked / reference (temp + args) |")
    print("|---|---|---|---|---|---|")
    for seq in seqs:
        ref = layer_memory(presets.preset(preset, "attention_impl=reference"), seq)
        chunked = layer_memory(presets.preset(preset, "attention_impl=chunked"), seq)
        ratio = (chunked["temp"] + chunked["args"]) / (ref["temp"] + ref["args"])
        print(f"| {seq} | {ref['temp'] / mib:,.1f} | {ref['args'] / mib:,.2f} | "
              f"{chunked['temp'] / mib:,.1f} | {chunked['args'] / mib:,.2f} | "
              f"{ratio:.4f} (1/{1 / ratio:,.0f}) |", flush=True)


def _loss(graphdef, p, rest, tokens):
    logits, aux = nnx.merge(graphdef, p, rest)(tokens[:, :-1])
    return cross_entropy(logits, tokens[:, 1:])[0] + aux["balance_loss"]


def _compile(fn, args, record_max: bool):
    """``fn(*args)`` jitted and compiled, as a zero-argument callable that has run once."""
    without = functools.partial(flash.flash_attention, record_max=False)
    with mock.patch.object(flash, "flash_attention", flash.flash_attention if record_max
                           else without):
        compiled = jax.jit(fn).lower(*args).compile()  # traced here, so the patch holds
    call = functools.partial(compiled, *args)
    jax.block_until_ready(call())
    return call


def compiled_step(cfg, batch: int, seq: int, record_max: bool = True):
    """One loss+gradient of the whole model, compiled."""
    graphdef, p, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.vocab_size)
    fn = jax.value_and_grad(functools.partial(_loss, graphdef))
    return _compile(fn, (p, rest, tokens), record_max)


def compiled_layer(cfg, batch: int, seq: int, record_max: bool = True):
    """One attention layer's value_and_grad (parameters and input), compiled."""
    graphdef, state = nnx.split(make_attention(cfg, rngs=nnx.Rngs(0)))
    x_BTD = jax.random.normal(jax.random.key(0), (batch, seq, cfg.hidden_size))
    fn = jax.value_and_grad(functools.partial(_attention_loss, graphdef), argnums=(0, 1))
    return _compile(fn, (state, x_BTD), record_max)


def interleaved_times(calls: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each call in each round, the calls taking turns once per round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - t0)
    return times


def paired_cost(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of time(name) / time(base) - 1: each ratio from one round."""
    return statistics.median(a / b - 1 for a, b in zip(times[name], times[base]))


def speed_section(preset: str, shapes: list[tuple[int, int]], rounds: int) -> None:
    print("\n| batch x seq | attention | fwd+bwd s (median) | vs reference (paired) |")
    print("|---|---|---|---|")
    chunked = presets.preset(preset, "attention_impl=chunked")
    for batch, seq in shapes:
        calls = {
            "reference": compiled_step(presets.preset(preset, "attention_impl=reference"),
                                       batch, seq),
            "chunked": compiled_step(chunked, batch, seq),
            "chunked, no S_h": compiled_step(chunked, batch, seq, record_max=False),
        }
        if seq > 128:
            calls["chunked, blocks 128"] = compiled_step(presets.preset(
                preset, "attention_impl=chunked", "attention_block_q=128",
                "attention_block_kv=128"), batch, seq)
        times = interleaved_times(calls, rounds)
        for name, ts in times.items():
            print(f"| {batch} x {seq} | {name} | {statistics.median(ts):.4f} | "
                  f"{paired_cost(times, name, 'reference'):+.1%} |", flush=True)
        del calls
    print("\n| batch x seq | S_h's cost: whole step | S_h's cost: attention layer alone |")
    print("|---|---|---|")
    for batch, seq in shapes:
        costs = []
        for compile_one in (compiled_step, compiled_layer):
            times = interleaved_times({
                "with": compile_one(chunked, batch, seq),
                "without": compile_one(chunked, batch, seq, record_max=False)}, rounds)
            costs.append(paired_cost(times, "with", "without"))
        print(f"| {batch} x {seq} | {costs[0]:+.2%} | {costs[1]:+.2%} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--section", choices=["all", "memory", "speed"], default="all")
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 8192],
                    help="memory: sequence lengths")
    ap.add_argument("--shapes", nargs="+", default=["32x128", "8x512"],
                    help="speed: batch x seq")
    ap.add_argument("--rounds", type=int, default=21, help="speed: rounds")
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{jax.device_count()} device(s); preset {args.preset}")
    if args.section in ("all", "memory"):
        memory_section(args.preset, args.seqs)
    if args.section in ("all", "speed"):
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
        speed_section(args.preset, shapes, args.rounds)


if __name__ == "__main__":
    main()
