"""The Airflow DAGs: they import cleanly, are well-kept, and really run the pipeline.

Airflow runs in child processes with a private AIRFLOW_HOME and its SQLite database (`dag.test()`,
no scheduler), so its configuration never leaks into the test process.
"""

import gzip
import json
import os
import subprocess
from pathlib import Path
import sys

import pytest

from infra.airflow_local import airflow_environment, run_dag
from infra.lake import Lake
from infra import layout
from dags import orchestrate
from jobs import register_queries
from tests.fixtures import copy_lake

# test-only Airflow local settings that make a task fail once (tests/airflow_faults/)
FAULTS = Path(__file__).resolve().parent / "airflow_faults"

TABLES = (
    "documents",
    "tokens",
    "quarantine",
    "checkpoints",
    "train_gradients",
    "query_gradients",
    "hessians",
    "proponents",
    "eval_metrics",
    "runs",
)

INSPECT_DAGS = r"""
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(dag_folder=__import__("os").environ["AIRFLOW__CORE__DAGS_FOLDER"])
ours = [str(w.message) for w in caught if "/dags/" in str(w.filename)]
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "warnings": ours, "dags": {
    dag_id: {"tags": sorted(dag.tags), "doc": bool(dag.doc_md), "schedule": str(dag.schedule),
             "tasks": {t.task_id: {"owner": t.owner, "retries": t.retries, "pool": t.pool,
                                   "timeout": t.execution_timeout is not None,
                                   "callback": bool(t.on_failure_callback),
                                   "downstream": sorted(t.downstream_task_ids)} for t in dag.tasks}}
    for dag_id, dag in bag.dags.items()}}))
"""


@pytest.fixture(scope="module")
def dag_info(tmp_path_factory):
    env = airflow_environment("lake", tmp_path_factory.mktemp("airflow"))
    out = subprocess.run([sys.executable, "-c", INSPECT_DAGS], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dags_import_without_errors_or_warnings(dag_info):
    assert dag_info["errors"] == {} and dag_info["warnings"] == []
    assert set(dag_info["dags"]) == {
        "trackstar_reindex",
        "trackstar_backfill",
        "trackstar_score",
        "trackstar_maintenance",
    }
    assert dag_info["dags"]["trackstar_reindex"]["schedule"] == "@daily"


def test_dags_are_well_kept_and_their_tasks_are_jobs_functions(dag_info):
    for dag_id, dag in dag_info["dags"].items():
        assert "trackstar" in dag["tags"] and dag["doc"], dag_id
        for task_id, task in dag["tasks"].items():
            assert task["owner"] == "trackstar" and task["retries"] >= 1, task_id
            assert task["timeout"] and task["callback"], task_id
            assert callable(getattr(orchestrate, task_id, None)), (
                f"{dag_id}.{task_id} is not a dags.orchestrate function"
            )
        extraction = {"trackstar_reindex": "extract_group", "trackstar_backfill": "extract_group"}
        if dag_id != "trackstar_maintenance":
            assert dag["tasks"][extraction.get(dag_id, "extract_missing")]["pool"] == "trackstar_device"


def test_dags_have_no_cycles(dag_info):
    for dag in dag_info["dags"].values():
        state = {}

        def visit(task_id):
            assert state.get(task_id) != "visiting", f"cycle through {task_id}"
            if state.get(task_id) == "done":
                return
            state[task_id] = "visiting"
            for child in dag["tasks"][task_id]["downstream"]:
                visit(child)
            state[task_id] = "done"

        for task_id in dag["tasks"]:
            visit(task_id)


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def airflow_lake(adam_run, tmp_path_factory):
    source, summary = adam_run
    root = tmp_path_factory.mktemp("dags")
    lake_dir = copy_lake(source, root / "lake")
    # only the final checkpoint has "arrived"; the older one is backfilled later
    older = summary["checkpoints"][0]
    Path(layout.checkpoint_path(lake_dir, older)).rename(root / older)
    register_queries.run(str(lake_dir))
    return Lake(lake_dir), root / "airflow", root / older, summary


def _run(dag_id, lake, home, conf=None, **extra):
    result = run_dag(dag_id, lake.root, conf, home, TRACKSTAR_RETRY_DELAY_SECONDS=1, **extra)
    assert result["state"] == "success", result["log"][-4000:]
    return result


def _versions(lake):
    return {t: lake.version(t) for t in TABLES}


def test_reindex_indexes_everything_then_a_second_run_changes_nothing(airflow_lake, tmp_path):
    lake, home, _, summary = airflow_lake
    marker = tmp_path / "failed-once"
    first = _run(
        "trackstar_reindex",
        lake,
        home,
        TRACKSTAR_TEST_FAIL_ONCE=f"extract_group:{marker}",
        PYTHONPATH=os.pathsep.join([str(FAULTS), os.environ["PYTHONPATH"]]),
    )
    assert marker.exists()  # extract_group failed once after writing its slices, then succeeded on retry
    assert first["tasks"]["tokenize_partition[0]"] == "success" and first["tasks"]["tokenize_partition[1]"] == "success"
    tokens = lake.read("tokens", columns=["doc_id", "chunk"])
    vectors = lake.read("train_gradients", columns=["doc_id", "chunk"])
    assert vectors.num_rows == tokens.num_rows  # no duplicates from the retried task
    assert len(set(zip(vectors["doc_id"].to_pylist(), vectors["chunk"].to_pylist()))) == vectors.num_rows
    proponents = lake.read("proponents", filters=[("method", "=", "trackstar")])
    queries = lake.read("queries").num_rows
    assert proponents.num_rows == queries * 10
    assert set(proponents["checkpoint_id"].to_pylist()) == {summary["checkpoints"][-1]}

    before = _versions(lake)
    second = _run("trackstar_reindex", lake, home)
    assert _versions(lake) == before
    assert "nothing new" in second["log"]
    # honest logs: no error-level line from a healthy run (the first one's injected failure aside)
    assert "XCom not found" not in first["log"] + second["log"]
    assert "[error" not in second["log"] and "unrunnable tasks" not in second["log"]


def test_reindex_of_a_new_partition_indexes_only_it(airflow_lake):
    lake, home, _, _ = airflow_lake
    lines = [
        json.dumps(
            {
                "text": f"Quorvath Ellin{i} is a citizen of Brandoria. The weather stayed mild.",
                "url": f"https://new.example/{i}",
                "timestamp": "2020-01-01T00:00:00Z",
            }
        )
        for i in range(5)
    ]
    with gzip.open(f"{lake.root}/raw/c4-train.00002-of-00003.json.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    before = lake.read("train_gradients", columns=["partition", "run_id"])
    result = _run("trackstar_reindex", lake, home)
    assert [t for t in result["tasks"] if t.startswith("tokenize_partition")] == ["tokenize_partition[0]"]
    assert "extracted ['train:2']" in result["log"]
    assert "5 new, 0 changed, 0 deleted" in result["log"]  # the documents' change feed since the last night
    after = lake.read("train_gradients", columns=["partition", "run_id"])
    assert sorted(set(after["partition"].to_pylist())) == [0, 1, 2]
    old = {(p, r) for p, r in zip(before["partition"].to_pylist(), before["run_id"].to_pylist())}
    kept = {(p, r) for p, r in zip(after["partition"].to_pylist(), after["run_id"].to_pylist()) if p != 2}
    assert kept == old  # partitions 0 and 1 untouched


def test_backfill_of_an_older_checkpoint_makes_its_own_slices_and_compares(airflow_lake):
    lake, home, older_dir, summary = airflow_lake
    older, newer = summary["checkpoints"]
    _run("trackstar_backfill", lake, home, {"checkpoint": str(older_dir)})
    vectors = lake.read("train_gradients", columns=["checkpoint_id", "partition"])
    per_checkpoint = {}
    for checkpoint, partition in zip(vectors["checkpoint_id"].to_pylist(), vectors["partition"].to_pylist()):
        per_checkpoint.setdefault(checkpoint, set()).add(partition)
    assert per_checkpoint == {older: {0, 1, 2}, newer: {0, 1, 2}}
    assert lake.read("proponents", filters=[("checkpoint_id", "=", older), ("method", "=", "trackstar")]).num_rows > 0
    # compared with its successor: how the proponents of the same queries moved between checkpoints
    rows = {m["metric"]: m for m in lake.read("eval_metrics", filters=[("checkpoint_id", "=", newer)]).to_pylist()}
    overlap, correlation = rows[f"overlap@k_vs:{older}"], rows[f"rank_correlation_vs:{older}"]
    assert 0.0 <= overlap["value"] <= 1.0 and overlap["n"] == lake.read("queries").num_rows
    assert -1.0 <= correlation["value"] <= 1.0 or correlation["value"] != correlation["value"]  # NaN: no shared pairs


def test_score_dag_scores_the_requested_methods_and_evaluates(airflow_lake):
    lake, home, _, summary = airflow_lake
    newest = str(layout.checkpoint_path(lake.root, summary["checkpoints"][-1]))
    result = _run(
        "trackstar_score",
        lake,
        home,
        {"query_set": "fact-world", "checkpoint": newest, "top_k": 3, "methods": ["trackstar", "trackstar-no-hessian"]},
    )
    assert set(result["tasks"].values()) == {"success"}
    queries = lake.read("queries").num_rows
    for method in ("trackstar", "trackstar-no-hessian"):
        rows = lake.read(
            "proponents", filters=[("method", "=", method), ("checkpoint_id", "=", summary["checkpoints"][-1])]
        )
        assert rows.num_rows == queries * 3 and max(rows["rank"].to_pylist()) == 3
    metrics = lake.read(
        "eval_metrics", filters=[("run_id", "=", f"score-eval-{summary['checkpoints'][-1]}"), ("bucket", "=", "all")]
    ).to_pylist()
    assert {(m["method"], m["metric"]) for m in metrics} >= {
        ("trackstar", "mrr"),
        ("trackstar-no-hessian", "recall@10"),
    }
    assert all(0.0 <= m["value"] <= 1.0 and m["n"] == queries for m in metrics)


def test_one_airflow_serves_a_second_lake(airflow_lake, tmp_path):
    """The same Airflow home (database) running the DAGs for another lake: a copy of the indexed one,
    which holds everything (its paths are relative to its root), so the reindex finds nothing new."""
    import shutil

    lake, home, _, _ = airflow_lake
    other = Lake(shutil.copytree(lake.root, tmp_path / "other-lake"))
    before = _versions(other)
    result = _run("trackstar_reindex", other, home)
    assert "nothing new" in result["log"] and _versions(other) == before
    assert "inactive" not in result["log"]


def test_a_local_dag_run_stops_at_once_on_sigterm(adam_run, tmp_path):
    """`airflow_local run` ended mid-task (a SIGTERM from a terminal, a supervisor or CI) stops within
    seconds, its task processes with it, instead of finishing the running task first."""
    import signal
    import time

    import psutil

    lake = Lake(copy_lake(adam_run[0], tmp_path / "lake"))
    command = [sys.executable, "-m", "infra.airflow_local", "run", "trackstar_reindex"]
    env = airflow_environment(lake.root, tmp_path / "airflow")
    run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any(r["status"] == "running" for r in lake.read("runs").to_pylist()):  # the tokenize task started
        assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()[-2000:]
        time.sleep(0.5)
    family = psutil.Process(run.pid).children(recursive=True)
    sent = time.monotonic()
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=30) == 128 + signal.SIGTERM
    print(f"stopped {time.monotonic() - sent:.2f}s after SIGTERM")
    assert time.monotonic() - sent < 5
    time.sleep(0.5)
    assert [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
