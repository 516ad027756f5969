"""Dotted names of pytree leaves: the interface between a model's parameters and the optimizer.

Partition rules and the QK-Clip layout address leaves by these names
(``layers.3.attn.q_b``), so they are defined once, here, for any pytree: plain
dicts, ``nnx.State`` (whose Variables' ``.value`` is not part of a name) and
``nnx.to_flat_state`` path tuples alike.
"""

from __future__ import annotations

from typing import Any

import jax


def path_str(key_path) -> str:
    """('layers', 0, 'attn', 'q_b') or a jax key path -> 'layers.0.attn.q_b'."""
    parts = []
    for k in key_path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            if k.name in ("value", "raw_value"):
                continue
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return ".".join(parts)


def flatten(tree, is_leaf=None) -> dict[str, Any]:
    """{dotted name: leaf} in the tree's flattening order."""
    return {path_str(kp): x for kp, x in
            jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}
