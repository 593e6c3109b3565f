"""Shared fixtures: a real S3-compatible server (moto) on loopback, the embedded Spark engine, a lake."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import uuid
from pathlib import Path

import pytest

from infra.lake import Lake

# pytest's `pythonpath = .` reaches this process only; child processes (Airflow, DeepSpeed ranks)
# find the project through PYTHONPATH where it is not installed (`make install` installs it).
REPO_ROOT = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "test-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret",
    "AWS_REGION": "us-east-1",
    "AWS_ALLOW_HTTP": "true",
}


def _serve_s3(address_pipe) -> None:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    address_pipe.send(server.get_host_and_port())
    threading.Event().wait()  # serve until the test session terminates this process


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server with the AWS environment pointing at it (restored after).

    The server runs in its own process: some delta-rs calls hold the GIL while they wait for the
    HTTP answer, so a server thread in the test process would never get to answer (deadlock).
    """
    receiver, sender = multiprocessing.get_context("spawn").Pipe(duplex=False)
    server = multiprocessing.get_context("spawn").Process(target=_serve_s3, args=(sender,), daemon=True)
    server.start()
    if not receiver.poll(60):
        server.kill()
        raise RuntimeError("moto S3 server did not start within 60 s")
    host, port = receiver.recv()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            env.setenv(name, value)
        env.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        yield endpoint
    server.kill()
    server.join()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the test server."""
    from infra.storage import s3_client

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    """Local copies of s3:// checkpoints go to a temporary folder, not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as env:
        folder = tmp_path_factory.mktemp("cache")
        env.setenv("TRACKSTAR_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def spark():
    from infra.spark import spark_session

    return spark_session()


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(tmp_path / "lake")


# the session's trained lakes: a test that needs one (directly or through another fixture) is slow
TRAINED_LAKES = {"adam_run", "adafactor_run"}


def pytest_collection_modifyitems(items):
    """Marks every test that needs a trained lake `slow`, so `make test-fast` (-m "not slow") is the
    unit tier: the kernels, schemas, configs and one-table checks, without DeepSpeed training."""
    for item in items:
        if TRAINED_LAKES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
