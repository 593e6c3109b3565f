"""Weekly lake maintenance: first the pending takedown requests (`jobs takedown --queue`, table
takedown_requests) are carried out and committed, then small files are compacted, tables vacuumed
with Delta's default retention (7 days, so time travel within a week keeps working) and each
table's log checkpointed. Tables whose folder holds files Delta does not know are compacted but
not vacuumed (see infra/maintenance.py).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task

from dags.common import DEFAULT_ARGS, orchestrate


@dag(
    dag_id="trackstar_maintenance",
    schedule="@weekly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["trackstar", "maintenance"],
    doc_md=__doc__,
    dagrun_timeout=timedelta(hours=6),
)
def trackstar_maintenance():
    @task
    def take_down_requested() -> dict:
        return orchestrate().take_down_requested()

    @task
    def maintain_lake() -> dict:
        return orchestrate().maintain_lake()

    take_down_requested() >> maintain_lake()  # committed before the vacuum


trackstar_maintenance()
