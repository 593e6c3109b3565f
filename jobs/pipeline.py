"""The whole pipeline on the embedded default: what `make run` does.

Each stage is the same `run(config)` its own `python -m jobs <command>` calls; this module only
chains them and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from jobs import model_eval, train_model, world


def run(lake: str, seed: int = 0) -> dict:
    timings = {}

    started = time.time()
    world_summary = world.run(world.WorldConfig(out_dir=lake, seed=seed))
    timings["world"] = time.time() - started

    started = time.time()
    train_summary = train_model.run(train_model.TrainConfig(lake=lake, seed=seed))
    timings["train-model"] = time.time() - started

    final_checkpoint = Path(lake) / "checkpoints" / train_summary["checkpoints"][-1]
    accuracy = model_eval.evaluate_checkpoint(final_checkpoint, Path(lake) / "world" / "queries.jsonl")
    report = {"world": _as_dict(world_summary), "model": train_summary, "accuracy": accuracy.as_dict(),
              "seconds": {k: round(v, 1) for k, v in timings.items()}}
    (Path(lake) / "pipeline_summary.json").write_text(json.dumps(report, indent=2, default=str))

    print("\n=== TrackStar lake: embedded run ===")
    print(f"lake:        {Path(lake).resolve()}")
    print(f"corpus:      {train_summary['n_documents']:,} documents, {train_summary['n_tokens']:,} tokens")
    print(f"model:       GPT-2, {train_summary['parameters']:,} parameters, {train_summary['steps']} steps "
          f"in {train_summary['train_seconds']}s on 2 CPU ranks (DeepSpeed ZeRO-2)")
    print(f"checkpoints: {', '.join(train_summary['checkpoints'])}")
    print(accuracy.table())
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return report


def _as_dict(summary) -> dict:
    return summary if isinstance(summary, dict) else vars(summary)


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--lake", default=os.environ.get("TRACKSTAR_LAKE_ROOT", "lake"))
    parser.add_argument("--seed", type=int, default=0)


def main(args):
    run(args.lake, args.seed)
