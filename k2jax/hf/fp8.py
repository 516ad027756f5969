"""DeepSeek-V3's fp8 weight format: e4m3 tensors, each with a ``weight_scale_inv`` per block.

Published DeepSeek-V3 / Kimi-K2 weights are stored this way (``quantization_config``
in config.json, 128×128 blocks); k2jax dequantises them to float on load, so
training never sees fp8. Any other quantization is refused rather than misread.
"""

from __future__ import annotations

import numpy as np

from k2jax.hf.config import HFError


def block_size(hf_config: dict) -> tuple[int, int] | None:
    """The fp8 block size of a DeepSeek-V3-style ``quantization_config``, None when the
    checkpoint is not quantized; any other quantization is an error."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method, fmt = qc.get("quant_method"), qc.get("fmt", "e4m3")
    block = qc.get("weight_block_size", [128, 128])
    bad = [f"{k}={v!r}" for k, v, ok in (("quant_method", method, method == "fp8"),
                                         ("fmt", fmt, fmt == "e4m3"),
                                         ("weight_block_size", block, len(block) == 2)) if not ok]
    if bad:
        raise HFError(f"load: quantization_config {', '.join(bad)} is not supported (fp8 "
                      "e4m3 with a per-block weight_scale_inv, as DeepSeek-V3 / Kimi K2 publish)")
    return int(block[0]), int(block[1])


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """One scale per block of a 2-d weight of ``shape``; edge blocks may be partial."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def dequantize(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """fp8 weight × its per-block inverse scale, in float32."""
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], 0), block[1], 1)
    return w.astype(np.float32) * s[:w.shape[0], :w.shape[1]]
