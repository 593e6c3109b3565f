"""Two-stage retrieval: the 1-bit sign sketch picks N candidates, exact scores rerank them.

On the lake of `make run`: for each N, the share of the exhaustive exact top-10 that the two stages
find (recall lost = 1 - that), the MRR against the stating documents, and the bytes both stages
read (every sketch, then the exact vectors of the union of candidates) ÷ the bytes exhaustive
exact scoring reads (every vector). Both the exhaustive and the reranked top-10 break ties by
(doc_id, chunk), as the score job does: the corpus repeats chunks, and an arbitrary pick among
equal scores would count as a loss. The sketch is the one `jobs index` stores (`encode_sign_sketch`
of the exact Ḡ: signs and a float16 mean |value| per block of SKETCH_BLOCK coordinates), first with
its block scales, then its signs alone; queries stay float32 (asymmetric: nothing more is stored).
The exact vectors are float32 Ḡ here, so the loss measured is the sketch's alone. In memory the
sketch stage is a matmul as costly as the exact one: its gain is the reading, ~30x less.

    python bench/two_stage.py [--lake lake] [--candidates 10,20,50,100,200,500,1000,2000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import overlap_at, ranking_metrics, trackstar_inputs  # noqa: E402
from gradient_kernels.scoring import two_stage_top_k  # noqa: E402
from schemas.vectors import decode_sign_sketch, encode_sign_sketch  # noqa: E402

AIM_CANDIDATES, AIM_RECALL = 1000, 0.99


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lake", default="lake")
    parser.add_argument("--candidates", default="10,20,50,100,200,500,1000,2000")
    args = parser.parse_args()
    inputs = trackstar_inputs(args.lake)
    by_key = sorted(range(len(inputs["keys"])), key=inputs["keys"].__getitem__)  # row order = tie order
    inputs["keys"] = [inputs["keys"][i] for i in by_key]
    queries, train = inputs["queries"], inputs["train"][by_key]
    cells = encode_sign_sketch(train.numpy())
    sketch = torch.from_numpy(decode_sign_sketch(cells, inputs["dim"]))

    # one query at a time, as the rerank scores its candidates: equal vectors get bit-equal scores
    exact_scores = torch.stack([train @ query for query in queries])
    exact_top = exact_scores.sort(dim=1, descending=True, stable=True).indices[:, :10]
    exact = ranking_metrics(inputs, exact_top)
    exhaustive_bytes = train.numel() * 4
    sketch_bytes = len(cells[0].as_py())
    print(f"{len(train):,} train chunks x {len(queries)} queries; exhaustive exact: MRR {exact['mrr']:.3f}")
    print(
        f"sketch: {sketch_bytes} bytes per vector ({inputs['dim'] // 8} of signs + block scales) = "
        f"float32 ÷ {exhaustive_bytes / len(train) / sketch_bytes:.1f}"
    )
    print(f"sketch_bytes_per_vector={sketch_bytes}")
    recall_at = {}
    first_stages = (
        ("signs x block scales", sketch, "two_stage_recall"),
        ("signs alone", sketch.sign(), "two_stage_signs_alone_recall"),
    )
    for name, first_stage, measure in first_stages:
        print(f"first stage: {name}")
        print(
            f"{'N':>6} {'N/corpus':>8} {'recall of exact top-10':>22} {'lost':>6} {'MRR':>6} "
            f"{'bytes read / exhaustive':>23}"
        )
        for n in [int(c) for c in args.candidates.split(",") if int(c) <= len(train)]:
            _, top = two_stage_top_k(queries, first_stage, train, n, 10)
            candidates = (queries @ first_stage.T).topk(n, dim=1).indices.unique()
            read = len(train) * sketch_bytes + len(candidates) * train.shape[1] * 4
            recall = overlap_at(top, exact_top)
            print(
                f"{n:6d} {n / len(train):8.3f} {recall:22.3f} {1 - recall:6.3f} "
                f"{ranking_metrics(inputs, top)['mrr']:6.3f} {read / exhaustive_bytes:23.3f}"
            )
            print(f"{measure}_at_N{n}={recall:.3f}")
            recall_at[measure, n] = recall
    measured = recall_at["two_stage_recall", AIM_CANDIDATES]
    print(
        f"aim: 1-bit first stage, exact rerank of its top {AIM_CANDIDATES:,}, recall of the exhaustive top-10 "
        f"≥ {AIM_RECALL}: measured {measured:.3f} ({'met' if measured >= AIM_RECALL else 'not met'})"
    )


if __name__ == "__main__":
    main()
