"""The whole pipeline on the embedded default: what `make run` does.

Build the fact world and train the model (skipped when the same corpus and configuration already
made one), register the queries, then run the nightly `trackstar_reindex` DAG with a project-local
Airflow (`.airflow/`, SQLite): tokenize → extract → fit the Hessian → score. Then the evaluation
(all methods, MRR, recall@10, tail-patch, report). A second `make run` finds nothing new to index.
"""

from __future__ import annotations

import argparse
import json
import time

from infra import storage
from jobs import evaluate, model_eval, register_queries, train_model, world
from infra.config import load_config


def run(lake: str, seed: int = 0, airflow_home: str = ".airflow", reports: str = "reports") -> dict:
    from infra.airflow_local import run_dag

    timings = {}

    def stage(name, fn):
        started = time.time()
        print(f"\n--- {name}", flush=True)
        result = fn()
        timings[name] = time.time() - started
        return result

    world_summary = stage("world", lambda: world.run(world.WorldConfig(out_dir=lake, seed=seed)))
    train_summary = stage("train-model", lambda: train_model.run(train_model.TrainConfig(lake=lake, seed=seed)))
    accuracy = stage("model-accuracy", lambda: model_eval.evaluate_checkpoint(
        train_model.final_checkpoint(lake, train_summary), storage.join(lake, "world", "queries.jsonl")))
    stage("register-queries", lambda: register_queries.run(lake))
    dag = stage("airflow: trackstar_reindex", lambda: run_dag("trackstar_reindex", storage.absolute(lake),
                                                              home=airflow_home))
    print("\n".join(line for line in dag["log"].splitlines() if line.startswith(("[reindex]", "trackstar_reindex run", "  "))))
    if dag["state"] != "success":
        raise RuntimeError(f"trackstar_reindex ended {dag['state']}; see the task log above")
    settings = load_config()
    report = stage("evaluate", lambda: evaluate.run(evaluate.EvaluateConfig(
        lake=lake, reports=reports, k=settings.top_k, k_projection=settings.k_per_module)))

    summary = {"world": vars(world_summary), "model": train_summary, "accuracy": accuracy.as_dict(), "dag": {
        k: v for k, v in dag.items() if k != "log"}, "evaluation": report["methods"],
        "seconds": {k: round(v, 1) for k, v in timings.items()}}
    storage.write_text(storage.join(lake, "pipeline_summary.json"), json.dumps(summary, indent=2, default=str))

    print("\n=== TrackStar lake: embedded run ===")
    print(f"lake:        {storage.absolute(lake)}")
    print(f"corpus:      {train_summary['n_documents']:,} documents, {train_summary['n_tokens']:,} tokens in "
          f"{world_summary.partitions} C4 partitions; {world_summary.facts} facts, {world_summary.queries} queries")
    print(f"model:       GPT-2, {train_summary['parameters']:,} parameters, {train_summary['steps']} steps in "
          f"{train_summary['train_seconds']}s on 2 CPU ranks (DeepSpeed ZeRO-2); checkpoints "
          f"{', '.join(train_summary['checkpoints'])}")
    print(accuracy.table())
    print(f"airflow:     trackstar_reindex {dag['state']}: " + ", ".join(f"{t} {s}" for t, s in dag["tasks"].items()))
    print(f"\nfact tracing on checkpoint {report['checkpoint_id']} (λ = {report['lambda']:.3f}; "
          f"tail-patch over {report['tail_patch_queries']} queries):")
    print(evaluate.table(report))
    print(f"\nreport:      {storage.join(storage.absolute(reports), 'eval.html')}")
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print("next:        .venv/bin/python -m jobs sql --list        (SQL over the Delta tables)")
    print("             make airflow-ui                            (the DAGs in the Airflow UI, 127.0.0.1:8080)")
    print(f"explorer:    .venv/bin/python -m jobs explore --lake {lake}   (then open http://127.0.0.1:8765/)")
    return summary


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--lake", default=load_config().lake_root)
    parser.add_argument("--seed", type=int, default=load_config().seed)
    parser.add_argument("--airflow-home", default=".airflow")
    parser.add_argument("--reports", default="reports")


def main(args):
    run(args.lake, args.seed, args.airflow_home, args.reports)
