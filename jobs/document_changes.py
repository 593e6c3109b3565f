"""changes: which documents were added, changed or removed since a version of the `documents`
table, read from its Delta change feed (delta-rs `DeltaTable.load_cdf`).

    changes = document_changes(lake, since_version=12)   # the commits after version 12
    changes.new, changes.changed, changes.deleted         # [(doc_id, partition)], sorted
    changes.partitions_to_reextract                       # extracted partitions whose documents changed

    python -m jobs changes --since-version 12             # the same, printed

A document is its url (doc_id); it is "changed" when its text or its partition differs, which is
what its chunks and gradients are made from. The nightly reindex reads the changes since the
version the previous night read up to (`read_since_last_run`, recorded as a `changes` run).

What the feed holds (docs/delta-features.md). `documents` does not set
`delta.enableChangeDataFeed`: Sail 0.7.2, the default engine tokenize writes it with, refuses to
write a table that does ("Unsupported table features required: [ChangeDataFeed]"). delta-rs reads
the feed of such a table from the log: every file a commit added reads as inserted rows, every file
it removed as deleted rows. That is also all the property would give here, since no writer of
`documents` writes `_change_data` files (Sail cannot write the table; delta-spark's replaceWhere
and the takedown's own writer write none). A re-tokenized partition therefore reads as all its old
rows deleted and its new ones inserted, a takedown as the rows of each file it rewrote deleted and
inserted again less the taken-down ones; `first_and_last_changes` turns both back into documents.
Compaction (OPTIMIZE: no data change) reads as nothing. The removed files must still exist: once
maintenance has vacuumed them (after 7 days), the feed over those versions cannot be read
(FeedUnavailable).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from infra.cli import add_config_arguments, config_from_args, option
from infra.config import from_settings
from infra.lake import Lake, LakeError
from infra.runs import finish_run, start_run
from jobs.catalog import runs_of

COMMAND = "changes"  # the `runs` rows of the nightly reads: the documents version each read up to
FEED_COLUMNS = ["doc_id", "partition", "text", "_change_type", "_commit_version"]
INSERTED = {"insert", "update_postimage"}
DELETED = {"delete", "update_preimage"}
EXAMPLES = 20  # doc ids of each kind a run record and the nightly report name


class FeedUnavailable(LakeError):
    """The change feed over the asked versions cannot be read (its removed files were vacuumed)."""


@dataclass(frozen=True)
class DocumentChanges:
    since_version: int  # the changes are those of the commits after it ...
    version: int  # ... up to and including this one
    new: list[tuple[str, int]]  # (doc_id, partition)
    changed: list[tuple[str, int]]  # (doc_id, partition now); the text or the partition differs
    deleted: list[tuple[str, int]]  # (doc_id, partition it was in)
    taken_down: list[str]  # the deleted doc ids a takedown removed (it cleaned their derived rows itself)
    # partitions that held documents at since_version and whose documents changed since, by anything
    # but a takedown: their tokens and gradients were made from other documents
    partitions_to_reextract: list[int]

    def summary(self) -> dict:
        """Counts, the partitions to re-extract and a few doc ids of each kind (JSON-able)."""
        return {
            "since_version": self.since_version,
            "version": self.version,
            **{kind: len(getattr(self, kind)) for kind in ("new", "changed", "deleted", "taken_down")},
            "partitions_to_reextract": self.partitions_to_reextract,
            "changed_examples": [doc_id for doc_id, _ in self.changed[:EXAMPLES]],
            "deleted_examples": [doc_id for doc_id, _ in self.deleted[:EXAMPLES]],
        }


def document_changes(lake: Lake, since_version: int, version: int | None = None) -> DocumentChanges:
    """The documents added, changed and deleted by the commits after `since_version` up to `version`
    (default: the latest), net of files rewritten with the same rows."""
    delta = lake.open("documents")
    version = delta.version() if version is None else version
    if since_version >= version:
        return DocumentChanges(since_version, version, [], [], [], [], [])
    try:
        feed = pa.table(
            delta.load_cdf(starting_version=since_version + 1, ending_version=version, columns=FEED_COLUMNS).read_all()
        )
    except Exception as error:  # noqa: BLE001 - delta-rs raises its own and Arrow's errors for a missing file
        raise FeedUnavailable(
            f"the change feed of documents after version {since_version} cannot be read ({error}); a vacuum "
            "removes the files of versions older than the retention (7 days)"
        ) from error
    documents = first_and_last_changes(feed)
    was_there, is_there = pc.invert(documents["inserted_first"]), documents["inserted_last"]
    differs = pc.or_(
        pc.not_equal(documents["partition_first"], documents["partition_last"]),
        pc.not_equal(documents["text_first"], documents["text_last"]),
    )
    new = _doc_ids(documents.filter(pc.and_(pc.invert(was_there), is_there)), "partition_last")
    deleted = _doc_ids(documents.filter(pc.and_(was_there, pc.invert(is_there))), "partition_first")
    changed_documents = documents.filter(pc.and_(pc.and_(was_there, is_there), differs))
    changed = _doc_ids(changed_documents, "partition_last")
    taken_down = sorted(_taken_down(lake, [doc_id for doc_id, _ in deleted]))
    by_takedown = set(taken_down)
    touched = set(changed_documents["partition_first"].to_pylist()) | {partition for _, partition in new + changed}
    touched |= {partition for doc_id, partition in deleted if doc_id not in by_takedown}
    held = _partitions_at(lake, since_version)
    return DocumentChanges(since_version, version, new, changed, deleted, taken_down, sorted(touched & held))


def first_and_last_changes(feed: pa.Table) -> pa.Table:
    """One row per doc_id the feed names: its first change and its last (`inserted_first`,
    `partition_first`, `text_first`; the same `_last`), in commit order and within a commit deletes
    before inserts (a rewritten file is removed and its rows added again). A document whose first
    change is a delete was there before, with that row; one whose last change is an insert is there
    after, with that row. Computed in Arrow: the texts never become Python strings."""
    inserted = pc.is_in(feed["_change_type"].cast(pa.string()), pa.array(sorted(INSERTED)))
    changes = pa.table(
        {
            "doc_id": feed["doc_id"].cast(pa.large_string()),  # group_by has no string_view kernels
            "partition": feed["partition"],
            "text": feed["text"].cast(pa.large_string()),
            "inserted": inserted,
            "commit": feed["_commit_version"],
        }
    ).sort_by([("commit", "ascending"), ("inserted", "ascending")])
    values = ["inserted", "partition", "text"]
    # use_threads=False keeps the rows' order, which "first" and "last" follow
    return changes.group_by("doc_id", use_threads=False).aggregate(
        [(name, "first") for name in values] + [(name, "last") for name in values]
    )


def _doc_ids(documents: pa.Table, partition: str) -> list[tuple[str, int]]:
    return sorted(zip(documents["doc_id"].to_pylist(), documents[partition].to_pylist()))


def _taken_down(lake: Lake, doc_ids: list[str]) -> set[str]:
    if not doc_ids or not lake.exists("takedowns"):
        return set()
    return set(lake.read("takedowns", filters=[("url", "in", doc_ids)], columns=["url"])["url"].to_pylist())


def _partitions_at(lake: Lake, version: int) -> set[int]:
    """The partitions holding documents at `version`, from that version's log (no data read)."""
    actions = pa.table(lake.open("documents", version=version).get_add_actions(flatten=True))
    return {int(value) for value in actions["partition.partition"].to_pylist()}


# ------------------------------------------------------------------ the nightly read
def last_read_version(lake: Lake) -> int | None:
    """The documents version the newest `changes` run read up to; None before the first."""
    for _, _, counts in runs_of(lake, COMMAND):
        return counts["version"]
    return None


def read_since_last_run(lake: Lake) -> dict:
    """The changes since the version the previous read reached (`DocumentChanges.summary`), recorded
    as a `changes` run with the version read up to. The first read only records the version (a
    baseline: the documents already there are not "new"), as does a read whose feed was vacuumed;
    a read with no commit since the last writes nothing."""
    version, since = lake.version("documents"), last_read_version(lake)
    if version is None or version == since:
        return {"since_version": since, "version": version, "new": 0, "changed": 0, "deleted": 0, "baseline": False}
    run_id = start_run(lake, COMMAND, {"lake": lake.root, "since_version": since})  # failed at exit if this raises
    result: dict = {"since_version": since, "version": version, "baseline": True}
    if since is not None:
        try:
            result = document_changes(lake, since, version).summary() | {"baseline": False}
        except FeedUnavailable as error:
            result["feed_unavailable"] = str(error)
    finish_run(lake, run_id, "succeeded", result)
    return result


# ------------------------------------------------------------------ the command
@dataclass
class ChangesConfig:
    lake: str = from_settings("lake_root", help="lake root: a folder or s3://bucket/prefix")
    since_version: int | None = option(
        None, help="documents version to compare with (default: the version the last nightly read reached)"
    )


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, ChangesConfig)


def main(args):
    config = config_from_args(ChangesConfig, args)
    lake = Lake(config.lake)
    since = last_read_version(lake) if config.since_version is None else config.since_version
    if since is None:
        raise SystemExit("changes: no nightly read recorded yet; pass --since-version")
    changes = document_changes(lake, since)
    print(f"documents: version {changes.since_version} -> {changes.version}")
    taken_down = set(changes.taken_down)
    for kind in ("new", "changed", "deleted"):
        rows = getattr(changes, kind)
        print(f"{kind} ({len(rows)}):")
        for doc_id, partition in rows:
            taken = "  (taken down)" if kind == "deleted" and doc_id in taken_down else ""
            print(f"  {partition}\t{doc_id}{taken}")
    print(f"partitions to re-extract: {changes.partitions_to_reextract or 'none'}")
