"""Nightly reindex: tokenize new raw partitions, read which documents are new, changed or deleted
since the last night from the documents' change feed, extract missing gradient slices for the newest
checkpoint, refit the Hessian when the training sample changed enough, rescore what changed.

Every step is idempotent: a night with nothing new changes no table and says so. Param
`also_extract`: other projections of the same slices, by the same ranks (dags/common.py).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import TriggerRule, dag, task

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
    dag_id="trackstar_reindex",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["trackstar", "index"],
    doc_md=__doc__,
    dagrun_timeout=timedelta(hours=12),
    params={"also_extract": ALSO_EXTRACT},
)
def trackstar_reindex():
    @task
    def find_new_partitions() -> list[int]:
        return orchestrate().find_new_partitions()

    @task
    def newest_checkpoint() -> str:
        return orchestrate().newest_checkpoint()

    @task(outlets=[table_asset("documents"), table_asset("tokens"), table_asset("quarantine")])
    def tokenize_partition(partition: int) -> dict:
        return orchestrate().tokenize_partition(partition)

    @task(trigger_rule=TriggerRule.NONE_FAILED)
    def find_document_changes() -> dict:
        return orchestrate().find_document_changes()

    @task(trigger_rule=TriggerRule.NONE_FAILED)
    def report_summary(
        tokenized: list | None, changes: dict, extraction: dict, refitted: list[str], rescored: list[str]
    ) -> str:
        return orchestrate().report_summary(tokenized, changes, extraction, refitted, rescored)

    new_partitions = find_new_partitions()
    checkpoint, query_sets = newest_checkpoint(), registered_query_sets()
    # Looked up after the new partitions: on a night without any, the loop of `dag.test()` (what
    # `make run` uses) would otherwise spend one pass only skipping the empty mapping, and warn
    # "No tasks to run. unrunnable tasks" about a healthy run
    new_partitions >> [checkpoint, query_sets]
    tokenized = tokenize_partition.expand(partition=new_partitions)
    changes = find_document_changes()  # after tonight's tokenize; none_failed: also on a night without any
    tokenized >> changes
    # the plan waits for every tokenize task (none_failed: a night without new partitions maps
    # tokenize over nothing, which is skipped); extraction then fans out over groups of partitions
    plan, extraction = fan_out_extraction(checkpoint, query_sets)
    tokenized >> plan
    refitted = refit_hessians(extraction, query_sets)
    rescored = rescore_changed(extraction, query_sets)
    refitted >> rescored
    report_summary(tokenized, changes, extraction, refitted, rescored)


trackstar_reindex()
