"""The Spark stages on Apache Spark with delta-spark, with the same job code as the embedded engine.

infra/deploy/spark-connect.sh (the command docker-compose runs) starts a standalone master, two
workers and the Spark Connect server with the Delta extension and catalog on 127.0.0.1. tokenize
and score run as `python -m jobs ...` child processes with TRACKSTAR_SPARK_REMOTE pointing at it,
the one setting that picks the engine; the SQL query runs through a client session on it. Each
result is compared with the embedded Sail engine on the same input, and the tables cross engines:
Apache Spark reads what delta-rs wrote (train_gradients, queries) and delta-rs, the explorer and
Sail read and write what Apache Spark created. The first start fetches the Delta and hadoop-aws jars
from Maven Central (`make install` does it beforehand).
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from infra.lake import Lake
from explorer.data import Explorer
from jobs import extract, fit_hessian, register_queries, score, tokenize
from jobs.sql import run_query
from tests.fixtures import copy_lake

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "infra" / "deploy" / "spark-connect.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connect(url: str):
    from pyspark.sql import SparkSession

    return SparkSession.builder.remote(url).create()


@pytest.fixture(scope="module")
def apache_spark(tmp_path_factory, s3_server):
    """sc:// URL of a Spark Connect server on a standalone cluster (master + 2 workers) on loopback."""
    work = tmp_path_factory.mktemp("spark")
    port = _free_port()
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        SPARK_CONNECT_PORT=str(port),
        SPARK_WORK_DIR=str(work),
        SPARK_WORKERS="2",
        PYTHONPATH=str(REPO_ROOT),
    )
    started = time.monotonic()
    server = subprocess.Popen(
        ["bash", str(SCRIPT)],
        env=env,
        start_new_session=True,
        stdout=open(work / "script.log", "w"),
        stderr=subprocess.STDOUT,
    )
    url = f"sc://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None or time.monotonic() - started > 600:
                logs = "\n".join(p.read_text()[-3000:] for p in sorted(work.glob("*.log")))
                raise RuntimeError(f"Spark Connect did not start (exit {server.returncode}):\n{logs}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        session = _connect(url)
        assert session.range(10).selectExpr("sum(id) AS s").first()["s"] == 45  # executors are up
        print(f"[apache spark] {url} ready after {time.monotonic() - started:.0f} s, Spark {session.version}")
        session.stop()
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)


def _job(url: str, *args: str) -> str:
    """`python -m jobs ...` on Apache Spark: TRACKSTAR_SPARK_REMOTE is the only difference to a Sail run."""
    env = dict(os.environ, TRACKSTAR_SPARK_REMOTE=url, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-m", "jobs", *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"jobs {args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def _first_commit_engine(lake: Lake, table: str) -> str:
    first = min(DeltaTable(lake.path(table)).history(), key=lambda commit: commit["version"])
    return first.get("engineInfo") or first.get("clientVersion") or "?"


def _sorted_rows(table: pa.Table, keys: list[str], columns: list[str]) -> list[tuple]:
    rows = table.select(columns).to_pylist()
    return sorted((tuple(r[c] for c in columns) for r in rows), key=lambda r: [r[columns.index(k)] for k in keys])


@pytest.fixture(scope="module")
def lakes(adam_run, tmp_path_factory):
    """Two copies of the trained lake: one for Apache Spark, one for the embedded engine."""
    source, _ = adam_run
    root = tmp_path_factory.mktemp("engines")
    return Lake(copy_lake(source, root / "apache")), Lake(copy_lake(source, root / "sail"))


def test_tokenize_on_apache_spark_equals_sail_and_delta_rs_reads_it(apache_spark, lakes):
    apache, sail = lakes
    out = _job(apache_spark, "tokenize", "--lake", apache.root)
    assert "partition(s)" in out
    tokenize.run(tokenize.TokenizeConfig(lake=sail.root))
    for table, keys in (("documents", ["doc_id"]), ("tokens", ["doc_id", "chunk"])):
        # created and written by Apache Spark alone: its first commit is Spark's CREATE TABLE
        assert _first_commit_engine(apache, table).startswith("Apache-Spark/4.2.0 Delta-Lake/4.4.0")
        columns = [c for c in apache.read(table).column_names if c not in ("run_id", "created_at")]
        rows = _sorted_rows(apache.read(table), keys, columns)
        assert rows and rows == _sorted_rows(sail.read(table), keys, columns)
    assert apache.open("tokens").metadata().partition_columns == ["partition"]
    assert apache.open("tokens").metadata().configuration["trackstar.schema_version"]


def test_score_and_sql_on_apache_spark_over_delta_rs_tables(apache_spark, lakes):
    apache, _ = lakes
    register_queries.run(apache.root)
    # DeepSpeed ranks read the tokens Apache Spark wrote and write train_gradients with delta-rs
    extract.run(extract.ExtractConfig(lake=apache.root, projection_k=4, token_budget=512))
    fit = fit_hessian.run(fit_hessian.FitHessianConfig(lake=apache.root))
    checkpoint = fit["checkpoint_id"]
    _job(apache_spark, "score", "--lake", apache.root, "--methods", "trackstar", "--top-k", "5")
    on_spark = _sorted_rows(
        apache.read("proponents"), ["query_id", "rank"], ["query_id", "rank", "doc_id", "chunk", "score"]
    )
    n_queries = apache.read("queries").num_rows
    assert len(on_spark) == n_queries * 5
    assert _first_commit_engine(apache, "proponents").startswith("Apache-Spark/")
    # the explorer reads what Apache Spark wrote
    ranked = Explorer(apache.root).ranked(checkpoint)["trackstar"]
    assert sum(len(rows) for rows in ranked.values()) == len(on_spark)
    # the embedded engine replaces the same slice of the Spark-created table with the same answer
    score.run(score.ScoreConfig(lake=apache.root, methods=["trackstar"], top_k=5))
    on_sail = _sorted_rows(
        apache.read("proponents"), ["query_id", "rank"], ["query_id", "rank", "doc_id", "chunk", "score"]
    )
    assert [r[:2] for r in on_sail] == [r[:2] for r in on_spark]
    np.testing.assert_allclose([r[4] for r in on_sail], [r[4] for r in on_spark], rtol=1e-5, atol=1e-6)
    # the same chunks, up to the order of exact ties: the world repeats some documents verbatim
    tokens = apache.read("tokens", columns=["doc_id", "chunk", "partition", "input_ids"]).to_pylist()
    text_of = {(r["doc_id"], r["chunk"]): tuple(r["input_ids"]) for r in tokens}
    assert all(text_of[r[2:4]] == text_of[s[2:4]] for r, s in zip(on_sail, on_spark))

    spark = _connect(apache_spark)
    try:
        coverage = run_query(spark, apache, "gradient_coverage").collect()
    finally:
        spark.stop()
    partitions = [r["partition"] for r in tokens]
    vectors = apache.read("train_gradients", columns=["partition", "checkpoint_id"]).to_pylist()
    assert coverage and {(r["checkpoint_id"], r["partition"]): (r["n_chunks"], r["n_vectors"]) for r in coverage} == {
        (c, p): (partitions.count(p), sum(v["partition"] == p and v["checkpoint_id"] == c for v in vectors))
        for c in {v["checkpoint_id"] for v in vectors}
        for p in set(partitions)
    }


def test_apache_spark_and_delta_rs_share_tables_on_s3(apache_spark, s3_bucket):
    """s3:// lake paths through hadoop-aws (s3a) on the moto server, written and read both ways."""
    lake = Lake(f"s3://{s3_bucket}/lake")
    spark = _connect(apache_spark)
    try:
        df = spark.createDataFrame(
            [("a", "queries/a.jsonl", 3), ("b", "queries/b.jsonl", 4)], "query_set string, path string, n_queries int"
        )
        lake.spark_write(
            df.selectExpr("*", "current_timestamp() AS registered_at", "'run-spark' AS run_id"), "query_sets"
        )
        assert _first_commit_engine(lake, "query_sets").startswith("Apache-Spark/")
        assert sorted(lake.read("query_sets")["n_queries"].to_pylist()) == [3, 4]
        lake.append(
            "query_sets",
            pa.table(
                {
                    "query_set": ["c"],
                    "path": ["queries/c.jsonl"],
                    "n_queries": [5],
                    "registered_at": [datetime.datetime.now(datetime.timezone.utc)],
                    "run_id": ["run-delta-rs"],
                }
            ),
        )
        read_back = lake.spark_read(spark, "query_sets").collect()
        assert sorted((r["query_set"], r["n_queries"], r["run_id"]) for r in read_back) == [
            ("a", 3, "run-spark"),
            ("b", 4, "run-spark"),
            ("c", 5, "run-delta-rs"),
        ]
    finally:
        spark.stop()
