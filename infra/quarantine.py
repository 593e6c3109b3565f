"""The quarantine: rows that failed validation, kept with their source, position and reason."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

import pyarrow as pa

from infra.lake import Lake

RAW_VALUE_LIMIT = 1000


def quarantine_rows(lake: Lake, rows: list[dict], stage: str, run_id: str) -> int:
    """rows: {source, position, reason, raw_value}; replaces this stage's earlier rows for the same
    sources, so a rerun over the same input never duplicates them."""
    if not rows:
        return 0
    now = datetime.now(timezone.utc)
    table = pa.table({
        "source": [r["source"] for r in rows], "position": [str(r["position"]) for r in rows],
        "stage": [stage] * len(rows), "reason": [r["reason"] for r in rows],
        "raw_value": [None if r.get("raw_value") is None else str(r["raw_value"])[:RAW_VALUE_LIMIT] for r in rows],
        "run_id": [run_id] * len(rows), "recorded_at": [now] * len(rows)})
    for source in sorted({r["source"] for r in rows}):
        part = table.filter(pa.compute.equal(table["source"], source))
        lake.replace_slice("quarantine", part, stage=stage, source=source)
    return len(rows)


def quarantine_counts(lake: Lake, stage: str | None = None) -> dict:
    """reason -> rows, for one stage or all."""
    filters = [("stage", "=", stage)] if stage else None
    return dict(Counter(lake.read("quarantine", filters=filters, columns=["reason"])["reason"].to_pylist()))
