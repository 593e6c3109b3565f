"""The Spark session every Spark job uses: Spark Connect only (DataFrame API).

With `SPARK_REMOTE` set (e.g. `sc://spark-master:15002`, a Spark 4 cluster with delta-spark), the
session connects there. Otherwise the Sail engine starts in this process on loopback: it reads
and writes Delta natively, starts in about a second and needs no JVM or jar downloads.
"""

from __future__ import annotations

import atexit
import os

_server = None
_session = None


def spark_session():
    """The process-wide session (started on first use, stopped at exit)."""
    global _server, _session
    if _session is not None:
        return _session
    from pyspark.sql import SparkSession

    remote = os.environ.get("SPARK_REMOTE")
    if not remote:
        os.environ.setdefault("RUST_LOG", "warn")  # Sail logs every query at INFO otherwise
        from pysail.spark import SparkConnectServer

        _server = SparkConnectServer(ip="127.0.0.1", port=0)
        _server.start(background=True)
        host, port = _server.listening_address
        remote = f"sc://{host}:{port}"
        atexit.register(stop)
    _session = SparkSession.builder.remote(remote).getOrCreate()
    return _session


def stop():
    global _server, _session
    if _session is not None:
        _session.stop()
        _session = None
    if _server is not None:
        _server.stop()
        _server = None
