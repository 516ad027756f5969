"""k2jax.sharding: logical axes to mesh axes, and optimizer state sharded like its params."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from k2jax import presets, sharding
from k2jax.model import Transformer


def test_logical_to_spec_drops_what_does_not_divide():
    mesh = sharding.make_mesh(data=1, fsdp=2, expert=2, tensor=2)
    assert sharding.logical_to_spec(("expert", "embed", "moe_mlp"), (8, 64, 32), mesh) == P(
        "expert", "fsdp", "tensor")
    assert sharding.logical_to_spec(("expert", "embed"), (3, 63), mesh) == P(None, None)
    assert sharding.logical_to_spec(("embed", "embed"), (4, 4), mesh) == P("fsdp", None)


def test_optimizer_state_is_sharded_like_its_parameter():
    """Adam moments mirror their parameter's sharding; counts and odd shapes replicate."""
    cfg = presets.preset("tiny")
    mesh = sharding.make_mesh(data=1, fsdp=2, expert=2, tensor=2)
    _, params, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))),
                             nnx.Param, ...)
    p_sh = sharding.variable_shardings(params, mesh)
    opt_state = jax.eval_shape(optax.adam(1e-3).init, params)
    extra = {"stats": jnp.zeros((2, 4)), "count": jnp.zeros((), jnp.int32)}
    got = sharding.mirrored_shardings((opt_state, extra), params, p_sh, mesh)
    mu = got[0][0].mu
    spec = lambda tree: [s.spec for s in jax.tree.leaves(tree)]  # noqa: E731
    assert spec(mu) == spec(p_sh) and spec(got[0][0].nu) == spec(p_sh)
    assert P(None, "expert", "fsdp", "tensor") in spec(mu)  # an expert stack [L, E, D, F]
    assert got[0][0].count.spec == P()
    assert spec(got[1]) == [P(), P()]
