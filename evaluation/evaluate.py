"""evaluate: the paper's fact-tracing comparison, into `eval_metrics` and a report.

Methods, all compared on the same queries: BM25 and dense retrieval (text), plain gradient
dot/cosine and TRAK (vectors extracted without optimizer correction), TrackStar and its ablations
(see `jobs.score.METHODS`), and variants that measure this implementation's own choices:
TrackStar with another optimizer correction than the default (`evaluation.config.CORRECTION_VARIANTS`:
the paper-exact or floored Adam correction, Adafactor's own, second moments estimated from data;
each where the checkpoint's optimizer state allows it), R_query fitted on the other half of the
queries (`trackstar-heldout-r-query`, 2-fold cross-fit), the classic global damping with a fixed
crossing component (`trackstar-global-damping`) and R_train of every chunk, the outliers the
fit-hessian job leaves out kept in (`trackstar-every-chunk`).

TrackStar, its ablations and the variants computed from its vectors run for several projection
seeds (`seeds`); the methods that need an extraction of their own (plain-gradient baselines, the
other corrections) for the first seed, or every seed with `baselines_every_seed`. Metrics are computed per
query (evaluation/metrics.py: MRR, binary recall@10 and its fraction, tail-patch Δlog p and Δp),
averaged over seeds, and given bootstrap confidence intervals over queries; differences to
TrackStar and the TrackStar/BM25 tail-patch ratio are paired. What the pipeline already made is
reused: the first seed's extraction, Hessian and proponents come from the DAG when their inputs are
unchanged; other seeds and variants are scored in memory and never overwrite `proponents`.

Writes `eval_metrics` rows, `tail_patches`, `eval.json` and `eval.html` into the report's folder:
`<lake>/reports/<run_id>/` (a new folder per run, never overwritten; `<lake>/reports/latest` links
to the newest, or on S3 `<lake>/reports/latest.txt` names it), or `--reports DIR` when given.
Its title names the query set ("Fact tracing on <query set>"), which the pipeline's `--name` names.

This module wires the steps; each lives in its own module (evaluation/README.md): baselines,
rankings, tail_patching, summary (with findings), categories, metric_rows, report.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from evaluation.baselines import text_rankings
from evaluation.categories import CATEGORIES, Categorizer, category_shares
from evaluation.metric_rows import write_metrics
from evaluation.config import EvaluateConfig
from evaluation.rankings import evaluated_checkpoint, rankings_per_seed
from evaluation.report import render_html
from evaluation.summary import summarise, table
from evaluation.tail_patching import (
    TailPatches,
    stratified_sample,
    tail_patch,
    tail_patch_step,
    write_tail_patches,
)
from infra import storage
from infra.cli import add_config_arguments, config_from_args
from infra.lake import Lake
from infra import layout
from jobs.catalog import resolve_checkpoint
from jobs.checkpoints import load_manifest
from jobs.threads import use_cpu_threads

# the report's row order: baselines first, full TrackStar last, as in the paper's Table 1
REPORT_ORDER = (
    "bm25",
    "dense",
    "grad-dot",
    "grad-cos",
    "trak",
    "trackstar-no-optimizer",
    "trackstar-adam-exact",
    "trackstar-adam-floored",
    "trackstar-adam-factored",
    "trackstar-adam-half",
    "trackstar-adam-flat-vocab",
    "trackstar-adafactor",
    "trackstar-data-moments",
    "trackstar-no-hessian",
    "trackstar-no-mixing",
    "trackstar-heldout-r-query",
    "trackstar-global-damping",
    "trackstar-every-chunk",
    "trackstar-no-unit-norm",
    "trackstar",
)


def run(config: EvaluateConfig) -> dict:
    """One evaluation of one checkpoint: rank with every method, tail-patch a sample of the queries,
    summarise, write the metrics and the report; returns the report (eval.json's content)."""
    from infra.names import check_names
    from infra.runs import finish_run, start_run

    check_names(query_set=config.query_set, checkpoint_id=config.checkpoint_id)
    use_cpu_threads(config.cpu_threads, "evaluate")
    lake = Lake(config.lake)
    checkpoint = evaluated_checkpoint(lake, config)
    checkpoint_dir = resolve_checkpoint(lake, checkpoint)
    manifest = load_manifest(checkpoint_dir)
    checkpoint_id = manifest["checkpoint_id"]
    run_id = start_run(lake, "evaluate", asdict(config) | {"checkpoint_id": checkpoint_id})
    queries = {
        q["query_id"]: q for q in lake.read("queries", filters=[("query_set", "=", config.query_set)]).to_pylist()
    }
    documents = lake.read("documents", columns=["doc_id", "text"])
    by_doc = dict(zip(documents["doc_id"].to_pylist(), documents["text"].to_pylist()))

    text_ranked = text_rankings(lake, by_doc, queries, config.query_set, config.top_k, checkpoint_id, run_id)
    gradient_ranked, diagnostics = rankings_per_seed(lake, config, checkpoint, manifest, sorted(queries))
    per_seed = {seed: text_ranked | ranked for seed, ranked in gradient_ranked.items()}
    methods = [m for m in REPORT_ORDER if m in per_seed[config.seeds[0]]]
    seeds_of = {m: [s for s in config.seeds if m in per_seed[s]] for m in methods}
    patches = measure_tail_patches(lake, config, checkpoint_dir, manifest, per_seed, seeds_of, queries)
    write_tail_patches(lake, config.query_set, checkpoint_id, patches.changes, run_id)

    report = summarise(config, checkpoint_id, run_id, per_seed, seeds_of, queries, patches, diagnostics)
    categorizer = Categorizer(layout.world(lake.root))
    report["categories"] = category_shares(categorizer, per_seed[config.seeds[0]], methods, queries, by_doc)
    write_metrics(lake, report, run_id)
    folder = report_folder(lake, config, run_id)
    write_report(lake, config, report, per_seed[config.seeds[0]], queries, by_doc, categorizer, folder)
    if not config.reports:
        point_latest(lake, run_id)
    report["report_dir"] = folder  # where it was written (not stored in eval.json: the lake may move)
    counts = {"methods": len(methods), "queries": len(queries), "seeds": len(config.seeds)}
    finish_run(lake, run_id, "succeeded", counts | {"tail_patch_pairs": len(patches.changes)})
    print(table(report))
    for line in report["findings"]:
        print(f"[evaluate] {line}")
    print(f"[evaluate] report: {storage.join(folder, 'eval.html')}")
    return report


def measure_tail_patches(
    lake: Lake,
    config: EvaluateConfig,
    checkpoint_dir: Path,
    manifest: dict,
    per_seed: dict,
    seeds_of: dict,
    queries: dict,
) -> TailPatches:
    """One step on each proponent of every method and seed, for a bucket-stratified sample of the queries."""
    sample = stratified_sample(queries, config.tail_patch_queries, config.sample_seed)
    every_ranking = {f"{m}@{s}": per_seed[s][m] for m, seeds in seeds_of.items() for s in seeds}
    rule, learning_rate, step = tail_patch_step(checkpoint_dir, manifest, config.tail_patch_lr)
    use_cpu_threads(config.cpu_threads, "evaluate tail-patch")  # the cores idle now, after minutes of other stages
    print(f"[evaluate] tail-patch step: {step}", flush=True)
    base, changes = tail_patch(lake, checkpoint_dir, rule, learning_rate, every_ranking, queries, sample)
    return TailPatches(sample, base, changes, step)


def report_folder(lake: Lake, config: EvaluateConfig, run_id: str) -> str:
    """The run's own folder under the lake (`<lake>/reports/<run_id>`), or the one asked for."""
    return storage.absolute(config.reports) if config.reports else layout.reports(lake.root, run_id)


def point_latest(lake: Lake, run_id: str) -> None:
    """Point `<lake>/reports/latest` at the run's folder: a relative link replaced in one rename (the
    lake can move), or on S3 (no links) `<lake>/reports/latest.txt` holding the folder's name."""
    reports = layout.reports(lake.root)
    if storage.is_s3(reports):
        storage.write_text(storage.join(reports, "latest.txt"), run_id + "\n")
        return
    link, part = Path(reports) / "latest", Path(reports) / f".latest-{run_id}"
    if link.exists() and not link.is_symlink():
        print(f"[evaluate] {link} is not a link this job made; left as it is", flush=True)
        return
    part.symlink_to(run_id, target_is_directory=True)
    os.replace(part, link)


def write_report(
    lake: Lake,
    config: EvaluateConfig,
    report: dict,
    ranked: dict,
    queries: dict,
    by_doc: dict,
    categorizer: Categorizer,
    reports: str,
) -> None:
    """<reports>/eval.json and eval.html (with the Hessian's spectra plot when there is one)."""
    storage.write_text(storage.join(reports, "eval.json"), json.dumps(report, indent=2))
    spectra = storage.join(
        lake.root,
        "reports",
        f"hessian_{report['checkpoint_id']}_{config.query_set}_{report['hessian'].get('fingerprint')}.png",
    )
    page = render_html(
        report,
        ranked,
        queries,
        by_doc,
        storage.read_bytes(spectra) if storage.exists(spectra) else None,
        categorizer,
        CATEGORIES,
    )
    storage.write_text(storage.join(reports, "eval.html"), page)


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, EvaluateConfig)


def main(args):
    run(config_from_args(EvaluateConfig, args))
