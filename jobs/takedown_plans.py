"""A takedown run's plan: written before its first delete, so that the next takedown run can finish
what a run that failed or was killed owed (its refits and rescorings) although the rows that told
what to redo are gone. `<lake>/_takedown_plans/<run_id>.json`, deleted when the run succeeds."""

from __future__ import annotations

import json

from infra import layout, storage
from infra.lake import Lake


def write_plan(lake: Lake, run_id: str, items: list, per_url: dict, sums: list, to_score: dict) -> str:
    """The run's plan, written before its first delete; deleted when the run succeeded."""
    path = storage.join(layout.takedown_plans(lake.root), f"{run_id}.json")
    plan = {
        "run_id": run_id,
        "items": [list(item) for item in items],
        "per_url": per_url,
        "sums": sums,
        "to_score": [[list(key), settings] for key, settings in to_score.items()],
    }
    storage.write_text(path, json.dumps(plan, default=str))
    return path


def unfinished_plans(lake: Lake) -> list[dict]:
    """The plans of takedown runs that failed or were killed (`start_run` has marked the killed ones
    failed); those of runs still running are theirs."""
    plans = []
    for path in storage.list_objects(layout.takedown_plans(lake.root), suffix=".json"):
        plan = json.loads(storage.read_text(path))
        status = lake.read("runs", filters=[("run_id", "=", plan["run_id"])], columns=["status"])["status"].to_pylist()
        if status != ["running"]:
            plans.append(plan | {"file": path})
    return plans


def with_owed_work(owed: list[dict], sums: list, to_score: dict, per_url: dict) -> tuple[list, dict, dict]:
    """This run's sums corrected, scorings to redo and rows per url, with what the `owed` plans of
    dead runs found (and may have deleted already) added."""
    for plan in owed:
        sums = sums + [entry for entry in plan["sums"] if entry not in sums]
        to_score = to_score | {tuple(key): settings for key, settings in plan["to_score"]}
        for url, counts in plan["per_url"].items():
            per_url[url] = per_url[url] | {t: max(n, per_url[url].get(t, 0)) for t, n in counts.items()}
    return sums, to_score, per_url
