"""Expert parallelism: tokens travel to the devices that hold their experts, never the
experts' weights to the tokens.

Left to GSPMD, a dispatch that indexes the expert stack by a data-dependent expert id
(``blocked``'s per-block weight gather, ``ragged_dot``'s groups) makes XLA move the
[E, D, F] stacks to every device along the ``expert`` mesh axis: on CPU an all-reduce
of the per-block weights for ``blocked`` (tests/test_expert_parallel.py), compiled for a
TPU v5e:2x2 (libtpu, as experiments.aot does) an all-gather of the full stacks. Here
the dispatch is written per device with ``jax.shard_map``, in the shape GShard
(Lepikhin et al., arXiv 2006.16668) and DeepSpeed-MoE (Rajbhandari et al., arXiv
2201.05596) give expert parallelism: all-to-all, local experts, all-to-all back.

1. routing (``moe.route``), the expert load and the balance loss are computed before,
   outside the shard_map, by the same code as on one device, so the load [E] that
   moves the selection biases (k2jax/train.py) is exactly the one-device load;
2. every device takes a disjoint share of the tokens (split over every mesh axis that
   divides them, ``expert`` included) and the local experts E/J of its ``expert``
   coordinate, gathered over the other axes (``fsdp``, ``tensor``) as ZeRO-3 gathers
   any weight; no device ever receives an expert it does not own;
3. it lays its A = n·X local assignments out in a send buffer [J, A, D], chunk j for
   the device holding experts [j·E/J, (j+1)·E/J), and one ``all_to_all`` over ``expert``
   delivers chunk j to device j (a second one carries the local expert ids);
4. the received J·A rows go through ``moe.experts_blocked`` / ``experts_ragged`` /
   ``experts_dense`` (``moe_impl``) on the local experts; rows that carried nothing have
   the id E/J, which those functions give no slot and no output, so padding never
   contributes, forward or backward;
5. the reverse ``all_to_all`` brings each result back to the slot it left from, and the
   routing weights combine them in float32, as in the one-device path.

Dropless means a static receive buffer for the worst case: every assignment of all J
peers could name experts of one device, so each chunk holds A rows. Per device and MoE
layer, with n = N / (product of the token-splitting mesh axes) local tokens, A = n·X:

- send and receive buffers, both directions: 4·J·A·D elements of the compute dtype,
  e.g. J = 8, n = 4096, X = 8, D = 7168 in bf16: 4·8·32768·7168·2 B = 14 GiB;
- the local experts' matmuls run on all J·A received rows (``blocked``: Z·W ≤
  J·A + (E/J)·W rows, hidden [Z·W, F] twice), J times the rows of a balanced step: the
  price of static shapes (a grouped-matmul kernel that stops at the last group's end
  would skip the padding; whether a backend's ``ragged_dot`` does is not measured here);
- the local expert stacks gathered over fsdp and tensor: 3·(E/J)·D·F.

``jax.lax.ragged_all_to_all`` would send only the filled rows, but XLA:CPU does not
implement it (jax 0.10.2: "HLO opcode `ragged-all-to-all` is not supported by XLA:CPU
ThunkEmitter"), so the plain all_to_all keeps one code path, the one the CPU tests run.

The mesh comes from the trace's context (``jax.sharding.use_abstract_mesh``, which
k2jax.train's jitted steps enter): the model holds no mesh, and without one (or with
``expert`` = 1) nothing here runs. Inside the shard_map, shape letters name per-device
sizes: E is the local expert count E/J there.

Shape letters (k2jax.model docstring): J devices on the ``expert`` axis, N tokens,
X experts per token, A assignments (per destination chunk: all local ones), D model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

EXPERT_AXIS = "expert"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where expert parallelism runs: the context mesh and the axes that split tokens."""

    mesh: jax.sharding.AbstractMesh
    token_axes: tuple[str, ...]

    @property
    def n_expert_devices(self) -> int:  # J
        return self.mesh.shape[EXPERT_AXIS]

    @property
    def n_token_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.token_axes)


def plan(n_tokens: int, n_experts: int) -> Plan | None:
    """The expert-parallel plan for this trace, or None: no context mesh, ``expert`` of
    size 1 or already manual, E not divisible by J (then k2jax.sharding leaves the expert
    stacks replicated, and local dispatch moves no weights), or tokens that cannot be
    split over ``expert``. Tokens are split greedily over the mesh axes in order, each
    kept if the shards so far still divide them (as k2jax.sharding.logical_to_spec)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(EXPERT_AXIS, 1) == 1 or EXPERT_AXIS in mesh.manual_axes:
        return None
    if n_experts % mesh.shape[EXPERT_AXIS]:
        return None
    axes: list[str] = []
    for name, size in mesh.shape.items():
        if size > 1 and n_tokens % (size * math.prod(mesh.shape[a] for a in axes)) == 0:
            axes.append(name)
    return Plan(mesh, tuple(axes)) if EXPERT_AXIS in axes else None


def dispatch(x_ND, idx_NX, w_NX, w_gate_EDF, w_up_EDF, w_down_EFD, *, local: Callable,
             ep: Plan):
    """Σ_x w[n, x]·expert_{idx[n, x]}(x[n]) -> [N, D] float32, each expert computed on the
    device that owns it. ``local(x_ND, idx_NX, w_NX, w_gate, w_up, w_down)`` is one of
    k2jax.model.moe's exact dispatches, run there on the local experts."""
    tokens = P(ep.token_axes, None)
    experts = P(EXPERT_AXIS, None, None)
    body = functools.partial(_exchange, local=local, n_devices=ep.n_expert_devices)
    return jax.shard_map(body, mesh=ep.mesh, in_specs=(tokens,) * 3 + (experts,) * 3,
                         out_specs=tokens)(x_ND, idx_NX, w_NX, w_gate_EDF, w_up_EDF, w_down_EFD)


def send_slots(expert_A, n_local: int, n_devices: int):
    """Each assignment's row in the flattened send buffer [J·A]: chunk j = expert // E_local
    holds device j's assignments in expert order, from row j·A on."""
    a = expert_A.shape[0]
    device_A = expert_A // n_local
    order_A = jnp.argsort(expert_A, stable=True)
    counts_J = jnp.bincount(device_A, length=n_devices)
    start_J = jnp.cumsum(counts_J) - counts_J
    sorted_device_A = device_A[order_A]
    slot_sorted_A = sorted_device_A * a + jnp.arange(a) - start_J[sorted_device_A]
    return jnp.zeros(a, jnp.int32).at[order_A].set(slot_sorted_A.astype(jnp.int32))


def _exchange(x_ND, idx_NX, w_NX, w_gate_EDF, w_up_EDF, w_down_EFD, *, local: Callable,
              n_devices: int):
    """One device's share of :func:`dispatch` (inside the shard_map; E = local experts)."""
    n, k = idx_NX.shape
    e, d = w_gate_EDF.shape[:2]
    a = n * k
    expert_A = idx_NX.reshape(-1)
    slot_A = send_slots(expert_A, e, n_devices)
    token_of_slot = jnp.full(n_devices * a, n, jnp.int32).at[slot_A].set(
        jnp.arange(a, dtype=jnp.int32) // k)
    local_of_slot = jnp.full(n_devices * a, e, jnp.int32).at[slot_A].set(expert_A % e)
    x_pad = jnp.concatenate([x_ND, jnp.zeros((1, d), x_ND.dtype)])  # row n: padding
    swap = functools.partial(jax.lax.all_to_all, axis_name=EXPERT_AXIS, split_axis=0,
                             concat_axis=0)
    recv_JAD = swap(x_pad[token_of_slot].reshape(n_devices, a, d))
    recv_JA = swap(local_of_slot.reshape(n_devices, a))
    rows = n_devices * a
    y_rows = local(recv_JAD.reshape(rows, d), recv_JA.reshape(rows, 1),
                   jnp.ones((rows, 1), jnp.float32), w_gate_EDF, w_up_EDF, w_down_EFD)
    back_JAD = swap(y_rows.astype(x_ND.dtype).reshape(n_devices, a, d))
    y_AD = back_JAD.reshape(rows, d)[slot_A]
    return jnp.einsum("nxd,nx->nd", y_AD.reshape(n, k, d).astype(jnp.float32), w_NX)
