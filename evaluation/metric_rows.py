"""The evaluation's numbers as `eval_metrics` rows: (method, metric, bucket, value, n) per run."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

from infra.lake import Lake
from schemas.tables import TABLES

# a report cell's key -> the metric its row is stored under
REPORTED_METRICS = {
    "mrr": "mrr",
    "recall@10": "recall@10",
    "recall@10_fraction": "recall@10_fraction",
    "tail_patch": "tail_patch_delta_log_prob",
    "tail_patch_delta_prob": "tail_patch_delta_prob",
}


def _metric_rows(query_set: str, checkpoint_id: str, run_id: str, values) -> pa.Table:
    """values: (method, metric, bucket, value, n) tuples -> `eval_metrics` rows."""
    now = datetime.now(timezone.utc)
    rows = [
        {
            "run_id": run_id,
            "query_set": query_set,
            "checkpoint_id": checkpoint_id,
            "method": method,
            "metric": metric,
            "bucket": bucket,
            "value": float(value),
            "n": int(n),
            "created_at": now,
        }
        for method, metric, bucket, value, n in values
    ]
    return pa.Table.from_pylist(rows, schema=TABLES["eval_metrics"].arrow_schema)


def _attribution_values(attribution: dict):
    for method, per_bucket in attribution.items():
        for bucket, cell in per_bucket.items():
            for metric in ("mrr", "recall@10", "recall@10_fraction"):
                yield method, metric, bucket, cell[metric], cell["n"]


def write_attribution_metrics(lake: Lake, query_set: str, checkpoint_id: str, attribution: dict, run_id: str):
    """`metrics.attribution_metrics`' cells (method -> bucket -> MRR and recalls) as the run's rows."""
    lake.replace_slice(
        "eval_metrics", _metric_rows(query_set, checkpoint_id, run_id, _attribution_values(attribution)), run_id=run_id
    )


def write_metrics(lake: Lake, report: dict, run_id: str):
    """Each headline (mean over seeds and queries) with its CI bounds as `<metric>:ci_low/high` rows,
    and the per-bucket attribution of the first seed."""
    values = []
    for method, cell in report["methods"].items():
        for key, metric in REPORTED_METRICS.items():
            n = cell["tail_patch_queries"] if key.startswith("tail_patch") else cell["n_queries"]
            low, high = cell[f"{key}_ci"]
            values += [
                (method, metric, "all", cell[key], n),
                (method, f"{metric}:ci_low", "all", low, n),
                (method, f"{metric}:ci_high", "all", high, n),
            ]
    values += list(_attribution_values(report["per_bucket"]))
    lake.replace_slice(
        "eval_metrics", _metric_rows(report["query_set"], report["checkpoint_id"], run_id, values), run_id=run_id
    )
