"""`jobs/document_changes.py` on real Delta tables written by the lake's writers of `documents`:
Sail (`Lake.spark_write` with replaceWhere, as tokenize writes) and the takedown's own file
rewrite (`infra.row_deletes.delete_rows`). Each change is checked by exact doc ids."""

from __future__ import annotations

import argparse
import time

import pyarrow as pa
import pytest
from deltalake import TableFeatures
from deltalake.transaction import RemoveAction

from dags.orchestrate import describe_document_changes, report_summary
from infra.lake import Lake, utc_now
from jobs import document_changes as changes_job
from jobs.document_changes import FeedUnavailable, document_changes, read_since_last_run
from infra.row_deletes import delete_rows
from jobs.takedown import rows_of
from schemas.tables import TABLES
from tests.test_lake import document_rows


def tokenize_partition(spark, lake: Lake, rows: pa.Table, partition: int) -> int:
    """Writes a partition's documents as tokenize does (Sail, replaceWhere); the new version."""
    lake.spark_write(spark.createDataFrame(rows.to_pandas()), "documents", replace_where=f"partition IN ({partition})")
    return lake.version("documents")


def with_text(rows: pa.Table, index: int, text: str) -> pa.Table:
    texts = rows["text"].to_pylist()
    texts[index] = text
    return rows.set_column(rows.schema.get_field_index("text"), "text", pa.array(texts))


def url(partition: int, i: int) -> str:
    return f"https://example.com/{partition}/{i}"


def take_down(lake: Lake, urls: list[str]) -> None:
    """What `jobs takedown` does to `documents` and records: the rows deleted, a takedowns row per url."""
    delete_rows(
        lake, "documents", "doc_id", urls, rows_of(lake, "documents", urls), {"trackstar.takedown_run": "takedown-1"}
    )
    audit = [
        {
            "url": u,
            "reason": "test",
            "request_id": None,
            "counts_json": "{}",
            "run_id": "takedown-1",
            "taken_at": utc_now(),
        }
        for u in urls
    ]
    lake.replace_slice("takedowns", pa.Table.from_pylist(audit, TABLES["takedowns"].arrow_schema), run_id="takedown-1")


def test_a_new_partition_reads_as_new_documents(spark, lake):
    since = tokenize_partition(spark, lake, document_rows(0, 3), 0)
    tokenize_partition(spark, lake, document_rows(1, 2), 1)
    changes = document_changes(lake, since)
    assert changes.new == [(url(1, 0), 1), (url(1, 1), 1)]
    assert changes.changed == [] and changes.deleted == [] and changes.taken_down == []
    assert changes.partitions_to_reextract == []  # a partition not there before: extraction finds it missing
    assert (changes.since_version, changes.version) == (since, since + 1)


def test_a_retokenized_partition_reads_as_the_one_document_that_changed(spark, lake):
    """Sail's replaceWhere removes the partition's file and adds a new one: the feed holds every row
    deleted and inserted again; only the document whose text differs is reported."""
    since = tokenize_partition(spark, lake, document_rows(0, 4), 0)
    tokenize_partition(spark, lake, document_rows(1, 2), 1)
    tokenize_partition(spark, lake, with_text(document_rows(0, 4), 2, "a corrected text"), 0)
    changes = document_changes(lake, since)
    assert changes.changed == [(url(0, 2), 0)]
    assert changes.new == [(url(1, 0), 1), (url(1, 1), 1)] and changes.deleted == []
    assert changes.partitions_to_reextract == [0]


def test_a_document_gone_from_a_retokenized_partition_reads_as_deleted(spark, lake):
    since = tokenize_partition(spark, lake, document_rows(0, 3), 0)
    tokenize_partition(spark, lake, document_rows(0, 2), 0)
    changes = document_changes(lake, since)
    assert changes.deleted == [(url(0, 2), 0)] and changes.taken_down == []
    assert changes.new == [] and changes.changed == [] and changes.partitions_to_reextract == [0]


def test_a_takedown_reads_as_deleted_and_needs_no_reextraction(spark, lake):
    """The takedown rewrites the files holding the urls: their other rows read as deleted and inserted
    again (no change); the taken-down documents as deleted, by a takedown, which removed their
    derived rows itself."""
    tokenize_partition(spark, lake, document_rows(0, 3), 0)
    since = tokenize_partition(spark, lake, document_rows(1, 3), 1)
    take_down(lake, [url(0, 1), url(1, 2)])
    changes = document_changes(lake, since)
    assert changes.deleted == [(url(0, 1), 0), (url(1, 2), 1)]
    assert changes.taken_down == [url(0, 1), url(1, 2)]
    assert changes.new == [] and changes.changed == [] and changes.partitions_to_reextract == []


def test_changes_over_several_commits_are_net(spark, lake):
    """A document added and taken down in the same span is not reported; one changed twice back to
    its text is not changed; compaction (no data change) adds nothing."""
    since = tokenize_partition(spark, lake, document_rows(0, 3), 0)
    tokenize_partition(spark, lake, with_text(document_rows(0, 3), 0, "other"), 0)
    tokenize_partition(spark, lake, document_rows(0, 3), 0)
    tokenize_partition(spark, lake, document_rows(1, 2), 1)
    take_down(lake, [url(1, 0)])
    lake.append("documents", document_rows(2, 1))
    lake.append("documents", document_rows(2, 2).slice(1))
    compacted = lake.optimize("documents")
    assert compacted["numFilesRemoved"] == 2
    changes = document_changes(lake, since)
    assert changes.new == [(url(1, 1), 1), (url(2, 0), 2), (url(2, 1), 2)]
    assert changes.changed == [] and changes.deleted == [] and changes.partitions_to_reextract == []
    assert document_changes(lake, lake.version("documents") - 1).new == []  # the compaction alone


def test_the_nightly_read_records_a_baseline_then_the_changes_and_a_quiet_night_writes_nothing(spark, lake, capsys):
    """A lake written before the change feed was read (no `changes` run yet): the first read records
    the version only; later reads report what changed since the previous one."""
    tokenize_partition(spark, lake, document_rows(0, 3), 0)
    first = read_since_last_run(lake)
    assert first["baseline"] and first["version"] == lake.version("documents")
    runs_version = lake.version("runs")
    assert read_since_last_run(lake)["new"] == 0 and lake.version("runs") == runs_version  # nothing written

    tokenize_partition(spark, lake, document_rows(1, 2), 1)
    tokenize_partition(spark, lake, with_text(document_rows(0, 3), 1, "changed"), 0)
    second = read_since_last_run(lake)
    assert (second["new"], second["changed"], second["deleted"]) == (2, 1, 0)
    assert second["changed_examples"] == [url(0, 1)] and second["partitions_to_reextract"] == [0]
    assert second["since_version"] == first["version"] and changes_job.last_read_version(lake) == second["version"]
    assert describe_document_changes(second) == (
        f"documents since version {first['version']}: 2 new, 1 changed, 0 deleted (0 by a takedown); partition(s) "
        "[0] hold gradients of other documents: `python -m jobs extract --partitions 0 --force`"
    )

    take_down(lake, [url(1, 1)])
    cli = argparse.ArgumentParser()
    changes_job.add_arguments(cli)
    changes_job.main(cli.parse_args(["--lake", lake.root]))
    printed = capsys.readouterr().out
    assert f"deleted (1):\n  1\t{url(1, 1)}  (taken down)" in printed and "partitions to re-extract: none" in printed


def test_a_night_after_a_compaction_reports_nothing_new(spark, lake):
    """Maintenance's OPTIMIZE moves the documents version without changing a document: the next
    night's read records the new version, and the report still says nothing new."""
    lake.append("documents", document_rows(0, 1))
    lake.append("documents", document_rows(0, 2).slice(1))
    read_since_last_run(lake)
    lake.optimize("documents")
    changes = read_since_last_run(lake)
    assert (changes["new"], changes["changed"], changes["deleted"], changes["baseline"]) == (0, 0, 0, False)
    nothing = {"checkpoint_id": "ck1", "extracted": []}
    assert report_summary(None, changes, nothing, [], []).startswith("nothing new")


def test_a_feed_that_cannot_be_read_is_refused_and_the_nightly_read_starts_again(spark, lake):
    """A takedown commit from before its removes carried their size (which delta-rs' feed needs)
    stands for a feed that cannot be read, as after a vacuum: the nightly read records a new baseline."""
    since = tokenize_partition(spark, lake, document_rows(0, 2), 0)
    read_since_last_run(lake)
    delta = lake.open("documents")
    path = pa.table(delta.get_add_actions(flatten=True))["path"][0].as_py()
    remove = RemoveAction(path, True, int(time.time() * 1000), partition_values={"partition": "0"})
    delta.create_write_transaction(
        [remove], mode="append", schema=TABLES["documents"].arrow_schema, partition_by=["partition"]
    )
    with pytest.raises(FeedUnavailable, match="cannot be read"):
        document_changes(lake, since)
    result = read_since_last_run(lake)
    assert result["baseline"] and "cannot be read" in result["feed_unavailable"]
    assert changes_job.last_read_version(lake) == lake.version("documents")


# ------------------------------------------------------------------ why the table sets no feature
def test_sail_refuses_to_write_a_table_with_the_change_data_feed_property(spark, lake):
    """Why `documents` does not set delta.enableChangeDataFeed (jobs/document_changes.py): Sail, the
    default engine of tokenize, refuses the write. When this fails, Sail writes such tables: set it."""
    lake.create("documents")
    lake.open("documents").alter.add_feature(TableFeatures.ChangeDataFeed, allow_protocol_versions_increase=True)
    lake.open("documents").alter.set_table_properties({"delta.enableChangeDataFeed": "true"})
    with pytest.raises(Exception, match=r"Unsupported table features required: \[ChangeDataFeed\]"):
        tokenize_partition(spark, lake, document_rows(0, 2), 0)


def test_delta_rs_cannot_read_a_table_with_deletion_vectors(lake):
    """Why no table enables deletion vectors (docs/sql-views.md): delta-rs 1.6.6 still writes such a
    table (rewriting files, no vectors) but its reader, every reader of the lake, refuses it."""
    lake.append("documents", document_rows(0, 2))
    lake.open("documents").alter.add_feature(TableFeatures.DeletionVectors, allow_protocol_versions_increase=True)
    lake.append("documents", document_rows(1, 2))
    with pytest.raises(Exception, match="deletionVectors"):
        lake.read("documents")
