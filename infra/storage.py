"""Object storage: local paths or s3:// URIs, configured by the standard AWS environment.

Variables read: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (any S3-compatible server), AWS_REGION or
AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ALLOW_HTTP.
boto3 reads them itself; delta-rs gets them as storage options (`delta_storage_options`).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith(("s3://", "s3a://"))


def split_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key prefix) of s3://bucket/prefix."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri}")
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def allow_http() -> bool:
    """Plain HTTP only when asked for, or towards a loopback endpoint (a test server)."""
    if os.environ.get("AWS_ALLOW_HTTP"):
        return os.environ["AWS_ALLOW_HTTP"].lower() in ("1", "true", "yes")
    endpoint = endpoint_url()
    return bool(endpoint) and urlparse(endpoint).hostname in _LOOPBACK_HOSTS


def delta_storage_options() -> dict[str, str]:
    """delta-rs storage options from the AWS environment (empty keys are left to its defaults)."""
    options = {name: os.environ[name] for name in _CREDENTIAL_VARIABLES if os.environ.get(name)}
    if endpoint_url():
        options["AWS_ENDPOINT_URL"] = endpoint_url()
    if region():
        options["AWS_REGION"] = region()
    if allow_http():
        options["AWS_ALLOW_HTTP"] = "true"
    return options


def s3_client():
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url(), region_name=region())


def list_objects(uri: str, suffix: str | None = None) -> list[str]:
    """Full s3:// URIs (or local file paths) under `uri`, sorted, optionally ending in `suffix`."""
    if not is_s3(uri):
        files = (str(p) for p in Path(uri).rglob("*") if p.is_file())
    else:
        bucket, prefix = split_s3_uri(uri)
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=_as_folder(prefix))
        files = (f"s3://{bucket}/{item['Key']}" for page in pages for item in page.get("Contents", []))
    return sorted(f for f in files if suffix is None or f.endswith(suffix))


def download_prefix(s3_uri: str, local_dir: str | Path) -> Path:
    """Copy every object under s3_uri into local_dir, keeping relative paths (e.g. a checkpoint)."""
    bucket, prefix = split_s3_uri(s3_uri)
    prefix, local_dir, client = _as_folder(prefix), Path(local_dir), s3_client()
    keys = [uri.removeprefix(f"s3://{bucket}/") for uri in list_objects(s3_uri)]
    if not keys:
        raise FileNotFoundError(f"nothing under {s3_uri}")
    for key in keys:
        target = local_dir / key.removeprefix(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
    return local_dir


def upload_dir(local_dir: str | Path, s3_uri: str) -> list[str]:
    """Upload every file under local_dir to s3_uri, keeping relative paths; returns the URIs."""
    bucket, prefix = split_s3_uri(s3_uri)
    local_dir, client = Path(local_dir), s3_client()
    uploaded = []
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        key = _as_folder(prefix) + path.relative_to(local_dir).as_posix()
        client.upload_file(str(path), bucket, key)
        uploaded.append(f"s3://{bucket}/{key}")
    return uploaded


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; local files are replaced atomically (no torn file after a crash)."""
    if is_s3(uri):
        bucket, key = split_s3_uri(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3_uri(uri)
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(uri).read_bytes()


def _as_folder(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"
