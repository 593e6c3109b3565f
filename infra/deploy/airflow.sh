#!/usr/bin/env bash
# Airflow as deployed: a PostgreSQL metadata database and the LocalExecutor (not `airflow standalone`).
#
#   infra/deploy/airflow.sh migrate        # create/upgrade the metadata schema, create the TrackStar pools
#   infra/deploy/airflow.sh api-server     # one component in the foreground (also: scheduler, dag-processor)
#   infra/deploy/airflow.sh all            # migrate, then api-server + scheduler + dag-processor until stopped
#
# The tests (tests/test_airflow_deployed.py, `make airflow-deployed`) run `all`; docker-compose.yml runs
# `migrate` once, then each component in its own container with the same settings.
#
# Settings (environment):
#   AIRFLOW__DATABASE__SQL_ALCHEMY_CONN   required: postgresql+psycopg2://user:password@host:port/db
#   AIRFLOW_HOME          (default /tmp/trackstar-airflow)
#   AIRFLOW_HOST, AIRFLOW_PORT   address of the API server (default 127.0.0.1:8080); the task runners
#                         reach its execution API there
#   AIRFLOW__API_AUTH__JWT_SECRET   shared by every component when they run in separate containers
#   TRACKSTAR_*           the pipeline's settings, passed on to every task (TRACKSTAR_LAKE_ROOT, ...)
#   PYTHON                python with Airflow and the project (default: python3 on PATH)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}
: "${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:?set AIRFLOW__DATABASE__SQL_ALCHEMY_CONN (postgresql+psycopg2://...)}"
host=${AIRFLOW_HOST:-127.0.0.1}
port=${AIRFLOW_PORT:-8080}

export AIRFLOW_HOME=${AIRFLOW_HOME:-/tmp/trackstar-airflow}
export AIRFLOW__CORE__EXECUTOR=LocalExecutor
export AIRFLOW__CORE__DAGS_FOLDER=${AIRFLOW__CORE__DAGS_FOLDER:-$REPO_ROOT/dags}
export AIRFLOW__CORE__LOAD_EXAMPLES=False
# LocalExecutor starts one worker process per parallelism slot (~130 MB each)
export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-2}
export AIRFLOW__CORE__AUTH_MANAGER=airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin}
export AIRFLOW__API__HOST=$host AIRFLOW__API__PORT=$port AIRFLOW__API__WORKERS=${AIRFLOW__API__WORKERS:-1}
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=${AIRFLOW__CORE__EXECUTION_API_SERVER_URL:-http://$host:$port/execution/}
# The DAG files import the job modules (torch among them): more than the default 30 s on a busy machine.
export AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT=${AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT:-120}
export AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL=${AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL:-30}
# The scheduler runs with --skip-serve-logs: the workers' log server would listen on every interface
# (port 8793); the API server reads task logs from AIRFLOW_HOME/logs instead (a shared volume in compose).
# Until the project is pip-installed, the DAG files and tasks import it from the checkout.
export PYTHONPATH=$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$AIRFLOW_HOME"

airflow() { "$PYTHON" -m airflow "$@"; }

migrate() {
  echo "[airflow] migrating the metadata database"
  airflow db migrate >"$AIRFLOW_HOME/migrate.log" 2>&1 || { tail -n 40 "$AIRFLOW_HOME/migrate.log"; return 1; }
  "$PYTHON" -c 'import subprocess, sys; from infra.airflow_local import device_pool
subprocess.run([sys.executable, "-m", "airflow", "pools", "set", *map(str, device_pool())], check=True, stdout=subprocess.DEVNULL)'
}

case "${1:-all}" in
  migrate) migrate ;;
  api-server|dag-processor|triggerer) exec "$PYTHON" -m airflow "$1" ;;
  scheduler) exec "$PYTHON" -m airflow scheduler --skip-serve-logs ;;
  all)
    migrate
    trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT
    trap 'exit 143' TERM INT
    for component in api-server scheduler dag-processor; do
      "$0" "$component" >"$AIRFLOW_HOME/$component.log" 2>&1 &
    done
    echo "[airflow] api-server on http://$host:$port, scheduler and dag-processor (LocalExecutor); logs in $AIRFLOW_HOME"
    wait -n
    echo "[airflow] a component exited; see $AIRFLOW_HOME/*.log" >&2
    exit 1 ;;
  *) echo "usage: $0 [all|migrate|api-server|scheduler|dag-processor|triggerer]" >&2; exit 2 ;;
esac
