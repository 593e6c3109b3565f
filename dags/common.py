"""What the TrackStar DAGs share: default arguments, the device pool, the lake's assets, common tasks.

DAG files are parsed often (by every DAG processor, on every change): they import Airflow and the
configuration only. The jobs, and with them torch, deltalake and pyarrow, are imported when a task
runs, through `orchestrate()`.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta
from pathlib import Path

from airflow.sdk import Asset, Param, TriggerRule, get_current_context, task

from infra import storage
from infra.airflow_local import DEVICE_POOL
from infra.config import load_config

log = logging.getLogger(__name__)


def orchestrate():
    """The `dags.orchestrate` module, imported on first use inside a running task."""
    from dags import orchestrate as module

    return module


# One slot per extraction node (DEVICE_POOL): a mapped extract_group task uses all the GPUs (or cores)
# of its node. Its size is the setting device_pool_slots (infra/airflow_local.py creates it).


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
    """The Delta table as an Airflow asset, so downstream DAGs can be triggered by its updates.
    Its name carries a hash of the lake's root: Airflow keeps one active asset per name, so one
    Airflow serving two lakes (one after the other) would find the first lake's assets inactive."""
    root = storage.absolute(load_config().lake_root)
    uri = f"{(root if storage.is_s3(root) else Path(root).as_uri()).rstrip('/')}/{table}"
    return Asset(name=f"trackstar.{table}.{hashlib.sha256(uri.encode()).hexdigest()[:8]}", uri=uri)


# ------------------------------------------------------------------ tasks more than one DAG uses
@task
def registered_query_sets() -> list[str]:
    return orchestrate().registered_query_sets()


# The extraction DAGs' param: other projections of the same slices, extracted by the same start of
# the ranks (e.g. the evaluation's seeds and corrections, which `make run` passes); they are not scored.
ALSO_EXTRACT = Param(
    [],
    type="array",
    items={"type": "object"},
    description='other projections of the slices extracted, by the same ranks: [{"projection_seed": 1, '
    '"normalizer": "none"}, ...] (keys: projection_seed, projection_k, normalizer); stored, not scored',
)


# The extraction fan-out: plan the missing slices in groups, one mapped task per group in the device
# pool (a retry redoes only its group), then one summary that the Hessian fit and scoring wait for.
@task(trigger_rule=TriggerRule.NONE_FAILED)
def plan_extraction(checkpoint: str, query_sets: list[str], partitions: list[int] | None = None) -> dict:
    also = get_current_context()["params"].get("also_extract") or []
    return orchestrate().plan_extraction(checkpoint, query_sets, partitions, also)


# its own task: Airflow maps only over a task's whole return value
@task
def extraction_groups(plan: dict) -> list[dict]:
    return orchestrate().extraction_groups(plan)


@task(pool=DEVICE_POOL, outlets=[table_asset("train_gradients"), table_asset("query_gradients")])
def extract_group(group: dict) -> dict:
    return orchestrate().extract_group(group)


@task
def collect_extraction(plan: dict, groups: list) -> dict:
    return orchestrate().collect_extraction(plan, groups)


def fan_out_extraction(checkpoint, query_sets, partitions=None):
    """Wires plan -> extract_group (mapped over the groups) -> collect; returns (plan, collected)."""
    plan = plan_extraction(checkpoint, query_sets, partitions)
    return plan, collect_extraction(plan, extract_group.expand(group=extraction_groups(plan)))


@task(outlets=[table_asset("hessians")])
def refit_hessians(extraction: dict, query_sets: list[str]) -> list[str]:
    return orchestrate().refit_hessians(extraction, query_sets)


@task(outlets=[table_asset("proponents")])
def rescore_changed(extraction: dict, query_sets: list[str]) -> list[str]:
    return orchestrate().rescore_changed(extraction, query_sets)
