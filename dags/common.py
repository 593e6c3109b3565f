"""What the TrackStar DAGs share: default arguments, the device pool, the lake's assets, common tasks.

DAG files are parsed often (by every DAG processor, on every change): they import Airflow and the
configuration only. The jobs, and with them torch, deltalake and pyarrow, are imported when a task
runs, through `orchestrate()`.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

from airflow.sdk import Asset, task

from infra import storage
from infra.config import load_config

log = logging.getLogger(__name__)


def orchestrate():
    """The `dags.orchestrate` module, imported on first use inside a running task."""
    from dags import orchestrate as module

    return module


# Extraction saturates a machine (all its GPUs, or all CPU cores with CPU ranks): one at a time.
DEVICE_POOL = "trackstar_device"


def log_failure(context) -> None:
    """Failure callback: one line saying what failed, where, and how to retry it."""
    ti = context["ti"]
    log.error(
        "TrackStar task %s.%s failed (try %s of %s, run %s): %s. Fix the cause, then clear the task; "
        "stages are idempotent, so a rerun only redoes missing slices.",
        ti.dag_id,
        ti.task_id,
        ti.try_number,
        ti.max_tries + 1,
        ti.run_id,
        context.get("exception"),
    )


DEFAULT_ARGS = {
    "owner": "trackstar",
    "retries": load_config().task_retries,
    "retry_delay": timedelta(seconds=load_config().retry_delay_seconds),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
    "execution_timeout": timedelta(hours=6),
    "on_failure_callback": log_failure,
}


def table_asset(table: str) -> Asset:
    """The Delta table as an Airflow asset, so downstream DAGs can be triggered by its updates."""
    root = storage.absolute(load_config().lake_root)
    uri = root if storage.is_s3(root) else Path(root).as_uri()
    return Asset(name=f"trackstar.{table}", uri=f"{uri.rstrip('/')}/{table}")


# ------------------------------------------------------------------ tasks more than one DAG uses
@task
def registered_query_sets() -> list[str]:
    return orchestrate().registered_query_sets()


@task(outlets=[table_asset("hessians")])
def refit_hessians(extraction: dict, query_sets: list[str]) -> list[str]:
    return orchestrate().refit_hessians(extraction, query_sets)


@task(outlets=[table_asset("proponents")])
def rescore_changed(extraction: dict, query_sets: list[str]) -> list[str]:
    return orchestrate().rescore_changed(extraction, query_sets)
