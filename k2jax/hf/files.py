"""The safetensors file format, read through memory maps and written, in numpy.

An 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets}, "__metadata__": {...}}``, then raw little-endian data
(https://github.com/huggingface/safetensors#format). Decoded here because
safetensors' own numpy API cannot represent BF16 or F8 tensors; the tests check
both directions against the safetensors library.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import ml_dtypes
import numpy as np

from k2jax.hf.config import HFError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(file: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(name -> TensorInfo, ``__metadata__``) of one .safetensors file; checks that every
    tensor's byte range fits its dtype, shape and the file."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n < 2 or 8 + n > size:
            raise HFError(f"{file}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HFError(f"{file}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise HFError(f"{file}: not a safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    out = {}
    for name, h in header.items():
        try:
            dtype, shape, (b, e) = h["dtype"], tuple(h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise HFError(f"{file}: malformed header entry for {name!r}") from None
        if dtype not in _DTYPES:
            raise HFError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        if e - b != math.prod(shape) * _DTYPES[dtype].itemsize or b < 0 or 8 + n + e > size:
            raise HFError(f"{file}: tensor {name!r} {dtype}{list(shape)} does not fit bytes "
                          f"[{b}, {e}) of the data (file truncated or corrupt)")
        out[name] = TensorInfo(file, dtype, shape, 8 + n + b, 8 + n + e)
    return out, meta


def read_tensor(info: TensorInfo) -> np.ndarray:
    """The tensor, as a read-only view of the memory-mapped file (no copy)."""
    mm = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.start,
                   shape=(info.end - info.start,))
    return mm.view(_DTYPES[info.dtype]).reshape(info.shape)


def write_safetensors(file: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` in the safetensors format (header padded to 8 bytes)."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, x in tensors.items():
        if x.dtype not in _NAMES:
            raise HFError(f"save: tensor {name!r} has unsupported dtype {x.dtype}")
        header[name] = {"dtype": _NAMES[x.dtype], "shape": list(x.shape),
                        "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for x in tensors.values():
            f.write(np.ascontiguousarray(x).tobytes())
