"""Deleting rows by value from a Delta table with the project's own writer, in one commit.

Not delta-rs' `DeltaTable.delete`: the files it rewrites declare their strings as Arrow
string_view, and pyarrow's `is_in` has no kernel for those, so the next streamed slice replace of
the partition (`Lake.replace_slice_batches`: extract --force, the index) would fail on them. Here
each file holding one of the rows is rewritten with `infra.slice_files` (declared types, page
checksums, exact statistics) without them, and the old files are removed, all in one transaction
carrying the caller's commit metadata. The values are a pyarrow filter's, never pasted into SQL,
so quotes and backslashes in them are data.
"""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from infra.lake import Lake, LakeError
from schemas.tables import TABLES


def delete_rows(lake: Lake, table: str, column: str, values: list[str], found: pa.Table, metadata: dict) -> int:
    """Deletes the rows whose `column` is one of `values` in one commit; returns the rows deleted.
    `found`: those rows as read before (with `partition`, where the table has it, for data
    skipping; with the slice keys for a table without partitions)."""
    if found.num_rows == 0:
        return 0
    if not TABLES[table].partition_by:
        return _delete_by_slices(lake, table, column, values, found)
    from deltalake import CommitProperties
    from deltalake.exceptions import CommitFailedError

    spec, delta, files = TABLES[table], lake.open(table), {}
    holding = set(map(str, found["partition"].to_pylist())) if "partition" in found.column_names else None
    try:
        removes, deleted = _rewrite_files_holding(lake, delta, table, ds.field(column).isin(values), holding, files)
        added = [action for written in files.values() for action in written.finish()]
        delta.create_write_transaction(
            [*removes, *added],
            mode="append",
            schema=spec.arrow_schema,
            partition_by=list(spec.partition_by),
            commit_properties=CommitProperties(custom_metadata=metadata),
        )
    except CommitFailedError as error:
        for written in files.values():
            written.discard()
        raise LakeError(f"another run committed to {table} during the delete: rerun it ({error})") from error
    except BaseException:
        for written in files.values():
            written.discard()
        raise
    print(f"[delete] {table}: {deleted} row(s) deleted ({len(removes)} file(s) rewritten)", flush=True)
    return deleted


def _rewrite_files_holding(lake: Lake, delta, table: str, match, holding: set | None, files: dict):
    """Writes every file holding a row that `match` selects again without those rows (into `files`,
    one SliceFiles per partition); returns (the remove actions of the old files, rows left out)."""
    from deltalake.transaction import RemoveAction

    from infra.lake_reads import VERIFY_PAGES
    from infra.slice_files import SliceFiles

    spec, dataset = TABLES[table], delta.to_pyarrow_dataset()
    adds = pa.table(delta.get_add_actions(flatten=True)).to_pylist()
    partition_of = {a["path"]: {c: str(a[f"partition.{c}"]) for c in spec.partition_by} for a in adds}
    # the change feed (delta-rs `load_cdf`, jobs/document_changes.py) refuses a remove without its size
    size_of = {action["path"]: action["size_bytes"] for action in adds}
    stored = [name for name in spec.column_names if name not in spec.partition_by]
    scan = {"schema": dataset.schema, "use_threads": False, "fragment_scan_options": VERIFY_PAGES}
    removes, deleted, now = [], 0, int(time.time() * 1000)
    for fragment in dataset.get_fragments():
        values = partition_of[fragment.path]
        if holding is not None and values.get("partition") not in holding:
            continue  # data skipping: the partition holds none of them
        matched = fragment.scanner(columns=[], filter=match, **scan).count_rows()
        if matched == 0:
            continue
        key = json.dumps(values, sort_keys=True)
        if key not in files:
            files[key] = SliceFiles(
                delta, spec.arrow_schema, values, lake.storage_options, split_by=spec.files_per_slice
            )
        for batch in fragment.to_batches(columns=stored, filter=~match, batch_size=4096, **scan):
            files[key].write(pa.Table.from_batches([batch]).cast(files[key].schema))
        removes.append(RemoveAction(fragment.path, True, now, size=size_of[fragment.path], partition_values=values))
        deleted += matched
    return removes, deleted


def _delete_by_slices(lake: Lake, table: str, column: str, values: list[str], found: pa.Table) -> int:
    """A table without partitions (train_outliers: small) loses the rows by replacing each of its
    slices that holds one with the slice's other rows."""
    keys = list(TABLES[table].slice_keys)
    deleted = 0
    for key_values in sorted(set(zip(*(found[key].to_pylist() for key in keys)))):
        where = dict(zip(keys, key_values))
        rows = lake.read(table, filters=where)
        kept = rows.filter(pc.invert(pc.is_in(rows[column], pa.array(values, pa.string()))))
        lake.replace_slice(table, kept, **where)
        deleted += rows.num_rows - kept.num_rows
    print(f"[delete] {table}: {deleted} row(s) deleted", flush=True)
    return deleted
