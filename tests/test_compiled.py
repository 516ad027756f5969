"""k2jax.compiled: HLO collectives (hand-written modules and a real compiled CPU program),
shape bytes, the chip table against libtpu's device kinds, roofline and MFU arithmetic."""
# ruff: noqa: E501  (HLO instructions are one line each, as XLA writes them)

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax import compiled

GiB = 2**30


@pytest.mark.parametrize("shape, nbytes", [
    ("bf16[64,128]{1,0:T(8,128)(2,1)S(1)}", 64 * 128 * 2),
    ("(f32[2]{0}, s32[3]{0:T(128)})", 2 * 4 + 3 * 4),
    ("((u32[], u8[5]), pred[10])", 4 + 5 + 10),
    ("f8e4m3fn[4,4]", 16),
    ("s4[3]", 2),  # 12 bits, rounded up
    ("f32[]", 4),
    ("token[]", 0),
    ("u32[<=8]", 32),
    ("c64[2]", 16),
])
def test_shape_bytes(shape, nbytes):
    assert compiled.shape_bytes(shape) == nbytes


LOOP_MODULE = """
HloModule loop, entry_computation_layout={(bf16[4,16]{1,0})->f32[8]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8]{0}) tuple(%j, %ar)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%never_called (q: f32[8]) -> f32[16] {
  %q = f32[8]{0} parameter(0)
  ROOT %dead = f32[16]{0} all-gather(%q), channel_id=9, dimensions={0}
}

ENTRY %main (x: bf16[4,16], y: f32[8]) -> f32[8] {
  %x = bf16[4,16]{1,0} parameter(0)
  %y = f32[8]{0} parameter(1)
  %ags = (bf16[4,16]{1,0}, bf16[8,16]{1,0}) all-gather-start(%x), channel_id=2, dimensions={0}
  %agd = bf16[8,16]{1,0} all-gather-done(%ags)
  %cps = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%y), channel_id=3, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[8]{0} collective-permute-done(%cps)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%zero, %cpd)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  %w2 = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
  %a2a = (f32[2,8]{1,0}, f32[2,8]{1,0}) all-to-all(%y, %y), channel_id=4, dimensions={0}
  ROOT %out = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_collectives_hand_written_loop_module():
    """Start/done pairs count once with the done's bytes; a while body counts per trip
    (trip count from the condition, or from known_trip_count when XLA records it); a
    computation nobody calls counts nothing."""
    got = compiled.collectives(LOOP_MODULE)
    assert got == {
        "all-gather": {"count": 1, "bytes": 8 * 16 * 2},
        "collective-permute": {"count": 1, "bytes": 8 * 4},
        "all-reduce": {"count": 3 + 7, "bytes": (3 + 7) * 8 * 4},
        "all-to-all": {"count": 1, "bytes": 2 * 2 * 8 * 4},
    }


TPU_FUSIONS = """
HloModule tpu_like

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_start (p0: bf16[16,128]) -> (bf16[16,128], bf16[64,128]) {
  %p0 = bf16[16,128]{1,0} parameter(0)
  %ag.1 = bf16[64,128]{1,0:T(8,128)(2,1)} all-gather(%p0), channel_id=8, replica_groups={{0,1,2,3}}, dimensions={0}, frontend_attributes={chain_id="2"}
  ROOT %t = (bf16[16,128]{1,0}, bf16[64,128]{1,0}) tuple(%p0, %ag.1)
}

%async_collective_fusion.1 (p1: bf16[16,128]) -> bf16[64,128] {
  %p1 = bf16[16,128]{1,0} parameter(0)
  ROOT %ag.2 = bf16[64,128]{1,0:T(8,128)(2,1)S(1)} all-gather(%p1), channel_id=8, replica_groups={{0,1,2,3}}, dimensions={0}, frontend_attributes={chain_id="2"}
}

%fused_done (p2: bf16[16,128]) -> bf16[64,128] {
  %p2 = bf16[16,128]{1,0} parameter(0)
  ROOT %ag.3 = bf16[64,128]{1,0:T(8,128)(2,1)} all-gather(%p2), channel_id=8, replica_groups={{0,1,2,3}}, dimensions={0}, frontend_attributes={chain_id="2"}
}

%all-reduce-scatter (input: f32[4096,2]) -> f32[1024,2] {
  %input = f32[4096,2]{1,0} parameter(0)
  %ar = f32[4096,2]{1,0:T(8,128)} all-reduce(%input), channel_id=39, replica_groups={{0,1,2,3}}, to_apply=%add
  %pid = u32[] partition-id()
  %k = u32[] constant(1024)
  %off = u32[] multiply(%pid, %k)
  %z = u32[] constant(0)
  ROOT %ds = f32[1024,2]{1,0} dynamic-slice(%ar, %off, %z), dynamic_slice_sizes={1024,2}
}

ENTRY %main.1_spmd (x: bf16[16,128], g: f32[4096,2]) -> f32[1024,2] {
  %x = bf16[16,128]{1,0} parameter(0)
  %g = f32[4096,2]{1,0} parameter(1)
  %async-collective-start = (bf16[16,128]{1,0}, bf16[64,128]{1,0}) fusion(%x), kind=kCustom, calls=%fused_start
  %fusion.1 = bf16[64,128]{1,0} fusion(%x), kind=kCustom, calls=%async_collective_fusion.1
  %async-collective-done = bf16[64,128]{1,0} fusion(%x), kind=kCustom, calls=%fused_done
  ROOT %fusion.2 = f32[1024,2]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter, backend_config={"collective_algorithm_config":{"emitter":"SingleInputAllReduceScatterFusion"}}
}
"""


def test_collectives_tpu_async_chain_and_reduce_scatter_fusion():
    """TPU copies one async collective into its start, continuation and done fusions
    (one chain_id): one all-gather. Its reduce-scatter is an all-reduce + dynamic-slice
    fusion: one reduce-scatter, bytes of the scattered result."""
    assert compiled.collectives(TPU_FUSIONS) == {
        "all-gather": {"count": 1, "bytes": 64 * 128 * 2},
        "reduce-scatter": {"count": 1, "bytes": 1024 * 2 * 4},
    }


def test_collectives_of_a_real_compiled_cpu_program():
    """A psum in a 5-trip fori_loop and an all_gather after it, compiled for the 8-device
    CPU mesh: XLA's own HLO text, parsed."""
    mesh = jax.make_mesh((8,), ("x",))

    def per_device(x_):  # [8, 32] f32 per device
        body = lambda i, c: jax.lax.psum(jnp.sin(c), "x") / 8 + c  # noqa: E731
        y = jax.lax.fori_loop(0, 5, body, x_)
        return jax.lax.all_gather(y, "x", tiled=True)

    f = jax.shard_map(per_device, mesh=mesh, in_specs=P("x"), out_specs=P(), check_vma=False)
    x = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    text = jax.jit(f).lower(x).compile().as_text()
    assert compiled.collectives(text) == {
        "all-reduce": {"count": 5, "bytes": 5 * 8 * 32 * 4},
        "all-gather": {"count": 1, "bytes": 64 * 32 * 4},
    }


def test_trip_count_unknown_counts_once():
    text = LOOP_MODULE.replace("%n = s32[] constant(3)",
                               "%n = s32[] get-tuple-element(%p), index=0")
    got = compiled.collectives(text)
    assert got["all-reduce"]["count"] == 1 + 7  # unknown loop once, the known one 7 times


@pytest.mark.parametrize("topology, name", [
    ("v5e:2x2", "v5e"), ("v5p:2x2x1", "v5p"), ("v6e:2x2", "v6e"), ("v4:2x2x1", "v4")])
def test_chip_table_matches_libtpu_device_kinds(topology, name):
    devices = compiled.topology_devices(topology)
    assert len(devices) == 4  # one device per chip
    c = compiled.chip(devices[0].device_kind)
    assert c.name == name and c.peak_flops > 1e14 and c.hbm_bytes >= 16 * GiB


def test_chip_figures_and_override():
    v5e = compiled.chip("TPU v5 lite")
    assert (v5e.peak_flops, v5e.hbm_bytes, v5e.hbm_bandwidth) == (197e12, 16 * GiB, 819e9)
    assert compiled.chip("TPU v5").hbm_bytes == 95 * GiB
    assert compiled.chip("TPU v5 lite", hbm_gib=0.5).hbm_bytes == GiB // 2
    with pytest.raises(ValueError, match="no published figures"):
        compiled.chip("cpu")


def test_roofline_and_mfu_estimate():
    c = compiled.Chip("x", "X", peak_flops=100.0, hbm_bytes=1, hbm_bandwidth=10.0,
                      ici_bandwidth=5.0)
    r = compiled.roofline(flops=200.0, bytes_accessed=50.0, collective_bytes=20.0, c=c)
    assert r == {"compute_s": 2.0, "hbm_s": 5.0, "ici_s": 4.0, "step_s": 5.0}
    assert compiled.mfu_estimate(100.0, r["step_s"], c) == pytest.approx(0.2)
    no_ici = compiled.roofline(200.0, 10.0, 1e9, compiled.Chip("x", "X", 100.0, 1, 10.0, None))
    assert no_ici["ici_s"] == 0.0 and no_ici["step_s"] == 2.0
