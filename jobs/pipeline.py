"""The whole pipeline on the embedded default: what `make run` does.

Each stage is the same `run(config)` its own `python -m jobs <command>` calls; this module only
chains them and prints a summary. Stages that find their output already there skip it
(tokenize, extract), so a second `make run` redoes only the world and the model.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from jobs import extract, fit_hessian, model_eval, register_queries, score, tokenize, train_model, world

METHODS = list(score.METHODS)


def run(lake: str, seed: int = 0) -> dict:
    timings, report = {}, {}

    def stage(name, fn):
        started = time.time()
        print(f"\n--- {name}", flush=True)
        result = fn()
        timings[name] = time.time() - started
        return result

    world_summary = stage("world", lambda: world.run(world.WorldConfig(out_dir=lake, seed=seed)))
    train_summary = stage("train-model", lambda: train_model.run(train_model.TrainConfig(lake=lake, seed=seed)))
    final_checkpoint = Path(lake) / "checkpoints" / train_summary["checkpoints"][-1]
    accuracy = stage("model-accuracy", lambda: model_eval.evaluate_checkpoint(final_checkpoint,
                                                                              Path(lake) / "world" / "queries.jsonl"))
    # a regenerated world/model replaces the index: force the stages keyed by content that changed
    tokens = stage("tokenize", lambda: tokenize.run(tokenize.TokenizeConfig(lake=lake, force=True)))
    stage("register-queries", lambda: register_queries.run(lake))
    extraction = stage("extract", lambda: extract.run(extract.ExtractConfig(lake=lake, checkpoint=str(final_checkpoint),
                                                                                 force=True)))
    hessian = stage("fit-hessian", lambda: fit_hessian.run(fit_hessian.FitHessianConfig(
        lake=lake, checkpoint_id=extraction["checkpoint_id"], fingerprint=extraction["fingerprint"])))
    scored = stage("score", lambda: score.run(score.ScoreConfig(
        lake=lake, checkpoint_id=extraction["checkpoint_id"], fingerprint=extraction["fingerprint"], methods=METHODS)))
    retrieval = stage("quick-check", lambda: stating_doc_recall(lake, extraction["checkpoint_id"]))

    report = {"world": vars(world_summary), "model": train_summary, "accuracy": accuracy.as_dict(), "tokenize": tokens,
              "extract": extraction, "fit_hessian": hessian, "score": scored, "retrieval": retrieval,
              "seconds": {k: round(v, 1) for k, v in timings.items()}}
    (Path(lake) / "pipeline_summary.json").write_text(json.dumps(report, indent=2, default=str))

    print("\n=== TrackStar lake: embedded run ===")
    print(f"lake:        {Path(lake).resolve()}")
    print(f"corpus:      {train_summary['n_documents']:,} documents, {train_summary['n_tokens']:,} tokens, "
          f"{world_summary.partitions} partitions; {tokens.get('quarantined', 0)} lines quarantined")
    print(f"model:       GPT-2, {train_summary['parameters']:,} parameters, {train_summary['steps']} steps "
          f"in {train_summary['train_seconds']}s on 2 CPU ranks (DeepSpeed ZeRO-2)")
    print(f"checkpoints: {', '.join(train_summary['checkpoints'])}")
    print(accuracy.table())
    print(f"index:       {extraction['dim']:,}-dim vectors (fingerprint {extraction['fingerprint']}) for "
          f"{extraction.get('train_vectors', 0):,} chunks; λ = {hessian['lambda']:.3f}; spectra: {hessian['figure']}")
    print("proponents vs ground truth (documents that state the fact), prompt0, top-10:")
    print(f"  {'method':<24} {'MRR':>6} {'recall@10':>10}")
    for method, cell in retrieval.items():
        print(f"  {method:<24} {cell['mrr']:>6.3f} {cell['recall@10']:>10.3f}")
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"query the tables:  .venv/bin/python -m jobs sql --list")
    return report


def stating_doc_recall(lake: str, checkpoint_id: str) -> dict:
    """MRR of the first stating document and recall@10 per method (the full evaluation is `evaluate`)."""
    from infra.lake import Lake

    tables = Lake(lake)
    truth = {q["query_id"]: set(q["stating_doc_ids"]) for q in tables.read("queries", columns=["query_id", "stating_doc_ids"]).to_pylist()}
    ranked = {}
    for row in tables.read("proponents", filters=[("checkpoint_id", "=", checkpoint_id)]).to_pylist():
        ranked.setdefault(row["method"], {}).setdefault(row["query_id"], []).append((row["rank"], row["doc_id"]))
    out = {}
    for method, per_query in sorted(ranked.items()):
        mrr = recall = 0.0
        for query_id, docs in per_query.items():
            docs.sort()
            hits = [rank for rank, doc in docs if doc in truth[query_id]]
            mrr += 1 / hits[0] if hits else 0.0
            recall += len(hits) / min(len(docs), len(truth[query_id]))
        out[method] = {"mrr": mrr / len(per_query), "recall@10": recall / len(per_query), "n_queries": len(per_query)}
    return out


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--lake", default=os.environ.get("TRACKSTAR_LAKE_ROOT", "lake"))
    parser.add_argument("--seed", type=int, default=0)


def main(args):
    run(args.lake, args.seed)
