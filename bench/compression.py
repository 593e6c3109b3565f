"""Compression of the TrackStar index: how much smaller, and what it costs in ranking quality.

On the lake of `make run`: the index (`jobs.trackstar_index`) is built in each code (int8, bfloat16,
float16, float32) and the 1-bit sign sketch beside it; every query is scored against every train
chunk from each, and compared with exact float32 scoring of the same Ḡ computed here: bytes per
vector (and on disk), top-10 overlap with the exact ranking, MRR and recall@10 against the
stating documents. Aim: int8 ≥ 4x smaller than float32, top-10 overlap ≥ 0.95, |ΔMRR| ≤ 0.01.
The int8 index is scored as the score job does (queries coded in int8 too, integer products); the
row `int8·f32q` scores its decoded vectors against float32 queries, to show what that costs.

    python bench/compression.py [--lake lake]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from bench.common import overlap_at, ranking_metrics, trackstar_inputs  # noqa: E402
from jobs.trackstar_index import DTYPES, ensure_index  # noqa: E402
from gradient_kernels.scoring import Int8Queries  # noqa: E402
from schemas.vectors import decode_sign_sketch, decode_vectors, stored_values  # noqa: E402


def index_rows(inputs: dict, dtype: str):
    """(index rows in the order of inputs["keys"], bytes on disk of the slice's files)."""
    context, lake = inputs["context"], inputs["lake"]
    ensure_index(lake, context.checkpoint_id, context.fingerprint, context.query_set, "inverse_root", dtype)
    rows = lake.read(
        "trackstar_index",
        filters=[
            ("checkpoint_id", "=", context.checkpoint_id),
            ("fingerprint", "=", context.fingerprint),
            ("query_set", "=", context.query_set),
            ("kind", "=", "inverse_root"),
            ("dtype", "=", dtype),
        ],
    )
    position = {key: i for i, key in enumerate(zip(rows["doc_id"].to_pylist(), rows["chunk"].to_pylist()))}
    rows = rows.take([position[key] for key in inputs["keys"]])
    folders = (
        f"/checkpoint_id={context.checkpoint_id}/query_set={context.query_set}/kind=inverse_root/"
        f"dtype={dtype}/"
    )  # the slice's partition folders; the files hold the fingerprint column
    paths = [Path(uri.removeprefix("file://")) for uri in lake.open("trackstar_index").file_uris() if folders in uri]
    return rows, sum(
        path.stat().st_size
        for path in paths
        if pq.read_table(path, columns=["fingerprint"])["fingerprint"][0].as_py() == context.fingerprint
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lake", default="lake")
    args = parser.parse_args()
    inputs = trackstar_inputs(args.lake)
    queries, dim = inputs["queries"], inputs["dim"]
    exact_top = (queries @ inputs["train"].T).topk(10, dim=1).indices
    exact = ranking_metrics(inputs, exact_top)
    print(
        f"{len(inputs['keys']):,} train chunks x {len(queries)} queries, {dim} dims; exact float32 Ḡ: "
        f"MRR {exact['mrr']:.3f}, recall@10 {exact['recall@10']:.3f}"
    )
    print(
        f"{'code':<10} {'bytes/vector':>12} {'x smaller':>9} {'on disk':>10} {'x smaller':>9} "
        f"{'top-10 overlap':>14} {'MRR':>6} {'ΔMRR':>7} {'recall@10':>9}"
    )
    results, float32_bytes = {}, None
    for dtype in reversed(DTYPES):  # float32 first: the baseline of the size ratios
        rows, disk = index_rows(inputs, dtype)
        per_vector = len(rows["vector"][0].as_py()) + (4 if dtype == "int8" else 0)  # + the int8 scale
        float32_bytes = float32_bytes or (per_vector, disk)
        top = (
            (queries @ torch.from_numpy(decode_vectors(rows["vector"], dtype, rows["scale"], dim)).T)
            .topk(10, dim=1)
            .indices
        )
        results[dtype] = (per_vector, disk, overlap_at(top, exact_top), ranking_metrics(inputs, top))
        if dtype == "int8":
            results["int8·f32q"] = results["int8"]
            scores = Int8Queries(queries).scores(
                torch.from_numpy(stored_values(rows["vector"], dtype, dim).copy()),
                torch.from_numpy(rows["scale"].to_numpy().copy()),
            )
            top = scores.topk(10, dim=1).indices
            results["int8"] = (per_vector, disk, overlap_at(top, exact_top), ranking_metrics(inputs, top))
            sketch = decode_sign_sketch(rows["sketch"], dim)
            top = (queries @ torch.from_numpy(sketch).T).topk(10, dim=1).indices
            results["1-bit sign"] = (
                len(rows["sketch"][0].as_py()),
                None,
                overlap_at(top, exact_top),
                ranking_metrics(inputs, top),
            )
    for code, (per_vector, disk, overlap, metrics) in results.items():
        disk_text = f"{disk / 2**20:8.1f}MB {float32_bytes[1] / disk:8.2f}x" if disk else f"{'-':>10} {'-':>9}"
        print(
            f"{code:<10} {per_vector:12,.0f} {float32_bytes[0] / per_vector:8.2f}x {disk_text} {overlap:14.3f} "
            f"{metrics['mrr']:6.3f} {metrics['mrr'] - exact['mrr']:+7.3f} {metrics['recall@10']:9.3f}"
        )
    per_vector, disk, overlap, metrics = results["int8"]
    print(
        f"int8_size_ratio={float32_bytes[0] / per_vector:.2f} int8_disk_ratio={float32_bytes[1] / disk:.2f} "
        f"int8_top10_overlap={overlap:.3f} int8_mrr_delta={metrics['mrr'] - exact['mrr']:+.4f} "
        f"sign_size_ratio={float32_bytes[0] / results['1-bit sign'][0]:.1f} "
        f"sign_top10_overlap={results['1-bit sign'][2]:.3f}"
    )


if __name__ == "__main__":
    main()
