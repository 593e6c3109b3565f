"""The `runs` table: one row per pipeline run, its configuration, status and result counts.

    run_id = start_run(lake, "tokenize", config)   # ... write rows with run_id=run_id ...
    finish_run(lake, run_id, "succeeded", {"documents": n})

A run always ends in a state. One still open when its process exits (the job raised) is marked
failed then; one whose process was killed is marked
failed by the next run started on the same host, which finds its process gone (a running row
records its host, pid and the process's start time, so a reused pid is not taken for it).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import uuid

import pyarrow as pa

from infra.lake import Lake, LakeError, utc_now
from schemas.tables import TABLES

SECRET_WORDS = ("secret", "password", "access_key", "api_key", "session_token", "credential")


def new_run_id(command: str) -> str:
    return f"{command}-{utc_now():%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def config_json(config) -> str:
    """A Config's JSON, or a dict's with secret-looking keys left out: everyone reads `runs`."""
    if hasattr(config, "as_json"):
        return config.as_json()
    public = {key: value for key, value in config.items() if not any(word in key.lower() for word in SECRET_WORDS)}
    return json.dumps(public, sort_keys=True, default=str)


_unfinished: dict[str, tuple[Lake, int]] = {}  # run_id -> (lake, pid): runs this process started


def this_process() -> dict:
    """Who runs a run: enough to tell later whether that process is still alive."""
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "process_started": psutil.Process().create_time()}


def process_is_alive(owner: dict) -> bool:
    """Whether the process recorded by `this_process` still runs (unknowable on another host: True)."""
    import psutil

    if owner.get("host") != socket.gethostname() or "pid" not in owner:
        return True
    try:
        return abs(psutil.Process(owner["pid"]).create_time() - owner["process_started"]) < 1e-3
    except psutil.NoSuchProcess:
        return False


def fail_abandoned_runs(lake: Lake) -> list[str]:
    """Mark failed the `running` runs whose process is gone (killed, or died without finishing)."""
    abandoned = []
    for row in lake.read("runs", filters=[("status", "=", "running")]).to_pylist():
        owner = json.loads(row["counts_json"] or "{}").get("process", {})
        if owner and not process_is_alive(owner):
            finish_run(
                lake,
                row["run_id"],
                "failed",
                {
                    "error": f"abandoned: process {owner['pid']} on {owner['host']} ended without finishing the run "
                    "(killed?); marked failed by a later run",
                    "process": owner,
                },
            )
            abandoned.append(row["run_id"])
    return abandoned


def start_run(lake: Lake, command: str, config) -> str:
    """Record a run as "running"; `config` is a Config (infra.config) or a dict. First marks failed
    the runs whose process was killed."""
    if lake.exists("runs"):
        fail_abandoned_runs(lake)
    run_id = new_run_id(command)
    row = {
        "run_id": run_id,
        "command": command,
        "config_json": config_json(config),
        "started_at": utc_now(),
        "finished_at": None,
        "status": "running",
        "counts_json": json.dumps({"process": this_process()}),
    }
    lake.append("runs", pa.Table.from_pylist([row], schema=TABLES["runs"].arrow_schema))
    _unfinished[run_id] = (lake, os.getpid())
    return run_id


@atexit.register
def fail_unfinished_runs() -> None:
    """At exit, this process's runs that never finished (their job raised) are marked failed."""
    for run_id, (lake, pid) in list(_unfinished.items()):
        if pid == os.getpid():  # not in a forked child, whose parent may still finish them
            try:
                finish_run(
                    lake, run_id, "failed", {"error": "the process exited before the run finished (see its log)"}
                )
            except Exception as error:  # at exit there is no one left to raise to
                print(f"[runs] could not mark run {run_id} failed: {error}", file=sys.stderr)


def finish_run(lake: Lake, run_id: str, status: str, counts: dict | None = None) -> None:
    """Mark a run "succeeded" or "failed" with its end time and counts."""
    if status not in ("succeeded", "failed"):
        raise ValueError(f"status must be succeeded or failed, got {status!r}")
    _unfinished.pop(run_id, None)
    values = {
        "status": status,
        "finished_at": utc_now(),
        "counts_json": json.dumps(counts or {}, sort_keys=True, default=str),
    }
    if lake.update("runs", {"run_id": run_id}, values) != 1:
        raise LakeError(f"no run {run_id!r} in {lake.path('runs')}")
