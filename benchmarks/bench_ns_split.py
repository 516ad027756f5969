"""Newton–Schulz split across devices: per-device FLOPs, collective bytes, Muon step time.

    python -m benchmarks.bench_ns_split [--preset ladder-d256] [--iters 10] [--parts ...]

Runs on the simulated 8-device CPU mesh (XLA_FLAGS is set before jax is imported).
"split" is Muon with a :class:`optim.Placement` (optim.distributed_ns: whole matrices
per device); "gspmd" is the same optimizer without one, partitioned by GSPMD where the
parameters lie.

1. ``flops``: per-device Newton–Schulz FLOPs from XLA's cost analysis of the compiled
   update (a 5-step update less a 1-step one, × 5/4), on fsdp 8 and on
   fsdp 2 × expert 2 × tensor 2, against one device.
2. ``bytes``: collective bytes per device per optimizer update (k2jax.compiled), against
   the bytes of the Muon parameters on that device.
3. ``time``: Muon update + apply on the 8-device mesh, median of ``--iters`` calls.
4. ``step``: on one device, the MuonClip train step against its forward+backward alone.

The 8 simulated devices share this machine's cores, so (3) measures the work and
collectives the program does, not a pod's wall time.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (for --topology) would look for a TPU
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks.bench_optim import timeit  # noqa: E402
from experiments import aot  # noqa: E402
from k2jax import loop, optimizer, presets, sharding, train  # noqa: E402

MESHES = {"fsdp8": ["mesh.fsdp=8"],
          "fsdp2-expert2-tensor2": ["mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"]}
DEVICES = None  # --topology: abstract TPU devices (compile only) instead of the CPU's
OVERRIDES: list[str] = []  # config overrides for every part (e.g. model.num_hidden_layers=4)


def _setup(preset: str, mesh_overrides, ns_steps: int = 5, placed: bool = True):
    cfg = presets.load(preset, [*OVERRIDES, *mesh_overrides, f"optimizer.ns_steps={ns_steps}",
                                "optimizer.qk_clip=false"])
    m = cfg.mesh
    mesh = sharding.make_mesh(m.data, m.fsdp, m.expert, m.tensor, devices=DEVICES)
    tx = optimizer.build_optimizer(cfg, mesh) if placed else optimizer.build_optimizer(cfg)
    abstract = train.abstract_state(cfg, tx, mesh)
    sh = train.state_shardings(abstract, mesh)

    def update(params, grads, opt_state):
        u, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, u), opt_state

    fn = jax.jit(update, in_shardings=(sh.params, sh.params, sh.opt_state),
                 out_shardings=(sh.params, sh.opt_state), donate_argnums=(0, 2))
    return cfg, mesh, tx, abstract, fn


@functools.cache
def _compiled(preset, mesh_name, ns_steps, placed):
    cfg, mesh, tx, a, _ = _setup(preset, MESHES.get(mesh_name, ["mesh.fsdp=1"]), ns_steps,
                                 placed)
    return aot.compile_optimizer(cfg, mesh, tx, a)[0]


def ns_flops(preset, mesh_name, placed) -> float:
    f1, f5 = (_compiled(preset, mesh_name, n, placed).cost_analysis()["flops"] for n in (1, 5))
    return (f5 - f1) * 5 / 4


def bench_flops(preset):
    """On a --topology the one-device baseline is skipped: a big model does not fit a chip."""
    one = None if DEVICES else ns_flops(preset, "one", True)
    ratio = lambda x: "n/a" if one is None else f"{x / one:.3f}"  # noqa: E731
    print(f"\n1. Newton–Schulz FLOPs per device ({preset}; 1 device: "
          f"{'not compiled' if one is None else f'{one:.3e}'})")
    print("| mesh | split | split / 1 device | gspmd | gspmd / 1 device | split / gspmd |")
    print("|---|---|---|---|---|---|")
    for name in MESHES:
        s, g = ns_flops(preset, name, True), ns_flops(preset, name, False)
        print(f"| {name} | {s:.3e} | {ratio(s)} | {g:.3e} | {ratio(g)} | {s / g:.2f} |",
              flush=True)


def muon_bytes_per_device(preset, mesh_name) -> int:
    """Bytes of the Muon parameters that one device holds (its shards)."""
    cfg, mesh, *_ = _setup(preset, MESHES[mesh_name])
    abstract_params = train.abstract_state(cfg, optimizer.build_optimizer(cfg), mesh).params
    labels = optimizer.partition(cfg.optimizer).labels(abstract_params)
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x, lab in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(labels))
               if lab == "muon")


def bench_bytes(preset):
    from k2jax import compiled  # needs no TPU; imported here to keep --parts time light

    print(f"\n2. Collectives per device per optimizer update ({preset}, 5 NS steps)")
    print("| mesh | variant | collectives | bytes | Muon param bytes on a device | ratio |")
    print("|---|---|---|---|---|---|")
    for name in MESHES:
        own = muon_bytes_per_device(preset, name)
        for placed in (True, False):
            c = compiled.collectives(_compiled(preset, name, 5, placed).as_text())
            count = ", ".join(f"{k} {v['count']}" for k, v in c.items())
            total = sum(v["bytes"] for v in c.values())
            print(f"| {name} | {'split' if placed else 'gspmd'} | {count} | {total:,} | "
                  f"{own:,.0f} | {total / own:.2f} |", flush=True)


def bench_time(preset, iters, variants):
    print(f"\n3. Muon update + apply on 8 CPU devices ({preset}), median of {iters}")
    print("| mesh | variant | ms |")
    print("|---|---|---|")
    for name in MESHES:
        for placed in variants:
            cfg, mesh, tx, _, fn = _setup(preset, MESHES[name], 5, placed)
            state, _, _ = train.init_state(cfg, tx, mesh)
            grads = jax.tree.map(lambda x: x * 0.01, state.params)
            args = [state.params, grads, state.opt_state]

            def call(fn=fn, args=args):
                args[0], args[2] = fn(*args)
                return args[0]

            t = timeit(call, iters=iters)
            print(f"| {name} | {'split' if placed else 'gspmd'} | {t * 1e3:.1f} |", flush=True)


def bench_step(preset, iters, placed=True):
    cfg = presets.load(preset, [*OVERRIDES, "mesh.fsdp=1", "optimizer.qk_clip=true"])
    mesh = loop.make_mesh(cfg)
    tx = optimizer.build_optimizer(cfg, mesh) if placed else optimizer.build_optimizer(cfg)
    state, sh, graphdef = train.init_state(cfg, tx, mesh)
    shape = (cfg.data.global_batch_size, cfg.data.seq_len)
    batch = train.global_batch({k: jnp.ones(shape, jnp.int32) for k in ("inputs", "targets")},
                               mesh)
    step = train.make_train_step(cfg, graphdef, tx, mesh, sh)
    loss = functools.partial(train.loss_fn, graphdef=graphdef, cfg=cfg, constrain=lambda x: x)
    grads = jax.jit(lambda s, b: train.micro_batch_grads(s, b, loss, cfg))
    t_grad = timeit(lambda: grads(state, batch), iters=iters)
    holder = [state]

    def one_step():
        holder[0], m = step(holder[0], batch)
        return m["train/loss"]

    t_step = timeit(one_step, iters=iters)
    print(f"\n4. One device, {preset}, batch {shape[0]} x {shape[1]}, median of {iters}")
    print(f"forward+backward {t_grad * 1e3:.1f} ms; MuonClip train step {t_step * 1e3:.1f} ms; "
          f"optimizer and the rest {(t_step - t_grad) / t_step:.1%} of the step")


def _configure(args, parts):
    global DEVICES, MESHES
    OVERRIDES.extend(args.overrides)
    if args.mesh:
        MESHES = {args.mesh: [f"mesh.{kv}" for kv in args.mesh.split(",")]}
    if args.topology:
        if {"time", "step"} & set(parts):
            raise SystemExit("error: --topology compiles only: use --parts flops,bytes")
        from jax.experimental import topologies

        DEVICES = topologies.get_topology_desc(platform="tpu",
                                               topology_name=args.topology).devices


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ladder-d256")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--parts", default="flops,bytes,time,step")
    ap.add_argument("--topology", help="a TPU topology (e.g. v5p:4x8x8): --parts flops,bytes "
                    "compiled for its abstract devices (libtpu) instead of the CPU mesh")
    ap.add_argument("--mesh", help="one mesh instead of the two defaults, e.g. fsdp=16,tensor=16")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.num_hidden_layers=4")
    ap.add_argument("--variants", default="split,gspmd",
                    help="for --parts time (and step: the first): split, gspmd (gspmd alone "
                    "runs on commits before optim.distributed_ns)")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    _configure(args, parts)
    print(f"jax {jax.__version__}, " + (f"{len(DEVICES)} {DEVICES[0].device_kind} devices "
          f"({args.topology}, compile only)" if DEVICES else
          f"{jax.device_count()} {jax.default_backend()} devices"))
    if "flops" in parts:
        bench_flops(args.preset)
    if "bytes" in parts:
        bench_bytes(args.preset)
    variants = [v == "split" for v in args.variants.split(",")]
    if "time" in parts:
        bench_time(args.preset, args.iters, variants)
    if "step" in parts:
        bench_step(args.preset, args.iters, variants[0])


if __name__ == "__main__":
    main()
