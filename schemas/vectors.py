"""Gradient vectors as BINARY cells: one little-endian buffer per row, no per-row Python work.

dtype      bytes/value  error
float32    4            exact
float16    2            ~1e-3 relative; a vector beyond ±65504 is refused (VectorOverflow), never stored as inf
bfloat16   2            ~4e-3 relative (float32's range; upper 16 bits, rounded to nearest even)
int8       1            |x - x'| <= scale/2 with scale = max|x| / 127 per vector (the `scale` column)

Each stored vector carries a checksum (`vector_checksums`: CRC-32 of its cell, and of its int8 scale),
checked by every reader that scores (`check_vectors`): a changed byte fails with the row, never
becomes an answer. Rows written before checksums existed hold null and are not checked.

A sign sketch (`encode_sign_sketch`) keeps 1 bit per value, the sign (bits packed 8 per byte), and
a float16 mean |value| per block of SKETCH_BLOCK coordinates (d/8 + d/128 bytes: ~30x smaller than
float32). It ranks by q · t' with t' = sign(t) × its block's mean |t|, a cheap first stage before an
exact rerank: the block scales keep how a vector's weight is spread over its layers, which the
signs alone lose (bench/two_stage.py: recall of the exact top-10 after a rerank of 1,000, 0.970 →
0.993 on the embedded world).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from isal.isal_zlib import crc32  # ISA-L's CRC-32: zlib's values, ~4x faster on 4-KB cells

DTYPES = ("float32", "float16", "bfloat16", "int8")
_STORAGE: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int8": np.dtype("i1"),
}


class VectorOverflow(ValueError):
    """Finite vectors that the chosen dtype would store as inf."""


class CorruptVector(ValueError):
    """Stored vector bytes that no longer match the checksum written with them."""


def encode_vectors(array: np.ndarray, dtype: str) -> tuple[pa.BinaryArray, pa.FloatArray | None]:
    """(one binary cell per row, per-row scales for int8 else None) for a float [n, d] array.
    Raises VectorOverflow rather than store a finite value as inf."""
    _check_dtype(dtype)
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"expected a [n, d] array, got shape {array.shape}")
    scales = None
    if dtype == "int8":
        stored, scale_values = _to_int8(array)
        scales = pa.array(scale_values, pa.float32())
    elif dtype == "bfloat16":
        stored = _to_bfloat16_bits(array)
    else:
        with np.errstate(over="ignore"):  # an overflow is refused just below, with the numbers
            stored = array.astype(_STORAGE[dtype])
    _check_no_overflow(array, stored, dtype)
    return _rows_as_binary(np.ascontiguousarray(stored)), scales


def decode_vectors(vectors: pa.Array | pa.ChunkedArray, dtype: str, scales=None, dim: int | None = None) -> np.ndarray:
    """The float32 [n, d] array of binary cells written by encode_vectors (one frombuffer, no loop)."""
    stored = stored_values(vectors, dtype, dim)
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    if dtype == "int8":
        if scales is None:
            raise ValueError("int8 vectors need their scales")
        return stored.astype(np.float32) * _scale_column(scales)
    return stored.astype(np.float32)


def decode_rows(rows: pa.Table | pa.RecordBatch, dim: int | None = None) -> np.ndarray:
    """The float32 [n, d] vectors of rows holding `vector`, `dtype` and `scale`, in row order,
    whatever mix of dtypes they hold (a slice re-extracted with another --vector-dtype)."""
    dtypes = rows.column("dtype")
    kinds = pc.unique(dtypes).to_pylist()
    if len(kinds) == 1:
        return decode_vectors(rows.column("vector"), kinds[0], rows.column("scale"), dim)
    out = None
    for kind in kinds:
        where = pc.equal(dtypes, kind)
        part = rows.filter(where)
        decoded = decode_vectors(part.column("vector"), kind, part.column("scale"), dim)
        if out is None:
            out = np.empty((rows.num_rows, decoded.shape[1]), np.float32)
        out[np.flatnonzero(where.to_numpy(zero_copy_only=False))] = decoded
    return out if out is not None else np.empty((0, dim or 0), np.float32)


def stored_values(vectors: pa.Array | pa.ChunkedArray, dtype: str, dim: int | None = None) -> np.ndarray:
    """The [n, d] values as stored (int8 codes, float16, bfloat16 bits, float32): a read-only view
    of the cells' buffer, no copy. int8 codes times their `scale` column are the vectors."""
    _check_dtype(dtype)
    vectors = _single_binary_array(vectors)
    width = _STORAGE[dtype].itemsize
    n = len(vectors)
    if vectors.null_count:
        raise ValueError(f"{vectors.null_count} null vector(s)")
    offsets = np.frombuffer(vectors.buffers()[1], dtype=np.int32, count=n + 1, offset=vectors.offset * 4)
    lengths = np.diff(offsets)
    dim = dim if dim is not None else (int(lengths[0]) // width if n else 0)
    if n and not (lengths == dim * width).all():
        raise ValueError(
            f"vectors are not all {dim} x {dtype} ({dim * width} bytes): lengths {sorted(set(lengths.tolist()))}"
        )
    data = vectors.buffers()[2]
    return np.frombuffer(data, dtype=_STORAGE[dtype], count=n * dim, offset=int(offsets[0])).reshape(n, dim)


def vector_checksums(vectors: pa.Array | pa.ChunkedArray, scales=None) -> pa.Int64Array:
    """CRC-32 of each binary cell, continued over its float32 scale where it has one (int8)."""
    vectors = _single_binary_array(vectors)
    offsets = np.frombuffer(vectors.buffers()[1], dtype=np.int32, count=len(vectors) + 1, offset=vectors.offset * 4)
    data = memoryview(vectors.buffers()[2]) if len(vectors) else memoryview(b"")
    cells = [data[start:end] for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    if scales is None:
        return pa.array([crc32(cell) for cell in cells], pa.int64())
    scales = pa.chunked_array([scales]) if isinstance(scales, pa.Array) else scales
    if not isinstance(scales, pa.ChunkedArray):
        scales = pa.chunked_array([pa.array(np.asarray(scales, dtype=np.float32))])
    scales = scales.cast(pa.float32())
    scale_bytes = memoryview(scales.fill_null(0).to_numpy().astype("<f4").tobytes())
    has_scale = scales.is_valid().to_numpy(zero_copy_only=False).tolist()
    return pa.array(
        [
            crc32(scale_bytes[4 * i : 4 * i + 4], crc32(cell)) if scaled else crc32(cell)
            for i, (cell, scaled) in enumerate(zip(cells, has_scale))
        ],
        pa.int64(),
    )


ROW_NAMES = ("query_set", "query_id", "prompt_index", "partition", "doc_id", "chunk")


def check_vectors(rows: pa.Table | pa.RecordBatch, where: str) -> None:
    """Raises CorruptVector unless every row's `vector` (and `scale`) matches its `checksum`;
    `where` names the table (and file), the row is named by its ROW_NAMES columns."""
    checksums = rows.column("checksum")
    if checksums.null_count == len(checksums):
        return
    actual = vector_checksums(rows.column("vector"), rows.column("scale"))
    bad = np.flatnonzero(pc.fill_null(pc.not_equal(actual, checksums), False).to_numpy(zero_copy_only=False))
    if len(bad):
        first = rows.slice(int(bad[0]), 1).select([c for c in ROW_NAMES if c in rows.column_names]).to_pylist()[0]
        raise CorruptVector(
            f"{where}: {len(bad)} of {len(actual)} stored vector(s) do not match their checksum (first: "
            f"{', '.join(f'{c} {v!r}' for c, v in first.items())}); the bytes changed after they were "
            "written: run `python -m jobs verify` and re-extract the slice (`--force`)"
        )


SKETCH_BLOCK = 256  # coordinates per float16 scale (k² for the default k = 16: one layer's block)


def encode_sign_sketch(array: np.ndarray) -> pa.BinaryArray:
    """One binary cell per row: ceil(d / 8) bytes of signs (bit set where the value is > 0, numpy
    bit order), then one little-endian float16 per SKETCH_BLOCK coordinates: their mean |value|."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"expected a [n, d] array, got shape {array.shape}")
    bits = np.packbits(array > 0, axis=1)
    scales = np.stack([np.abs(block).mean(axis=1) for block in _sketch_blocks(array)], axis=1).astype("<f2")
    return _rows_as_binary(np.ascontiguousarray(np.concatenate([bits, scales.view(np.uint8)], axis=1)))


def decode_sign_sketch(cells: pa.Array | pa.ChunkedArray, dim: int) -> np.ndarray:
    """The float32 [n, dim] sketch vectors of cells written by encode_sign_sketch: each sign times
    its block's mean |value|. Cells of signs alone (indexes built before the block scales) decode
    as ±1 until the index is rebuilt."""
    cells = _single_binary_array(cells)
    n, bits_width, blocks = len(cells), (dim + 7) // 8, -(-dim // SKETCH_BLOCK)
    offsets = np.frombuffer(cells.buffers()[1], dtype=np.int32, count=n + 1, offset=cells.offset * 4)
    lengths = np.diff(offsets)
    width = int(lengths[0]) if n else bits_width
    if width not in (bits_width, bits_width + 2 * blocks) or not (lengths == width).all():
        raise ValueError(f"sketches are not all {bits_width + 2 * blocks} bytes ({dim} bits and {blocks} scales)")
    packed = np.frombuffer(cells.buffers()[2], dtype=np.uint8, count=n * width, offset=int(offsets[0])).reshape(
        n, width
    )
    sketch = np.unpackbits(packed[:, :bits_width], axis=1, count=dim).astype(np.float32) * 2.0 - 1.0  # the signs
    if width == bits_width:
        return sketch
    scales = np.ascontiguousarray(packed[:, bits_width:]).view("<f2").astype(np.float32)
    for block, scale in zip(_sketch_blocks(sketch), scales.T):
        block *= scale[:, None]
    return sketch


def _sketch_blocks(array: np.ndarray) -> list[np.ndarray]:
    """Views of consecutive SKETCH_BLOCK columns of `array` (the last one may be narrower)."""
    return [array[:, start : start + SKETCH_BLOCK] for start in range(0, array.shape[1], SKETCH_BLOCK)]


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown vector dtype {dtype!r}; one of {DTYPES}")


def _check_no_overflow(array: np.ndarray, stored: np.ndarray, dtype: str) -> None:
    if dtype == "float16":
        infinite = np.isinf(stored)
    elif dtype == "bfloat16":
        infinite = (stored & 0x7FFF) == 0x7F80
    else:
        return
    overflowed = (infinite & np.isfinite(array)).any(axis=1)
    if overflowed.any():
        largest = float(np.abs(array[overflowed]).max())
        raise VectorOverflow(
            f"{int(overflowed.sum())} of {len(array)} vectors hold values beyond {dtype}'s range "
            f"(largest |x| = {largest:.4g}): they would be stored as inf. Use --vector-dtype bfloat16 "
            "(float32's range in 2 bytes) or float32"
        )


def _to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """Upper 16 bits of each float32, rounded to nearest even (NaN kept NaN)."""
    bits = array.view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> 16) & 1)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    return np.where(np.isnan(array), np.uint16(0x7FC0), rounded)


def _to_int8(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # one float temporary, rounded and clipped in place: at d = 2^16 each temporary of a batch is
    # 64 MB of fresh pages (256 rows at d = 64,343: 42 -> 21 ms, the same codes)
    largest = np.maximum(array.max(axis=1, initial=0.0), -array.min(axis=1, initial=0.0))
    scales = largest / 127.0
    safe = np.where(scales > 0, scales, 1.0)[:, None]  # all-zero rows stay zero
    quotient = np.divide(array, safe)
    np.rint(quotient, out=quotient)
    np.clip(quotient, -127, 127, out=quotient)
    return quotient.astype(np.int8), scales.astype(np.float32)


def _rows_as_binary(stored: np.ndarray) -> pa.BinaryArray:
    n, row_bytes = stored.shape[0], stored.shape[1] * stored.itemsize
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * row_bytes).tobytes())
    return pa.BinaryArray.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(stored.tobytes())])


def _single_binary_array(vectors) -> pa.BinaryArray:
    if isinstance(vectors, pa.ChunkedArray):
        vectors = vectors.combine_chunks() if vectors.num_chunks != 1 else vectors.chunk(0)
    if pa.types.is_large_binary(vectors.type) or pa.types.is_binary_view(vectors.type):
        vectors = vectors.cast(pa.binary())
    if not pa.types.is_binary(vectors.type):
        raise ValueError(f"vectors must be BINARY, got {vectors.type}")
    return vectors


def _scale_column(scales) -> np.ndarray:
    if isinstance(scales, (pa.Array, pa.ChunkedArray)):
        scales = scales.to_numpy(zero_copy_only=False)
    return np.asarray(scales, dtype=np.float32)[:, None]
