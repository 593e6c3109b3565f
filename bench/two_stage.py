"""Two-stage retrieval: the 1-bit sign sketch picks N candidates, exact scores rerank them.

On the lake of `make run` (its int8 index with sketches, built if missing): for each N, the
share of the exhaustive exact top-10 that the two stages find (recall lost = 1 - that), the MRR
against the stating documents, and the bytes both stages read (every sketch, then the exact
vectors of the union of candidates) ÷ the bytes exhaustive exact scoring reads (every vector).
The exact vectors are float32 Ḡ here, so the loss measured is the sketch's alone. In memory the
sketch stage is a ±1 matmul as costly as the exact one: its gain is the reading, 32x less.

    python bench/two_stage.py [--lake lake] [--candidates 10,20,50,100,200,500,1000,2000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import overlap_at, ranking_metrics, trackstar_inputs  # noqa: E402
from bench.compression import index_rows  # noqa: E402
from gradient_kernels.scoring import two_stage_top_k  # noqa: E402
from schemas.vectors import decode_sign_sketch  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lake", default="lake")
    parser.add_argument("--candidates", default="10,20,50,100,200,500,1000,2000")
    args = parser.parse_args()
    inputs = trackstar_inputs(args.lake)
    queries, train = inputs["queries"], inputs["train"]
    rows, _ = index_rows(inputs, "int8")
    signs = torch.from_numpy(decode_sign_sketch(rows["sketch"], inputs["dim"]))

    exact_top = (queries @ train.T).topk(10, dim=1).indices
    exact = ranking_metrics(inputs, exact_top)
    exhaustive_bytes = train.numel() * 4
    print(f"{len(train):,} train chunks x {len(queries)} queries; exhaustive exact: MRR {exact['mrr']:.3f}")
    print(
        f"{'N':>6} {'N/corpus':>8} {'recall of exact top-10':>22} {'lost':>6} {'MRR':>6} {'bytes read / exhaustive':>23}"
    )
    for n in [int(c) for c in args.candidates.split(",") if int(c) <= len(train)]:
        _, top = two_stage_top_k(queries, signs, train, n, 10)
        candidates = (queries @ signs.T).topk(n, dim=1).indices.unique()
        read = train.numel() / 8 + len(candidates) * train.shape[1] * 4
        recall = overlap_at(top, exact_top)
        print(
            f"{n:6d} {n / len(train):8.3f} {recall:22.3f} {1 - recall:6.3f} {ranking_metrics(inputs, top)['mrr']:6.3f} "
            f"{read / exhaustive_bytes:23.3f}"
        )
        print(f"two_stage_recall_at_N{n}={recall:.3f}")


if __name__ == "__main__":
    main()
