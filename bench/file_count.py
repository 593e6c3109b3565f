"""Reads that cost per partition, not per table: one partition of a table of many files.

C4's index has 1,024 partitions, and every extraction of a checkpoint adds files to each, so a
vector table soon holds tens of thousands of files while each score or index task reads one
partition. Here `train_gradients` holds --partitions partitions of --files files each (small
vectors: the cost measured is per file, not per byte); the same partition is read from it and from a
lake holding only that partition's files, in the same process, with the lake's own reads (`read`,
`read_batches`, `count_rows`, `distinct`). Printed: each read's time in both lakes and their ratio
(`<read>_ratio=`: how much a read grows with the rest of the table), what building a dataset of
the whole table costs (what every read paid before its partition filters pruned the log's file
list), and what opening the table costs (delta-rs replaying the log: what is left of the ratio).

    python bench/file_count.py [--partitions 1024] [--files 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from bench.common import timed  # noqa: E402
from infra.lake import Lake  # noqa: E402
from schemas.vectors import encode_vectors  # noqa: E402

CHECKPOINT = "ck-1"
READ_PARTITION = 7


def rows_of(partitions: list[int], append: int) -> pa.Table:
    """One row per partition: each append adds one file to each."""
    n = len(partitions)
    vectors = np.random.default_rng(append).normal(size=(n, 16)).astype(np.float32)
    binary, _ = encode_vectors(vectors, "float32")
    return pa.table(
        {
            "checkpoint_id": [CHECKPOINT] * n,
            "partition": partitions,
            "doc_id": [f"doc-{p}-{append}" for p in partitions],
            "chunk": [0] * n,
            "n_tokens": [16] * n,
            "vector": binary,
            "dtype": ["float32"] * n,
            "scale": pa.nulls(n, pa.float32()),
            "norm": np.linalg.norm(vectors, axis=1),
            "fingerprint": ["fp"] * n,
            "run_id": [f"run-{append}"] * n,
        }
    )


def reads(lake: Lake) -> dict:
    where = [("checkpoint_id", "=", CHECKPOINT), ("partition", "=", READ_PARTITION), ("fingerprint", "=", "fp")]
    return {
        "read": lambda: lake.read("train_gradients", filters=where),
        "read_batches": lambda: list(lake.read_batches("train_gradients", filters=where)),
        "count_rows": lambda: lake.count_rows("train_gradients", where),
        "distinct": lambda: lake.distinct("train_gradients", ["run_id"], where),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--partitions", type=int, default=1024)
    parser.add_argument("--files", type=int, default=4, help="files per partition (appends)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        many, one = Lake(f"{scratch}/many"), Lake(f"{scratch}/one")
        started = time.perf_counter()
        for append in range(args.files):
            many.append("train_gradients", rows_of(list(range(args.partitions)), append))
            one.append("train_gradients", rows_of([READ_PARTITION], append))
            print(f"[file_count] append {append + 1}/{args.files}: {time.perf_counter() - started:.0f}s", flush=True)
        files = len(many.open("train_gradients").file_uris())
        print(
            f"{files:,} files in {args.partitions:,} partitions; reading partition {READ_PARTITION} ({args.files} files)"
        )
        for name, read_many in reads(many).items():
            both = timed(read_many, reads(one)[name], repeats=5)
            print(
                f"{name}_ratio={both[0] / both[1]:.2f} ({both[0] * 1e3:.1f} ms in the table of {files:,} files, "
                f"{both[1] * 1e3:.1f} ms in the one of {args.files})"
            )
        whole, opened = timed(
            lambda: many.open("train_gradients").to_pyarrow_dataset(), lambda: many.open("train_gradients"), repeats=5
        )
        print(f"a dataset of the whole table (what each read built before): {whole * 1e3:.1f} ms")
        print(f"opening the table (delta-rs replays its log; a Delta checkpoint shortens it): {opened * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
