"""Scoring throughput: is bulk scoring bound by reading the vectors, not by Python?

On the lake of `make run`, every side reads through the lake's own reader (`Lake.read_batches`:
vector checksums and Parquet page CRCs verified, as every job's read is), in the score job's batch
size: the rate of scoring every stored training vector against every query (decode, precondition
with R^(-1/2), normalise, dot products, running top-k: the score job's own `score_batches`) ÷ the
rate of just reading and decoding the same vectors, in the same process. Then the same for the
TrackStar index (`jobs.trackstar_index`, int8, built first if missing): scoring it (integer
products of its int8 rows with int8-coded queries + top-k, the next batch read meanwhile in a
thread, as the engine reads ahead in the job) ÷ just reading and decoding it to float32 (aim ≥ 1.5
with 200 queries; also shown for 16 queries, and with the time to open the table, a fixed cost in
both, taken out), the bound on that ratio (read + decode ÷ the slower of reading alone and scoring
rows already in memory: no overlap does better), and index scoring ÷ the current scoring of the raw
vectors (the speed-up). Then the index ratios again (names ending `_d65536`) on a random int8
index of --synthetic-rows unit vectors at --synthetic-dim coordinates (default 65,536, the
dimension of 100M+ parameter models), written as the index job writes its rows, and, at that
dimension, R^(-1/2) on one batch of raw vectors and the index build's encoding of it. With
`--extraction-scaling` it also times extraction of the same tokens with 1 and 2 CPU ranks
(vectors/s per rank), in a scratch lake.

    python bench/score_throughput.py [--lake lake] [--synthetic-dim 65536] [--synthetic-rows 4096]
                                     [--extraction-scaling]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from bench.common import timed  # noqa: E402
from infra.lake import Lake  # noqa: E402
from jobs.trackstar_index import ensure_index  # noqa: E402
from jobs.score import BATCH_BYTES, rows_per_batch, score_batches  # noqa: E402
from explorer.trace import TraceContext  # noqa: E402
from schemas.vectors import decode_vectors  # noqa: E402

INDEX_RATIO_AIM = 1.5


def batches(context: TraceContext, dim: int, table: str = "train_gradients", dtype: str = "int8", ahead: bool = False):
    """The vectors of the context's checkpoint and fingerprint as the lake reads them (checksums and
    page CRCs verified), in the score job's batch size; `ahead`: read in a thread meanwhile."""
    where = [("checkpoint_id", "=", context.checkpoint_id), ("fingerprint", "=", context.fingerprint)]
    if table == "trackstar_index":
        where += [("query_set", "=", context.query_set), ("kind", "=", "inverse_root"), ("dtype", "=", dtype)]
    return vector_batches(context.lake, table, where, dim, ahead)


def vector_batches(lake: Lake, table: str, where: list, dim: int, ahead: bool = False):
    columns = ["doc_id", "chunk", "vector", "dtype", "scale"]
    return lake.read_batches(table, filters=where, columns=columns, rows=rows_per_batch(dim, BATCH_BYTES), ahead=ahead)


def extraction_scaling(lake: Lake):
    from jobs import extract

    with tempfile.TemporaryDirectory() as scratch:
        for folder in ("tokens", "model"):  # model/ holds the checkpoint folders
            shutil.copytree(Path(lake.root) / folder, Path(scratch) / folder)
        n = Lake(scratch).read("tokens", columns=["chunk"]).num_rows
        for ranks in (1, 2):
            started = time.perf_counter()
            extract.run(extract.ExtractConfig(lake=scratch, ranks=ranks, query_set=None, force=True))
            seconds = time.perf_counter() - started
            print(
                f"extraction with {ranks} CPU rank(s): {n:,} vectors in {seconds:.1f}s = {n / seconds:,.0f} vectors/s "
                f"({n / seconds / ranks:,.0f} per rank; includes ~15 s of launcher and model start-up)"
            )


def decode_all(batches_read, dim: int) -> None:
    for batch in batches_read:
        decode_vectors(batch.column("vector"), batch.column("dtype")[0].as_py(), batch.column("scale"), dim)


def index_measures(lake: Lake, where: list, queries: np.ndarray, dim: int, suffix: str = "") -> tuple[float, float]:
    """Times scoring the int8 index rows `where` selects against `queries` (prepared) and reading and
    decoding them; prints the index ratios (names ending in `suffix`); (ratio, scoring seconds)."""

    def score_index(queries=queries):
        for _ in score_batches(
            vector_batches(lake, "trackstar_index", where, dim, True), queries, None, False, 10, dim
        ):
            pass

    n = lake.count_rows("trackstar_index", where)
    index_read_seconds, index_seconds, few_queries_seconds, open_seconds = timed(
        lambda: decode_all(vector_batches(lake, "trackstar_index", where, dim), dim),
        score_index,
        lambda: score_index(queries[:16]),  # the matmul shrinks, the reading does not
        lambda: lake.open("trackstar_index").to_pyarrow_dataset(),  # the table's log, nothing read
        repeats=7,  # ~50 ms each on the embedded index: more runs to find the quiet moments of a shared machine
    )
    in_memory = list(vector_batches(lake, "trackstar_index", where, dim))
    read_only_seconds, compute_seconds = timed(
        lambda: list(vector_batches(lake, "trackstar_index", where, dim)),  # read and checked, not decoded
        lambda: list(score_batches(iter(in_memory), queries, None, False, 10, dim)),  # nothing read
        repeats=7,
    )
    print(f"index (int8), {n:,} vectors of {dim} dims x {len(queries)} queries")
    print(f"index (int8) read + decode:   {n / index_read_seconds:12,.0f} vectors/s")
    print(
        f"index (int8) decode + score:  {n / index_seconds:12,.0f} vectors/s = "
        f"{n * len(queries) / index_seconds:,.0f} vector·queries/s"
    )
    print(f"index (int8), 16 queries:     {n / few_queries_seconds:12,.0f} vectors/s")
    print(
        f"index open (log + dataset):   {open_seconds * 1e3:9.1f} ms of the {index_read_seconds * 1e3:.1f} ms of "
        f"read + decode, {index_seconds * 1e3:.1f} ms of scoring (a fixed cost, large on a small corpus)"
    )
    index_ratio = index_read_seconds / index_seconds
    print(f"index_ratio{suffix}={index_ratio:.3f} (index scoring ÷ index read + decode)")
    print(f"index_ratio_16_queries{suffix}={index_read_seconds / few_queries_seconds:.3f} (the same with 16 queries)")
    print(
        f"index_ratio_past_open{suffix}={(index_read_seconds - open_seconds) / (index_seconds - open_seconds):.3f} "
        "(the same, the time to open the table taken from both)"
    )
    print(
        f"index (int8) read alone:      {read_only_seconds * 1e3:9.1f} ms; scoring it from memory: "
        f"{compute_seconds * 1e3:.1f} ms (the products and the top-k, one thread)"
    )
    bound = index_read_seconds / max(read_only_seconds, compute_seconds)
    print(
        f"index_ratio_bound{suffix}={bound:.3f} (the most any overlap can give: read + decode ÷ the slower of "
        "reading alone and scoring from memory)"
    )
    print(
        f"aim: int8 index scoring ÷ index read + decode, {len(queries)} queries, d = {dim} ≥ {INDEX_RATIO_AIM}: "
        f"measured {index_ratio:.3f} ({'met' if index_ratio >= INDEX_RATIO_AIM else 'not met'})"
    )
    return index_ratio, index_seconds


def synthetic_index(root: str, dim: int, rows: int, partitions: int = 4) -> list:
    """A lake holding only an int8 TrackStar index of `rows` random unit vectors of `dim` coordinates
    in `partitions` partitions, written as the index job writes them; the filters selecting it."""
    from schemas.vectors import encode_sign_sketch, encode_vectors

    lake, keys = Lake(root), {"checkpoint_id": "ck", "query_set": "qs", "kind": "inverse_root", "dtype": "int8"}
    per_batch, rng = rows_per_batch(dim, BATCH_BYTES), np.random.default_rng(0)
    for partition in range(partitions):
        n_partition = rows // partitions + (partition < rows % partitions)

        def pieces(partition=partition, n_partition=n_partition):
            for start in range(0, n_partition, per_batch):
                n = min(per_batch, n_partition - start)
                unit = rng.standard_normal((n, dim), dtype=np.float32)
                unit /= np.linalg.norm(unit, axis=1, keepdims=True)
                cells, scales = encode_vectors(unit, "int8")
                yield pa.table(
                    {
                        **{name: [value] * n for name, value in keys.items()},
                        "partition": [partition] * n,
                        "doc_id": [f"doc-{partition}-{start + i}" for i in range(n)],
                        "chunk": [0] * n,
                        "fingerprint": ["fp"] * n,
                        "hessian_sha256": ["h"] * n,
                        "source_run_id": ["run"] * n,
                        "vector": cells,
                        "scale": scales,
                        "sketch": encode_sign_sketch(unit),
                        "run_id": ["run"] * n,
                    }
                )

        lake.replace_slice_batches("trackstar_index", pieces(), partition=partition, fingerprint="fp", **keys)
    return [("checkpoint_id", "=", "ck"), ("query_set", "=", "qs"), ("fingerprint", "=", "fp")]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lake", default="lake")
    parser.add_argument("--extraction-scaling", action="store_true")
    parser.add_argument(
        "--synthetic-dim",
        type=int,
        default=65536,
        help="also measure the index ratios on a random index of this many coordinates (C4-sized models: "
        "d ≈ 2^16); 0: not",
    )
    parser.add_argument("--synthetic-rows", type=int, default=4096)
    args = parser.parse_args()
    lake = Lake(args.lake)
    context = TraceContext(lake)
    from gradient_kernels.scoring import prepare
    from jobs.score import query_vectors

    _, raw_queries, dim = query_vectors(lake, context.query_set, context.checkpoint_id, context.fingerprint, 0)
    queries = prepare(raw_queries, context.preconditioner).numpy()
    n = sum(b.num_rows for b in batches(context, dim))

    def score_all():
        for _ in score_batches(batches(context, dim), queries, context.preconditioner.blocks, True, 10, dim):
            pass

    started = time.perf_counter()
    built = ensure_index(lake, context.checkpoint_id, context.fingerprint, context.query_set, "inverse_root", "int8")
    print(
        f"int8 index: {len(built['built'])} partition(s) built, {len(built['kept'])} up to date, "
        f"{time.perf_counter() - started:.1f}s"
    )
    read_seconds, score_seconds = timed(lambda: decode_all(batches(context, dim), dim), score_all)
    print(f"{n:,} vectors of {dim} dims x {len(queries)} queries, checkpoint {context.checkpoint_id}")
    print(f"read + decode:                {n / read_seconds:12,.0f} vectors/s")
    print(
        f"read + decode + R + score:    {n / score_seconds:12,.0f} vectors/s = "
        f"{n * len(queries) / score_seconds:,.0f} vector·queries/s"
    )
    print(f"ratio={read_seconds / score_seconds:.3f}")
    if args.extraction_scaling:
        extraction_scaling(lake)
    where = [
        ("checkpoint_id", "=", context.checkpoint_id),
        ("fingerprint", "=", context.fingerprint),
        ("query_set", "=", context.query_set),
        ("kind", "=", "inverse_root"),
        ("dtype", "=", "int8"),
    ]
    _, index_seconds = index_measures(lake, where, queries, dim)
    print(f"index_speedup={score_seconds / index_seconds:.2f} (index scoring ÷ scoring the raw vectors)")
    if args.synthetic_dim:
        with tempfile.TemporaryDirectory() as scratch:
            started = time.perf_counter()
            where = synthetic_index(scratch, args.synthetic_dim, args.synthetic_rows)
            print(
                f"random int8 index of {args.synthetic_rows:,} rows x {args.synthetic_dim:,} dims written in "
                f"{time.perf_counter() - started:.1f}s"
            )
            unit = np.random.default_rng(1).standard_normal((len(queries), args.synthetic_dim), dtype=np.float32)
            unit /= np.linalg.norm(unit, axis=1, keepdims=True)
            index_measures(Lake(scratch), where, unit, args.synthetic_dim, suffix=f"_d{args.synthetic_dim}")
        preconditioner_at(args.synthetic_dim)


def preconditioner_at(dim: int, k: int = 37, rows: int = 256):
    """R^(-1/2) applied to one score batch of raw vectors at `dim` (one k² block per weight matrix,
    as the fit makes them), against stacking the blocks again for each batch as the score job did."""
    from gradient_kernels.scoring import Preconditioner, prepare

    blocks = [torch.randn(k * k, k * k) for _ in range(dim // (k * k))]
    vectors = torch.randn(rows, len(blocks) * k * k)
    preconditioner = Preconditioner(blocks)
    once, each_batch = timed(
        lambda: preconditioner.apply(vectors), lambda: Preconditioner(blocks).apply(vectors), repeats=3
    )
    print(
        f"R^(-1/2) on {rows} raw vectors of {vectors.shape[1]:,} dims ({len(blocks)} blocks of {k * k:,}): "
        f"{once * 1e3:.0f} ms, {each_batch * 1e3:.0f} ms stacking the blocks again"
    )
    print(f"preconditioner_stacked_once_speedup={each_batch / once:.2f}")
    from schemas.vectors import encode_sign_sketch, encode_vectors

    prepared = prepare(vectors, preconditioner).numpy()
    int8_seconds, sketch_seconds = timed(
        lambda: encode_vectors(prepared, "int8"), lambda: encode_sign_sketch(prepared), repeats=3
    )
    print(
        f"the index build's encoding of that batch: int8 {int8_seconds * 1e3:.0f} ms, 1-bit sketch "
        f"{sketch_seconds * 1e3:.0f} ms (R^(-1/2) {once * 1e3:.0f} ms)"
    )
    print(f"index_build_encoding_share={(int8_seconds + sketch_seconds) / once:.2f} (encoding ÷ R^(-1/2))")


if __name__ == "__main__":
    main()
