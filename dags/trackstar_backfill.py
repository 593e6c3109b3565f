"""Backfill: index one checkpoint (an older one, or one that just arrived) over all partitions or a
range, then compare its proponents with the previous checkpoint's.

Resumable: re-triggering after a failure only does the slices still missing.
Params: `checkpoint` (folder or s3:// prefix), optional `first_partition` / `last_partition`, and
`also_extract` (other projections of the same slices, by the same ranks: dags/common.py).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

from dags.common import (
    ALSO_EXTRACT,
    DEFAULT_ARGS,
    fan_out_extraction,
    orchestrate,
    refit_hessians,
    registered_query_sets,
    rescore_changed,
    table_asset,
)


@dag(
    dag_id="trackstar_backfill",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args=DEFAULT_ARGS,
    tags=["trackstar", "index", "backfill"],
    doc_md=__doc__,
    dagrun_timeout=timedelta(hours=24),
    params={
        "checkpoint": Param("", type="string", description="checkpoint folder or s3:// prefix"),
        "first_partition": Param(None, type=["null", "integer"], minimum=0),
        "last_partition": Param(None, type=["null", "integer"], minimum=0),
        "also_extract": ALSO_EXTRACT,
    },
)
def trackstar_backfill():
    @task
    def partitions_in_range() -> list[int] | None:
        params = get_current_context()["params"]
        return orchestrate().partitions_in_range(params["first_partition"], params["last_partition"])

    @task(outlets=[table_asset("eval_metrics")])
    def compare_with_previous(extraction: dict, query_sets: list[str]) -> list[dict]:
        return orchestrate().compare_with_previous(extraction, query_sets)

    query_sets = registered_query_sets()
    # a task's arguments are templated: the plan gets the checkpoint param itself
    _, extraction = fan_out_extraction("{{ params.checkpoint }}", query_sets, partitions_in_range())
    rescored = rescore_changed(extraction, query_sets)
    refit_hessians(extraction, query_sets) >> rescored >> compare_with_previous(extraction, query_sets)


trackstar_backfill()
