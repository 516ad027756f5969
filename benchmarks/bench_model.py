"""Forward+backward throughput of the model, and MoE dispatch cost vs expert count.

    python -m benchmarks.bench_model                 # all sections, "small" at 32x128
    python -m benchmarks.bench_model --section experts --batch 16 --seq 256

Times are the median of ``--iters`` jitted calls after one warm-up (compile)
call, each synchronised with ``block_until_ready``. Results go to stdout as a
Markdown table; copy them into benchmarks/RESULTS.md with the date, the commit
and the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
from flax import nnx

from k2jax import params, presets
from k2jax.model import Transformer, cross_entropy


def time_fwd_bwd(cfg, batch: int, seq: int, iters: int) -> float:
    """Median seconds of one jitted loss+gradient evaluation."""
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, p, rest = nnx.split(model, nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.vocab_size)

    @jax.jit
    def step(p, rest, tokens):
        def loss_fn(p):
            logits, aux = nnx.merge(graphdef, p, rest)(tokens[:, :-1])
            return cross_entropy(logits, tokens[:, 1:])[0] + aux["balance_loss"]
        return jax.value_and_grad(loss_fn)(p)

    jax.block_until_ready(step(p, rest, tokens))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(step(p, rest, tokens))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--section", choices=["all", "throughput", "experts"], default="all")
    ap.add_argument("--impls", nargs="+", default=["blocked", "ragged", "dense"],
                    choices=["blocked", "ragged", "dense"])
    args = ap.parse_args(argv)
    tokens = args.batch * args.seq
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{jax.device_count()} device(s); batch {args.batch} x seq {args.seq}")
    if args.section in ("all", "throughput"):
        print("\n| preset | moe_impl | total params | active params | fwd+bwd s | tokens/s |")
        print("|---|---|---|---|---|---|")
        for impl in [i for i in args.impls if i != "dense"]:
            cfg = presets.preset(args.preset, f"moe_impl={impl}")
            total, active = params.count(cfg)
            s = time_fwd_bwd(cfg, args.batch, args.seq, args.iters)
            print(f"| {args.preset} | {impl} | {total:,} | {active:,} | {s:.3f} | "
                  f"{tokens / s:,.0f} |", flush=True)
    if args.section in ("all", "experts"):
        print("\n| routed experts | top-k | moe_impl | total params | fwd+bwd s | tokens/s |")
        print("|---|---|---|---|---|---|")
        for impl in args.impls:
            for e in (8, 64):
                cfg = presets.preset(args.preset, f"n_routed_experts={e}", f"moe_impl={impl}")
                s = time_fwd_bwd(cfg, args.batch, args.seq, args.iters)
                print(f"| {e} | {cfg.num_experts_per_tok} | {impl} | {params.count(cfg)[0]:,} | "
                      f"{s:.3f} | {tokens / s:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
