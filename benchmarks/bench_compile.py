"""Compile time and memory against depth: scanned vs unrolled layers.

    python -m benchmarks.bench_compile [--layers 8,61] [--unrolled 8,16] [k=v ...]

Compiles the real MuonClip train step (experiments.aot.compile_step, one CPU device) for
a Kimi-K2-shaped model at reduced width (``kimi-k2`` with the overrides below: its 61
layers, first dense layer, 384 experts with 8 active and one shared, MLA, at a width a
CPU compiles in seconds), at each depth in ``--layers`` with ``scan_layers=true`` and
at each in ``--unrolled`` with ``scan_layers=false``. Prints compile seconds, XLA's
memory analysis (arguments, temporaries) and the memory per layer between the two
depths. Nothing runs; the state and batch are abstract.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402

from experiments import aot  # noqa: E402
from k2jax import compiled, optimizer, overrides, presets, sharding, train  # noqa: E402

REDUCED_WIDTH = ("model.hidden_size=128", "model.num_attention_heads=8",
                 "model.q_lora_rank=64", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16",
                 "model.qk_rope_head_dim=8", "model.v_head_dim=16",
                 "model.intermediate_size=256", "model.moe_intermediate_size=32",
                 "model.vocab_size=1024", "model.moe_impl=blocked", "optimizer.qk_clip=true",
                 "data.global_batch_size=2", "data.seq_len=128", "mesh.fsdp=1")


def measure(cfg) -> dict:
    mesh = sharding.make_mesh(**{k: getattr(cfg.mesh, k) for k in sharding.MESH_AXES})
    tx = optimizer.build_optimizer(cfg, mesh)
    step, seconds = aot.compile_step(cfg, mesh, tx, train.abstract_state(cfg, tx, mesh))
    return {"seconds": seconds, **compiled.memory(step)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="8,61")
    ap.add_argument("--unrolled", default="8,16", help="depths to compile unrolled ('' none)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    base = presets.load("kimi-k2", [*REDUCED_WIDTH, *args.overrides])
    print("| layers | scan_layers | compile s | arguments MiB | temporaries MiB |")
    print("|---|---|---|---|---|")
    rows = {}
    for scan, depths in ((True, args.layers), (False, args.unrolled)):
        for n in [int(x) for x in depths.split(",") if x]:
            cfg = overrides.apply(base, [f"model.num_hidden_layers={n}",
                                         f"model.scan_layers={str(scan).lower()}"])
            r = rows[scan, n] = measure(cfg)
            print(f"| {n} | {scan} | {r['seconds']:.1f} | {r['arguments'] / 2**20:.1f} | "
                  f"{r['temporaries'] / 2**20:.1f} |", flush=True)
    for scan in (True, False):
        (a, ra), (b, rb) = sorted((n, r) for (s, n), r in rows.items() if s == scan)[:2] or (
            (None, None), (None, None))
        if ra is None:
            continue
        per = {k: (rb[k] - ra[k]) / (b - a) / 2**20 for k in ("arguments", "temporaries")}
        print(f"scan_layers={scan}: compile {rb['seconds'] / ra['seconds']:.2f}x from {a} to "
              f"{b} layers; per layer: arguments {per['arguments']:.2f} MiB, temporaries "
              f"{per['temporaries']:.2f} MiB")


if __name__ == "__main__":
    main()
