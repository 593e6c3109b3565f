"""The Spark session: a Spark Connect endpoint from the config, else the embedded Sail engine.

The one setting that picks the engine is `spark_remote` (TRACKSTAR_SPARK_REMOTE, or SPARK_REMOTE):
unset, the embedded Sail engine runs the jobs; set, e.g. sc://127.0.0.1:15002, an Apache Spark
Connect server with Delta Lake does (infra/deploy/spark-connect.sh starts one).

Sail runs in this process on loopback (no JVM, about a second to start); one server per process,
shared by every `spark_session()` call and stopped at interpreter exit. Sail reads S3 settings from
the standard AWS environment variables (AWS_ENDPOINT_URL, AWS_REGION, keys, AWS_ALLOW_HTTP).
"""

from __future__ import annotations

import atexit
import os
import threading

from pyspark.sql import SparkSession

from infra.config import load_config

_lock = threading.Lock()
_session: SparkSession | None = None
_embedded = False  # whether _session is the embedded Sail engine
ROWS_PER_BATCH = 256
ROWS_PER_ROW_GROUP = 16_384
SESSION_TIMEOUT_SECONDS = 30 * 24 * 3600


def spark_session(remote: str | None = None) -> SparkSession:
    """The process's Spark session, started on first use.

    `remote`, else $SPARK_REMOTE (pyspark's own), else the config's spark_remote names a Spark Connect endpoint;
    without any the embedded Sail engine starts.
    """
    global _session, _embedded
    with _lock:
        if _session is None:
            url = configured_remote(remote)
            _embedded = url is None
            _session = SparkSession.builder.remote(url or _start_sail()).getOrCreate()
        return _session


def is_embedded(spark: SparkSession) -> bool:
    """Whether `spark` is the embedded Sail engine (else an external Spark Connect server)."""
    return _embedded and spark is _session


def configured_remote(remote: str | None = None) -> str | None:
    """The Spark Connect endpoint to use, or None for the embedded engine (no side effects)."""
    return remote or os.environ.get("SPARK_REMOTE") or load_config().spark_remote or None


def _start_sail() -> str:
    """Start the embedded Sail server on loopback; its sc:// URL."""
    # Sail logs every session at INFO through env_logger; it reads RUST_LOG when the server starts.
    os.environ.setdefault("RUST_LOG", "error")
    # The server lives as long as this process, and so must its session: Sail drops a session idle
    # for 900 s by default, and a long-lived process (a bench, the explorer) then fails with
    # "session ... is not running" on its next query.
    os.environ.setdefault("SAIL_SPARK__SESSION_TIMEOUT_SECS", str(SESSION_TIMEOUT_SECONDS))
    # Rows per batch inside the engine. Our rows are vectors of kilobytes (17 KB in float32 at 4,352
    # dims, 262 KB at 2^16): at Sail's default (8,192 rows a batch) scoring 16x the embedded corpus
    # peaked at 3.0 GB against 1.7 GB at 1x; at 256 rows, 1.42 GB against 1.37 GB, and no slower.
    os.environ.setdefault("SAIL_EXECUTION__BATCH_SIZE", str(ROWS_PER_BATCH))
    # Rows per Parquet row group the engine writes, held in memory until written: at Sail's default
    # (1,048,576) one row group was a whole C4-sized partition of documents or tokens, and tokenize
    # peaked at 4.2 GB against 0.93 GB for a tenth of it. 16,384 rows of ~2.5 KB texts: ~40 MB.
    os.environ.setdefault("SAIL_PARQUET__MAX_ROW_GROUP_SIZE", str(ROWS_PER_ROW_GROUP))
    from pysail.spark import SparkConnectServer

    server = SparkConnectServer(ip="127.0.0.1", port=0)
    server.start(background=True)
    atexit.register(_stop, server)
    host, port = server.listening_address
    return f"sc://{host}:{port}"


def _stop(server) -> None:
    # Close the client first: a client outliving its server retries and warns at exit.
    global _session
    if _session is not None:
        _session.stop()
        _session = None
    server.stop()
