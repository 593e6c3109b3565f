"""Score a query set against a checkpoint: query gradients, scores per method, evaluation where the
set has ground truth. Runs on demand, and whenever a query set is registered (asset trigger).

Params: `query_set`, `checkpoint` (folder or s3:// prefix; default the newest), `top_k`, `methods`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

from infra.names import NAME_PATTERN
from infra.config import load_config
from dags.common import DEFAULT_ARGS, DEVICE_POOL, orchestrate, table_asset


@dag(
    dag_id="trackstar_score",
    schedule=[table_asset("query_sets")],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args=DEFAULT_ARGS,
    tags=["trackstar", "score"],
    doc_md=__doc__,
    dagrun_timeout=timedelta(hours=6),
    params={
        "query_set": Param(load_config().query_set, type="string", pattern=NAME_PATTERN),
        "checkpoint": Param("", type="string", description="default: the newest checkpoint"),
        "top_k": Param(10, type="integer", minimum=1, maximum=1000),
        "methods": Param(["trackstar"], type="array", description="see jobs/score.py"),
    },
)
def trackstar_score():
    @task(pool=DEVICE_POOL, outlets=[table_asset("query_gradients")])
    def extract_missing() -> dict:
        params = get_current_context()["params"]
        return orchestrate().extract_missing(
            params["checkpoint"] or orchestrate().newest_checkpoint(), params["query_set"]
        )

    @task(outlets=[table_asset("hessians")])
    def refit_hessians(extraction: dict) -> list[str]:
        return orchestrate().refit_hessians(extraction, [get_current_context()["params"]["query_set"]])

    @task(outlets=[table_asset("proponents")])
    def score_query_set(extraction: dict) -> dict:
        params = get_current_context()["params"]
        return orchestrate().score_query_set(extraction, params["query_set"], params["methods"], params["top_k"])

    @task(outlets=[table_asset("eval_metrics")])
    def evaluate_if_ground_truth(extraction: dict) -> dict | None:
        return orchestrate().evaluate_if_ground_truth(extraction, get_current_context()["params"]["query_set"])

    extraction = extract_missing()
    scored = score_query_set(extraction)
    refit_hessians(extraction) >> scored >> evaluate_if_ground_truth(extraction)


trackstar_score()
