"""The whole pipeline, end to end: on the embedded default (`make run`) or on a user's own data.

    python -m jobs pipeline                                              # the embedded fact world
    python -m jobs pipeline --corpus DIR --queries FILE [--checkpoint DIR]   # your own data

Build the fact world, or import the user's C4 partitions and queries (`demo.import_data`); train
the small model, unless a checkpoint folder is given (then it is linked into the lake with its
tokenizer); register the queries; run the nightly `trackstar_reindex` DAG with a project-local
Airflow (`.airflow/`, SQLite): tokenize → extract → fit the Hessian → score; then the evaluation
(all methods, MRR, recall@10, tail-patch, report). A second run finds nothing new to index.

Nothing the pipeline did not create is deleted: on a lake holding imported data, the embedded
default refuses to run (it would regenerate the world over it) and says how to rerun on that data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from infra import storage
from demo import import_data, model_eval, train_model, world
from evaluation import evaluate
from jobs import register_queries
from jobs.checkpoints import optimizer_state_source
from infra.config import load_config


def run(
    lake: str,
    world_seed: int = 0,
    airflow_home: str = ".airflow",
    reports: str = "reports",
    corpus: str | None = None,
    queries: str | None = None,
    checkpoint: str | None = None,
) -> dict:
    from infra.airflow_local import run_dag

    timings = {}

    def stage(name, fn):
        started = time.time()
        print(f"\n--- {name}", flush=True)
        result = fn()
        timings[name] = time.time() - started
        return result

    if corpus or queries:
        if not (corpus and queries):
            raise ValueError("your own data needs both --corpus and --queries")
        world_summary = stage("import", lambda: import_data.import_world(lake, corpus, queries))
        for note in world_summary.notes:
            print(f"[import] {note}")
    else:
        world_summary = stage("world", lambda: world.run(world.WorldConfig(out_dir=lake, world_seed=world_seed)))
    print(
        f"[{'import' if corpus else 'world'}] {world_summary.documents:,} documents in {world_summary.partitions} "
        f"partitions, {world_summary.queries} queries"
    )
    if checkpoint:
        final_checkpoint = stage("import-checkpoint", lambda: import_data.import_checkpoint(lake, checkpoint))
        state = optimizer_state_source(final_checkpoint)
        model_line = (
            f"{final_checkpoint.name}, linked from {Path(checkpoint).resolve()}; optimizer state: "
            f"{state or 'none (indexed without the optimizer correction)'}"
        )
        print(f"[import-checkpoint] {model_line}")
    else:
        trained = stage("train-model", lambda: train_model.run(train_model.TrainConfig(lake=lake, seed=world_seed)))
        final_checkpoint = train_model.final_checkpoint(lake, trained)
        model_line = (
            f"GPT-2, {trained['parameters']:,} parameters, {trained['steps']} steps in "
            f"{trained['train_seconds']}s on 2 CPU ranks (DeepSpeed ZeRO-2); checkpoints "
            f"{', '.join(trained['checkpoints'])}"
        )
    queries_file = storage.join(lake, "world", "queries.jsonl")
    accuracy = stage("model-accuracy", lambda: model_eval.evaluate_checkpoint(final_checkpoint, queries_file))
    # the user's own file, so that refusals name its lines
    stage("register-queries", lambda: register_queries.run(lake, queries))
    dag = stage(
        "airflow: trackstar_reindex", lambda: run_dag("trackstar_reindex", storage.absolute(lake), home=airflow_home)
    )
    print(
        "\n".join(
            line for line in dag["log"].splitlines() if line.startswith(("[reindex]", "trackstar_reindex run", "  "))
        )
    )
    if dag["state"] != "success":
        raise RuntimeError(f"trackstar_reindex ended {dag['state']}; see the task log above")
    settings = load_config()
    # without optimizer state the index has no correction and the tail-patch steps by plain SGD (the report says so)
    report = stage(
        "evaluate",
        lambda: evaluate.run(
            evaluate.EvaluateConfig(
                lake=lake,
                reports=reports,
                checkpoint=str(final_checkpoint),
                top_k=settings.top_k,
                projection_k=settings.projection_k,
            )
        ),
    )

    summary = {
        "world": vars(world_summary),
        "checkpoint": str(final_checkpoint),
        "accuracy": accuracy.as_dict(),
        "dag": {k: v for k, v in dag.items() if k != "log"},
        "evaluation": report["methods"],
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    storage.write_text(storage.join(lake, "pipeline_summary.json"), json.dumps(summary, indent=2, default=str))

    print(f"\n=== TrackStar lake: {'your data' if corpus else 'embedded run'} ===")
    print(f"lake:        {storage.absolute(lake)}")
    print(
        f"corpus:      {world_summary.documents:,} documents ({world_summary.words:,} words) in "
        f"{world_summary.partitions} C4 partitions; {world_summary.facts} facts, {world_summary.queries} queries"
    )
    print(f"model:       {model_line}")
    print(accuracy.table())
    print(f"airflow:     trackstar_reindex {dag['state']}: " + ", ".join(f"{t} {s}" for t, s in dag["tasks"].items()))
    print(
        f"\nfact tracing on checkpoint {report['checkpoint_id']} (λ = {report['lambda']:.3f}; "
        f"tail-patch over {report['tail_patch_queries']} queries, {report['tail_patch_step']}):"
    )
    print(evaluate.table(report))
    print(f"\nreport:      {storage.join(storage.absolute(reports), 'eval.html')}")
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print("next:        .venv/bin/python -m jobs sql --list        (SQL over the Delta tables)")
    print("             make airflow-ui                            (the DAGs in the Airflow UI, 127.0.0.1:8080)")
    print(f"explorer:    .venv/bin/python -m jobs explore --lake {lake}   (then open http://127.0.0.1:8765/)")
    return summary


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--lake", default=load_config().lake_root)
    parser.add_argument("--world-seed", type=int, default=load_config().world_seed)
    parser.add_argument("--airflow-home", default=".airflow")
    parser.add_argument("--reports", default="reports")
    parser.add_argument("--corpus", help="your own C4 partitions (a folder of c4-*.json.gz) instead of the world")
    parser.add_argument("--queries", help="your own queries JSONL (format: schemas/queries.py, README)")
    parser.add_argument("--checkpoint", help="a Hugging Face causal LM folder to index instead of training one")


def main(args):
    try:
        run(args.lake, args.world_seed, args.airflow_home, args.reports, args.corpus, args.queries, args.checkpoint)
    except import_data.ImportedDataError as refusal:
        print(f"pipeline refused: {refusal}", file=sys.stderr)
        return 2
