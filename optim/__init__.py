"""Optax transforms for optimizer studies: Newton–Schulz, Muon, QK-Clip, MuonClip, AdamW.

Model-agnostic: nothing here imports k2jax. The model supplies a
:class:`Partition` (which leaves Muon owns) and a :class:`QKLayout` (where
each head's query/key slices live).
"""

from optim.factory import adamw, build, muon, muonclip
from optim.muon import orthogonalize, scale_by_muon
from optim.newton_schulz import newton_schulz
from optim.partition import ADAMW, AUTO, DEFAULT, MatrixDims, Partition
from optim.qk_clip import ClipTarget, QKClipState, QKLayout, clip_params, qk_clip
from optim.schedules import schedule

__all__ = [
    "ADAMW", "AUTO", "DEFAULT", "ClipTarget", "MatrixDims", "Partition", "QKClipState",
    "QKLayout", "adamw", "build", "clip_params", "muon", "muonclip", "newton_schulz",
    "orthogonalize", "qk_clip", "scale_by_muon", "schedule",
]
