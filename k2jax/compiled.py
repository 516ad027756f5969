"""What the compiler says about a compiled step: memory, FLOPs, collectives, a roofline.

The idea is MaxText's ``train_compile.py`` (AI-Hypercomputer/maxtext): compile the
real jitted step ahead of time for a TPU topology that is not there
(``jax.experimental.topologies``, libtpu) and read per-chip HBM, FLOPs and
collectives from the TPU compiler before anyone rents the pod.
``experiments/aot.py`` is the command; this module holds what is pure about it:

- :func:`topology_devices`: a libtpu topology's compile-only devices;
- :func:`collectives` parses the compiled, partitioned per-device HLO text;
- :func:`memory` and :func:`cost` read ``Compiled.memory_analysis()`` / ``cost_analysis()``;
- :data:`CHIPS` and :func:`chip`: published per-chip HBM and bandwidths (peak FLOP/s
  come from :data:`k2jax.metrics.flops.KNOWN_PEAK_FLOPS`, one table for both);
- :func:`roofline` and :func:`mfu_estimate`: a step-time and MFU *estimate* from those.

Everything here is per chip (per device of the mesh: one device is one chip on
v5e, v5p and v6e, and on v4 when its topology is built with megacore).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import defaultdict

from jax.experimental import topologies

from k2jax.metrics.flops import known_peak_flops

GiB = 2**30
TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):\d+(x\d+){1,2}$")


def topology_devices(name: str) -> list:
    """The compile-only devices of a libtpu topology (``v5e:2x2``, ``v5p:4x4x8``; v4 as
    megacore: one device per chip). Raises ValueError, one line, for a bad name.

    Without a TPU backend in use (``JAX_PLATFORMS=cpu``) nothing here touches a chip, so
    libtpu may be loaded by several processes at once (``ALLOW_MULTIPLE_LIBTPU_LOAD``;
    otherwise it holds /tmp/libtpu_lockfile and a second process fails), and it is given
    placeholders for the TPU VM metadata it would otherwise look up and log errors about
    (the compiled program is the same with any value)."""
    if os.environ.get("JAX_PLATFORMS") == "cpu":
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if not TOPOLOGY.match(name):
        raise ValueError(f"--topology {name!r}: expected GENERATION:SHAPE with GENERATION "
                         "one of v4, v5e, v5p, v6e, e.g. v5e:2x2, v5p:2x2x1, v6e:4x4")
    kwargs = {"chip_config_name": "megacore"} if name.startswith("v4") else {}
    try:
        return list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)
    except RuntimeError as e:  # jax.errors.JaxRuntimeError
        raise ValueError(f"--topology {name!r}: {str(e).splitlines()[0]}") from None


KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# HLO opcode -> collective kind. "-done" halves of start/done pairs are not here: a pair
# is one collective, counted at its start (its bytes read from the done).
_OPCODES = {**{k: k for k in KINDS}, **{f"{k}-start": k for k in KINDS},
            "ragged-all-to-all": "all-to-all"}

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*->\s*(.*?)\s*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\(([^)]*)\)(.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string: an array (``bf16[64,128]{1,0:T(8,128)}``) or a tuple of
    them (summed). Element widths come from the type name's digits (bf16, f32, s32, u8,
    f8e4m3fn, c64, s4 ...); ``pred`` is one byte; ``token[]`` and opaque types none."""
    bits = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype == "pred":
            width = 8
        else:
            m = re.match(r"[a-z]+(\d+)", dtype)
            width = int(m.group(1)) if m else 0
        n = 1
        for d in dims.replace("<=", "").split(","):
            if d.strip():
                n *= int(d)
        bits += n * width
    return (bits + 7) // 8


@dataclasses.dataclass
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: str
    attrs: str


def _parse(hlo_text: str):
    """-> ({computation: [instructions]}, {computation: result shape}, entry name)."""
    comps: dict[str, list[_Instr]] = {}
    results: dict[str, str] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():
            m = _COMPUTATION.match(line)
            if m:
                current = m.group(2)
                comps[current], results[current] = [], m.group(3)
                entry = current if m.group(1) else entry
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            comps[current].append(_Instr(*m.groups()))
    return comps, results, entry


def trip_count(while_instr: _Instr, comps) -> int | None:
    """A while loop's trip count: the ``known_trip_count`` XLA records in its backend
    config, else the loop JAX writes (counter from 0, condition ``counter < N``, N a
    constant in the condition computation), else None (unknown)."""
    m = re.search(r'known_trip_count"?\s*[:=]\s*\{\s*"?n"?\s*[:=]\s*"?(\d+)', while_instr.attrs)
    if m:
        return int(m.group(1))
    condition = dict(_CALLEE.findall(while_instr.attrs)).get("condition")
    instrs = comps.get(condition, [])
    consts = {i.name: i.operands for i in instrs if i.opcode == "constant"}
    for i in instrs:
        if i.opcode == "compare" and "direction=LT" in i.attrs:
            args = [a.strip().lstrip("%") for a in i.operands.split(",")]
            if len(args) == 2 and args[1] in consts and consts[args[1]].strip().isdigit():
                return int(consts[args[1]])
    return None


def _multiplicities(comps, entry):
    """{computation: times it runs per step}, from ENTRY down the call graph. A while body
    runs trip-count times (1 when unknown); each conditional branch counts once (an upper
    bound); an async-done's or -update's callee is its start's, not counted again."""
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for comp, instrs in comps.items():
        for i in instrs:
            if i.opcode in ("async-done", "async-update"):
                continue
            trips = (trip_count(i, comps) or 1) if i.opcode == "while" else 1
            for kind, callee in _CALLEE.findall(i.attrs):
                calls[callee].append((comp, trips if kind == "body" else 1))
            for group in _BRANCHES.findall(i.attrs):
                for callee in group.split(","):
                    calls[callee.strip().lstrip("%")].append((comp, 1))
    memo: dict[str, int] = {}

    def times(comp: str) -> int:  # the call graph is a DAG
        if comp == entry:
            return 1
        if comp not in memo:
            memo[comp] = sum(times(caller) * k for caller, k in calls.get(comp, []))
        return memo[comp]

    return {c: times(c) for c in comps}


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count": executions per step, "bytes": result bytes moved per step}} for
    all-gather, all-reduce, reduce-scatter, all-to-all and collective-permute in a compiled
    module's HLO text (``Compiled.as_text()``: partitioned, so per device).

    - A start/done pair (``all-gather-start``/``-done``, ``async-start``/``-done``) counts
      once; its bytes are the done's result (the start's tuple also holds the operand).
    - TPU's asynchronous collective fusions copy one collective into its start, every
      continuation and its done fusion; the copies share a ``chain_id`` frontend
      attribute and a ``channel_id``, and count once.
    - TPU writes a reduce-scatter as an all-reduce then a dynamic-slice inside a fusion
      named ``all-reduce-scatter*`` (emitter ``...ReduceScatterFusion``): counted as a
      reduce-scatter whose bytes are the fusion's (scattered) result.
    - Bytes are the result shape's, tuples summed: what each device receives, not the
      traffic of the algorithm (a ring all-reduce sends about twice that).
    - A collective inside a while loop counts once per trip when the trip count is
      known (:func:`trip_count`), once otherwise; in a conditional, once per branch.
    """
    comps, results, entry = _parse(hlo_text)
    times = _multiplicities(comps, entry)
    done_shape = {i.operands.strip().lstrip("%"): i.shape
                  for instrs in comps.values() for i in instrs if i.opcode.endswith("-done")}
    scatter = _scatter_fusions(comps)
    seen: set[tuple] = set()
    out = {k: {"count": 0, "bytes": 0} for k in KINDS}
    for comp, instrs in comps.items():
        for i in instrs:
            kind = _OPCODES.get(i.opcode)
            if kind is None or not times[comp]:
                continue
            nbytes = shape_bytes(done_shape.get(i.name, i.shape))
            if kind == "all-reduce" and comp in scatter:
                kind, nbytes = "reduce-scatter", shape_bytes(results[comp])
            chain = re.search(r'chain_id="?(\d+)', i.attrs)
            if chain:
                channel = re.search(r"channel_id=(\d+)", i.attrs)
                key = (kind, chain.group(1), channel and channel.group(1))
                if key in seen:
                    continue
                seen.add(key)
            out[kind]["count"] += times[comp]
            out[kind]["bytes"] += times[comp] * nbytes
    return {k: v for k, v in out.items() if v["count"]}


def _scatter_fusions(comps) -> set[str]:
    """Computations that are TPU reduce-scatter fusions (all-reduce + dynamic-slice)."""
    found = {c for c in comps if c.startswith("all-reduce-scatter")}
    for instrs in comps.values():
        for i in instrs:
            if i.opcode == "fusion" and "ReduceScatterFusion" in i.attrs:
                found.update(callee for kind, callee in _CALLEE.findall(i.attrs)
                             if kind == "calls")
    return found


# ---------------------------------------------------------------------------
# what the compiled object reports


def memory(compiled) -> dict[str, int]:
    """Per-chip HBM of a compiled step, from ``memory_analysis()``: arguments, outputs,
    aliased (outputs living in donated arguments' buffers), temporaries, generated code,
    and ``total`` = arguments + outputs − aliased + temporaries + code, as MaxText's
    train_compile adds them (plus the code, which lives in HBM too)."""
    m = compiled.memory_analysis()
    parts = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
             "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
             "generated_code": m.generated_code_size_in_bytes}
    parts = {k: int(v) for k, v in parts.items()}
    return {**parts, "total": total_bytes(parts)}


def total_bytes(parts: dict[str, int]) -> int:
    return (parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"]
            + parts["generated_code"])


def cost(compiled) -> dict[str, float]:
    """{"flops", "bytes_accessed"} per chip from ``cost_analysis()`` (XLA's
    HloCostAnalysis). It counts a while loop's body once, whatever its trip count."""
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return {"flops": float(c.get("flops", 0.0)),
            "bytes_accessed": float(c.get("bytes accessed", 0.0))}


# ---------------------------------------------------------------------------
# chips, a roofline and an MFU estimate


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    device_kind: str
    peak_flops: float  # bf16, dense, per chip (k2jax.metrics.flops.KNOWN_PEAK_FLOPS)
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float | None  # bytes/s per chip, one direction; None: not published


# Per-chip HBM capacity, HBM bandwidth and ICI bandwidth, keyed by jax's device_kind as
# the compile-only topologies report it. Source: Google Cloud TPU docs, "TPU v4", "TPU
# v5e", "TPU v5p", "TPU v6e" (cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}). The v4 and
# v5p pages give HBM in GiB; the v5e and v6e pages write "16 GB" / "32 GB", taken here
# as GiB like the others. ICI: v5e 1,600 Gbps; v5p 4,800 Gbps (1,200 GB/s
# bidirectional); v6e 800 GB/s bidirectional; the v4 page gives no per-chip figure.
CHIPS = {c.device_kind: c for c in (
    Chip("v4", "TPU v4", known_peak_flops("TPU v4"), 32 * GiB, 1200e9, None),
    Chip("v5e", "TPU v5 lite", known_peak_flops("TPU v5 lite"), 16 * GiB, 819e9, 200e9),
    Chip("v5p", "TPU v5", known_peak_flops("TPU v5"), 95 * GiB, 2765e9, 600e9),
    Chip("v6e", "TPU v6 lite", known_peak_flops("TPU v6 lite"), 32 * GiB, 1640e9, 400e9),
)}


def chip(device_kind: str, hbm_gib: float | None = None) -> Chip:
    """The :data:`CHIPS` entry for a device kind; ``hbm_gib`` replaces its capacity."""
    if device_kind not in CHIPS:
        raise ValueError(f"no published figures for device kind {device_kind!r} "
                         f"(have {', '.join(CHIPS)})")
    c = CHIPS[device_kind]
    return c if hbm_gib is None else dataclasses.replace(c, hbm_bytes=int(hbm_gib * GiB))


def roofline(flops: float, bytes_accessed: float, collective_bytes: float,
             c: Chip) -> dict[str, float]:
    """An *estimate* of one step's time per chip: the slowest of compute (FLOPs / peak),
    HBM traffic (bytes accessed / HBM bandwidth) and, where the chip's ICI bandwidth is
    published, collectives (result bytes / one-direction ICI bandwidth), as if they
    overlapped perfectly. It ignores latency, collective algorithms and hops, and
    kernels' efficiency, so a real step is slower."""
    parts = {"compute_s": flops / c.peak_flops, "hbm_s": bytes_accessed / c.hbm_bandwidth,
             "ici_s": collective_bytes / c.ici_bandwidth if c.ici_bandwidth else 0.0}
    return {**parts, "step_s": max(parts.values())}


def mfu_estimate(model_flops_per_chip: float, step_s: float, c: Chip) -> float:
    """An *estimate* of MFU (PaLM App. B): the model's analytic FLOPs per chip per step
    (k2jax.metrics.flops_per_token × tokens / chips) over the roofline step time × peak."""
    return model_flops_per_chip / (step_s * c.peak_flops) if step_s > 0 else 0.0
