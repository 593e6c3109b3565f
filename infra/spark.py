"""The Spark session: a Spark Connect endpoint from SPARK_REMOTE, else the embedded Sail engine.

Sail runs in this process on loopback (no JVM, about a second to start); one server per process,
shared by every `spark_session()` call and stopped at interpreter exit. Sail reads S3 settings from
the standard AWS environment variables (AWS_ENDPOINT_URL, AWS_REGION, keys, AWS_ALLOW_HTTP).
"""

from __future__ import annotations

import atexit
import os
import threading

from pyspark.sql import SparkSession

_lock = threading.Lock()
_session: SparkSession | None = None


def spark_session(remote: str | None = None) -> SparkSession:
    """The process's Spark session, started on first use.

    `remote`, else $SPARK_REMOTE, else the configured `spark_remote` names a Spark Connect
    endpoint; without any the embedded Sail engine starts.
    """
    global _session
    with _lock:
        if _session is None:
            _session = SparkSession.builder.remote(_remote_url(remote)).getOrCreate()
        return _session


def _remote_url(remote: str | None) -> str:
    from infra.config import load_config

    remote = remote or os.environ.get("SPARK_REMOTE") or load_config().spark_remote
    if remote:
        return remote
    # Sail logs every session at INFO through env_logger; it reads RUST_LOG when the server starts.
    os.environ.setdefault("RUST_LOG", "error")
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
