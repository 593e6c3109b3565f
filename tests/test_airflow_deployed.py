"""Airflow as deployed: PostgreSQL (Debian's package) as the metadata database; the API server,
scheduler and DAG processor with the LocalExecutor running two tasks at once; `trackstar_reindex`
triggered through the REST API (v2) with a SimpleAuthManager token, on the same small lake as
tests/test_dags.py, locally and on S3 (the moto server). Extraction fans out: one mapped task per
partition (extract_group_size 1) in a device pool of two slots, so the two partitions' extraction
tasks write one lake at the same time; one of them has its DeepSpeed rank killed mid-way and is
retried alone. The tables then equal a sequential extraction of the same lake.

Both services start through the scripts docker-compose runs (infra/deploy/postgres.sh,
infra/deploy/airflow.sh), each in its own process group, on 127.0.0.1 and free ports.
`make airflow-deployed` runs this file alone.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import psycopg2
import pyarrow as pa
import pytest

from infra import storage
from infra.lake import Lake
from jobs import extract, register_queries, tokenize
from schemas.vectors import decode_vectors
from tests.fixtures import copy_lake

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "infra" / "deploy"
DAG_ID = "trackstar_reindex"
TABLES = ("documents", "tokens", "quarantine", "train_gradients", "query_gradients", "hessians", "proponents", "runs")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(script: str, env: dict, log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(DEPLOY / script), *args],
        env=env,
        start_new_session=True,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the whole process group, SIGKILL to what is left after 30 s (a LocalExecutor
    scheduler can wait on its workers for ever)."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(30)


def _wait(what: str, ready, process: subprocess.Popen, logs: list[Path], timeout: float = 300):
    started = time.monotonic()
    while True:
        if process.poll() is not None or time.monotonic() - started > timeout:
            tails = "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
            raise RuntimeError(f"{what} not ready (exit {process.returncode}):\n{tails}")
        try:
            value = ready()
            if value:
                return value
        except (OSError, httpx.HTTPError, psycopg2.OperationalError):
            pass
        time.sleep(2)


@pytest.fixture(scope="module")
def postgres():
    """SQLAlchemy URL of a fresh PostgreSQL cluster; the connection to inspect it directly."""
    # Not under pytest's tmp root (mode 0700, root's): as root the server runs as the postgres user.
    data = Path(tempfile.mkdtemp(prefix="trackstar-postgres-"))
    port, password = _free_port(), secrets.token_urlsafe(16)
    log = Path(tempfile.mkdtemp(prefix="trackstar-postgres-log-")) / "postgres.log"
    server = _start(
        "postgres.sh", dict(os.environ, PGDATA=str(data), PGPORT=str(port), POSTGRES_PASSWORD=password), log
    )
    try:
        connect = lambda: psycopg2.connect(
            host="127.0.0.1", port=port, user="airflow", password=password, dbname="airflow"
        )  # noqa: E731
        _wait("PostgreSQL", connect, server, [log], timeout=120).close()
        yield f"postgresql+psycopg2://airflow:{password}@127.0.0.1:{port}/airflow", connect
    finally:
        _stop(server)
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(log.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def airflow(postgres, adam_run, s3_server, tmp_path_factory):
    """(REST client with a bearer token, the local lake, the server, its logs) for Airflow serving
    this project's DAGs; its tasks see the S3 server too (an s3:// lake is chosen by trigger conf)."""
    url, _ = postgres
    root = tmp_path_factory.mktemp("deployed")
    lake_dir = copy_lake(adam_run[0], root / "lake")
    register_queries.run(str(lake_dir))
    home, port = root / "airflow", _free_port()
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        AIRFLOW_HOME=str(home),
        AIRFLOW_PORT=str(port),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=url,
        TRACKSTAR_LAKE_ROOT=str(lake_dir),
        TRACKSTAR_RETRY_DELAY_SECONDS="1",
        # the fan-out: one extraction task per partition, two at once, one CPU rank each
        TRACKSTAR_EXTRACT_GROUP_SIZE="1",
        TRACKSTAR_DEVICE_POOL_SLOTS="2",
        TRACKSTAR_EXTRACT_RANKS="1",
        AIRFLOW__CORE__PARALLELISM="2",
        # only triggered runs: unpausing would otherwise start the @daily run as well
        AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False",
    )
    server = _start("airflow.sh", env, root / "airflow.log", "all")
    logs = [root / "airflow.log", *(home / f"{c}.log" for c in ("migrate", "api-server", "scheduler", "dag-processor"))]
    base = f"http://127.0.0.1:{port}"
    try:
        healthy = lambda: (
            httpx.get(f"{base}/api/v2/monitor/health", timeout=10).json()["scheduler"]["status"] == "healthy"
        )  # noqa: E731
        _wait("Airflow", healthy, server, logs)
        # SimpleAuthManager: the generated password of the `admin` user, exchanged for a JWT
        password = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        token = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": password}, timeout=30)
        token.raise_for_status()
        client = httpx.Client(
            base_url=f"{base}/api/v2", timeout=60, headers={"Authorization": f"Bearer {token.json()['access_token']}"}
        )
        _wait("the DAG processor", lambda: client.get(f"/dags/{DAG_ID}").status_code == 200, server, logs)
        yield client, Lake(lake_dir), server, logs
    finally:
        _stop(server)


def _trigger_and_wait(client: httpx.Client, server, logs, conf: dict | None = None) -> dict:
    response = client.post(f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf or {}})
    assert response.status_code == 200, response.text
    run_id = response.json()["dag_run_id"]
    finished = lambda: client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}").json()["state"] in ("success", "failed")  # noqa: E731
    _wait(f"run {run_id}", finished, server, logs, timeout=900)
    run = client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}").json()
    tasks = client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    assert run["state"] == "success", {t["task_id"]: t["state"] for t in tasks}
    summary = client.get(
        f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/report_summary/xcomEntries/return_value",
        params={"deserialize": True},
    ).json()["value"]
    return {"run": run, "tasks": tasks, "summary": summary}


class RankKiller(threading.Thread):
    """SIGKILLs, once, the DeepSpeed rank that extracts `partition` (an OOM kill, a lost node), a
    second after it started: its task fails mid-way, with the run recorded and no slice committed."""

    def __init__(self, partition: int, lake_root: str):
        super().__init__(daemon=True)
        self.partition, self.lake_root, self.killed, self.stop = partition, lake_root, [], threading.Event()

    def run(self):
        while not self.stop.is_set() and not self.killed:
            for process in psutil.process_iter(["pid", "cmdline", "create_time"]):
                command = process.info["cmdline"] or []
                # the rank is `python -u -m jobs.extract_rank ... --plan P`
                if "jobs.extract_rank" not in command or command[command.index("jobs.extract_rank") - 1] != "-m":
                    continue
                if time.time() - process.info["create_time"] < 1.0 or "--plan" not in command:
                    continue
                plan_path = command[command.index("--plan") + 1]
                if not storage.exists(plan_path):
                    continue  # ranks start while their driver still plans: not yet known whose they are
                plan = json.loads(storage.read_bytes(plan_path))
                if plan["lake"] != self.lake_root:
                    continue  # another lake's extraction (another test, another user): not ours to kill
                if ["train", self.partition] in [item for job in plan["jobs"] for item in job["items"]]:
                    process.kill()
                    self.killed.append(process.pid)
                    return
            time.sleep(0.2)


def _tries(client: httpx.Client, run_id: str, task_id: str, map_index: int) -> list[dict]:
    response = client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/tries")
    assert response.status_code == 200, response.text
    return sorted(response.json()["task_instances"], key=lambda t: t["try_number"])


def _vectors(lake: Lake, table: str, keys: list[str]) -> dict:
    rows = lake.read(table, columns=[*keys, "vector", "dtype", "scale", "fingerprint"]).to_pylist()
    found = {}
    for row in rows:
        key = tuple(row[k] for k in keys) + (row["fingerprint"],)
        assert key not in found, f"{table}: duplicate row {key}"
        found[key] = decode_vectors(
            pa.array([row["vector"]], pa.binary()), row["dtype"], None if row["scale"] is None else [row["scale"]]
        )[0]
    return found


def _sequential_reference(source: Path, root: str) -> Lake:
    """The same lake extracted the plain way: every partition by one task, one after the other."""
    if storage.is_s3(root):
        storage.upload_dir(source, root)
    else:
        copy_lake(source, Path(root))
    register_queries.run(root)
    tokenize.run(tokenize.TokenizeConfig(lake=root))
    extract.run(extract.ExtractConfig(lake=root, ranks=1))
    return Lake(root)


def _assert_same_vectors(lake: Lake, reference: Lake):
    for table, keys in (
        ("train_gradients", ["partition", "doc_id", "chunk"]),
        ("query_gradients", ["query_id", "prompt_index"]),
    ):
        ours, theirs = _vectors(lake, table, keys), _vectors(reference, table, keys)
        assert ours.keys() == theirs.keys() and ours, table
        worst = max(np.linalg.norm(ours[k] - theirs[k]) / max(np.linalg.norm(theirs[k]), 1e-30) for k in ours)
        assert worst < 1e-4, f"{table}: vectors differ from the sequential run by up to {worst:.2e}"


def _run_with_one_extraction_killed(client, server, logs, lake: Lake, conf: dict | None = None) -> dict:
    """Triggers the reindex while killing the rank of partition 1; checks the fan-out ran both
    extraction tasks at the same time and retried only the killed one."""
    killer = RankKiller(partition=1, lake_root=lake.root)
    killer.start()
    try:
        result = _trigger_and_wait(client, server, logs, conf)
    finally:
        killer.stop.set()
    assert killer.killed, "the rank of partition 1 was never seen running"
    run_id = result["run"]["dag_run_id"]
    groups = sorted((t for t in result["tasks"] if t["task_id"] == "extract_group"), key=lambda t: t["map_index"])
    assert [t["state"] for t in groups] == ["success", "success"]
    tries = [_tries(client, run_id, "extract_group", t["map_index"]) for t in groups]
    plan = client.get(
        f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/plan_extraction/xcomEntries/return_value",
        params={"deserialize": True},
    ).json()["value"]
    killed = next(i for i, group in enumerate(plan["groups"]) if group["partitions"] == [1])
    assert [len(t) for t in tries] == [2 if i == killed else 1 for i in range(2)]  # only the killed task retried
    assert tries[killed][0]["state"] == "failed"
    first = [t[0] for t in tries]
    latest_start = max(t["start_date"] for t in first)
    assert all(t["end_date"] > latest_start for t in first), "the two extraction tasks did not run at the same time"
    runs = lake.read("runs", filters=[("command", "=", "extract")], columns=["status"])["status"].to_pylist()
    assert sorted(runs) == ["failed", "succeeded", "succeeded"]  # the killed try is recorded as failed
    return result


def test_reindex_fans_extraction_out_over_concurrent_tasks_then_finds_nothing_new(
    airflow, postgres, adam_run, tmp_path
):
    client, lake, server, logs = airflow
    assert client.patch(f"/dags/{DAG_ID}", json={"is_paused": False}).status_code == 200
    first = _run_with_one_extraction_killed(client, server, logs, lake)
    assert first["run"]["run_type"] == "manual"
    ran = {t["task_id"] for t in first["tasks"] if t["state"] == "success"}
    assert {"tokenize_partition", "plan_extraction", "extract_group", "collect_extraction", "report_summary"} <= ran
    _assert_same_vectors(lake, _sequential_reference(adam_run[0], str(tmp_path / "sequential")))
    assert (
        lake.read("proponents", filters=[("method", "=", "trackstar")]).num_rows == lake.read("queries").num_rows * 10
    )

    before = {t: lake.version(t) for t in TABLES}
    second = _trigger_and_wait(client, server, logs)
    assert second["summary"].startswith("nothing new"), second["summary"]
    assert {t: lake.version(t) for t in TABLES} == before
    (quiet,) = [t for t in second["tasks"] if t["task_id"] == "extract_group"]  # one empty group: no ranks
    assert quiet["state"] == "success"

    # the runs live in PostgreSQL, Airflow's metadata database here, and the scheduler queued every task
    _, connect = postgres
    with connect() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT run_id, state FROM dag_run WHERE dag_id = %s", (DAG_ID,))
        states = dict(cursor.fetchall())
        cursor.execute(
            "SELECT DISTINCT job.job_type FROM task_instance ti LEFT JOIN job ON job.id = ti.queued_by_job_id "
            "WHERE ti.run_id = %s AND ti.state = 'success'",
            (first["run"]["dag_run_id"],),
        )
        queued_by = {row[0] for row in cursor.fetchall()}
    assert states[first["run"]["dag_run_id"]] == "success" and states[second["run"]["dag_run_id"]] == "success"
    assert queued_by == {"SchedulerJob"}


def test_concurrent_extraction_tasks_on_an_s3_lake_equal_a_sequential_run(airflow, adam_run, s3_bucket):
    client, _, server, logs = airflow
    root = f"s3://{s3_bucket}/lake"
    storage.upload_dir(adam_run[0], root)
    register_queries.run(root)
    lake = Lake(root)
    _run_with_one_extraction_killed(client, server, logs, lake, {"lake_root": root})
    _assert_same_vectors(lake, _sequential_reference(adam_run[0], f"s3://{s3_bucket}/sequential"))
