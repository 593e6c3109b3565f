"""Fidelity over model seeds and optimizers: the full evaluation on AdamW and Adafactor models of the
embedded world, several model seeds each (each model scored with its own projection seed).

Every run trains its own model on the same corpus (world seed 0) in its own lake under --out, then
tokenizes, extracts, fits, scores and evaluates it. Prints, per optimizer and method, the mean and
the standard deviation over model seeds of MRR, recall@10 and tail-patch (Δlog p and Δp), and the
TrackStar / BM25 tail-patch ratio; writes everything to <out>/fidelity.json.

    .venv/bin/python bench/fidelity_seeds.py --optimizers adam adafactor --seeds 0 1 2   # ~6 min a model

Run it from the repository root: the training ranks import the project from the working directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo import train_model, world  # noqa: E402
from evaluation import evaluate  # noqa: E402
from jobs import register_queries, tokenize  # noqa: E402

METRICS = ("mrr", "recall@10", "tail_patch", "tail_patch_delta_prob")
PREPARED = ".prepared"  # marks a bench lake whose world, model, tokens and queries are complete


def evaluate_lake(
    world_config: world.WorldConfig, train_config: train_model.TrainConfig, evaluate_config: evaluate.EvaluateConfig
) -> dict:
    """A world, a model trained on it, its tokens and queries and the full evaluation, all in one lake
    of its own (the three configs name it; the report goes to `evaluate_config.reports`). Resumable:
    a lake whose eval.json exists is kept; one that is prepared (PREPARED: trained, tokenized, queries
    registered) but has none is only evaluated (again: remove eval.json to re-evaluate a lake with
    other code); any other lake an interrupted run left is made afresh (a half-trained model or
    half-written tables must not leak into the new run)."""
    lake, summary = Path(world_config.out_dir), Path(evaluate_config.reports) / "eval.json"
    if summary.exists():
        return json.loads(summary.read_text())
    if not (lake / PREPARED).exists():
        if lake.exists():
            shutil.rmtree(lake)
        world.run(world_config)
        train_model.run(train_config)
        tokenize.run(tokenize.TokenizeConfig(lake=str(lake)))
        register_queries.run(str(lake))
        (lake / PREPARED).touch()
    return evaluate.run(evaluate_config)


def evaluate_one(out: Path, optimizer: str, seed: int, tail_patch_queries: int) -> dict:
    lake = out / f"{optimizer}-s{seed}"
    return evaluate_lake(
        world.WorldConfig(out_dir=str(lake), world_seed=0),
        train_model.TrainConfig(lake=str(lake), seed=seed, optimizer=optimizer),
        evaluate.EvaluateConfig(
            lake=str(lake), seeds=[seed], tail_patch_queries=tail_patch_queries, reports=str(lake / "reports")
        ),
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
