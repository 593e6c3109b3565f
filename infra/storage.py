"""Object storage: every file of the lake, as a local path or an s3:// URI.

Locations are plain strings (`join(lake_root, "model", "tokenizer")`), never `pathlib.Path`, which
collapses `s3://b/k` into `s3:/b/k`. Local locations are made absolute (`absolute`), so a path
stored in a table resolves from any working directory. Libraries that only read local folders
(transformers' `from_pretrained`) get one through `local_folder`, a download into the cache.

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


def absolute(uri: str | Path) -> str:
    """The location as it resolves from anywhere: an s3:// URI as is, a local path made absolute."""
    return str(uri).rstrip("/") if is_s3(uri) else str(Path(uri).resolve())


def join(root: str | Path, *parts: str) -> str:
    """root/part/...: "/"-joined for s3://, os-joined for local paths (kept relative if root is)."""
    if is_s3(root):
        return "/".join([str(root).rstrip("/"), *(str(p).strip("/") for p in parts)])
    return str(Path(root, *parts))


def name(uri: str) -> str:
    """The last component: the file or folder name."""
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def exists(uri: str) -> bool:
    """Whether the file (object) exists."""
    if not is_s3(uri):
        return Path(uri).is_file()
    from botocore.exceptions import ClientError

    bucket, key = split_s3_uri(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if _is_missing(error):
            return False
        raise
    return True


def _is_missing(error) -> bool:
    return error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


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
    os.replace(_written_beside(path, data), path)


def create_bytes(uri: str, data: bytes) -> bool:
    """Write an object only where none exists yet (S3: a conditional put; locally: a hard link of
    the finished file, which fails if the name is taken); False when another writer was first."""
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True
    path = Path(uri)
    partial = _written_beside(path, data)
    try:
        os.link(partial, path)
    except FileExistsError:
        return False
    finally:
        partial.unlink()
    return True


def _written_beside(path: Path, data: bytes) -> Path:
    """`data` in a hidden file beside `path` (its folder made), to be moved or linked into place whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    return partial


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as fh:
        return fh.read()


def open_read(uri: str):
    """A binary file object to read from (a streaming body on S3; gzip.open accepts either)."""
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except ClientError as error:
            if _is_missing(error):
                raise FileNotFoundError(f"no object {uri}") from None
            raise
    return open(uri, "rb")


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def upload_file(local_path: str | Path, uri: str) -> str:
    """Copy a local file to `uri` (s3:// or another local path); returns the location."""
    if is_s3(uri):
        bucket, key = split_s3_uri(uri)
        s3_client().upload_file(str(local_path), bucket, key)
    else:
        write_bytes(uri, Path(local_path).read_bytes())
    return uri


def local_folder(uri: str, cache_dir: str | Path) -> Path:
    """A local folder holding the files under `uri`: the folder itself if local, else a fresh
    download of the S3 prefix into its `cache_path` (each file replaced whole)."""
    if not is_s3(uri):
        return Path(uri)
    return download_prefix(uri, cache_path(uri, cache_dir))


def cache_path(s3_uri: str, cache_dir: str | Path) -> Path:
    """The local folder standing for an s3:// location: <cache_dir>/s3/<bucket>/<prefix>."""
    bucket, prefix = split_s3_uri(s3_uri)
    return Path(cache_dir).expanduser() / "s3" / bucket / prefix.strip("/")


def delete(uri: str) -> None:
    """Remove one file (object); a missing one is no error."""
    if is_s3(uri):
        bucket, key = split_s3_uri(uri)
        s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)


def _as_folder(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"
