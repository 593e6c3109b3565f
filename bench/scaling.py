"""Cost linear, memory flat: time and peak RSS of each stage at 1x, 4x and 16x the corpus.

One trained checkpoint (`make run`'s lake) is reused; the world generator makes one size only, so
bigger corpora are made here:
- extract: the first --extract-rows token chunks, replicated 1x/4x/16x into ONE partition (so
  the partition grows with the scale: a rank's memory must not), extracted by one CPU rank;
- index, score (index), score (raw): every stored train vector replicated 1x/4x/16x, each copy
  slightly perturbed (1% noise, so copies do not tie) and written as new partitions;
- compact: every stored train vector replicated 1x/4x/16x into ONE partition as small files (one
  append of ~15 MB each, alternately under two fingerprints, as a lake holding two projections of a
  slice), then the weekly maintenance's compaction (`Lake.optimize`) of that partition: the
  partition grows with the scale, the compaction's memory must not.
Each stage runs in a fresh process; its peak RSS is sampled over that process and its descendants
(the DeepSpeed launcher and rank) together. Printed: seconds and peak RSS per stage and scale,
and each one's ratio to 1x (linear cost: time ratio ≈ scale; flat memory: RSS ratio ≈ 1).

    python bench/scaling.py [--lake lake] [--scales 1,4,16] [--extract-rows 128]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from infra.lake import Lake  # noqa: E402

STAGES = ("extract", "index", "score (index)", "score (raw)", "compact")
ROWS_PER_SMALL_FILE = 862  # ~15 MB of float32 vectors at d = 4,352: a file compaction merges


def replicate_vectors(source: Lake, scratch: Lake, copies: range, checkpoint_id: str, fingerprint: str):
    """Write copies `copies` of every train_gradients partition into scratch as partitions copy*1000 + p."""
    from schemas.vectors import decode_vectors, encode_vectors, vector_checksums

    partitions = sorted(set(source.read("train_gradients", columns=["partition"])["partition"].to_pylist()))
    for partition in partitions:
        rows = source.read(
            "train_gradients",
            filters=[
                ("checkpoint_id", "=", checkpoint_id),
                ("partition", "=", partition),
                ("fingerprint", "=", fingerprint),
            ],
        )
        vectors = decode_vectors(rows["vector"], rows["dtype"][0].as_py(), rows["scale"])
        for copy in copies:
            noise = np.random.default_rng(copy * 1000 + partition).normal(size=vectors.shape).astype(np.float32)
            perturbed = (
                vectors + (0.01 * np.linalg.norm(vectors, axis=1, keepdims=True) / np.sqrt(vectors.shape[1])) * noise
                if copy
                else vectors
            )
            cells, scales = encode_vectors(perturbed, rows["dtype"][0].as_py())
            table = as_copy(
                rows.set_column(rows.schema.get_field_index("vector"), "vector", cells), copy, copy * 1000 + partition
            )
            if scales is not None:
                table = table.set_column(table.schema.get_field_index("scale"), "scale", scales)
            checksums = vector_checksums(table["vector"], table["scale"])  # of the perturbed vectors
            table = table.set_column(table.schema.get_field_index("checksum"), "checksum", checksums)
            scratch.replace_slice(
                "train_gradients",
                table,
                checkpoint_id=checkpoint_id,
                partition=copy * 1000 + partition,
                fingerprint=fingerprint,
            )


def as_copy(rows: pa.Table, copy: int, partition: int) -> pa.Table:
    """`rows` moved to `partition`, their doc ids made distinct for each copy but the first."""
    rows = rows.set_column(
        rows.schema.get_field_index("partition"), "partition", pa.array([partition] * rows.num_rows, pa.int32())
    )
    doc_ids = [f"{d}#copy{copy}" if copy else d for d in rows["doc_id"].to_pylist()]
    return rows.set_column(rows.schema.get_field_index("doc_id"), "doc_id", pa.array(doc_ids))


def replicate_as_small_files(source: Lake, scratch: Lake, scale: int, checkpoint_id: str, fingerprint: str):
    """`scale` copies of the fingerprint's train vectors in partition 0 of scratch, one append (one
    small file) per ROWS_PER_SMALL_FILE rows, every other append under a second fingerprint."""
    rows = source.read(
        "train_gradients", filters=[("checkpoint_id", "=", checkpoint_id), ("fingerprint", "=", fingerprint)]
    )
    for copy in range(scale):
        table = as_copy(rows, copy, 0)
        for piece, start in enumerate(range(0, table.num_rows, ROWS_PER_SMALL_FILE)):
            part = table.slice(start, ROWS_PER_SMALL_FILE)
            if piece % 2:
                second = pa.array([f"{fingerprint}-second"] * part.num_rows)
                part = part.set_column(part.schema.get_field_index("fingerprint"), "fingerprint", second)
            scratch.append("train_gradients", part)


def replicate_tokens(source: Lake, scratch: Lake, rows: int | None, scale: int, partition: int = 0):
    """`partition` holding its first `rows` chunks (None: all), `scale` times over (doc ids made distinct)."""
    chunks = source.read("tokens", filters=[("partition", "=", partition)])
    chunks = chunks if rows is None else chunks.slice(0, rows)
    copies = [
        chunks.set_column(
            chunks.schema.get_field_index("doc_id"),
            "doc_id",
            pa.array([f"{d}#copy{copy}" for d in chunks["doc_id"].to_pylist()]),
        )
        for copy in range(scale)
    ]
    scratch.replace_slice("tokens", pa.concat_tables(copies), partition=partition)


def run_stage(stage: str, lake: str, checkpoint: str, checkpoint_id: str, fingerprint: str, query_set: str):
    """Runs in the stage's own process."""
    from jobs import extract, score, trackstar_index

    if stage == "extract":
        extract.run(extract.ExtractConfig(lake=lake, checkpoint=checkpoint, ranks=1, query_set=None, force=True))
    elif stage == "compact":
        compacted = Lake(lake).optimize("train_gradients")
        if not compacted["numFilesAdded"]:
            raise RuntimeError(f"nothing was compacted: {compacted}")
    elif stage == "index":
        trackstar_index.ensure_index(Lake(lake), checkpoint_id, fingerprint, query_set, "inverse_root", "int8")
    else:
        score.run(
            score.ScoreConfig(
                lake=lake,
                checkpoint_id=checkpoint_id,
                query_set=query_set,
                fingerprint=fingerprint,
                methods=["trackstar"],
                index="int8" if stage == "score (index)" else "none",
            )
        )


def measured(stage: str, lake: Path, context: dict) -> tuple[float, float]:
    """(seconds, peak RSS in MB of its process tree) of one stage in a fresh process."""
    from bench.common import peak_tree_rss_mb

    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, __file__, "--stage", stage, "--scratch", str(lake), "--context", json.dumps(context)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = peak_tree_rss_mb(child)
    if child.returncode:
        raise RuntimeError(f"stage {stage} failed:\n{child.stderr.read()[-3000:]}")
    return time.perf_counter() - started, peak


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lake", default="lake")
    parser.add_argument("--scales", default="1,4,16")
    parser.add_argument("--extract-rows", type=int, default=128)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--context", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:  # a stage's own process, measured from outside by `measured`
        return run_stage(args.stage, args.scratch, **json.loads(args.context))

    from bench.common import latest_checkpoint
    from explorer.trace import TraceContext

    source = Lake(args.lake)
    trace = TraceContext(source)
    context = {
        "checkpoint": str(latest_checkpoint(Path(args.lake)).resolve()),
        "checkpoint_id": trace.checkpoint_id,
        "fingerprint": trace.fingerprint,
        "query_set": trace.query_set,
    }
    scales = [int(s) for s in args.scales.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="scaling-") as scratch_dir:
        vectors_lake, tokens_lake = Path(scratch_dir) / "vectors", Path(scratch_dir) / "tokens"
        compact_lake = Path(scratch_dir) / "compact"
        lakes = {"extract": tokens_lake, "compact": compact_lake}
        # the tables scoring reads, and the fitted Hessians' files the hessians table points to
        for table in ("checkpoints", "hessians", "queries", "query_sets", "query_gradients", "runs", "_matrices"):
            shutil.copytree(Path(source.root) / table, vectors_lake / table)
        done = 0
        for scale in scales:
            print(
                f"[scaling] {scale}x: preparing {scale} cop{'y' if scale == 1 else 'ies'} of the vectors "
                f"and {scale * args.extract_rows} chunks in one partition",
                flush=True,
            )
            replicate_vectors(source, Lake(vectors_lake), range(done, scale), trace.checkpoint_id, trace.fingerprint)
            done = scale
            shutil.rmtree(tokens_lake, ignore_errors=True)
            replicate_tokens(source, Lake(tokens_lake), args.extract_rows, scale)
            shutil.rmtree(compact_lake, ignore_errors=True)  # small files only, none compacted before
            replicate_as_small_files(source, Lake(compact_lake), scale, trace.checkpoint_id, trace.fingerprint)
            shutil.rmtree(vectors_lake / "trackstar_index", ignore_errors=True)  # a full build at every scale
            for stage in STAGES:
                results[(stage, scale)] = measured(stage, lakes.get(stage, vectors_lake), context)
                seconds, rss = results[(stage, scale)]
                print(f"[scaling] {scale}x {stage}: {seconds:.1f}s, peak RSS {rss:,.0f} MB", flush=True)
    n_vectors = (
        Lake(args.lake)
        .read(
            "train_gradients",
            filters=[("checkpoint_id", "=", trace.checkpoint_id), ("fingerprint", "=", trace.fingerprint)],
            columns=["partition"],
        )
        .num_rows
    )
    print(
        f"\nscales: extract {args.extract_rows} chunks x scale (one partition, 1 rank); index and score "
        f"{n_vectors:,} vectors x scale; compact {n_vectors:,} vectors x scale in one partition of small files"
    )
    print(
        f"{'stage':<14} "
        + " ".join(f"{f'{s}x s':>8} {f'{s}x MB':>8}" for s in scales)
        + " "
        + " ".join(f"{f'time {s}x/1x':>12} {f'RSS {s}x/1x':>11}" for s in scales[1:])
    )
    for stage in STAGES:
        base_seconds, base_rss = results[(stage, scales[0])]
        cells = " ".join(f"{results[(stage, s)][0]:8.1f} {results[(stage, s)][1]:8,.0f}" for s in scales)
        ratios = " ".join(
            f"{results[(stage, s)][0] / base_seconds:12.2f} {results[(stage, s)][1] / base_rss:11.2f}"
            for s in scales[1:]
        )
        print(f"{stage:<14} {cells} {ratios}")
    if len(scales) > 2:  # fixed costs (start-up, imports, Sail) weigh on 1x: the cost of each extra 1x shows linearity
        previous, last = scales[-2], scales[-1]
        print(
            "seconds per extra 1x of corpus between "
            + f"{previous}x and {last}x: "
            + ", ".join(
                f"{stage} {(results[(stage, last)][0] - results[(stage, previous)][0]) / (last - previous):.2f}"
                for stage in STAGES
            )
        )
    last = scales[-1]
    for stage in STAGES:
        key = stage.replace(" ", "_").replace("(", "").replace(")", "")
        print(
            f"{key}_time_ratio_{last}x={results[(stage, last)][0] / results[(stage, scales[0])][0]:.2f} "
            f"{key}_rss_ratio_{last}x={results[(stage, last)][1] / results[(stage, scales[0])][1]:.2f}"
        )


if __name__ == "__main__":
    main()
