"""Run bookkeeping: every job run gets a run_id and a `runs` row with its full configuration."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import pyarrow as pa

from infra.lake import Lake, slice_predicate

SECRET_WORDS = ("secret", "password", "token", "key")


def _now():
    return datetime.now(timezone.utc)


def public_config(config: dict) -> dict:
    """The configuration with anything secret-looking removed: runs rows are read by everyone."""
    return {k: v for k, v in config.items() if not any(word in k.lower() for word in SECRET_WORDS)}


def start_run(lake: Lake, command: str, config: dict) -> str:
    run_id = f"{command}-{_now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    lake.append("runs", pa.table({
        "run_id": [run_id], "command": [command],
        "config_json": [json.dumps(public_config(config), sort_keys=True, default=str)],
        "started_at": [_now()], "finished_at": pa.nulls(1, pa.timestamp("us", tz="UTC")),
        "status": ["running"], "counts_json": pa.nulls(1, pa.string())}))
    return run_id


def finish_run(lake: Lake, run_id: str, status: str, counts: dict | None = None) -> None:
    lake.open("runs").update(predicate=slice_predicate(run_id=run_id),
                             new_values={"status": status, "finished_at": _now(),
                                         "counts_json": json.dumps(counts or {}, sort_keys=True, default=str)})
