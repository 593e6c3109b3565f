"""The report's numbers: per method, the means over seeds and queries with bootstrap 95% intervals,
the paired differences to full TrackStar, the TrackStar/BM25 tail-patch ratio, the per-bucket
attribution of the first seed; and the console table of them."""

from __future__ import annotations


import numpy as np

from evaluation import metrics as M
from evaluation.baselines import TEXT_METHODS
from evaluation.findings import findings
from evaluation.report import signed
from evaluation.tail_patching import TailPatches
from evaluation.config import CORRECTION_VARIANTS, EvaluateConfig


ATTRIBUTION_METRICS = ("mrr", "recall@10", "recall@10_fraction")
# a per-query tail-patch value -> the report cell's key for its mean
TAIL_PATCH_METRICS = {"delta_log_prob": "tail_patch", "delta_prob": "tail_patch_delta_prob"}


def summarise(
    config: EvaluateConfig,
    checkpoint_id: str,
    run_id: str,
    per_seed: dict,
    seeds_of: dict,
    queries: dict,
    patches: TailPatches,
    diagnostics: dict,
) -> dict:
    """The report (eval.json): per_seed: seed -> method -> query -> [doc ids]; seeds_of: method (in
    the report's order) -> the seeds it was ranked under; diagnostics: seed -> its Hessian's fit."""
    query_ids, methods, first = sorted(queries), list(seeds_of), config.seeds[0]
    truth = {q: set(queries[q]["stating_doc_ids"] or ()) for q in query_ids}
    per_query = {
        m: M.average_over_seeds([M.attribution_per_query(per_seed[s][m], truth, config.top_k) for s in seeds_of[m]])
        for m in methods
    }
    patched = {
        m: M.average_over_seeds(
            [M.tail_patch_per_query(per_seed[s][m], patches.changes, patches.base, patches.sample) for s in seeds_of[m]]
        )
        for m in methods
    }
    patched_queries = [q for q in patches.sample if all(q in patched[m] for m in methods)]
    cells = {
        m: {
            "n_queries": len(query_ids),
            "seeds": 1 if m in TEXT_METHODS else len(seeds_of[m]),
            "mrr_seed_std": mrr_seed_spread([per_seed[s][m] for s in seeds_of[m]], truth, config.top_k),
            "tail_patch_queries": len(patched_queries),
            **bootstrapped_means(per_query[m], patched[m], query_ids, patched_queries, config.sample_seed),
        }
        for m in methods
    }
    report = {
        "checkpoint_id": checkpoint_id,
        "query_set": config.query_set,
        "run_id": run_id,
        "seeds": config.seeds,
        "lambda": diagnostics[first].get("lambda"),
        "hessian": diagnostics[first],
        "tail_patch_queries": len(patched_queries),
        "methods": cells,
        "trackstar_minus": trackstar_minus(per_query, patched, query_ids, patched_queries, config.sample_seed),
        "trackstar_over_bm25_tail_patch": trackstar_over_bm25(patched, patched_queries, config.sample_seed),
        "correction_effects": correction_effects(patched, patched_queries, config.sample_seed),
    }
    report["optimizer_correction"] = diagnostics[first].get("optimizer_correction", "")
    report["findings"] = findings(report) + [
        f"TrackStar's optimizer correction: {report['optimizer_correction']}.",
        f"The tail-patch step: {patches.step}.",
    ]
    report["seed_diagnostics"] = {str(s): d for s, d in diagnostics.items()}
    report["tail_patch_step"] = patches.step
    report["per_bucket"] = per_bucket(per_seed[first], methods, queries, truth, config.top_k)
    return report


def mrr_seed_spread(rankings: list[dict], truth: dict, k: int) -> float:
    """The standard deviation over seeds of a method's MRR."""
    return float(np.std([np.mean([c["mrr"] for c in M.attribution_per_query(r, truth, k).values()]) for r in rankings]))


def bootstrapped_means(
    per_query: dict, patched: dict, query_ids: list, patched_queries: list, seed: int
) -> dict[str, object]:
    """One method's attribution and tail-patch means over queries, each with its bootstrap 95% interval."""
    cell: dict[str, object] = {}
    for metric in ATTRIBUTION_METRICS:
        mean, low, high = M.bootstrap_mean(M.aligned(per_query, metric, query_ids), seed)
        cell |= {metric: mean, f"{metric}_ci": [low, high]}
    for metric, name in TAIL_PATCH_METRICS.items():
        mean, low, high = M.bootstrap_mean(M.aligned(patched, metric, patched_queries), seed)
        cell |= {name: mean, f"{name}_ci": [low, high]}
    return cell


def trackstar_minus(per_query: dict, patched: dict, query_ids: list, patched_queries: list, seed: int) -> dict:
    """method -> TrackStar's MRR and tail-patch minus the method's, paired over the same queries."""
    versus = {}
    for m in per_query:
        if m == "trackstar":
            continue
        versus[m] = {"mrr": _minus(per_query["trackstar"], per_query[m], "mrr", query_ids, seed)}
        for metric, name in TAIL_PATCH_METRICS.items():
            versus[m][name] = _minus(patched["trackstar"], patched[m], metric, patched_queries, seed)
    return versus


def correction_effects(patched: dict, patched_queries: list, seed: int) -> dict:
    """TrackStar's correction (its row) and each correction variant -> its own effect: its tail-patch
    Δlog p minus TrackStar's without any correction, paired; empty without that ablation."""
    if "trackstar-no-optimizer" not in patched:
        return {}
    none = patched["trackstar-no-optimizer"]
    return {
        m: _minus(patched[m], none, "delta_log_prob", patched_queries, seed)
        for m in patched
        if m == "trackstar" or m in CORRECTION_VARIANTS
    }


def _minus(first: dict, second: dict, metric: str, query_ids: list, seed: int) -> tuple[float, float, float]:
    """(mean, low, high) of first − second in `metric`, paired over `query_ids` (query -> cells)."""
    return M.paired_difference(M.aligned(first, metric, query_ids), M.aligned(second, metric, query_ids), seed)


def trackstar_over_bm25(patched: dict, patched_queries: list, seed: int) -> dict:
    """Per tail-patch metric, TrackStar's mean over BM25's (paired); empty when BM25 was not run."""
    if "bm25" not in patched:
        return {}
    return {
        metric: M.paired_ratio(
            M.aligned(patched["trackstar"], metric, patched_queries),
            M.aligned(patched["bm25"], metric, patched_queries),
            seed,
        )
        for metric in TAIL_PATCH_METRICS
    }


def per_bucket(ranked: dict, methods: list, queries: dict, truth: dict, top_k: int) -> dict:
    """method -> frequency bucket -> MRR and recalls of one seed's rankings."""
    buckets = {q: queries[q]["frequency_bucket"] for q in truth}
    attribution = M.attribution_metrics({m: ranked[m] for m in methods}, truth, buckets, top_k)
    return {m: {b: v for b, v in cells.items() if b != "all"} for m, cells in attribution.items()}


def table(report: dict) -> str:
    """The console table: MRR and recall@10 (in [0, 1]) to 3 decimals, tail-patch at its magnitude."""
    lines = [f"{'method':<26} {'MRR':>17} {'recall@10':>17}  {'tail-patch Δlog p':<30} {'Δp':>10}"]
    for method, c in report["methods"].items():
        patched = f"{signed(c['tail_patch']):>9} [{signed(c['tail_patch_ci'][0])}, {signed(c['tail_patch_ci'][1])}]"
        lines.append(
            f"{method:<26} {c['mrr']:>6.3f} [{c['mrr_ci'][0]:.2f},{c['mrr_ci'][1]:.2f}] "
            f"{c['recall@10']:>6.3f} [{c['recall@10_ci'][0]:.2f},{c['recall@10_ci'][1]:.2f}]  "
            f"{patched:<30} {signed(c['tail_patch_delta_prob']):>10}"
        )
    return "\n".join(lines)
