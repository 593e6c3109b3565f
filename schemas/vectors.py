"""Vectors as compact little-endian binary cells: float32, float16, bfloat16, or int8 with a scale.

Decoding is vectorised: one `np.frombuffer` over the Arrow array's value buffer, no per-row loop.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

DTYPES = ("float32", "float16", "bfloat16", "int8")
_ITEM = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int8": "i1"}


def _to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    bits = x.astype("<f4").view("<u4")
    rounding = ((bits >> 16) & 1) + 0x7FFF  # round to nearest, ties to even
    return ((bits + rounding) >> 16).astype("<u2")


def encode_vectors(vectors: np.ndarray, dtype: str = "float32") -> tuple[pa.Array, np.ndarray | None, np.ndarray]:
    """(binary cells, int8 scales or None, float32 norms of the vectors as stored)."""
    if dtype not in DTYPES:
        raise ValueError(f"vector dtype must be one of {DTYPES}, not {dtype!r}")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array, got shape {x.shape}")
    scales = None
    if dtype == "float32":
        stored = x.astype("<f4")
    elif dtype == "float16":
        stored = x.astype("<f2")
    elif dtype == "bfloat16":
        stored = _to_bfloat16_bits(x)
    else:
        scales = (np.abs(x).max(axis=1) / 127).astype(np.float32)
        scales[scales == 0] = 1.0
        stored = np.clip(np.rint(x / scales[:, None]), -127, 127).astype("i1")
    n, width = stored.shape[0], stored.shape[1] * stored.itemsize
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width)
    cells = pa.BinaryArray.from_buffers(pa.binary(), n, [None, offsets.buffers()[1], pa.py_buffer(stored.tobytes())])
    norms = np.linalg.norm(decode_vectors(cells, dtype, scales, x.shape[1]), axis=1).astype(np.float32)
    return cells, scales, norms


def decode_vectors(cells, dtype: str, scales, dim: int) -> np.ndarray:
    """(n, dim) float32 from a binary Arrow array (or chunked array) of equal-length cells."""
    if isinstance(cells, pa.ChunkedArray):
        cells = cells.combine_chunks() if cells.num_chunks else pa.array([], pa.binary())
    n = len(cells)
    if n == 0:
        return np.zeros((0, dim), dtype=np.float32)
    if cells.null_count:
        raise ValueError("null vector cells")
    offsets = np.frombuffer(cells.buffers()[1], dtype=np.int32, count=n + 1, offset=cells.offset * 4)
    item = np.dtype(_ITEM[dtype])
    if not np.all(np.diff(offsets) == dim * item.itemsize):
        raise ValueError(f"vector cells are not all {dim} × {dtype}: wrong dimension or dtype")
    raw = np.frombuffer(cells.buffers()[2], dtype=item, count=n * dim, offset=int(offsets[0])).reshape(n, dim)
    if dtype == "bfloat16":
        return (raw.astype("<u4") << 16).view("<f4").astype(np.float32)
    if dtype == "int8":
        return raw.astype(np.float32) * np.asarray(scales, dtype=np.float32).reshape(n, 1)
    return raw.astype(np.float32)
