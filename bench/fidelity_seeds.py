"""Fidelity over model seeds and optimizers: the full evaluation on AdamW and Adafactor models of the
embedded world, several model seeds each (each model scored with its own projection seed).

Every run trains its own model on the same corpus (world seed 0) in its own lake under --out, then
tokenizes, extracts, fits, scores and evaluates it. Prints, per optimizer and method, the mean and
the standard deviation over model seeds of MRR, recall@10 and tail-patch (Δlog p and Δp), and the
TrackStar / BM25 tail-patch ratio; writes everything to <out>/fidelity.json.

    .venv/bin/python bench/fidelity_seeds.py --optimizers adam adafactor --seeds 0 1 2   # ~6 min a model

The project is installed as a package (`make install`), so the script runs from the repository root.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from demo import train_model, world
from evaluation import evaluate
from jobs import register_queries, tokenize

METRICS = ("mrr", "recall@10", "tail_patch", "tail_patch_delta_prob")


def evaluate_one(out: Path, optimizer: str, seed: int, tail_patch_queries: int) -> dict:
    lake = out / f"{optimizer}-s{seed}"
    summary = lake / "reports" / "eval.json"
    if summary.exists():  # resumable: a finished run is kept
        return json.loads(summary.read_text())
    world.run(world.WorldConfig(out_dir=str(lake), world_seed=0))
    train_model.run(train_model.TrainConfig(lake=str(lake), seed=seed, optimizer=optimizer))
    tokenize.run(tokenize.TokenizeConfig(lake=str(lake)))
    register_queries.run(str(lake))
    return evaluate.run(
        evaluate.EvaluateConfig(
            lake=str(lake), seeds=[seed], tail_patch_queries=tail_patch_queries, reports=str(lake / "reports")
        )
    )


def summarise(reports: list[dict]) -> dict:
    """method -> metric -> (mean, std) over the runs; plus the TrackStar/BM25 tail-patch ratios."""
    methods = [m for m in reports[0]["methods"] if all(m in r["methods"] for r in reports)]
    table = {
        m: {
            k: (float(np.mean(v)), float(np.std(v)))
            for k, v in ((k, [r["methods"][m][k] for r in reports]) for k in METRICS)
        }
        for m in methods
    }
    ratios = {k: [r["trackstar_over_bm25_tail_patch"][k][0] for r in reports] for k in ("delta_log_prob", "delta_prob")}
    return {
        "methods": table,
        "trackstar_over_bm25": {k: (float(np.mean(v)), float(np.std(v))) for k, v in ratios.items()},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", default=["adam", "adafactor"], choices=["adam", "adafactor"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tail-patch-queries", type=int, default=100)
    parser.add_argument("--out", default="lake/fidelity")
    args = parser.parse_args()
    out = Path(args.out)
    results = {}
    for optimizer in args.optimizers:
        reports = [evaluate_one(out, optimizer, seed, args.tail_patch_queries) for seed in args.seeds]
        results[optimizer] = summarise(reports)
    (out / "fidelity.json").write_text(json.dumps(results, indent=2))
    for optimizer, summary in results.items():
        print(f"\n== {optimizer}: mean ± std over model seeds {args.seeds}")
        print(f"{'method':<26} " + " ".join(f"{k:>22}" for k in METRICS))
        for method, cells in summary["methods"].items():
            print(f"{method:<26} " + " ".join(f"{cells[k][0]:>+13.4f} ± {cells[k][1]:.4f}" for k in METRICS))
        for k, (mean, std) in summary["trackstar_over_bm25"].items():
            print(f"TrackStar / BM25 tail-patch ({k}): {mean:.2f} ± {std:.2f}")


if __name__ == "__main__":
    main()
