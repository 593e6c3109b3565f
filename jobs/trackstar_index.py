"""index: the TrackStar index, the train side of scoring computed once and stored compactly.

For a (checkpoint, fingerprint, query set) and one fitted matrix (`inverse_root`, or
`inverse_root_train_only` for the no-mixing ablation), every train vector's scoring side
Ḡ = R^(-1/2) p / ‖R^(-1/2) p‖ depends only on the stored vector and the matrix. Scoring used to
recompute it for every vector on every run (256 multiply-adds per coordinate); the index stores it
once in `trackstar_index`, in a compact code (int8 with a per-vector scale by default; float16,
bfloat16 or float32 on request) with a 1-bit sign sketch beside it (a cheap first stage: signs and
a scale per block of coordinates, `schemas.vectors`), so scoring is decode + one matmul + top-k. A
partition indexed before the sketch had block scales keeps its signs-only sketch (still read, as
±1) until it is rebuilt.

Incremental: a partition is (re)built only when it is missing from the index, its
`train_gradients` rows come from another extraction run than the ones indexed, or the matrix's
checksum (`hessians.sha256`) differs from the one it was built with (a new Hessian fit); a
partition gone from `train_gradients` is removed. Each partition is one atomic slice replace,
streamed in batches bounded in bytes, so a rerun never duplicates rows and memory does not grow
with the partition. `score` builds what is missing before it scores (`ensure_index`).

    python -m jobs index [--kinds inverse_root inverse_root_train_only] [--dtype int8]   (jobs/index.py)
"""

from __future__ import annotations


import pyarrow as pa
import torch

from infra.lake import Lake
from infra.predicates import slice_predicate
from schemas.tables import table
from schemas.vectors import DTYPES

KINDS = ("inverse_root", "inverse_root_train_only")
BATCH_BYTES = 64 << 20  # decoded float32 bytes per batch while building or scoring


def rows_per_batch(dim: int, batch_bytes: int) -> int:
    """Rows whose decoded float32 vectors fit in batch_bytes (at least one)."""
    return max(1, batch_bytes // (4 * max(dim, 1)))


def _by_partition(pairs: set[tuple]) -> dict[int, set]:
    """{partition: its values} of (partition, value) pairs."""
    found: dict[int, set] = {}
    for partition, value in pairs:
        found.setdefault(partition, set()).add(value)
    return found


def plan(lake: Lake, checkpoint_id: str, fingerprint: str, query_set: str, kind: str, dtype: str, sha256: str) -> dict:
    """{"build": partitions to (re)build with the reason, "remove": partitions to drop, "keep": up to date}."""
    sources = _by_partition(
        lake.distinct(
            "train_gradients",
            ["partition", "run_id"],
            [("checkpoint_id", "=", checkpoint_id), ("fingerprint", "=", fingerprint)],
        )
    )
    slice_filter = [
        ("checkpoint_id", "=", checkpoint_id),
        ("query_set", "=", query_set),
        ("fingerprint", "=", fingerprint),
        ("kind", "=", kind),
        ("dtype", "=", dtype),
    ]
    hessians = _by_partition(lake.distinct("trackstar_index", ["partition", "hessian_sha256"], slice_filter))
    indexed_sources = _by_partition(lake.distinct("trackstar_index", ["partition", "source_run_id"], slice_filter))
    build, keep = {}, []
    for partition, run_ids in sorted(sources.items()):
        if partition not in hessians:
            build[partition] = "new partition"
        elif hessians[partition] != {sha256}:
            build[partition] = "Hessian changed"
        elif indexed_sources[partition] != {",".join(sorted(run_ids))}:
            build[partition] = "re-extracted"
        else:
            keep.append(partition)
    return {"build": build, "remove": sorted(set(hessians) - set(sources)), "keep": keep}


def indexed_batches(
    lake: Lake, checkpoint_id: str, fingerprint: str, partition: int, blocks: list, dtype: str, batch_bytes: int
):
    """(keys, encoded Ḡ, sketches) per byte-bounded batch of one partition's train vectors."""
    from gradient_kernels.scoring import Preconditioner, prepare
    from schemas.vectors import decode_rows, encode_sign_sketch, encode_vectors

    dim = sum(block.shape[0] for block in blocks)
    preconditioner = Preconditioner(blocks)
    for batch in lake.read_batches(
        "train_gradients",
        filters=[
            ("checkpoint_id", "=", checkpoint_id),
            ("fingerprint", "=", fingerprint),
            ("partition", "=", partition),
        ],
        columns=["doc_id", "chunk", "vector", "dtype", "scale"],
        rows=rows_per_batch(dim, batch_bytes),
        ahead=True,  # the next batch is read while this one is preconditioned and encoded
    ):
        raw = decode_rows(batch, dim)
        prepared = prepare(torch.from_numpy(raw), preconditioner, unit_norm=True).numpy()
        yield batch.select(["doc_id", "chunk"]), encode_vectors(prepared, dtype), encode_sign_sketch(prepared)


def build_partition(
    lake: Lake, keys: dict, partition: int, blocks: list, sha256: str, source_run_id: str, run_id: str, batch_bytes: int
) -> int:
    """Write one partition's index slice (atomic replace, streamed); returns the rows written."""
    from schemas.vectors import vector_checksums

    written = 0

    def batches():
        nonlocal written
        for ids, (cells, scales), sketches in indexed_batches(
            lake, keys["checkpoint_id"], keys["fingerprint"], partition, blocks, keys["dtype"], batch_bytes
        ):
            n = ids.num_rows
            written += n
            yield pa.table(
                {
                    **{name: [value] * n for name, value in keys.items()},
                    "partition": [partition] * n,
                    "doc_id": ids.column("doc_id"),
                    "chunk": ids.column("chunk"),
                    "hessian_sha256": [sha256] * n,
                    "source_run_id": [source_run_id] * n,
                    "vector": cells,
                    "scale": scales if scales is not None else pa.nulls(n, pa.float32()),
                    "sketch": sketches,
                    "checksum": vector_checksums(cells, scales),
                    "run_id": [run_id] * n,
                }
            )

    lake.replace_slice_batches("trackstar_index", batches(), partition=partition, **keys)
    return written


def ensure_index(
    lake: Lake,
    checkpoint_id: str,
    fingerprint: str,
    query_set: str,
    kind: str,
    dtype: str = "int8",
    run_id: str = "",
    batch_bytes: int = BATCH_BYTES,
) -> dict:
    """Bring the index of one (checkpoint, fingerprint, query set, matrix kind, dtype) up to date."""
    from jobs.catalog import load_preconditioner

    if kind not in KINDS or dtype not in DTYPES:
        raise ValueError(f"index kind {kind!r} / dtype {dtype!r}: kinds {KINDS}, dtypes {DTYPES}")
    blocks, hessian = load_preconditioner(lake, checkpoint_id, query_set, fingerprint, kind)
    work = plan(lake, checkpoint_id, fingerprint, query_set, kind, dtype, hessian["sha256"])
    keys = {
        "checkpoint_id": checkpoint_id,
        "query_set": query_set,
        "fingerprint": fingerprint,
        "kind": kind,
        "dtype": dtype,
    }
    if work["build"]:
        sources = _by_partition(
            lake.distinct(
                "train_gradients",
                ["partition", "run_id"],
                [
                    ("checkpoint_id", "=", checkpoint_id),
                    ("fingerprint", "=", fingerprint),
                    ("partition", "in", list(work["build"])),
                ],
            )
        )
    rows = 0
    for partition, reason in work["build"].items():
        rows += build_partition(
            lake, keys, partition, blocks, hessian["sha256"], ",".join(sorted(sources[partition])), run_id, batch_bytes
        )
        print(f"[index] {kind}/{dtype} partition {partition} built ({reason})", flush=True)
    for partition in work["remove"]:
        lake.open("trackstar_index").delete(slice_predicate(table("trackstar_index"), {**keys, "partition": partition}))
        print(f"[index] {kind}/{dtype} partition {partition} removed (no longer extracted)", flush=True)
    return {
        "kind": kind,
        "dtype": dtype,
        "hessian": hessian["sha256"],
        "built": work["build"],
        "removed": work["remove"],
        "kept": work["keep"],
        "rows_written": rows,
    }
