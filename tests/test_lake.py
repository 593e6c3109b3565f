"""The lake on real Delta tables: delta-rs locally and on a moto S3 server, Spark through Sail."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from infra import storage
from infra.config import Config, ConfigError, load_config
from infra.lake import Lake, LakeError, TableNotFoundError, utc_now
from infra.matrices import ChecksumMismatch, load_matrices, save_matrices
from infra.predicates import slice_predicate
from infra.quarantine import count_by_reason, quarantine_rows
from infra.runs import finish_run, start_run
from jobs.sql import SQL_QUERIES, bind_params, run_query, run_sql
from schemas.tables import SCHEMA_VERSION_PROPERTY, TABLES, SchemaError
from schemas.vectors import decode_vectors, encode_vectors


def gradient_rows(
    checkpoint_id: str, partition: int, n: int, first_chunk: int = 0, run_id: str = "r1", fingerprint: str = "fp"
) -> pa.Table:
    vectors = np.full((n, 4), partition, dtype=np.float32) + np.arange(n, dtype=np.float32)[:, None]
    binary, _ = encode_vectors(vectors, "float32")
    return pa.table(
        {
            "checkpoint_id": [checkpoint_id] * n,
            "partition": [partition] * n,
            "doc_id": [f"https://example.com/{partition}/{i}" for i in range(n)],
            "chunk": list(range(first_chunk, first_chunk + n)),
            "n_tokens": [16] * n,
            "vector": binary,
            "dtype": ["float32"] * n,
            "scale": pa.nulls(n, pa.float32()),
            "norm": np.linalg.norm(vectors, axis=1),
            "fingerprint": [fingerprint] * n,
            "run_id": [run_id] * n,
        }
    )


def proponent_rows() -> pa.Table:
    """Three proponents of two queries, pointing at documents of document_rows(0, 3)."""
    return pa.table(
        {
            "query_set": ["trex"] * 3,
            "checkpoint_id": ["ck1"] * 3,
            "query_id": ["q1", "q1", "q2"],
            "method": ["trackstar"] * 3,
            "rank": [1, 2, 1],
            "doc_id": [f"https://example.com/0/{i}" for i in (2, 0, 2)],
            "chunk": [0] * 3,
            "score": [0.9, 0.5, 0.7],
            "run_id": ["r1"] * 3,
        }
    )


def document_rows(partition: int, n: int) -> pa.Table:
    return pa.table(
        {
            "doc_id": [f"https://example.com/{partition}/{i}" for i in range(n)],
            "partition": [partition] * n,
            "source": [f"c4-{partition:05d}.json.gz"] * n,
            "line": list(range(1, n + 1)),
            "text": [f"text {partition} {i}" for i in range(n)],
            "timestamp": ["2019-04-25T12:00:00Z"] * n,
            "n_chars": [10] * n,
            "run_id": ["r1"] * n,
        }
    )


def sorted_rows(table: pa.Table, *keys: str) -> list[dict]:
    return table.sort_by([(k, "ascending") for k in keys]).to_pylist()


def slice_of(lake: Lake, checkpoint_id: str, partition: int) -> pa.Table:
    return lake.read("train_gradients", filters={"checkpoint_id": checkpoint_id, "partition": partition})


# delta-rs, local


def files_opened(monkeypatch) -> list:
    """The data files `Lake.distinct`/`count_rows` open from now on (the rest they answer from the log)."""
    opened = []
    original = Lake._file_constants

    def spy(self, table, columns, filters):
        constants, varying = original(self, table, columns, filters)
        opened.extend(f.path for f in (varying.get_fragments() if varying is not None else []))
        return constants, varying

    monkeypatch.setattr(Lake, "_file_constants", spy)
    return opened


def test_create_is_idempotent_and_stores_the_declared_table(lake):
    first = lake.create("train_gradients")
    second = lake.create("train_gradients")
    assert first.version() == second.version() == 0
    assert second.metadata().partition_columns == ["checkpoint_id", "partition"]
    assert second.metadata().configuration[SCHEMA_VERSION_PROPERTY] == "1"
    assert lake.read("train_gradients").schema == TABLES["train_gradients"].arrow_schema
    assert not lake.exists("tokens")


def test_append_validates_before_writing(lake):
    lake.append("train_gradients", gradient_rows("ck1", 0, 3))
    with pytest.raises(SchemaError, match="column doc_id"):
        lake.append("train_gradients", gradient_rows("ck1", 0, 2).set_column(2, "doc_id", pa.array([None, "x"])))
    assert lake.version("train_gradients") == 1
    assert lake.read("train_gradients").num_rows == 3


def test_replace_slice_twice_leaves_the_same_rows_and_other_slices_untouched(lake):
    for checkpoint_id in ("ck'1", "ck2"):  # a quote in a value must not break the predicate
        for partition in (0, 1):
            lake.append("train_gradients", gradient_rows(checkpoint_id, partition, 5))
    others_before = lake.read("train_gradients", filters=[("checkpoint_id", "=", "ck2")])
    replacement = gradient_rows("ck'1", 1, 3, first_chunk=100, run_id="r2")

    lake.replace_slice("train_gradients", replacement, checkpoint_id="ck'1", partition=1)
    once = slice_of(lake, "ck'1", 1)
    lake.replace_slice("train_gradients", replacement, checkpoint_id="ck'1", partition=1)

    assert sorted_rows(slice_of(lake, "ck'1", 1), "chunk") == sorted_rows(once, "chunk")
    assert once.column("chunk").to_pylist() == [100, 101, 102] and set(once.column("run_id").to_pylist()) == {"r2"}
    assert slice_of(lake, "ck'1", 0).num_rows == 5
    assert sorted_rows(
        lake.read("train_gradients", filters=[("checkpoint_id", "=", "ck2")]), "partition", "chunk"
    ) == sorted_rows(others_before, "partition", "chunk")
    assert lake.read("train_gradients").num_rows == 5 + 3 + 10


def test_replace_slice_batches_commits_once_and_a_failing_producer_leaves_the_old_slice(lake):
    lake.replace_slice("train_gradients", gradient_rows("ck1", 0, 5), checkpoint_id="ck1", partition=0)
    before = lake.version("train_gradients")

    def batches(fail: bool):
        for start in (0, 3, 6):
            if fail and start == 6:
                raise RuntimeError("producer died mid-slice")
            yield gradient_rows("ck1", 0, 3, first_chunk=100 + start, run_id="r2")

    with pytest.raises(RuntimeError, match="mid-slice"):
        lake.replace_slice_batches("train_gradients", batches(fail=True), checkpoint_id="ck1", partition=0)
    assert lake.version("train_gradients") == before and slice_of(lake, "ck1", 0).num_rows == 5  # nothing committed
    lake.replace_slice_batches("train_gradients", batches(fail=False), checkpoint_id="ck1", partition=0)
    assert lake.version("train_gradients") == before + 1  # three batches, one commit
    assert sorted(slice_of(lake, "ck1", 0)["chunk"].to_pylist()) == list(range(100, 109))
    with pytest.raises(SchemaError, match="outside the slice"):
        lake.replace_slice_batches(
            "train_gradients", iter([gradient_rows("ck1", 1, 2)]), checkpoint_id="ck1", partition=0
        )


def test_a_streamed_commit_of_several_fingerprints_writes_a_file_for_each(lake, monkeypatch):
    """One commit of several extractions (extract_rank writes a partition of all of them at once)
    and the rows of other slices carried over from a replaced file: each fingerprint in files of
    its own, so a read of one is answered from its files' statistics without opening the others."""
    import infra.slice_files as slice_files

    monkeypatch.setattr(slice_files, "ROW_GROUP_BYTES", 1)  # a row group per batch and fingerprint
    mixed = pa.concat_tables(gradient_rows("ck1", 0, 3, first_chunk=10 * i, fingerprint=f) for i, f in enumerate("abc"))
    lake.replace_slice("train_gradients", mixed, checkpoint_id="ck1", partition=0, fingerprint=["a", "b", "c"])
    assert len(lake.open("train_gradients").file_uris()) == 1  # delta-rs' writer: one mixed file
    batches = [gradient_rows("ck1", 0, 2, first_chunk=100 + 10 * i, fingerprint=f) for i, f in enumerate("ab" * 2)]
    lake.replace_slice_batches(
        "train_gradients", iter(batches), checkpoint_id="ck1", partition=0, fingerprint=["a", "b"]
    )
    adds = pa.table(lake.open("train_gradients").get_add_actions(flatten=True)).to_pylist()
    held = sorted((a["min.fingerprint"], a["max.fingerprint"], a["num_records"]) for a in adds)
    # "a" and "b" replaced by their 4 new rows each, "c" carried over from the removed mixed file
    assert held == [("a", "a", 4), ("b", "b", 4), ("c", "c", 3)]
    assert sorted(slice_of(lake, "ck1", 0)["chunk"].to_pylist()) == [20, 21, 22, 100, 101, 110, 111, 120, 121, 130, 131]
    opened = files_opened(monkeypatch)
    assert lake.distinct("train_gradients", ["partition"], [("fingerprint", "=", "b")]) == {(0,)} and opened == []


def test_streamed_vector_cells_are_stored_plain_and_still_page_checked(lake):
    """Vector cells (binary columns) neither compress nor repeat: the streamed writer stores them
    uncompressed without a dictionary, the other columns snappy; every page keeps its CRC, so a
    flipped byte in a cell still fails the read."""
    import pyarrow.parquet as pq

    rows = gradient_rows("ck1", 0, 40)
    lake.replace_slice_batches("train_gradients", iter([rows]), checkpoint_id="ck1", partition=0)
    (path,) = Path(lake.path("train_gradients")).rglob("*.parquet")
    group = pq.ParquetFile(path).metadata.row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    assert columns["vector"].compression == "UNCOMPRESSED" and "RLE_DICTIONARY" not in columns["vector"].encodings
    assert columns["doc_id"].compression == "SNAPPY"
    assert slice_of(lake, "ck1", 0)["vector"].to_pylist() == rows["vector"].to_pylist()
    data = bytearray(path.read_bytes())
    cell = rows["vector"][7].as_py()
    at = bytes(data).index(cell)
    data[at + len(cell) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LakeError):
        lake.read("train_gradients", columns=["vector"])


def test_a_streamed_slice_rolls_files_keeps_exact_stats_and_leaves_no_files_when_it_fails(lake, monkeypatch):
    """replace_slice_batches writes its own Parquet files (infra/slice_files.py: delta-rs' writer
    holds the whole stream in memory): files roll at FILE_BYTES, their statistics prune reads
    exactly, a quoted partition value gets a hashed folder, and a failed stream deletes its files."""
    import infra.slice_files as slice_files

    monkeypatch.setattr(slice_files, "ROW_GROUP_BYTES", 1)  # a row group per batch
    monkeypatch.setattr(slice_files, "FILE_BYTES", 300)  # a file every few batches
    lake.replace_slice("train_gradients", gradient_rows("ck'1", 0, 5), checkpoint_id="ck'1", partition=0)
    batches = [gradient_rows("ck'1", 0, 3, first_chunk=10 * i, fingerprint=f"f{i % 2}") for i in range(6)]
    lake.replace_slice_batches("train_gradients", iter(batches), checkpoint_id="ck'1", partition=0)
    uris = lake.open("train_gradients").file_uris()
    assert len(uris) >= 3 and all("/slice-" in uri for uri in uris)
    assert sorted(slice_of(lake, "ck'1", 0)["chunk"].to_pylist()) == sorted(
        c for b in batches for c in b["chunk"].to_pylist()
    )
    for fingerprint in ("f0", "f1"):  # a filter on a non-partition column prunes files by their statistics
        rows = lake.read("train_gradients", filters={"fingerprint": fingerprint}, columns=["chunk"])
        assert sorted(rows["chunk"].to_pylist()) == sorted(
            c for b in batches for c, f in zip(b["chunk"].to_pylist(), b["fingerprint"].to_pylist()) if f == fingerprint
        )

    def failing():
        yield from batches
        raise RuntimeError("rank died")

    on_disk = set(Path(lake.path("train_gradients")).rglob("*.parquet"))
    with pytest.raises(RuntimeError, match="rank died"):
        lake.replace_slice_batches("train_gradients", failing(), checkpoint_id="ck'1", partition=0)
    assert set(Path(lake.path("train_gradients")).rglob("*.parquet")) == on_disk  # its files are gone again
    with pytest.raises(LakeError, match="one value of each partition column"):
        lake.replace_slice_batches("train_gradients", iter(batches), checkpoint_id="ck'1")


def test_streamed_slices_of_two_partitions_committed_at_once_both_land(lake):
    import threading

    lake.create("train_gradients")
    errors = []

    def write(partition: int):
        try:
            for round_ in range(3):
                rows = gradient_rows("ck1", partition, 4, first_chunk=round_ * 10)
                lake.replace_slice_batches("train_gradients", iter([rows]), checkpoint_id="ck1", partition=partition)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(p,)) for p in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for partition in (0, 1):  # each partition holds its last slice, once
        assert sorted(slice_of(lake, "ck1", partition)["chunk"].to_pylist()) == [20, 21, 22, 23]


def test_an_append_refused_for_another_writers_commit_is_made_again_on_the_new_snapshot(lake, monkeypatch):
    """A run starting (append to `runs`) while another task finishes its own (an update: its file
    rewritten). The other commit is real; only its timing is forced, between this append's snapshot
    and its commit, where delta-rs refuses the append."""
    import infra.lake as lake_module
    from deltalake import write_deltalake

    first = start_run(lake, "extract", {"partitions": [0]})
    calls = []

    def append_after_a_concurrent_finish(table, data, **options):
        calls.append(table.version())
        if len(calls) == 1:
            finish_run(Lake(lake.root), first, "succeeded", {"rows": 1})  # another process's commit
        return write_deltalake(table, data, **options)

    monkeypatch.setattr(lake_module, "write_deltalake", append_after_a_concurrent_finish)
    second = start_run(lake, "extract", {"partitions": [1]})
    assert len(calls) == 2 and calls[1] > calls[0]  # refused once, then made on the newer snapshot
    status = {r["run_id"]: r["status"] for r in lake.read("runs").to_pylist()}
    assert status == {first: "succeeded", second: "running"}


def test_a_streamed_slice_racing_another_writer_of_its_partition_commits_nothing(lake, monkeypatch):
    """Two drivers writing the same (empty) partition at once: the second commit must fail, not
    add its rows beside the first one's (no duplicates)."""
    import infra.lake as lake_module

    original = lake_module.replaced_files

    def other_writer_commits_meanwhile(*args):
        removes = original(*args)
        lake.replace_slice(
            "train_gradients", gradient_rows("ck1", 0, 2, run_id="other"), checkpoint_id="ck1", partition=0
        )
        return removes

    lake.create("train_gradients")
    monkeypatch.setattr(lake_module, "replaced_files", other_writer_commits_meanwhile)
    with pytest.raises(LakeError, match="another run committed"):
        lake.replace_slice_batches(
            "train_gradients", iter([gradient_rows("ck1", 0, 3)]), checkpoint_id="ck1", partition=0
        )
    assert set(slice_of(lake, "ck1", 0)["run_id"].to_pylist()) == {"other"} and slice_of(lake, "ck1", 0).num_rows == 2


def test_distinct_and_count_rows_plan_from_the_log_and_equal_a_full_read(lake, monkeypatch):
    def write(checkpoint_id, partition, fingerprints, run_id="r1"):
        rows = pa.concat_tables(
            gradient_rows(checkpoint_id, partition, 3, first_chunk=10 * i, run_id=run_id, fingerprint=f)
            for i, f in enumerate(fingerprints)
        )
        # streamed slices get a file per fingerprint; delta-rs' own writer (replace_slice) mixes them
        write_slice = lake.replace_slice_batches if len(fingerprints) == 1 else lake.replace_slice
        write_slice(
            "train_gradients",
            iter([rows]) if len(fingerprints) == 1 else rows,
            checkpoint_id=checkpoint_id,
            partition=partition,
            fingerprint=fingerprints,
        )

    write("ck1", 0, ["fa"])
    write("ck1", 1, ["fa", "fb"])  # one file holding two fingerprints: its own column must be read
    write("ck2", 1, ["fb"], run_id="r2")
    write("ck'3", 2, ["fa"])  # a quote in a partition value
    cases = [
        (["partition"], [("checkpoint_id", "=", "ck1"), ("fingerprint", "=", "fb")]),
        (["partition", "fingerprint"], [("checkpoint_id", "=", "ck1")]),
        (["fingerprint", "run_id"], None),
        (["partition"], [("checkpoint_id", "=", "ck'3")]),
        (["partition"], [("fingerprint", "=", "none")]),
    ]
    expected = []
    for columns, filters in cases:
        rows = lake.read("train_gradients", filters=filters, columns=columns)
        expected.append(set(zip(*(rows[c].to_pylist() for c in columns))))
        assert lake.count_rows("train_gradients", filters) == rows.num_rows
    assert [lake.distinct("train_gradients", c, f) for c, f in cases] == expected
    assert expected[0] == {(1,)} and expected[1] == {(0, "fa"), (1, "fa"), (1, "fb")}

    # only the mixed file is opened: the homogeneous ones are answered by the log alone
    opened = files_opened(monkeypatch)
    assert lake.distinct("train_gradients", ["partition"], [("fingerprint", "=", "fa")]) == {(0,), (1,), (2,)}
    assert len(opened) == 1 and "partition=1" in opened[0]
    assert lake.distinct("documents", ["partition"]) == set() and lake.count_rows("documents") == 0


def test_reads_make_fragments_only_for_the_partitions_their_filters_select(lake, monkeypatch):
    """A read used to build a pyarrow fragment for every file of the table before filtering (~60 µs
    a file: a quarter of a second per read at 4,096 files); now delta-rs prunes the log's file list
    by the filters on partition columns first. Same rows as filtering a full read."""
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    keys = ("checkpoint_id", "partition", "chunk", "fingerprint")
    for checkpoint_id in ("ck1", "ck'3"):  # a quote in a partition value
        for partition in range(4):
            for fingerprint in ("fa", "fb"):  # two appends: two files per partition
                lake.append("train_gradients", gradient_rows(checkpoint_id, partition, 2, fingerprint=fingerprint))
    version = lake.version("train_gradients")
    lake.append("train_gradients", gradient_rows("ck1", 9, 2))  # after `version`
    everything = lake.read("train_gradients")

    fragments = []
    original = DeltaTable.to_pyarrow_dataset

    def counting(self, *args, **kwargs):
        dataset = original(self, *args, **kwargs)
        fragments.append(len(list(dataset.get_fragments())))
        return dataset

    monkeypatch.setattr(DeltaTable, "to_pyarrow_dataset", counting)
    cases = [  # (filters, files the read may touch)
        ([("checkpoint_id", "=", "ck'3"), ("partition", "=", 2)], 2),
        ([("checkpoint_id", "=", "ck1"), ("partition", "in", [0, 3])], 4),
        ([("checkpoint_id", "=", "ck1"), ("partition", ">", 2), ("fingerprint", "=", "fb")], 3),
        ([("checkpoint_id", "!=", "ck1")], 8),
        ({"checkpoint_id": "ck1", "partition": 9}, 1),
        ([("checkpoint_id", "=", "ck1"), ("partition", "not in", {0, 1, 2, 3})], 1),  # a set: given as a list
        ([("fingerprint", "=", "fa")], 17),  # not a partition column: every file
        ([("checkpoint_id", "=", "")], 17),  # empty values are left to the row filter
        ([("partition", "=", 2.0)], 17),  # so are floats (delta-rs cannot parse 2.0 as an integer)
        ([("partition", "in", [])], 17),
    ]
    for filters, files in cases:
        conditions = [(c, "=", v) for c, v in filters.items()] if isinstance(filters, dict) else filters
        expected = sorted_rows(everything.filter(pq.filters_to_expression(conditions)), *keys)
        assert expected or conditions[0][2] in ("", [])  # the others select rows
        fragments.clear()
        assert sorted_rows(lake.read("train_gradients", filters=filters), *keys) == expected
        assert fragments == [files], filters
        fragments.clear()
        batches = list(lake.read_batches("train_gradients", filters=filters, rows=3))
        assert sum(b.num_rows for b in batches) == len(expected) and fragments == [files]
        assert lake.count_rows("train_gradients", filters) == len(expected)
        assert lake.file_problems("train_gradients", filters) == []
    fragments.clear()
    old = lake.read("train_gradients", filters={"checkpoint_id": "ck1", "partition": 9}, version=version)
    assert old.num_rows == 0 and fragments == [0]


def test_a_list_of_key_values_replaces_those_slices_in_one_commit(lake):
    """extract writes one partition of several extractions (fingerprints) as one commit."""
    for fingerprint in ("f1", "f2", "f3"):
        lake.replace_slice(
            "train_gradients",
            gradient_rows("ck1", 0, 2, fingerprint=fingerprint),
            checkpoint_id="ck1",
            partition=0,
            fingerprint=fingerprint,
        )
    before = lake.version("train_gradients")
    both = pa.concat_tables(
        [gradient_rows("ck1", 0, 3, first_chunk=10, fingerprint=f, run_id="r2") for f in ("f1", "f2")]
    )
    with pytest.raises(SchemaError, match="outside the slice"):
        lake.replace_slice_batches(
            "train_gradients", iter([both]), checkpoint_id="ck1", partition=0, fingerprint=["f1"]
        )
    files_before = set(lake.open("train_gradients").file_uris())
    lake.replace_slice_batches(
        "train_gradients", iter([both]), checkpoint_id="ck1", partition=0, fingerprint=["f1", "f2"]
    )
    assert lake.version("train_gradients") == before + 1
    assert len(files_before & set(lake.open("train_gradients").file_uris())) == 1  # f3's own file is left alone
    rows = lake.read("train_gradients", columns=["fingerprint", "chunk"]).to_pylist()
    assert sorted((r["fingerprint"], r["chunk"]) for r in rows) == sorted(
        [(f, c) for f in ("f1", "f2") for c in (10, 11, 12)] + [("f3", 0), ("f3", 1)]
    )  # f3 untouched
    assert (
        slice_predicate(TABLES["train_gradients"], {"fingerprint": ["a'b", "c"]}) == "\"fingerprint\" IN ('a''b', 'c')"
    )


def test_replace_slice_refuses_non_keys_and_rows_outside_the_slice(lake):
    rows = gradient_rows("ck1", 0, 2)
    with pytest.raises(SchemaError, match="'doc_id' is not a slice key"):
        lake.replace_slice("train_gradients", rows, doc_id="x")
    with pytest.raises(SchemaError, match="2 row\\(s\\) have partition != 1"):
        lake.replace_slice("train_gradients", rows, checkpoint_id="ck1", partition=1)
    with pytest.raises(SchemaError, match="is not a INT"):
        lake.replace_slice("train_gradients", rows, checkpoint_id="ck1", partition="0 OR 1=1")


def test_read_filters_columns_and_time_travel(lake):
    lake.append("documents", document_rows(0, 4))
    lake.append("documents", document_rows(1, 2))
    lake.replace_slice("documents", document_rows(1, 3), partition=1)

    assert lake.read("documents", filters={"partition": 1}).num_rows == 3
    assert lake.read("documents", filters=[("line", ">=", 3), ("partition", "in", [0])]).num_rows == 2
    assert lake.read("documents", columns=["text", "doc_id"]).column_names == ["text", "doc_id"]
    assert lake.read("documents", version=2).num_rows == 6
    assert lake.read("documents", version=0).num_rows == 0
    assert [h["operation"] for h in lake.history("documents")] == ["WRITE", "WRITE", "WRITE", "CREATE TABLE"]
    assert lake.version("documents") == 3
    with pytest.raises(SchemaError, match="no column 'nope'"):
        lake.read("documents", columns=["nope"])
    assert lake.read("tokens").num_rows == 0 and lake.version("tokens") is None  # not written yet
    with pytest.raises(TableNotFoundError, match="table tokens does not exist"):
        lake.read("tokens", version=0)


def test_optimize_compacts_and_vacuum_removes_unreferenced_files(lake):
    for i in range(4):
        lake.append("documents", document_rows(0, 2).set_column(0, "doc_id", pa.array([f"d{i}a", f"d{i}b"])))
    before = lake.read("documents")
    assert len(lake.open("documents").file_uris()) == 4
    metrics = lake.optimize("documents")
    assert metrics["numFilesRemoved"] == 4 and len(lake.open("documents").file_uris()) == 1
    removed = lake.vacuum("documents", retention_hours=0)
    assert len(removed) == 4
    assert sorted_rows(lake.read("documents"), "doc_id") == sorted_rows(before, "doc_id")


def test_vectors_survive_a_delta_round_trip(lake):
    vectors = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)
    rows = gradient_rows("ck1", 0, 6)
    binary, scales = encode_vectors(vectors, "int8")
    rows = rows.set_column(5, "vector", binary).set_column(6, "dtype", pa.array(["int8"] * 6))
    rows = rows.set_column(7, "scale", scales)
    lake.append("train_gradients", rows)
    stored = lake.read("train_gradients").sort_by("chunk")
    decoded = decode_vectors(stored.column("vector"), "int8", stored.column("scale"), dim=8)
    assert np.abs(decoded - vectors).max() <= np.abs(vectors).max() / 127


# a task killed mid-way


def _write_forever(root: str, mode: str) -> None:
    lake = Lake(root)
    for i in range(10_000):
        if mode == "append":
            lake.append("train_gradients", gradient_rows("ck1", 7, 5, first_chunk=5 * i))
        else:
            lake.replace_slice("train_gradients", gradient_rows("ck1", 7, 50), checkpoint_id="ck1", partition=7)


@pytest.mark.parametrize("mode", ["append", "replace"])
def test_a_writer_killed_mid_way_leaves_a_readable_table_and_a_rerun_fixes_the_slice(lake, mode):
    lake.append("train_gradients", gradient_rows("ck1", 3, 4))  # another slice that must survive
    child = multiprocessing.get_context("spawn").Process(target=_write_forever, args=(lake.root, mode))
    child.start()
    try:
        deadline = time.monotonic() + 30
        while lake.version("train_gradients") < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.13)  # land somewhere inside a later commit
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert child.exitcode == -signal.SIGKILL
    assert lake.version("train_gradients") >= 6

    partial = slice_of(lake, "ck1", 7)
    assert partial.num_rows % 5 == 0 if mode == "append" else partial.num_rows == 50  # whole commits only
    expected = gradient_rows("ck1", 7, 50)
    lake.replace_slice("train_gradients", expected, checkpoint_id="ck1", partition=7)
    assert sorted_rows(slice_of(lake, "ck1", 7), "chunk") == sorted_rows(
        TABLES["train_gradients"].validate(expected), "chunk"
    )
    assert slice_of(lake, "ck1", 3).num_rows == 4


# S3 (moto server on loopback)


def test_the_lake_works_the_same_on_s3(s3_bucket):
    lake = Lake(f"s3://{s3_bucket}/lake")
    assert lake.storage_options["AWS_ALLOW_HTTP"] == "true" and lake.storage_options["AWS_ENDPOINT_URL"]
    lake.append("train_gradients", gradient_rows("ck1", 0, 4))
    lake.append("train_gradients", gradient_rows("ck1", 1, 4))
    for _ in range(2):
        lake.replace_slice("train_gradients", gradient_rows("ck1", 1, 2), checkpoint_id="ck1", partition=1)
    assert slice_of(lake, "ck1", 1).num_rows == 2 and slice_of(lake, "ck1", 0).num_rows == 4
    assert lake.read("train_gradients", version=2).num_rows == 8
    assert len(lake.history("train_gradients")) == 5
    assert storage.list_objects(f"s3://{s3_bucket}/lake/train_gradients/_delta_log", suffix=".json")


def test_storage_helpers_copy_folders_to_and_from_s3(s3_bucket, tmp_path):
    source = tmp_path / "checkpoint"
    (source / "zero" / "global_step4").mkdir(parents=True)
    (source / "manifest.json").write_text('{"step": 4}')
    (source / "zero" / "global_step4" / "shard.pt").write_bytes(b"\x00" * 100)
    uri = f"s3://{s3_bucket}/checkpoints/step-4"
    assert storage.upload_dir(source, uri) == [f"{uri}/manifest.json", f"{uri}/zero/global_step4/shard.pt"]
    assert storage.list_objects(f"s3://{s3_bucket}/checkpoints", suffix=".pt") == [f"{uri}/zero/global_step4/shard.pt"]
    copy = storage.download_prefix(uri, tmp_path / "copy")
    assert (copy / "manifest.json").read_text() == '{"step": 4}'
    assert (copy / "zero" / "global_step4" / "shard.pt").read_bytes() == b"\x00" * 100
    with pytest.raises(FileNotFoundError):
        storage.download_prefix(f"s3://{s3_bucket}/nothing-here", tmp_path / "empty")


# large matrices


@pytest.mark.parametrize("where", ["local", "s3"])
def test_matrices_round_trip_and_checksum(where, tmp_path, request):
    lake = Lake(tmp_path / "lake") if where == "local" else Lake(f"s3://{request.getfixturevalue('s3_bucket')}/lake")
    matrix = np.random.default_rng(2).standard_normal((5, 5)).astype(np.float32)
    path = storage.join(lake.root, "_matrices", "hessians", "ck1", "fp", "r_train.safetensors")
    sha256 = save_matrices(path, {"r": matrix, "eigenvalues": np.arange(5.0)})
    loaded = load_matrices(path, sha256)
    assert np.array_equal(loaded["r"].numpy(), matrix) and loaded["eigenvalues"].shape == (5,)
    storage.write_bytes(path, storage.read_bytes(path)[:-1] + b" ")
    with pytest.raises(ChecksumMismatch, match="does not match the recorded"):
        load_matrices(path, sha256)


# configuration, runs, quarantine


def test_config_from_file_then_environment(tmp_path):
    path = tmp_path / "trackstar.toml"
    path.write_text('lake_root = "s3://bucket/lake"\ntop_k = 20\nhessian_damping = 1\n')
    env = {
        "TRACKSTAR_TOP_K": "50",
        "TRACKSTAR_HESSIAN_LAMBDA": "0.9",
        "TRACKSTAR_SPARK_REMOTE": "sc://h:15002",
        "AWS_SECRET_ACCESS_KEY": "secret-value",
    }
    config = load_config(path, environ=env)
    assert (config.lake_root, config.top_k, config.hessian_damping) == ("s3://bucket/lake", 50, 1.0)
    assert config.hessian_lambda == 0.9 and config.spark_remote == "sc://h:15002"
    assert load_config(environ={"TRACKSTAR_CONFIG": str(path)}).top_k == 20
    assert load_config(environ={}) == Config()
    stored = json.loads(config.replace(spark_remote="sc://host:15002/;token=abc").as_json())
    assert stored["top_k"] == 50 and stored["spark_remote"] == "sc://host:15002/;token=***"
    assert "secret-value" not in config.as_json()


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"TRACKSTAR_TOP_K": "ten"}, "TRACKSTAR_TOP_K='ten': expected int"),
        ({"TRACKSTAR_PROJECTION_K": "0"}, "projection_k must be positive"),
        ({"TRACKSTAR_VECTOR_DTYPE": "float8"}, "vector_dtype 'float8'"),
        ({"TRACKSTAR_HESSIAN_LAMBDA": "1.5"}, r"hessian_lambda must lie in \[0, 1\]"),
    ],
)
def test_config_rejects_bad_values(environ, message):
    with pytest.raises(ConfigError, match=message):
        load_config(environ=environ)


def test_config_file_rejects_unknown_settings_and_wrong_types(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("lake_rot = 'x'\n")
    with pytest.raises(ConfigError, match="unknown setting 'lake_rot'"):
        load_config(path, environ={})
    path.write_text("top_k = '10'\n")
    with pytest.raises(ConfigError, match="top_k: expected int"):
        load_config(path, environ={})


def test_runs_are_recorded_with_status_and_counts(lake):
    run_id = start_run(lake, "tokenize", Config(top_k=7))
    (row,) = lake.read("runs").to_pylist()
    assert row["status"] == "running" and json.loads(row["config_json"])["top_k"] == 7 and row["finished_at"] is None
    finish_run(lake, run_id, "succeeded", {"documents": 3})
    (row,) = lake.read("runs").to_pylist()
    assert row["status"] == "succeeded" and json.loads(row["counts_json"]) == {"documents": 3}
    assert row["finished_at"] >= row["started_at"]
    with pytest.raises(LakeError, match="no run 'missing'"):
        finish_run(lake, "missing", "failed")


def test_quarantine_rows_are_validated_truncated_counted_and_replaced_on_rerun(lake):
    row = {
        "source": "c4-00000.json.gz",
        "position": "c4-00000.json.gz:7",
        "reason": "malformed JSON",
        "raw_value": "x" * 5000,
    }
    rows = [row, row, {**row, "reason": "blank line", "raw_value": None}]
    assert quarantine_rows(lake, rows, stage="tokenize", run_id="r1") == 3
    quarantine_rows(lake, [{**row, "source": "other.json.gz"}], stage="tokenize", run_id="r1")
    assert count_by_reason(lake, "r1") == {"malformed JSON": 3, "blank line": 1}
    assert count_by_reason(lake, "r3") == {}
    raw_values = lake.read("quarantine", filters={"source": "c4-00000.json.gz"}).column("raw_value").to_pylist()
    assert sorted(map(len, filter(None, raw_values))) == [1000, 1000] and None in raw_values

    quarantine_rows(lake, rows, stage="tokenize", run_id="r2")  # a rerun over the same file replaces its rows
    assert count_by_reason(lake, "r2") == {"malformed JSON": 2, "blank line": 1}
    assert lake.read("quarantine").num_rows == 4

    with pytest.raises(SchemaError, match="column reason: 1 null"):
        quarantine_rows(lake, [{k: v for k, v in row.items() if k != "reason"}], stage="tokenize", run_id="r3")
    with pytest.raises(SchemaError, match="column stage: 1 null"):
        quarantine_rows(lake, [row], run_id="r3")
    with pytest.raises(SchemaError, match=r"unexpected columns \['line'\]"):
        quarantine_rows(lake, [{**row, "line": 3}], stage="tokenize", run_id="r3")
    assert lake.read("quarantine").num_rows == 4


# Spark (embedded Sail)


def test_spark_writes_slices_with_replace_where(spark, lake):
    lake.append("documents", document_rows(2, 2))  # written by delta-rs, then extended by Spark
    batch = spark.createDataFrame(document_rows(0, 3).to_pandas()).unionByName(
        spark.createDataFrame(document_rows(1, 2).to_pandas())
    )
    lake.spark_write(batch, "documents")
    for _ in range(2):
        again = spark.createDataFrame(document_rows(1, 4).to_pandas())
        lake.spark_write(again, "documents", mode="overwrite", replace_where={"partition": 1})

    per_partition = lake.spark_read(spark, "documents").groupBy("partition").count().collect()
    counts = {r["partition"]: r["count"] for r in per_partition}
    assert counts == {0: 3, 1: 4, 2: 2}
    assert lake.read("documents", filters={"partition": 1}).num_rows == 4  # delta-rs sees Spark's commits
    assert lake.open("documents").metadata().configuration[SCHEMA_VERSION_PROPERTY] == "1"
    assert lake.spark_read(spark, "documents", version=1).count() == 2
    with pytest.raises(SchemaError, match=r"missing columns \['run_id'\]"):
        lake.spark_write(again.drop("run_id"), "documents")
    as_text = spark.createDataFrame(document_rows(2, 1).to_pandas())  # a raw predicate string works too
    lake.spark_write(as_text, "documents", replace_where="`partition` IN (2, 3)")
    assert lake.read("documents", filters={"partition": 2}).num_rows == 1


def _proponent(run_id: str) -> pa.Table:
    return pa.table(
        {
            "query_set": ["q"],
            "checkpoint_id": ["c"],
            "query_id": ["a"],
            "method": ["m"],
            "rank": [1],
            "doc_id": ["d"],
            "chunk": [0],
            "score": [1.0],
            "run_id": [run_id],
        }
    )


def test_a_spark_writer_that_loses_a_commit_race_fails_with_lake_error(spark, lake):
    """A real second writer (delta-rs) commits the same slice while the Spark write runs: it
    commits from inside the Spark job, after the job read its snapshot, so the race is certain."""
    keys = {"query_set": "q", "method": "m", "checkpoint_id": "c"}
    lake.replace_slice("proponents", _proponent("first"), **keys)
    root = lake.root

    def commit_meanwhile(batches):
        Lake(root).replace_slice("proponents", _proponent("winner"), **keys)
        yield from batches

    frame = spark.createDataFrame(_proponent("loser").to_pandas())
    frame = frame.mapInArrow(commit_meanwhile, frame.schema)
    first = set(Path(lake.path("proponents")).rglob("*.parquet"))
    with pytest.raises(LakeError, match="another run committed to table proponents at the same time"):
        lake.spark_write(frame, "proponents", replace_where=keys)
    assert lake.read("proponents", columns=["run_id"])["run_id"].to_pylist() == ["winner"]
    # the loser's file is referenced by no version; maintenance vacuums it once older than the retention
    referenced = {Path(uri) for uri in lake.open("proponents").file_uris()}
    orphans = set(Path(lake.path("proponents")).rglob("*.parquet")) - referenced - first
    assert len(orphans) == 1
    from infra.maintenance import maintain_table

    eight_days_ago = time.time() - 8 * 86400
    os.utime(*orphans, (eight_days_ago, eight_days_ago))
    maintain_table(lake, "proponents")
    assert not any(path.exists() for path in orphans)
    assert lake.read("proponents", columns=["run_id"])["run_id"].to_pylist() == ["winner"]


def test_spark_reads_tables_written_by_delta_rs_and_enforces_not_null(spark, lake):
    lake.append("train_gradients", gradient_rows("ck1", 0, 3))
    df = lake.spark_read(spark, "train_gradients")
    assert df.filter("chunk >= 1").count() == 2
    rows = df.orderBy("chunk").select("vector").collect()
    assert np.array_equal(
        decode_vectors(pa.array([r["vector"] for r in rows], pa.binary()), "float32", dim=4),
        np.full((3, 4), 0.0, np.float32) + np.arange(3, dtype=np.float32)[:, None],
    )
    with_null = spark.createDataFrame(document_rows(0, 1).to_pandas()).selectExpr(
        *[c if c != "text" else "CAST(NULL AS STRING) AS text" for c in TABLES["documents"].column_names]
    )
    with pytest.raises(Exception, match="NOT NULL"):
        lake.spark_write(with_null, "documents")


def test_spark_reads_and_writes_delta_on_s3(spark, s3_bucket):
    lake = Lake(f"s3://{s3_bucket}/lake")
    lake.append("documents", document_rows(0, 2))
    lake.spark_write(spark.createDataFrame(document_rows(1, 3).to_pandas()), "documents")
    assert lake.spark_read(spark, "documents").count() == 5
    assert lake.read("documents", filters={"partition": 1}).num_rows == 3


def test_sql_queries_run_on_the_lake(spark, lake):
    lake.append("documents", document_rows(0, 3))
    tokens = pa.table(
        {
            "doc_id": [f"https://example.com/0/{i}" for i in range(3)],
            "partition": [0] * 3,
            "chunk": [0] * 3,
            "token_start": [0] * 3,
            "token_end": [4] * 3,
            "input_ids": [[1, 2, 3, 4]] * 3,
            "n_tokens": [4] * 3,
            "tokenizer_fingerprint": ["t"] * 3,
            "run_id": ["r1"] * 3,
        }
    )
    lake.append("tokens", tokens)
    lake.append("train_gradients", gradient_rows("ck1", 0, 2))
    lake.append(
        "checkpoints",
        pa.table(
            {
                "checkpoint_id": ["ck1"],
                "step": [4],
                "path": ["/ck1"],
                "optimizer": ["adam"],
                "learning_rate": [1e-3],
                "tokens_seen": [100],
                "model_fingerprint": ["m"],
                "registered_at": [utc_now()],
                "run_id": ["r1"],
            }
        ),
    )
    lake.append("proponents", proponent_rows())

    top = run_query(spark, lake, "top_proponents", {"query_set": "trex", "query_id": "q1", "method": "trackstar"})
    assert [(r["rank"], r["text"]) for r in top.collect()] == [(1, "text 0 2"), (2, "text 0 0")]
    frequent = run_query(spark, lake, "proponent_frequency", {"query_set": "trex", "method": "trackstar", "limit": "1"})
    assert [(r["doc_id"], r["n_queries"]) for r in frequent.collect()] == [("https://example.com/0/2", 2)]
    coverage = run_query(spark, lake, "gradient_coverage").collect()
    assert [(r["checkpoint_id"], r["partition"], r["n_chunks"], r["n_vectors"]) for r in coverage] == [("ck1", 0, 3, 2)]
    with pytest.raises(ValueError, match=r"missing \['method'\]"):
        bind_params("top_proponents", {"query_set": "trex", "query_id": "q1"})
    with pytest.raises(TableNotFoundError, match="needs table quarantine"):
        run_query(spark, lake, "quarantine_by_reason")
    assert set(SQL_QUERIES) >= {
        "top_proponents",
        "proponent_frequency",
        "gradient_coverage",
        "quarantine_by_reason",
        "runs_history",
    }
    # any SQL text, over the same views
    counted = run_sql(spark, lake, "SELECT `partition`, count(*) AS n FROM tokens GROUP BY `partition`").collect()
    assert [(r["partition"], r["n"]) for r in counted] == [(0, 3)]


def test_the_embedded_session_outlives_sails_idle_timeout(tmp_path):
    """Sail drops a session idle for SAIL_SPARK__SESSION_TIMEOUT_SECS (900 s by default); the embedded
    engine lives as long as its process, so the project sets that timeout to 30 days. Shown with a
    2-second timeout (the failure a long-lived bench met) and with the project's own setting."""
    import subprocess
    import sys

    script = tmp_path / "idle.py"
    script.write_text(
        "import os, time\nfrom infra.spark import spark_session\nspark = spark_session()\n"
        "assert spark.range(3).count() == 3\nprint(os.environ['SAIL_SPARK__SESSION_TIMEOUT_SECS'])\n"
        "time.sleep(4)\nassert spark.range(3).count() == 3\nprint('alive')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SAIL_SPARK__SESSION_TIMEOUT_SECS"} | {"PYTHONPATH": os.getcwd()}
    short = subprocess.run(
        [sys.executable, str(script)],
        env=env | {"SAIL_SPARK__SESSION_TIMEOUT_SECS": "2"},
        capture_output=True,
        text=True,
    )
    assert short.returncode != 0 and "is not running" in short.stderr
    ours = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.split() == [str(30 * 24 * 3600), "alive"]


def test_the_embedded_engine_hands_python_at_most_rows_per_batch_rows(tmp_path):
    """Rows here are vectors of kilobytes: the embedded engine is started with SAIL_EXECUTION__BATCH_SIZE
    = ROWS_PER_BATCH (Sail's default of 8,192 rows made scoring's memory grow with the corpus)."""
    from infra.spark import ROWS_PER_BATCH, is_embedded, spark_session

    spark = spark_session()
    if not is_embedded(spark):
        pytest.skip("an external Spark Connect server batches by its own settings")

    def sizes(batches):
        for batch in batches:
            yield pa.RecordBatch.from_pydict({"rows": [batch.num_rows]})

    spark.range(5000).write.parquet(str(tmp_path / "rows"))  # read back from files, as the tables are
    found = [r["rows"] for r in spark.read.parquet(str(tmp_path / "rows")).mapInArrow(sizes, "rows long").collect()]
    assert sum(found) == 5000 and max(found) <= ROWS_PER_BATCH


def test_the_embedded_engine_writes_row_groups_of_at_most_rows_per_row_group(tmp_path):
    """A Parquet row group is held in memory until written: the embedded engine is started with
    SAIL_PARQUET__MAX_ROW_GROUP_SIZE = ROWS_PER_ROW_GROUP (Sail's default of 1,048,576 rows held a
    whole C4-sized partition of documents)."""
    import pyarrow.parquet as pq

    from infra.spark import ROWS_PER_ROW_GROUP, is_embedded, spark_session

    spark = spark_session()
    if not is_embedded(spark):
        pytest.skip("an external Spark Connect server sizes row groups by its own settings")
    rows = 3 * ROWS_PER_ROW_GROUP
    spark.range(rows).coalesce(1).write.parquet(str(tmp_path / "groups"))
    sizes = [
        metadata.row_group(i).num_rows
        for metadata in (pq.ParquetFile(f).metadata for f in sorted((tmp_path / "groups").glob("*.parquet")))
        for i in range(metadata.num_row_groups)
    ]
    assert sum(sizes) == rows and max(sizes) <= ROWS_PER_ROW_GROUP


def test_a_streamed_slice_replaces_files_delta_rs_rewrote_with_string_views(lake):
    """delta-rs' own update and delete rewrite files with string_view columns, which pyarrow's scan
    filters reject: the next streamed write of the partition must still tell its slice's rows."""
    import pyarrow.parquet as pq

    lake.replace_slice_batches(
        "train_gradients", iter([gradient_rows("ck1", 0, 3, fingerprint="a")]), checkpoint_id="ck1", partition=0
    )
    lake.replace_slice_batches(
        "train_gradients",
        iter([gradient_rows("ck1", 0, 2, first_chunk=10, fingerprint="b")]),
        checkpoint_id="ck1",
        partition=0,
        fingerprint="b",
    )
    lake.open("train_gradients").update(updates={"run_id": "'rewritten'"}, predicate="fingerprint = 'a'")
    assert any(
        pa.types.is_string_view(f.type) for uri in lake.open("train_gradients").file_uris() for f in pq.read_schema(uri)
    )
    lake.replace_slice_batches(
        "train_gradients",
        iter([gradient_rows("ck1", 0, 4, first_chunk=20, fingerprint="b")]),
        checkpoint_id="ck1",
        partition=0,
        fingerprint="b",
    )
    rows = lake.read("train_gradients", columns=["fingerprint", "chunk", "run_id"]).to_pylist()
    assert sorted((r["fingerprint"], r["chunk"]) for r in rows) == [("a", 0), ("a", 1), ("a", 2)] + [
        ("b", c) for c in range(20, 24)
    ]
    assert {r["run_id"] for r in rows if r["fingerprint"] == "a"} == {"rewritten"}
