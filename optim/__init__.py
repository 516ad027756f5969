"""Optax transforms for optimizer studies: Newton–Schulz, Muon, QK-Clip, MuonClip, AdamW.

Model-agnostic: nothing here imports k2jax. The model supplies a
:class:`Partition` (which leaves Muon owns) and a :class:`QKLayout` (where
each head's query/key slices live); given a :class:`Placement` (the mesh and each
parameter's sharding), Muon splits its Newton–Schulz work across the devices, whole
matrices per device (:mod:`optim.distributed_ns` says why and how). The submodules
stay reachable as attributes (``optim.qk_clip.find_state``,
``optim.newton_schulz.coefficients``): no function exported here shares a submodule's
name.
"""

from optim.distributed_ns import Placement
from optim.factory import adamw, build, muon, muonclip
from optim.muon import orthogonalize, scale_by_muon
from optim.newton_schulz import polar_factor
from optim.partition import ADAMW, AUTO, DEFAULT, MatrixDims, Partition
from optim.qk_clip import ClipTarget, QKClipState, QKLayout, clip_params, clip_qk_logits
from optim.schedules import schedule

__all__ = [
    "ADAMW", "AUTO", "DEFAULT", "ClipTarget", "MatrixDims", "Partition", "Placement", "QKClipState",
    "QKLayout", "adamw", "build", "clip_params", "clip_qk_logits", "muon", "muonclip",
    "orthogonalize", "polar_factor", "scale_by_muon", "schedule",
]
