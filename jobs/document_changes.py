"""changes: which documents were added, changed or removed since a version of the `documents`
table, read from its Delta change feed (delta-rs `DeltaTable.load_cdf`).

    changes = document_changes(lake, since_version=12)   # the commits after version 12
    changes.new, changes.changed, changes.deleted         # [(doc_id, partition)], sorted
    changes.partitions_to_reextract                       # extracted partitions whose documents changed

    python -m jobs changes --since-version 12             # the same, printed

A document is its url (doc_id); it is "changed" when its text or its partition differs, which is
what its chunks and gradients are made from. The nightly reindex reads the changes since the
version the previous night read up to (`read_since_last_run`, recorded as a `changes` run).

What the feed holds. `documents` does not set `delta.enableChangeDataFeed`: Sail 0.7.2, the
default engine tokenize writes it with, refuses to write a table that does ("Unsupported table
features required: [ChangeDataFeed]"). delta-rs reads the feed of such a table from the log: every
file a commit added reads as inserted rows, every file it removed as deleted rows. That is also all
the property would give here, since neither writer of `documents` writes `_change_data` files
(tokenize's Sail cannot, takedown's own writer does not). A re-tokenized partition therefore reads
as all its old rows deleted and its new ones inserted, a takedown as the rows of each file it
rewrote deleted and inserted again less the taken-down ones; `net_changes` turns both back into
documents. Compaction (OPTIMIZE: no data change) reads as nothing. The removed files must still
exist: once maintenance has vacuumed them (after 7 days), the feed over those versions cannot be
read (FeedUnavailable).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pyarrow as pa

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
    before, after = net_changes(feed)
    new = sorted((doc_id, row[0]) for doc_id, row in after.items() if doc_id not in before)
    deleted = sorted((doc_id, row[0]) for doc_id, row in before.items() if doc_id not in after)
    changed = sorted((doc_id, row[0]) for doc_id, row in after.items() if before.get(doc_id, row) != row)
    taken_down = sorted(_taken_down(lake, [doc_id for doc_id, _ in deleted]))
    held = _partitions_at(lake, since_version)
    by_takedown = set(taken_down)
    touched = {before[doc_id][0] for doc_id, _ in changed} | {after[doc_id][0] for doc_id, _ in new + changed}
    touched |= {partition for doc_id, partition in deleted if doc_id not in by_takedown}
    return DocumentChanges(since_version, version, new, changed, deleted, taken_down, sorted(touched & held))


def net_changes(feed: pa.Table) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """({doc_id: (partition, text)} of the documents the feed's first version found, the same of
    those its last version left), for each doc_id the feed names. Read in commit order, a commit's
    deletes before its inserts (a rewritten file is removed and its rows added again): a document's
    first change, when a delete, is its row before; its last, when an insert, its row after."""
    rows = feed.select(FEED_COLUMNS).to_pylist()
    rows.sort(key=lambda row: (row["_commit_version"], row["_change_type"] in INSERTED))
    before: dict[str, tuple] = {}
    after: dict[str, tuple] = {}
    seen: set[str] = set()
    for row in rows:
        doc_id, value = row["doc_id"], (row["partition"], row["text"])
        if doc_id not in seen and row["_change_type"] in DELETED:
            before[doc_id] = value
        seen.add(doc_id)
        if row["_change_type"] in INSERTED:
            after[doc_id] = value
        elif row["_change_type"] in DELETED:
            after.pop(doc_id, None)
    return before, after


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
