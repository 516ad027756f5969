"""Newton–Schulz split across the mesh (optim.distributed_ns): batched equals leaf by
leaf, the sharded update equals the unsharded one, each device does a fraction of the
work (XLA's cost analysis), and no collective runs inside the iterations (compiled HLO)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optim
from experiments import aot
from k2jax import compiled, loop, optimizer, presets, sharding, train
from optim import MatrixDims, Partition
from optim.distributed_ns import Placement, orthogonalize_tree

MESHES = {"fsdp8": ["mesh.fsdp=8"],
          "fsdp2-expert2-tensor2": ["mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"]}
# 8 layers: enough same-shape matrices (8 attention projections of each kind, 8 experts x
# 3 x 7 MoE layers) that whole matrices can be dealt out evenly to 8 devices
MODEL = ["model.num_hidden_layers=8", "optimizer.qk_clip=true"]

PART = Partition(rules=(
    (r"experts.*", MatrixDims(fan_in=(1,), fan_out=(2,), batch=(0,))),
    (r"heads", MatrixDims(fan_in=(0,), fan_out=(1, 2))),
    (r".*", MatrixDims()),
))


def test_batched_equals_leaf_by_leaf():
    """Grouped by shape (tall leaves transposed into their wide partners' group), stacked,
    padded: each matrix comes out as polar_factor of it alone, times its own scale."""
    rng = np.random.default_rng(0)
    shapes = {"a": (16, 24), "b": (24, 16), "c": (16, 24), "experts": (3, 16, 24),
              "experts2": (3, 24, 16), "heads": (16, 2, 12), "zero": (8, 8)}
    tree = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    tree["zero"] = jnp.zeros((8, 8))
    scale = lambda fan_in, fan_out: fan_out / fan_in  # noqa: E731  (distinguishes leaves)
    mesh = sharding.make_mesh(fsdp=8)
    for placement in (None, Placement(mesh)):
        got = orthogonalize_tree(tree, PART.dims, scale, placement=placement)
        for k, x in tree.items():
            d = PART.dims(k, x.shape)
            _, fan_in, fan_out = d.matrix_shape(x.shape)
            want = d.from_matrices(optim.polar_factor(d.to_matrices(x)), x.shape) * scale(
                fan_in, fan_out)
            np.testing.assert_allclose(got[k], want, atol=2e-6, err_msg=k)
    assert not np.any(got["zero"])


def test_one_device_is_leaf_by_leaf_exactly_and_unknown_leaves_are_named():
    """On one device nothing is stacked: bit-identical to orthogonalising each leaf alone.
    A placement whose shardings miss a Muon leaf names it, rather than gathering it."""
    rng = np.random.default_rng(1)
    tree = {"a": jnp.asarray(rng.normal(size=(16, 24)), jnp.float32),
            "experts": jnp.asarray(rng.normal(size=(3, 24, 16)), jnp.float32)}
    one = Placement(sharding.make_mesh(fsdp=1))
    got = orthogonalize_tree(tree, PART.dims, lambda i, o: 0.2, placement=one)
    for k, x in tree.items():
        d = PART.dims(k, x.shape)
        np.testing.assert_array_equal(
            got[k], d.from_matrices(optim.polar_factor(d.to_matrices(x)), x.shape) * 0.2)
    mesh = sharding.make_mesh(fsdp=8)
    partial = Placement(mesh, {"a": NamedSharding(mesh, P())})
    with pytest.raises(ValueError, match="experts: no sharding"):
        orthogonalize_tree(tree, PART.dims, lambda i, o: 1.0, placement=partial)


def _random_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [
        jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("mesh_name", MESHES)
def test_sharded_update_equals_the_unsharded_optimizer(mesh_name):
    """Two MuonClip steps (the second with momentum) on the 8-device mesh, Newton–Schulz
    split across it, against the same optimizer on one device with nothing sharded."""
    cfg = presets.load("tiny", ["optimizer.qk_clip=true", *MESHES[mesh_name]])
    mesh = loop.make_mesh(cfg)
    tx = optimizer.build_optimizer(cfg, mesh)
    state, shardings, _ = train.init_state(cfg, tx, mesh)
    logits = jnp.full((2, cfg.model.num_attention_heads), 150.0)  # > tau: the clip acts
    host = jax.device_get((state.params, state.opt_state))
    ref_tx = optimizer.build_optimizer(cfg)
    p, s, ref_p, ref_s = state.params, state.opt_state, *host
    update = jax.jit(lambda g, s, p, S: tx.update(g, s, p, attn_max_logits=S),
                     in_shardings=(shardings.params, shardings.opt_state, shardings.params,
                                   NamedSharding(mesh, P())),
                     out_shardings=(shardings.params, shardings.opt_state))
    for seed in (1, 2):
        g = _random_like(host[0], seed)
        u, s = update(jax.device_put(g, shardings.params), s, p, logits)
        ref_u, ref_s = jax.jit(ref_tx.update)(g, ref_s, ref_p, attn_max_logits=logits)
        p, ref_p = optax.apply_updates(p, u), optax.apply_updates(ref_p, ref_u)
        for (path, a), b in zip(optim.paths.flatten(u).items(), jax.tree.leaves(ref_u)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=path)


@functools.cache
def _compiled_update(mesh_name: str, ns_steps: int, placed: bool = True):
    """The optimizer update + apply of ``tiny`` (8 layers) compiled for a mesh, from
    abstract shapes (what experiments.aot compiles as the optimizer's share)."""
    cfg = presets.load("tiny", [*MODEL, *MESHES.get(mesh_name, ["mesh.fsdp=1"]),
                                f"optimizer.ns_steps={ns_steps}"])
    mesh = loop.make_mesh(cfg)
    tx = optimizer.build_optimizer(cfg, mesh if placed else None)
    return aot.compile_optimizer(cfg, mesh, tx, train.abstract_state(cfg, tx, mesh))[0]


def _ns_step(mesh_name: str, placed: bool = True) -> tuple[float, dict, dict]:
    """(per-device FLOPs of one Newton–Schulz step, collective counts with 1 and with 2
    steps): the difference of a 2-step and a 1-step update."""
    one, two = (_compiled_update(mesh_name, n, placed) for n in (1, 2))
    counts = [{k: v["count"] for k, v in compiled.collectives(c.as_text()).items()}
              for c in (one, two)]
    return two.cost_analysis()["flops"] - one.cost_analysis()["flops"], *counts


@pytest.mark.parametrize("mesh_name", MESHES)
def test_newton_schulz_is_split_across_devices_with_no_collective_inside(mesh_name):
    """Each device does at most a quarter of one device's Newton–Schulz FLOPs (XLA's cost
    analysis), and one more step adds no collective to the compiled HLO: they all happen
    before and after the iterations. Left to GSPMD (no placement), every step pays
    collectives of its own."""
    flops, one_step, two_steps = _ns_step(mesh_name)
    single_device = _ns_step("one")[0]
    assert 0 < flops <= single_device / 4, (flops, single_device)
    assert one_step == two_steps and one_step.get("all-to-all", 0) > 0, (one_step, two_steps)
    _, gspmd_one, gspmd_two = _ns_step(mesh_name, placed=False)
    assert gspmd_one != gspmd_two
