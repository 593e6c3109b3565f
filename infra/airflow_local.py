"""Running the TrackStar DAGs locally: a project-local Airflow with its SQLite metadata database.

    python -m infra.airflow_local run trackstar_reindex [--conf '{"top_k": 10}']

sets up `AIRFLOW_HOME` (default `./.airflow`: `airflow db migrate`, the device pool), runs one DAG
run in this process with `dag.test()` (no scheduler or workers needed) and prints every task's
state; the exit status is non-zero unless the run succeeded. `run_dag()` does the same from Python
in a child process, so the caller's own imports never see Airflow's configuration.

To watch the DAGs in the UI instead: `make airflow-ui` (Airflow standalone on 127.0.0.1:8080).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from infra.config import load_config

REPO_ROOT = Path(__file__).resolve().parent.parent


# the Airflow pool every extraction task runs in (dags/common.py puts the tasks there)
DEVICE_POOL = "trackstar_device"


def device_pool() -> tuple[str, int, str]:
    """(name, slots, description) of the pool every extraction task runs in: one slot per node that
    may extract at once (the setting device_pool_slots)."""
    slots = load_config().device_pool_slots
    return (DEVICE_POOL, slots, "extraction tasks that run at once, each on all the GPUs (or cores) of its node")


def airflow_environment(lake_root: str, home: str | os.PathLike = ".airflow", **extra) -> dict:
    """Environment for a local Airflow that sees this project's DAGs and lake (the project is
    imported as the installed package: `make install` runs `pip install -e .`)."""
    home = Path(home).resolve()
    return dict(
        os.environ,
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO_ROOT / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__PARALLELISM="2",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
        TRACKSTAR_LAKE_ROOT=str(lake_root),
        **{k: str(v) for k, v in extra.items()},
    )


def run_dag(dag_id: str, lake_root: str, conf: dict | None = None, home=".airflow", **extra) -> dict:
    """One run of `dag_id` in a child process (in this working directory); returns
    {"state": ..., "tasks": {task_id: state}}."""
    command = [
        sys.executable,
        "-m",
        "infra.airflow_local",
        "run",
        dag_id,
        "--conf",
        json.dumps(conf or {}),
        "--result-line",
    ]
    completed = subprocess.run(
        command, env=airflow_environment(lake_root, home, **extra), capture_output=True, text=True
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("TRACKSTAR_DAG_RESULT ")]
    if not lines:
        raise RuntimeError(f"{dag_id} did not report a result:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    result["log"] = completed.stdout
    return result


def _prepare_home() -> None:
    database = Path(os.environ["AIRFLOW_HOME"]) / "airflow.db"
    if not database.exists():
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
    subprocess.run(
        [sys.executable, "-m", "airflow", "pools", "set", *map(str, device_pool())], check=True, capture_output=True
    )


def _run_here(dag_id: str, conf: dict) -> dict:
    from airflow.dag_processing.dagbag import DagBag

    _prepare_home()
    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    run = bag.get_dag(dag_id).test(run_conf=conf)
    tasks = {}
    for ti in run.get_task_instances():
        key = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
        tasks[key] = str(ti.state)
    return {"dag_id": dag_id, "run_id": run.run_id, "state": str(run.state), "tasks": tasks}


def _run_in_child(argv: list[str], grace_seconds: float = 3.0) -> int:
    """Runs the DAG in a child process group that a SIGTERM or Ctrl-C here ends within
    `grace_seconds`, task processes (DeepSpeed ranks) included: `dag.test()` itself lets a running
    task finish first. The lake needs no clean-up: a killed writer commits nothing."""
    child = subprocess.Popen([sys.executable, "-m", "infra.airflow_local", *argv], start_new_session=True)
    stopping: list[tuple[int, float]] = []

    def stop(signum, _frame):
        if not stopping:
            stopping.append((signum, time.monotonic()))
            os.killpg(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while child.poll() is None:  # polled: a handler cannot wait on a child the main thread waits on
        if stopping and time.monotonic() - stopping[0][1] > grace_seconds:
            os.killpg(child.pid, signal.SIGKILL)
        time.sleep(0.1)
    if stopping:
        print(f"\nstopped by {signal.Signals(stopping[0][0]).name}", file=sys.stderr, flush=True)
        return 128 + stopping[0][0]
    return child.returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.airflow_local")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one DAG run in this process and print its task states")
    run.add_argument("dag_id")
    run.add_argument("--conf", default="{}", help="DAG run conf / params as JSON")
    run.add_argument("--result-line", action="store_true", help="also print a machine-readable result line")
    run.add_argument("--here", action="store_true", help=argparse.SUPPRESS)  # the child that runs the DAG
    args = parser.parse_args(argv)
    if "AIRFLOW_HOME" not in os.environ:
        os.execve(
            sys.executable,
            [sys.executable, "-m", "infra.airflow_local", *(argv or sys.argv[1:])],
            airflow_environment(load_config().lake_root),
        )
    if not args.here:
        return _run_in_child([*(argv or sys.argv[1:]), "--here"])
    result = _run_here(args.dag_id, json.loads(args.conf))
    print(f"\n{result['dag_id']} run {result['run_id']}: {result['state']}")
    for task_id, state in result["tasks"].items():
        print(f"  {task_id:<32} {state}")
    if args.result_line:
        print("TRACKSTAR_DAG_RESULT " + json.dumps(result))
    return 0 if result["state"] == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
