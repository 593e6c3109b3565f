"""The storage layer every lake file goes through: the same calls on a local folder and on S3."""

import gzip
from pathlib import Path

import pytest

from infra import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "lake")
    return f"s3://{request.getfixturevalue('s3_bucket')}/lake"


def test_join_keeps_s3_uris_whole_and_absolute_resolves_local_paths(tmp_path, monkeypatch):
    assert storage.join("s3://b/lake/", "model", "tokenizer") == "s3://b/lake/model/tokenizer"
    assert str(Path("s3://b/lake") / "model") == "s3:/b/lake/model"  # what pathlib would have stored
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("lake") == str(tmp_path / "lake") and storage.absolute("s3://b/lake/") == "s3://b/lake"
    assert storage.name("s3://b/lake/raw/c4-train.00000-of-00002.json.gz") == "c4-train.00000-of-00002.json.gz"


def test_files_round_trip_list_and_delete(root, tmp_path):
    plan, partition = (
        storage.join(root, "_plans", "run-1.json"),
        storage.join(root, "raw", "c4-train.00000-of-00001.json.gz"),
    )
    assert not storage.exists(plan)
    storage.write_text(plan, '{"items": []}')
    storage.write_bytes(partition, gzip.compress(b'{"text": "a"}\n'))
    assert storage.exists(plan) and storage.read_text(plan) == '{"items": []}'
    with storage.open_read(partition) as stored, gzip.open(stored) as fh:  # streamed, as tokenize reads it
        assert fh.read() == b'{"text": "a"}\n'
    assert storage.list_objects(root, suffix=".json") == [plan]
    storage.delete(plan)
    storage.delete(plan)  # already gone: no error
    assert storage.list_objects(root) == [partition]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(plan)


def test_create_writes_only_where_nothing_is(root):
    """Two extractions estimating one checkpoint's second moments at once: the first record stays."""
    record = storage.join(root, "_second_moments", "c", "sample-512.json")
    assert storage.create_bytes(record, b"first")
    assert not storage.create_bytes(record, b"second")
    assert storage.read_bytes(record) == b"first"
    assert storage.list_objects(root) == [record]  # no partial file left behind


def test_a_folder_on_s3_is_copied_into_the_cache_for_local_readers(root, tmp_path):
    storage.write_text(storage.join(root, "checkpoints", "c1", "config.json"), "{}")
    storage.write_text(storage.join(root, "checkpoints", "c1", "zero", "latest"), "step6")
    local = storage.local_folder(storage.join(root, "checkpoints", "c1"), tmp_path / "cache")
    assert (local / "config.json").read_text() == "{}" and (local / "zero" / "latest").read_text() == "step6"
    if storage.is_s3(root):
        assert local == storage.cache_path(storage.join(root, "checkpoints", "c1"), tmp_path / "cache")
        assert local.is_relative_to(tmp_path / "cache")
    else:
        assert local == Path(root) / "checkpoints" / "c1"  # a local folder is used where it is
