"""The `runs` table: one row per pipeline run, its configuration, status and result counts.

    with tracked_run(lake, "tokenize", config) as run:
        ... write rows with run_id=run.run_id ...
        run.counts["documents"] = n
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass, field

import pyarrow as pa

from infra.lake import Lake, LakeError, utc_now
from schemas.tables import TABLES

SECRET_WORDS = ("secret", "password", "access_key", "api_key", "session_token", "credential")


@dataclass
class Run:
    run_id: str
    counts: dict = field(default_factory=dict)


def new_run_id(command: str) -> str:
    return f"{command}-{utc_now():%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def config_json(config) -> str:
    """A Config's JSON, or a dict's with secret-looking keys left out: everyone reads `runs`."""
    if hasattr(config, "as_json"):
        return config.as_json()
    public = {key: value for key, value in config.items() if not any(word in key.lower() for word in SECRET_WORDS)}
    return json.dumps(public, sort_keys=True, default=str)


def start_run(lake: Lake, command: str, config) -> str:
    """Record a run as "running"; `config` is a Config (infra.config) or a dict."""
    run_id = new_run_id(command)
    row = {"run_id": run_id, "command": command, "config_json": config_json(config), "started_at": utc_now(),
           "finished_at": None, "status": "running", "counts_json": None}
    lake.append("runs", pa.Table.from_pylist([row], schema=TABLES["runs"].arrow_schema))
    return run_id


def finish_run(lake: Lake, run_id: str, status: str, counts: dict | None = None) -> None:
    """Mark a run "succeeded" or "failed" with its end time and counts."""
    if status not in ("succeeded", "failed"):
        raise ValueError(f"status must be succeeded or failed, got {status!r}")
    values = {"status": status, "finished_at": utc_now(),
              "counts_json": json.dumps(counts or {}, sort_keys=True, default=str)}
    if lake.update("runs", {"run_id": run_id}, values) != 1:
        raise LakeError(f"no run {run_id!r} in {lake.path('runs')}")


@contextlib.contextmanager
def tracked_run(lake: Lake, command: str, config):
    """start_run, then finish_run "succeeded" or, if the body raises, "failed" (and re-raise)."""
    run = Run(start_run(lake, command, config))
    try:
        yield run
    except BaseException as error:
        run.counts.setdefault("error", f"{type(error).__name__}: {error}"[:1000])
        finish_run(lake, run.run_id, "failed", run.counts)
        raise
    finish_run(lake, run.run_id, "succeeded", run.counts)
