"""Fact-tracing metrics as the paper defines them, per query, and their uncertainty.

Per query and method (top-k proponents against the documents that state the fact):
- MRR: 1 / rank of the first stating proponent (0 when none is in the top k);
- recall@10: 1 when any of the top 10 states the fact (the paper's definition), and
  recall@10_fraction: the share of stating documents found (capped by k);
- tail-patch: the mean over the top k of the change of the target's log-probability (Δlog p) and
  of its probability (Δp, the paper's unit) after one optimizer step on the proponent.

Uncertainty: values are first averaged over seeds per query, then bootstrapped over queries
(`bootstrap_mean`); comparisons between methods are paired (the same resampled queries for both:
`paired_difference`, `paired_ratio`).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

BOOTSTRAP_SAMPLES = 2000


def attribution_per_query(ranked: dict, truth: dict, k: int) -> dict:
    """query -> {mrr, recall@10, recall@10_fraction}; ranked: query -> [doc ids by rank]."""
    out = {}
    for query_id, docs in ranked.items():
        stating = truth[query_id]
        hits = [rank for rank, doc in enumerate(docs[:k], start=1) if doc in stating]
        found = len({docs[rank - 1] for rank in hits})
        out[query_id] = {
            "mrr": 1 / hits[0] if hits else 0.0,
            "recall@10": float(bool(hits)),
            "recall@10_fraction": found / min(k, len(stating)) if stating else 0.0,
        }
    return out


def tail_patch_per_query(ranked: dict, changes: dict, base: dict, queries: list) -> dict:
    """query -> {delta_log_prob, delta_prob}: the mean effect of one step on each of its proponents
    (queries of `queries` whose proponents were measured)."""
    out = {}
    for query_id in queries:
        deltas = [changes[(query_id, d)] for d in ranked.get(query_id, []) if (query_id, d) in changes]
        if deltas:
            before = np.exp(base[query_id])
            out[query_id] = {
                "delta_log_prob": float(np.mean(deltas)),
                "delta_prob": float(np.mean(np.exp(base[query_id] + np.asarray(deltas)) - before)),
            }
    return out


def average_over_seeds(per_seed: list[dict]) -> dict:
    """[query -> {metric: value}] per seed -> query -> {metric: mean over the seeds that have it}."""
    sums = defaultdict(lambda: defaultdict(list))
    for values in per_seed:
        for query_id, cell in values.items():
            for metric, value in cell.items():
                sums[query_id][metric].append(value)
    return {q: {m: float(np.mean(v)) for m, v in cells.items()} for q, cells in sums.items()}


def _resamples(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP_SAMPLES, n))


def bootstrap_mean(values, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap interval of the mean over queries."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    means = values[_resamples(len(values), seed)].mean(axis=1)
    tail = (1 - level) / 2
    return float(values.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_difference(a, b, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean(a - b), low, high) over the same queries: a, b aligned per query."""
    return bootstrap_mean(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), seed, level)


def paired_ratio(a, b, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean(a) / mean(b), low, high) with both means taken over the same resampled queries."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) == 0 or b.mean() == 0:
        return float("nan"), float("nan"), float("nan")
    picks = _resamples(len(a), seed)
    ratios = a[picks].mean(axis=1) / b[picks].mean(axis=1)
    tail = (1 - level) / 2
    return float(a.mean() / b.mean()), float(np.quantile(ratios, tail)), float(np.quantile(ratios, 1 - tail))


def aligned(per_query: dict, metric: str, queries: list) -> np.ndarray:
    return np.asarray([per_query[q][metric] for q in queries], dtype=np.float64)


def attribution_metrics(ranked: dict, truth: dict, buckets: dict, k: int) -> dict:
    """method -> bucket ("all" or N) -> {mrr, recall@10, recall@10_fraction, n}; ranked: method ->
    query -> [doc ids by rank]. recall@10 is binary per query (any stating document in the top k)."""
    out = {}
    for method, per_query in ranked.items():
        cells = defaultdict(lambda: defaultdict(float))
        for query_id, values in attribution_per_query(per_query, truth, k).items():
            for bucket in ("all", str(buckets[query_id])):
                for metric, value in values.items():
                    cells[bucket][metric] += value
                cells[bucket]["n"] += 1
        out[method] = {b: {m: (v / c["n"] if m != "n" else int(v)) for m, v in c.items()} for b, c in cells.items()}
    return out
