"""The whole jitted train step of the spike study, as step time and % of the matmul peak.

    python -m benchmarks.bench_step                                  # small, 16 x 128, 3 optimizers
    python -m benchmarks.bench_step --optimizers muonclip --variant model.scan_layers=false
    python -m benchmarks.bench_step --parts                          # where the time goes
    python -m benchmarks.bench_step --optimizers adamw --profile    # ... per XLA op kind

The step is k2jax.train.make_train_step's, built as k2jax.loop.setup builds it, on the
spike study's configuration (experiments/spike_study.py: ``DEFAULT["base"]``, the
optimizer's overrides, ``optimizer.lr``), fed a fixed batch of random tokens (no data
pipeline, no host-side logging: the loop's ``perf/mfu`` includes those). Each
``--variant`` (space-separated ``key=value`` overrides; repeatable) is compiled first,
then the variants take turns, one step each per round; times are medians over rounds.

"% of peak" is the repo's MFU (k2jax.metrics.mfu): analytic model FLOPs per token
(k2jax.metrics.flops_per_token, which counts no optimizer FLOPs) x tokens / step time,
over k2jax.metrics.peak_flops_per_device (on a CPU a cached, measured f32 matmul).

``--parts`` times jitted pieces of the first optimizer's step alone: forward,
forward+backward (k2jax.train.micro_batch_grads), the optimizer update
(k2jax.train.guarded_update) and one layer's attention, dense MLP, MoE, and the
embedding + LM head + cross-entropy, each forward+backward on inputs of the step's shape.

``--profile`` traces 8 steps of the first run with ``jax.profiler`` and sums each XLA
op's self time on the CPU client's threads, grouped by what the op's ``op_name``
metadata says it computes (einsum strings, scan slicing, copies, ...); the executor's
own time between ops is reported apart (on 2 cores: how far from both busy).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.spike_study import DEFAULT, OPTIMIZERS, QUICK
from k2jax import loop, metrics, presets, train
from k2jax import optimizer as optimizer_lib
from k2jax.model import Transformer, cross_entropy

SPIKE_BASE = [*DEFAULT["base"], f"optimizer.tau={DEFAULT['tau']}",
              f"train.steps={QUICK['steps']}"]  # as the spike study's --quick runs


def config(preset: str, opt: str, lr: float, changes: list[str]):
    return presets.load(preset, [*SPIKE_BASE, *OPTIMIZERS[opt], f"optimizer.lr={lr}",
                                 *changes])


def random_batch(cfg, mesh) -> dict:
    d = cfg.data
    toks = np.random.default_rng(0).integers(0, cfg.model.vocab_size,
                                             (d.global_batch_size, d.seq_len + 1), np.int32)
    return train.global_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:]}, mesh)


def build(cfg):
    """(state, step, batch, pieces) as k2jax.loop.setup builds them, compiled and run once."""
    mesh = loop.make_mesh(cfg)
    tx = optimizer_lib.build_optimizer(cfg, mesh)
    state, shardings, graphdef = train.init_state(cfg, tx, mesh)
    step = train.make_train_step(cfg, graphdef, tx, mesh, shardings)
    batch = random_batch(cfg, mesh)
    state, m = step(state, batch)
    jax.block_until_ready((state, m))
    return {"state": state, "step": step, "batch": batch, "graphdef": graphdef, "tx": tx}


def stepper(b: dict):
    """A zero-argument callable running one donated step on b's state."""
    def call():
        b["state"], m = b["step"](b["state"], b["batch"])
        return b["state"], m
    return call


def interleaved(calls: dict, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times[k].append(time.perf_counter() - t0)
    return times


def pct_peak(cfg, seconds: float, peak: float) -> float:
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    return metrics.mfu(tokens / seconds, metrics.flops_per_token(cfg.model, cfg.data.seq_len),
                       peak, jax.device_count())


def _once(fn, *args):
    """fn jitted, compiled and run once, as a zero-argument callable."""
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    return functools.partial(compiled, *args)


def _module_fwd_bwd(module, x, out=lambda y: y):
    """fwd+bwd of sum(out(module(x))) w.r.t. the module's params and x."""
    graphdef, state = nnx.split(module)

    def f(state, x):
        return jnp.sum(out(nnx.merge(graphdef, state)(x)))
    return _once(jax.value_and_grad(f, argnums=(0, 1)), state, x)


def _head_fwd_bwd(model, batch):
    """Embedding gather + final norm + LM head + cross-entropy, fwd+bwd."""
    embed, head, norm = model.embed[...], model.lm_head[...], model.norm

    def f(embed, head, h, inputs, targets):
        x = jnp.take(embed, inputs, axis=0) + h
        return cross_entropy(jnp.dot(norm(x), head), targets)[0]
    h = jnp.zeros((*batch["inputs"].shape, embed.shape[1]), embed.dtype)
    return _once(jax.value_and_grad(f, argnums=(0, 1, 2)), embed, head, h,
                 batch["inputs"], batch["targets"])


def part_calls(cfg, b: dict) -> dict:
    """Jitted pieces of the step (see the module docstring), each a zero-argument callable."""
    state, batch, m = b["state"], b["batch"], cfg.model
    loss = functools.partial(train.loss_fn, graphdef=b["graphdef"], cfg=cfg,
                             constrain=lambda x: x)
    grads_fn = functools.partial(train.micro_batch_grads, loss=loss, cfg=cfg)
    grads, stats = jax.jit(grads_fn)(state, batch)
    calls = {
        "forward (loss)": _once(lambda s, bt: loss(s.params, s.rest, bt)[0], state, batch),
        "forward+backward": _once(grads_fn, state, batch),
        "optimizer update": _once(lambda s, g, st: train.guarded_update(s, g, st, b["tx"])[:2],
                                  state, grads, stats),
    }
    model = Transformer(m, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (*batch["inputs"].shape, m.hidden_size))
    calls["1 attention layer"] = _module_fwd_bwd(model.layer(0).attn, x, lambda y: y[0])
    if m.first_k_dense_replace:
        calls["1 dense MLP"] = _module_fwd_bwd(model.layer(0).mlp, x)
    if m.num_moe_layers:
        calls["1 MoE layer"] = _module_fwd_bwd(model.layer(m.num_hidden_layers - 1).moe, x,
                                               lambda y: y[0])
    calls["embed + LM head + CE"] = _head_fwd_bwd(model, batch)
    return calls


def part_flops(cfg) -> dict[str, float]:
    """Analytic training FLOPs of each piece per step (metrics.flops_breakdown's counts)."""
    m, n = cfg.model, cfg.data.global_batch_size * cfg.data.seq_len
    br = metrics.flops_breakdown(m, cfg.data.seq_len)
    total = sum(br.values()) * n
    d, f = m.hidden_size, m.moe_intermediate_size
    return {"forward (loss)": total / 3, "forward+backward": total,
            "1 attention layer": (br["attn_proj"] + br["attention"]) / m.num_hidden_layers * n,
            "1 dense MLP": 6 * 3 * d * m.intermediate_size * n,
            "1 MoE layer": 6 * (d * m.n_routed_experts + (m.num_experts_per_tok
                                + m.n_shared_experts) * 3 * d * f) * n,
            "embed + LM head + CE": br["lm_head"] * n}


def parts_section(cfg, b: dict, rounds: int, peak: float, step_s: float) -> None:
    times = interleaved(part_calls(cfg, b), rounds)
    fl = part_flops(cfg)
    print("\n| piece | median ms | share of step | % of peak (its model FLOPs) |")
    print("|---|---|---|---|")
    for k, ts in times.items():
        s = statistics.median(ts)
        pk = f"{fl[k] / s / peak:.1%}" if k in fl else "– (no model FLOPs)"
        print(f"| {k} | {s * 1e3:.1f} | {s / step_s:.0%} | {pk} |", flush=True)


OP_GROUPS = (  # (label, regex on an op's op_name), first match wins
    ("scan: a layer's slice of a stack, its update", r"dynamic_(update_)?index_in_dim"),
    ("MoE expert matmuls (blocked)", r"zwd,zdf|zwf,zfd"),
    ("attention core (tiles, online softmax)", r"bh[ts][a-z],bh[ts][a-z]"),
    ("attention projections", r"btq|bthu|btc|bthk|chj|qhk|hud"),
    ("gathers, scatters, sorts (dispatch, embedding)", r"gather|scatter|sort|top_k|searchsorted"),
    ("other matmuls in the layers (MLP, router, shared expert)", r"while.*dot_general"),
    ("matmuls outside the layers (optimizer NS, LM head)", r"dot_general"),
    ("elementwise and reductions", r"silu|mul|add|exp|div|reduce|select|rsqrt|square|sub|max"),
    ("layout: transposes, pads, concatenations", r"transpose|reshape|pad|concatenate|slice"),
)


def op_self_times(trace_dir: str) -> collections.Counter:
    """XLA op name -> total self time (ns) on the CPU client's threads, nesting removed."""
    path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    out: collections.Counter = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines if plane.name == "/host:CPU" else ():
            if not line.name.startswith("tf_XLA"):
                continue
            evs = sorted(((e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events),
                         key=lambda x: (x[0], -x[1]))
            stack: list = []
            for s, e, name in evs:
                while stack and stack[-1][0] <= s:
                    stack.pop()
                if stack:
                    out[stack[-1][1]] -= e - s
                out[name] += e - s
                stack.append((e, name))
    return out


def profile_section(b: dict, steps: int = 8) -> None:
    hlo = b["step"].lower(b["state"], b["batch"]).compile().as_text()
    op_name = dict(re.findall(r'%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo))
    call = stepper(b)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            t0 = time.perf_counter()
            for _ in range(steps):
                jax.block_until_ready(call())
            wall = (time.perf_counter() - t0) / steps
        times = op_self_times(d)
    groups: collections.Counter = collections.Counter()
    for name, t in times.items():
        if name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
            groups["(executor between ops: waiting, scheduling)"] += t
            continue
        on = op_name.get(name, "")
        label = "copies" if name.startswith("copy") else next(
            (g for g, rx in OP_GROUPS if re.search(rx, on)), "other")
        groups[label] += t
    ops = sum(t for g, t in groups.items() if not g.startswith("("))
    print(f"\nprofiled step {wall * 1e3:.0f} ms (tracing slows it); ops busy "
          f"{ops / 1e6 / steps:.0f} ms of thread time per step = "
          f"{ops / 1e9 / steps / wall:.2f} cores on average")
    print("\n| op group | ms per step (thread time) | share of op time |\n|---|---|---|")
    for g, t in groups.most_common():
        share = "–" if g.startswith("(") else f"{t / ops:.0%}"
        print(f"| {g} | {t / 1e6 / steps:.1f} | {share} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--optimizers", default="adamw,muon,muonclip")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--variant", action="append", default=None,
                    help="space-separated key=value overrides; repeatable ('' = defaults)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--parts", action="store_true", help="also time the step's pieces")
    ap.add_argument("--profile", action="store_true", help="also profile the first run's ops")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every run")
    args = ap.parse_args(argv)
    peak = metrics.peak_flops_per_device()
    variants = args.variant or [""]
    opts = args.optimizers.split(",")
    cfgs = {(o, v): config(args.preset, o, args.lr, [*args.overrides, *v.split()])
            for o in opts for v in variants}
    print(f"jax {jax.__version__}, {jax.default_backend()}, {jax.device_count()} device(s); "
          f"peak {peak / 1e9:.1f} GFLOP/s; {args.preset}, {' '.join(SPIKE_BASE[:3])}; "
          f"overrides {args.overrides}")
    built, compile_s = {}, {}
    for key, cfg in cfgs.items():
        t0 = time.perf_counter()
        built[key] = build(cfg)
        compile_s[key] = time.perf_counter() - t0
    times = interleaved({k: stepper(b) for k, b in built.items()}, args.rounds)
    print("\n| optimizer | variant | step ms (median) | min | % of peak | compile+1st s |")
    print("|---|---|---|---|---|---|")
    for (o, v), ts in times.items():
        s = statistics.median(ts)
        print(f"| {o} | {v or 'defaults'} | {s * 1e3:.1f} | {min(ts) * 1e3:.1f} | "
              f"{pct_peak(cfgs[o, v], s, peak):.1%} | {compile_s[o, v]:.1f} |", flush=True)
    key = next(iter(built))
    if args.parts:
        parts_section(cfgs[key], built[key], args.rounds, peak, statistics.median(times[key]))
    if args.profile:
        profile_section(built[key])


if __name__ == "__main__":
    main()
