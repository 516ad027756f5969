"""AOT compile report: ``python -m experiments.aot --config PRESET --topology NAME [k=v ...]``.

Before anyone rents a TPU pod, compile the real jitted train step for that pod's
topology on any machine (libtpu's compile-only devices, ``jax.experimental.topologies``)
and read what the TPU compiler says, per chip: HBM (arguments, temporaries, outputs)
against the chip's capacity, FLOPs per step, every collective with its count and bytes,
the optimizer's share of the FLOPs, and the compile time; then a roofline step time
and MFU, which are *estimates* (k2jax.compiled). The idea is MaxText's
``train_compile.py``. Nothing is allocated: the state and batch are abstract.

``--config`` and the ``key=value`` overrides are those of ``experiments.train``
(``mesh.fsdp=-1 mesh.expert=4 data.global_batch_size=256 train.micro_batches=4 ...``);
``--topology`` is a libtpu topology name: ``v5e:2x2``, ``v5e:4x4``, ``v5p:2x2x1``,
``v5p:4x4x8``, ``v6e:4x4``, ``v4:2x2x1`` (v4 as megacore: one device per chip).
``model.moe_impl=auto`` compiles as ``ragged``, what it picks on a TPU.

``--fit-layers A,B`` compiles the model at A and at B layers instead of its own depth
and extrapolates every per-chip figure linearly to ``model.num_hidden_layers`` (for
``scan_layers=false``, where a 61-layer compile is slow and memory-hungry on a small
host): each layer past ``first_k_dense_replace`` is a MoE layer, so the difference of
the two is one MoE layer's cost. The report says so.

Exit status: 0 when the step fits the chip's HBM; 1 when it does not (one line on
stderr naming the shortfall; ``--json`` is still written, with ``"fits": false``); 2 for
bad input (config, topology, mesh, an existing ``--json`` file without ``--force``).
"""

# ruff: noqa: E402  (jax is imported after the platform is chosen)
from __future__ import annotations

import os

if "JAX_PLATFORMS" not in os.environ:  # else libtpu tries to start a TPU and logs errors
    os.environ["JAX_PLATFORMS"] = "cpu"

import argparse
import datetime
import gc
import json
import re
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.train import load_config
from k2jax import atomic, compiled, metrics, overrides, sharding, train
from k2jax import optimizer as optimizer_lib
from k2jax.config import Config, ConfigError
from k2jax.params import abstract_model

GiB = compiled.GiB


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


class OutOfMemory(Exception):
    """The TPU compiler refused the step: it does not fit HBM (bytes needed / available)."""

    def __init__(self, needed: float | None, available: float | None, layers: int):
        super().__init__(f"out of HBM: needs {needed} bytes, {available} available")
        self.needed, self.available, self.layers = needed, available, layers


def _oom(e: Exception, layers: int) -> OutOfMemory | None:
    """The TPU compiler's out-of-memory error, parsed: "... required for HLO temporaries
    (111.87G) exceeds available HBM (95.74G)" (its total, arguments and outputs included)
    or "Used 49.3G of 15.5G hbm". Sizes in binary units."""
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg:
        return None
    units = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    size = r"([\d.]+)\s*([KMGT]?)i?B?"
    m = (re.search(rf"\({size}\) exceeds available HBM \({size}\)", msg)
         or re.search(rf"Used {size} of {size} hbm", msg))
    if not m:
        return OutOfMemory(None, None, layers)
    need, need_u, have, have_u = m.groups()
    return OutOfMemory(float(need) * units[need_u], float(have) * units[have_u], layers)


def _compile(fn, args, layers: int):
    """(compiled, seconds), or OutOfMemory raised."""
    t0 = time.perf_counter()
    try:
        out = fn.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        if (oom := _oom(e, layers)) is not None:
            raise oom from None
        raise
    return out, time.perf_counter() - t0


def compile_step(cfg: Config, mesh, tx, abstract):
    """The real train step (k2jax.train.make_train_step) on an abstract global batch."""
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    graphdef = nnx.graphdef(abstract_model(cfg.model))
    step = train.make_train_step(cfg, graphdef, tx, mesh, shardings)
    shape = (cfg.data.global_batch_size, cfg.data.seq_len)
    tokens = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(mesh))
    return _compile(step, (abstract, {"inputs": tokens, "targets": tokens}),
                    cfg.model.num_hidden_layers)


def compile_optimizer(cfg: Config, mesh, tx, abstract):
    """tx.update + apply_updates alone, with the step's parameter and optimizer-state
    shardings and its per-head max logits (what QK-Clip reads)."""
    p_sh = jax.tree.map(lambda x: x.sharding, abstract.params)
    o_sh = jax.tree.map(lambda x: x.sharding, abstract.opt_state)
    replicated = NamedSharding(mesh, P())
    m = cfg.model
    logits = jax.ShapeDtypeStruct((m.num_hidden_layers, m.num_attention_heads), jnp.float32,
                                  sharding=replicated)

    def update(params, opt_state, grads, max_logits):
        updates, opt_state = tx.update(grads, opt_state, params, attn_max_logits=max_logits)
        return optax.apply_updates(params, updates), opt_state

    fn = jax.jit(update, in_shardings=(p_sh, o_sh, p_sh, replicated),
                 out_shardings=(p_sh, o_sh), donate_argnums=(0, 1))
    return _compile(fn, (abstract.params, abstract.opt_state, abstract.params, logits),
                    m.num_hidden_layers)


def measure(cfg: Config, mesh, capacity: int) -> dict:
    """Compile the step (and, if it fits, the optimizer alone) -> the compiler's per-chip
    figures. XLA's cost analysis counts the micro-batch loop's body once, so with
    ``train.micro_batches`` = k > 1 the step's FLOPs and bytes are corrected to
    k × (step − optimizer) + optimizer; ``*_compiler`` keep the uncorrected ones."""
    tx = optimizer_lib.build_optimizer(cfg, mesh)
    abstract = train.abstract_state(cfg, tx, mesh)
    step, step_s = compile_step(cfg, mesh, tx, abstract)
    mem, step_cost = compiled.memory(step), compiled.cost(step)
    colls = compiled.collectives(step.as_text())
    del step
    opt_cost, opt_s = {"flops": None, "bytes_accessed": None}, 0.0
    if mem["total"] <= capacity:
        opt, opt_s = compile_optimizer(cfg, mesh, tx, abstract)
        opt_cost = compiled.cost(opt)
        del opt
    gc.collect()
    k = cfg.train.micro_batches
    fixed = opt_cost if k > 1 else {"flops": 0.0, "bytes_accessed": 0.0}
    corrected = {key: None if fixed[key] is None else k * (v - fixed[key]) + fixed[key]
                 for key, v in step_cost.items()}
    return {"memory": mem, "flops_per_chip": corrected["flops"],
            "bytes_accessed_per_chip": corrected["bytes_accessed"],
            "flops_per_chip_compiler": step_cost["flops"],
            "bytes_accessed_per_chip_compiler": step_cost["bytes_accessed"],
            "optimizer_flops_per_chip": opt_cost["flops"],
            "optimizer_bytes_accessed_per_chip": opt_cost["bytes_accessed"],
            "collectives": colls, "step_compile_seconds": step_s,
            "optimizer_compile_seconds": opt_s}


def _lerp(a, b, t: float):
    """a + t (b − a) over nested dicts of numbers (a key missing on one side is 0; None
    on either side stays None)."""
    if a is None or b is None:
        return None
    if isinstance(a, dict) or isinstance(b, dict):
        a, b = a or {}, b or {}
        return {k: _lerp(a.get(k, 0), b.get(k, 0), t) for k in {**a, **b}}
    v = a + t * (b - a)
    return round(v) if isinstance(a, int) and isinstance(b, int) else v


def with_layers(cfg: Config, n: int) -> Config:
    return overrides.apply(cfg, [f"model.num_hidden_layers={n}"])


def measure_fit(cfg: Config, mesh, capacity: int, layers: tuple[int, int]) -> dict:
    """:func:`measure` at two depths A < B, extrapolated linearly to the config's depth;
    compile seconds are the total spent. The raw measurements are kept."""
    a, b = layers
    k, n = cfg.model.first_k_dense_replace, cfg.model.num_hidden_layers
    if not k < a < b:
        raise ConfigError(f"--fit-layers {a},{b}: need first_k_dense_replace={k} < A < B, so "
                          "both depths have MoE layers and differ only by MoE layers")
    ra = measure(with_layers(cfg, a), mesh, capacity)
    rb = measure(with_layers(cfg, b), mesh, capacity)
    fit = _lerp(ra, rb, (n - a) / (b - a))
    fit["memory"]["total"] = compiled.total_bytes(fit["memory"])
    for key in ("step_compile_seconds", "optimizer_compile_seconds"):
        fit[key] = ra[key] + rb[key]
    fit["extrapolated_from"] = {"layers": [a, b], "to_layers": n, "measured": [ra, rb]}
    return _optimizer_at_full_depth(fit, cfg, mesh)


def _optimizer_at_full_depth(fit: dict, cfg: Config, mesh) -> dict:
    """Replace the extrapolated optimizer figures by the optimizer compiled alone at the
    full depth (no activations: it compiles where the step does not). Newton–Schulz pads
    each shape's stack of matrices up to the chip count (optim.distributed_ns), so at
    2 or 3 layers its cost is mostly padding and does not grow linearly with depth."""
    tx = optimizer_lib.build_optimizer(cfg, mesh)
    opt, seconds = compile_optimizer(cfg, mesh, tx, train.abstract_state(cfg, tx, mesh))
    cost = compiled.cost(opt)
    for name in ("flops", "bytes_accessed"):
        old = fit[f"optimizer_{name}_per_chip"]
        for step_key in (f"{name}_per_chip", f"{name}_per_chip_compiler"):
            if fit[step_key] is not None and old is not None:
                fit[step_key] += cost[name] - old
        fit[f"optimizer_{name}_per_chip"] = cost[name]
    fit["optimizer_compile_seconds"] += seconds
    fit["extrapolated_from"]["optimizer"] = f"compiled at {cfg.model.num_hidden_layers} layers"
    return fit


def _commit() -> str:
    try:
        run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,  # noqa
                                        timeout=10, check=True).stdout.strip()
        head = run("rev-parse", "--short", "HEAD")
        return head + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def build_report(args, cfg: Config, mesh, chip: compiled.Chip, raw: dict | None,
                 oom: OutOfMemory | None) -> dict:
    """The JSON report: inputs, the compiler's figures, fit, and the labelled estimates."""
    chips = mesh.devices.size
    d = cfg.data
    rep = {
        "topology": args.topology, "chips": chips, "device_kind": chip.device_kind,
        "preset": args.config, "overrides": args.overrides,
        "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
        "moe_impl": cfg.model.moe_impl, "num_hidden_layers": cfg.model.num_hidden_layers,
        "global_batch_size": d.global_batch_size, "seq_len": d.seq_len,
        "micro_batches": cfg.train.micro_batches,
        "hbm_capacity_bytes": chip.hbm_bytes, "peak_flops_per_chip": chip.peak_flops,
        "model_flops_per_chip": (metrics.flops_per_token(cfg.model, d.seq_len)
                                 * d.global_batch_size * d.seq_len / chips),
        "commit": _commit(), "date": datetime.date.today().isoformat(),
        "jax": jax.__version__, "command": "python -m experiments.aot " + " ".join(args.argv),
    }
    if oom is not None:
        return {**rep, "fits": False, "hbm_bytes_per_chip": oom.needed,
                "compiler_hbm_available_bytes": oom.available, "oom_at_layers": oom.layers,
                "flops_per_chip": None, "optimizer_flops_per_chip": None, "collectives": {},
                "compile_seconds": None, "mfu_estimate": None}
    rep.update({"fits": raw["memory"]["total"] <= chip.hbm_bytes,
                "hbm_bytes_per_chip": raw["memory"]["total"], **raw,
                "compile_seconds": raw["step_compile_seconds"]
                + raw["optimizer_compile_seconds"]})
    flops, opt = raw["flops_per_chip"], raw["optimizer_flops_per_chip"]
    rep["optimizer_share"] = opt / flops if opt is not None and flops else None
    if flops is not None:
        coll_bytes = sum(v["bytes"] for v in raw["collectives"].values())
        roof = compiled.roofline(flops, raw["bytes_accessed_per_chip"], coll_bytes, chip)
        rep["roofline_estimate"] = roof
        rep["mfu_estimate"] = compiled.mfu_estimate(rep["model_flops_per_chip"],
                                                    roof["step_s"], chip)
    return rep


def _gib(x, digits: int = 2) -> str:
    if x is None:
        return "?"
    return (f"{x / GiB:,.{digits}f} GiB" if abs(x) >= GiB / 10
            else f"{x / 2**20:,.{digits}f} MiB")


def shortfall(rep: dict) -> str:
    """The one line for a step that does not fit."""
    need = rep["hbm_bytes_per_chip"]
    have = rep.get("compiler_hbm_available_bytes") or rep["hbm_capacity_bytes"]
    where = (f" (the TPU compiler's out-of-memory error at {rep['oom_at_layers']} layers; "
             "at least this much)" if "oom_at_layers" in rep else "")
    if need is None:
        return f"{rep['preset']} on {rep['topology']} does not fit HBM{where}"
    return (f"{rep['preset']} on {rep['topology']} needs {_gib(need, 1)} per chip, "
            f"{_gib(have, 1)} available (short by {_gib(need - have, 1)}){where}")


def _num(x, fmt: str = ".4g") -> str:
    return "?" if x is None else format(x, fmt)


def print_table(rep: dict) -> None:
    """The report as text; estimates are marked ``~``."""
    mesh = " ".join(f"{k}={v}" for k, v in rep["mesh"].items())
    print(f"{rep['preset']} on {rep['topology']}: {rep['chips']} chips ({rep['device_kind']}), "
          f"mesh {mesh}, batch {rep['global_batch_size']} x {rep['seq_len']}, "
          f"micro-batches {rep['micro_batches']}, moe_impl {rep['moe_impl']}")
    if "extrapolated_from" in rep:
        ex = rep["extrapolated_from"]
        print(f"every per-chip figure extrapolated linearly from {ex['layers'][0]} and "
              f"{ex['layers'][1]} layers to {ex['to_layers']}, but the optimizer's: "
              f"{ex.get('optimizer', 'extrapolated')}")
    print(f"HBM per chip          {_gib(rep['hbm_bytes_per_chip'])} of "
          f"{_gib(rep['hbm_capacity_bytes'])}  ({'fits' if rep['fits'] else 'DOES NOT FIT'})")
    if "memory" not in rep:
        return
    for k, v in rep["memory"].items():
        if k != "total":
            print(f"  {k:<20}{_gib(v)}")
    print(f"FLOPs per chip/step   {_num(rep['flops_per_chip'])}  (compiler: "
          f"{_num(rep['flops_per_chip_compiler'])}, model: {_num(rep['model_flops_per_chip'])})")
    share = rep["optimizer_share"]
    print(f"  optimizer           {_num(rep['optimizer_flops_per_chip'])}  "
          f"({'?' if share is None else f'{100 * share:.2f}%'})")
    print("collectives per chip/step (count, bytes received)")
    for k, v in rep["collectives"].items():
        print(f"  {k:<20}{v['count']:>8,}  {_gib(v['bytes'])}")
    print(f"compile               {rep['compile_seconds']:.1f} s")
    if (r := rep.get("roofline_estimate")) is not None:
        print(f"~ step time (roofline estimate) {r['step_s']:.4g} s  (compute "
              f"{r['compute_s']:.3g} s, HBM {r['hbm_s']:.3g} s, ICI {r['ici_s']:.3g} s)")
        print(f"~ MFU (estimate)      {100 * rep['mfu_estimate']:.1f}%")


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="preset name, config JSON file or HF "
                    "checkpoint directory (as experiments.train)")
    ap.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5p:2x2x1, v6e:4x4")
    ap.add_argument("--json", help="also write the report here (never overwritten silently)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    ap.add_argument("--hbm-gib", type=float, help="HBM per chip to fit in (default: the chip's)")
    ap.add_argument("--fit-layers", help="A,B: compile at A and B layers, extrapolate")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def _setup(args):
    """(config, mesh, chip, fit layers): every input checked before anything compiles."""
    if args.json and os.path.exists(args.json) and not args.force:
        _fail(f"--json {args.json} exists; refusing to overwrite it (--force, or a new path)")
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.model.moe_impl == "auto":
            cfg = overrides.apply(cfg, ["model.moe_impl=ragged"])
        devices = compiled.topology_devices(args.topology)
        m = cfg.mesh
        try:
            mesh = sharding.make_mesh(m.data, m.fsdp, m.expert, m.tensor, devices=devices)
        except ValueError as e:
            raise ConfigError(f"{e} (--topology {args.topology} has {len(devices)} chips)") \
                from None
        if mesh.devices.size != len(devices):
            raise ConfigError(f"mesh {dict(mesh.shape)} uses {mesh.devices.size} of "
                              f"--topology {args.topology}'s {len(devices)} chips; sizes "
                              "must multiply to the chip count (or use -1)")
        rows = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
        if cfg.data.global_batch_size % rows:
            raise ConfigError(f"data.global_batch_size={cfg.data.global_batch_size}: must be "
                              f"a multiple of mesh data x fsdp x expert = {rows}")
        chip = compiled.chip(devices[0].device_kind, args.hbm_gib)
        layers = tuple(int(x) for x in args.fit_layers.split(",")) if args.fit_layers else None
        if layers is not None and len(layers) != 2:
            raise ConfigError(f"--fit-layers {args.fit_layers!r}: expected A,B")
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    return cfg, mesh, chip, layers


def main(argv=None) -> int:
    args = _args(argv)
    # compile-only TPU executables cannot be read back from a persistent cache (a warning)
    jax.config.update("jax_enable_compilation_cache", False)
    cfg, mesh, chip, layers = _setup(args)
    raw = oom = None
    try:
        raw = (measure_fit(cfg, mesh, chip.hbm_bytes, layers) if layers
               else measure(cfg, mesh, chip.hbm_bytes))
    except OutOfMemory as e:
        oom = e
    except ConfigError as e:
        _fail(str(e))
    except jax.errors.JaxRuntimeError as e:  # the compiler failed: say so in one line
        print(f"error: compiling for {args.topology} failed: {str(e).splitlines()[0]}",
              file=sys.stderr)
        return 1
    rep = build_report(args, cfg, mesh, chip, raw, oom)
    rep["host_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print_table(rep)
    if args.json:
        atomic.write_text(args.json, json.dumps(rep, indent=2, default=str) + "\n")
    if not rep["fits"]:
        print(f"error: {shortfall(rep)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
