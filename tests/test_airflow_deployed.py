"""Airflow as deployed: PostgreSQL (Debian's package) as the metadata database; the API server,
scheduler and DAG processor with the LocalExecutor; `trackstar_reindex` triggered through the REST
API (v2) with a SimpleAuthManager token, on the same small lake as tests/test_dags.py.

Both services start through the scripts docker-compose runs (infra/deploy/postgres.sh,
infra/deploy/airflow.sh), each in its own process group, on 127.0.0.1 and free ports.
`make airflow-deployed` runs this file alone.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg2
import pytest

from infra.lake import Lake
from jobs import register_queries
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
def airflow(postgres, adam_run, tmp_path_factory):
    """(REST client with a bearer token, the lake) for Airflow serving this project's DAGs."""
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


def _trigger_and_wait(client: httpx.Client, server, logs) -> dict:
    response = client.post(f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": {}})
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


def test_reindex_triggered_through_the_rest_api_then_a_second_trigger_finds_nothing_new(airflow, postgres):
    client, lake, server, logs = airflow
    assert client.patch(f"/dags/{DAG_ID}", json={"is_paused": False}).status_code == 200
    first = _trigger_and_wait(client, server, logs)
    assert first["run"]["run_type"] == "manual"
    ran = {t["task_id"] for t in first["tasks"] if t["state"] == "success"}
    assert {"tokenize_partition", "extract_missing", "report_summary"} <= ran
    tokens = lake.read("tokens", columns=["doc_id", "chunk"])
    vectors = lake.read("train_gradients", columns=["doc_id", "chunk"])
    assert tokens.num_rows > 0 and vectors.num_rows == tokens.num_rows
    assert (
        lake.read("proponents", filters=[("method", "=", "trackstar")]).num_rows == lake.read("queries").num_rows * 10
    )

    before = {t: lake.version(t) for t in TABLES}
    second = _trigger_and_wait(client, server, logs)
    assert second["summary"].startswith("nothing new"), second["summary"]
    assert {t: lake.version(t) for t in TABLES} == before

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
