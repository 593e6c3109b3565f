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
vectors (the speed-up). With
`--extraction-scaling` it also times extraction of the same tokens with 1 and 2 CPU ranks
(vectors/s per rank), in a scratch lake.

    python bench/score_throughput.py [--lake lake] [--extraction-scaling]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    rows = rows_per_batch(dim, BATCH_BYTES)
    return context.lake.read_batches(
        table, filters=where, columns=["doc_id", "chunk", "vector", "dtype", "scale"], rows=rows, ahead=ahead
    )


def timed(*fns, repeats: int = 3) -> list[float]:
    """The fastest of `repeats` runs of each of `fns`, run in turn (a, b, a, b...) so that a change in
    the load of a shared machine falls on both sides of a ratio."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, kept in zip(fns, times):
            started = time.perf_counter()
            fn()
            kept.append(time.perf_counter() - started)
    return [min(kept) for kept in times]


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lake", default="lake")
    parser.add_argument("--extraction-scaling", action="store_true")
    args = parser.parse_args()
    lake = Lake(args.lake)
    context = TraceContext(lake)
    from gradient_kernels.scoring import prepare
    from jobs.score import query_vectors

    _, raw_queries, dim = query_vectors(lake, context.query_set, context.checkpoint_id, context.fingerprint, 0)
    queries = prepare(raw_queries, context.preconditioner).numpy()
    n = sum(b.num_rows for b in batches(context, dim))

    def decode_only(table="train_gradients"):
        for batch in batches(context, dim, table):
            decode_vectors(batch.column("vector"), batch.column("dtype")[0].as_py(), batch.column("scale"), dim)

    def score_all():
        for _ in score_batches(batches(context, dim), queries, context.preconditioner.blocks, True, 10, dim):
            pass

    def score_index(queries=queries):
        for _ in score_batches(batches(context, dim, "trackstar_index", ahead=True), queries, None, False, 10, dim):
            pass

    started = time.perf_counter()
    built = ensure_index(lake, context.checkpoint_id, context.fingerprint, context.query_set, "inverse_root", "int8")
    print(
        f"int8 index: {len(built['built'])} partition(s) built, {len(built['kept'])} up to date, "
        f"{time.perf_counter() - started:.1f}s"
    )
    read_seconds, score_seconds = timed(decode_only, score_all)
    index_read_seconds, index_seconds, few_queries_seconds, open_seconds = timed(
        lambda: decode_only("trackstar_index"),
        score_index,
        lambda: score_index(queries[:16]),  # the matmul shrinks, the reading does not
        lambda: lake.open("trackstar_index").to_pyarrow_dataset(),  # the table's log, nothing read
        repeats=7,  # ~50 ms each: more runs to find the quiet moments of a shared machine
    )
    in_memory = list(batches(context, dim, "trackstar_index"))
    read_only_seconds, compute_seconds = timed(
        lambda: list(batches(context, dim, "trackstar_index")),  # read and checked, not decoded
        lambda: list(score_batches(iter(in_memory), queries, None, False, 10, dim)),  # nothing read
        repeats=7,
    )
    print(f"{n:,} vectors of {dim} dims x {len(queries)} queries, checkpoint {context.checkpoint_id}")
    print(f"read + decode:                {n / read_seconds:12,.0f} vectors/s")
    print(
        f"read + decode + R + score:    {n / score_seconds:12,.0f} vectors/s = "
        f"{n * len(queries) / score_seconds:,.0f} vector·queries/s"
    )
    print(f"index (int8) read + decode:   {n / index_read_seconds:12,.0f} vectors/s")
    print(
        f"index (int8) decode + score:  {n / index_seconds:12,.0f} vectors/s = "
        f"{n * len(queries) / index_seconds:,.0f} vector·queries/s"
    )
    if args.extraction_scaling:
        extraction_scaling(lake)
    print(f"index (int8), 16 queries:     {n / few_queries_seconds:12,.0f} vectors/s")
    print(
        f"index open (log + dataset):   {open_seconds * 1e3:9.1f} ms of the {index_read_seconds * 1e3:.1f} ms of "
        f"read + decode, {index_seconds * 1e3:.1f} ms of scoring (a fixed cost, large on a small corpus)"
    )
    index_ratio = index_read_seconds / index_seconds
    print(f"index_ratio={index_ratio:.3f} (index scoring ÷ index read + decode)")
    print(f"index_ratio_16_queries={index_read_seconds / few_queries_seconds:.3f} (the same with 16 queries)")
    print(
        f"index_ratio_past_open={(index_read_seconds - open_seconds) / (index_seconds - open_seconds):.3f} "
        "(the same, the time to open the table taken from both)"
    )
    print(
        f"index (int8) read alone:      {read_only_seconds * 1e3:9.1f} ms; scoring it from memory: "
        f"{compute_seconds * 1e3:.1f} ms (the products and the top-k, one thread)"
    )
    bound = index_read_seconds / max(read_only_seconds, compute_seconds)
    print(
        f"index_ratio_bound={bound:.3f} (the most any overlap can give: read + decode ÷ the slower of reading "
        "alone and scoring from memory)"
    )
    print(f"index_speedup={score_seconds / index_seconds:.2f} (index scoring ÷ scoring the raw vectors)")
    print(f"ratio={read_seconds / score_seconds:.3f}")
    print(
        f"aim: int8 index scoring ÷ index read + decode, {len(queries)} queries ≥ {INDEX_RATIO_AIM}: measured "
        f"{index_ratio:.3f} ({'met' if index_ratio >= INDEX_RATIO_AIM else 'not met'})"
    )


if __name__ == "__main__":
    main()
