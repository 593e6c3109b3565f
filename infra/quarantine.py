"""The `quarantine` table: input rows a stage refused, with the reason; nothing is dropped silently."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from infra.lake import Lake, utc_now
from schemas.tables import RAW_VALUE_LIMIT, TABLES


def quarantine_rows(lake: Lake, rows: list[dict], stage: str | None = None, run_id: str | None = None) -> int:
    """Record refused rows: {source, position, reason, raw_value (may be None)} plus stage and run_id
    (given here or per row); raw_value is truncated, recorded_at defaults to now.

    Each (stage, source) slice is replaced as a whole, so a rerun of a stage over the same input
    replaces its earlier quarantine rows instead of duplicating them. Returns the rows written.
    """
    if not rows:
        return 0
    defaults = {key: value for key, value in (("stage", stage), ("run_id", run_id)) if value is not None}
    now = utc_now()
    prepared = [{"recorded_at": now, **defaults, **row, "raw_value": _truncated(row.get("raw_value"))} for row in rows]
    table = TABLES["quarantine"].validate(_as_table(prepared))  # before splitting: no row may lack its slice
    for stage_name, source in sorted({(row.get("stage"), row.get("source")) for row in prepared}, key=str):
        in_slice = pc.and_(pc.equal(table["stage"], stage_name), pc.equal(table["source"], source))
        lake.replace_slice("quarantine", table.filter(in_slice), stage=stage_name, source=source)
    return len(prepared)


def count_by_reason(lake: Lake, run_id: str) -> dict[str, int]:
    """{reason: rows} quarantined by one run (empty when none)."""
    reasons = lake.read("quarantine", filters={"run_id": run_id}, columns=["reason"])
    return {item["values"]: item["counts"] for item in pc.value_counts(reasons.column("reason")).to_pylist()}


def _truncated(raw_value) -> str | None:
    return None if raw_value is None else str(raw_value)[:RAW_VALUE_LIMIT]


def _as_table(rows: list[dict]) -> pa.Table:
    """Rows as Arrow, unknown keys kept, so Lake validation names any missing or extra field."""
    schema = TABLES["quarantine"].arrow_schema
    names = schema.names + sorted({key for row in rows for key in row} - set(schema.names))
    return pa.table(
        {
            name: pa.array(
                [row.get(name) for row in rows], type=schema.field(name).type if name in schema.names else None
            )
            for name in names
        }
    )
