#!/usr/bin/env bash
# An Apache Spark Connect server with Delta Lake and s3a, from the pip-installed pyspark.
#
#   infra/deploy/spark-connect.sh fetch   # resolve the Delta and hadoop-aws jars into the Ivy cache, then exit
#   infra/deploy/spark-connect.sh         # serve in the foreground until stopped (SIGTERM/SIGINT)
#
# The tests (tests/test_apache_spark.py) and docker-compose.yml both start Spark with this script.
# Serving starts a standalone master and SPARK_WORKERS workers (one core each) on SPARK_HOST, then
# the Connect server as the cluster's driver; SPARK_WORKERS=0 runs the driver alone with local[2].
# Jobs reach it with TRACKSTAR_SPARK_REMOTE=sc://$SPARK_HOST:$SPARK_CONNECT_PORT.
#
# Settings (environment):
#   PYTHON                 python with pyspark, delta-spark and the project (default: python3 on PATH)
#   SPARK_HOST             address every daemon binds to (default 127.0.0.1)
#   SPARK_CONNECT_PORT     gRPC port of the Connect server (default 15002)
#   SPARK_MASTER_PORT      standalone master port (default: a free port)
#   SPARK_WORKERS          standalone workers (default 2; 0 = local[2], no cluster)
#   SPARK_WORK_DIR         logs, worker dirs, warehouse (default /tmp/trackstar-spark)
#   SPARK_IVY_DIR          Ivy caches of the fetched jars (default ~/.cache/trackstar/spark-ivy)
#   SPARK_DRIVER_MEMORY, SPARK_EXECUTOR_MEMORY, SPARK_DAEMON_MEMORY   JVM heaps (768m, 512m, 192m)
#   AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   S3 for s3:// and s3a:// paths;
#                          the keys are read from the environment by s3a, never put on a command line
set -euo pipefail

PYTHON=${PYTHON:-python3}
SPARK_HOST=${SPARK_HOST:-127.0.0.1}
SPARK_CONNECT_PORT=${SPARK_CONNECT_PORT:-15002}
SPARK_WORKERS=${SPARK_WORKERS:-2}
SPARK_WORK_DIR=${SPARK_WORK_DIR:-/tmp/trackstar-spark}
SPARK_IVY_DIR=${SPARK_IVY_DIR:-$HOME/.cache/trackstar/spark-ivy}
HERE=$(cd "$(dirname "$0")" && pwd)

SPARK_HOME=$("$PYTHON" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')
PACKAGES=$("$PYTHON" "$HERE/spark_packages.py")
export SPARK_HOME SPARK_LOCAL_IP=$SPARK_HOST PYSPARK_PYTHON=$PYTHON
mkdir -p "$SPARK_WORK_DIR"

# One Ivy folder per package set, so its jars/ holds exactly this set's jars (no stale versions).
IVY_DIR=$SPARK_IVY_DIR/$(echo "$PACKAGES" | tr -c 'A-Za-z0-9._\n-' '_')

fetch() {
  # spark-submit resolves --packages before it runs the application, here an empty Python file.
  echo "[spark-connect] fetching $PACKAGES into $IVY_DIR"
  : >"$SPARK_WORK_DIR/noop.py"
  "$SPARK_HOME/bin/spark-submit" --packages "$PACKAGES" --conf "spark.jars.ivy=$IVY_DIR" "$SPARK_WORK_DIR/noop.py" \
    >"$SPARK_WORK_DIR/fetch.log" 2>&1 || { tail -n 30 "$SPARK_WORK_DIR/fetch.log"; return 1; }
}

if [ "${1:-serve}" = fetch ]; then
  fetch
  exit
fi
[ -d "$IVY_DIR/jars" ] || fetch
# local: jars are read in place by the driver and every executor: nothing is copied (the AWS SDK
# bundle alone is ~600 MB), and no resolution runs at start-up.
JARS=$(ls "$IVY_DIR"/jars/*.jar | sed 's|^|local:|' | paste -sd, -)

free_port() { "$PYTHON" -c 'import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$SPARK_HOST"; }

# Stop every daemon this script started when it is stopped (compose, the test fixture, Ctrl-C).
trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT
trap 'exit 143' TERM INT

if [ "$SPARK_WORKERS" -gt 0 ]; then
  daemon_memory=${SPARK_DAEMON_MEMORY:-192m}
  SPARK_MASTER_PORT=${SPARK_MASTER_PORT:-$(free_port)}
  master=spark://$SPARK_HOST:$SPARK_MASTER_PORT
  # no REST submission server: it would take the fixed port 6066 (jobs come through Connect)
  SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false" SPARK_DAEMON_MEMORY=$daemon_memory \
    "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.master.Master --host "$SPARK_HOST" \
    --port "$SPARK_MASTER_PORT" --webui-port 0 >"$SPARK_WORK_DIR/master.log" 2>&1 &
  for i in $(seq 1 "$SPARK_WORKERS"); do
    SPARK_DAEMON_MEMORY=$daemon_memory "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.worker.Worker --host "$SPARK_HOST" --webui-port 0 \
      --cores 1 --memory "${SPARK_WORKER_MEMORY:-768m}" --work-dir "$SPARK_WORK_DIR/worker-$i" "$master" \
      >"$SPARK_WORK_DIR/worker-$i.log" 2>&1 &
  done
  cluster_options=(--master "$master" --conf spark.executor.cores=1 --conf "spark.cores.max=$SPARK_WORKERS")
else
  cluster_options=(--master "local[2]")
fi

s3_options=(--conf spark.hadoop.fs.s3.impl=org.apache.hadoop.fs.s3a.S3AFileSystem)  # the lake's s3:// URIs
if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
  s3_options+=(--conf "spark.hadoop.fs.s3a.endpoint=$AWS_ENDPOINT_URL" --conf spark.hadoop.fs.s3a.path.style.access=true)
fi
if [ -n "${AWS_REGION:-}" ]; then
  s3_options+=(--conf "spark.hadoop.fs.s3a.endpoint.region=$AWS_REGION")
fi

echo "[spark-connect] sc://$SPARK_HOST:$SPARK_CONNECT_PORT on ${cluster_options[1]} with $PACKAGES; logs in $SPARK_WORK_DIR"
# spark-submit sizes the Connect server's heap like a daemon's (SPARK_DAEMON_MEMORY), not with --driver-memory.
# Small shuffle widths: the defaults (200 tasks per shuffle, 50 per Delta log replay) cost more than the work
# on small lakes; raise them for big ones.
SPARK_DAEMON_MEMORY=${SPARK_DRIVER_MEMORY:-768m} "$SPARK_HOME/bin/spark-submit" --class org.apache.spark.sql.connect.service.SparkConnectServer \
  --name trackstar-spark-connect --jars "$JARS" "${cluster_options[@]}" "${s3_options[@]}" \
  --conf "spark.executor.memory=${SPARK_EXECUTOR_MEMORY:-512m}" \
  --conf "spark.connect.grpc.binding.address=$SPARK_HOST" --conf "spark.connect.grpc.binding.port=$SPARK_CONNECT_PORT" \
  --conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension \
  --conf spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog \
  --conf spark.sql.catalogImplementation=in-memory --conf "spark.sql.warehouse.dir=$SPARK_WORK_DIR/warehouse" \
  --conf "spark.driver.host=$SPARK_HOST" --conf "spark.driver.bindAddress=$SPARK_HOST" --conf spark.ui.enabled=false \
  --conf "spark.pyspark.python=$PYTHON" --conf "spark.executorEnv.PYTHONPATH=${PYTHONPATH:-}" \
  --conf spark.sql.shuffle.partitions=4 --conf spark.databricks.delta.snapshotPartitions=2 \
  --conf spark.sql.session.timeZone=UTC \
  >"$SPARK_WORK_DIR/connect.log" 2>&1 &
wait -n
echo "[spark-connect] a Spark process exited; see $SPARK_WORK_DIR/*.log" >&2
exit 1
