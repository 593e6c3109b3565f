"""The lake: one Delta table per declared schema under a root folder or s3://bucket/prefix.

`Lake` is the one interface to it. Python-side writers and readers go through delta-rs; Spark jobs
through `Lake.spark_read` / `Lake.spark_write` (format("delta")). Every write is validated against
`schemas.tables` first, and every open checks the table's stored schema version. This module holds
the writes; opening and creating tables is `infra.lake_tables`, reads `infra.lake_reads`, the Spark
side `infra.lake_spark`, the SQL predicates `infra.predicates`.

Idempotence: a task rewrites its own slice with `replace_slice` (one atomic Delta commit that
removes the slice's old files and adds the new ones), so a retried or crashed-and-rerun task never
duplicates rows, and a task killed mid-way leaves no partial commit behind.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import RemoveAction

from infra.lake_reads import VERIFY_PAGES, LakeReads
from infra.lake_spark import LakeSpark
from infra.lake_tables import LakeError, TableNotFoundError
from infra.predicates import slice_predicate, update_value
from infra.slice_files import (
    SliceFiles,
    files_to_compact,
    partition_fragments,
    replaced_files,
    rows_of_slice_elsewhere,
)
from schemas.tables import SchemaError, Table, table as declared
from schemas.vectors import CorruptVector, check_vectors

# what callers import from here: the lake and the errors its methods raise
__all__ = ["Lake", "LakeError", "TableNotFoundError", "utc_now"]

# commits of a streamed slice tried before giving up, while other partitions' commits keep landing
COMMIT_ATTEMPTS = 20


def _on_a_fresh_snapshot(commit):
    """Runs `commit` (an append, or an update of rows chosen by keys) again on the latest snapshot
    when delta-rs refuses it for another writer's commit in between: neither depends on rows that
    commit changed (two extraction tasks appending and finishing `runs` rows at once hit this), and
    a refused commit wrote nothing to the log."""
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            return commit()
        except CommitFailedError:
            if attempt + 1 == COMMIT_ATTEMPTS:
                raise
            time.sleep(0.05 * (attempt + 1))


class Lake(LakeReads, LakeSpark):
    """The lake under `root`: its writes here, reads from `LakeReads`, Spark from `LakeSpark`, and
    where tables live, `create` and `open` from their base `LakeTables`."""

    def append(self, table: str, data: pa.Table | pa.RecordBatch) -> int:
        """Validate and append rows; returns the new table version."""
        data = declared(table).validate(data)
        _on_a_fresh_snapshot(lambda: write_deltalake(self.create(table), data, mode="append"))
        return self.version(table)

    def replace_slice(self, table: str, data: pa.Table | pa.RecordBatch, **keys) -> int:
        """Atomically replace the rows where every `keys` column equals its value with `data`.

        Keys are partition columns or declared slice keys of the table; every row of `data` must
        belong to the slice. Running it again with the same data leaves the same rows.
        """
        spec = declared(table)
        predicate, data = slice_predicate(spec, keys), spec.validate(data)
        _check_rows_in_slice(spec, data, keys)
        try:
            write_deltalake(self.create(table), data, mode="overwrite", predicate=predicate)
        except CommitFailedError as error:  # delta-rs's own words name the Delta conflict class only
            raise LakeError(
                f"another run committed slice {keys} of table {table} first (now version "
                f"{self.version(table)}); nothing of this write was committed: rerun it to replace "
                f"the slice again ({error})"
            ) from error
        return self.version(table)

    def replace_slice_batches(self, table: str, batches, **keys) -> int:
        """replace_slice for data that arrives in batches, in memory that does not grow with the
        slice (`infra.slice_files`): each batch is validated and written to Parquet as it comes,
        and one Delta commit at the end removes the slice's old files and adds the new ones. Every
        partition column must be a key, with one value. If the batches fail, nothing is committed
        and the files already written are deleted."""
        spec = declared(table)
        slice_predicate(spec, keys)  # refuses keys that are neither partition columns nor slice keys
        single = [c for c in spec.partition_by if c in keys and not isinstance(keys[c], (list, tuple))]
        if len(single) != len(spec.partition_by):
            missing = sorted(set(spec.partition_by) - set(single))
            raise LakeError(
                f"a streamed slice of {table} needs one value of each partition column; not given: {missing}"
            )
        partition_values = {column: str(keys[column]) for column in spec.partition_by}
        other_keys = {
            key: list(value) if isinstance(value, (list, tuple)) else [value]
            for key, value in keys.items()
            if key not in spec.partition_by
        }
        files = SliceFiles(
            self.create(table), spec.arrow_schema, partition_values, self.storage_options, split_by=spec.files_per_slice
        )
        try:
            for batch in batches:
                data = spec.validate(batch)
                _check_rows_in_slice(spec, data, keys)
                files.write(data)
            delta = self.open(table)  # the latest snapshot: the files to replace are listed from it
            fragments = partition_fragments(delta, partition_values)
            removes = replaced_files(files, fragments, other_keys)
            listed = {fragment.path for fragment in fragments}
            added = files.finish()
            self._commit_partition(table, delta, [*added, *removes], partition_values, listed)
            kept = listed - {remove.path for remove in removes}
            self._refuse_a_concurrent_write(table, files, other_keys, added, kept, keys)
        except CommitFailedError as error:
            files.discard()
            raise LakeError(
                f"another run committed slice {keys} of table {table} first; nothing of this write was "
                f"committed: rerun it to replace the slice again ({error})"
            ) from error
        except BaseException:
            files.discard()
            raise
        return self.version(table)

    def _commit_partition(self, table: str, delta: DeltaTable, actions: list, partition_values: dict, listed: set):
        """Commits the slice's file actions. delta-rs refuses the commit when any other commit
        landed since `delta`'s snapshot, even one in another partition (two ranks); it is then
        retried on the new snapshot, as long as this partition's files are still the `listed` ones
        the actions were built from. A change to them is a real conflict (LakeError)."""
        spec = declared(table)
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                delta.create_write_transaction(
                    actions, mode="append", schema=spec.arrow_schema, partition_by=list(spec.partition_by)
                )
                return
            except CommitFailedError:
                delta = self.open(table)
                now = {fragment.path for fragment in partition_fragments(delta, partition_values)}
                if attempt + 1 == COMMIT_ATTEMPTS or now != listed:
                    raise

    def _refuse_a_concurrent_write(self, table: str, files, other_keys: dict, added: list, kept: set, keys: dict):
        """Two writers of one slice whose snapshots both predate the other's commit both commit when
        neither removes a file the other removed (an empty partition): the slice would hold both
        runs' rows. After the commit, rows of the slice in files this write neither kept nor added
        mean exactly that: this write's files are taken out again and it fails (LakeError)."""
        ours, latest = {action.path for action in added}, self.open(table)
        fragments = partition_fragments(latest, files.partition_values)
        if not ours <= {fragment.path for fragment in fragments}:
            return  # a later write replaced this one: nothing doubled
        if rows_of_slice_elsewhere(fragments, other_keys, ours | kept) == 0:
            return
        now = int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
        latest.create_write_transaction(
            [RemoveAction(path, True, now, partition_values=files.partition_values) for path in ours],
            mode="append",
            schema=declared(table).arrow_schema,
            partition_by=list(declared(table).partition_by),
        )
        raise LakeError(
            f"another run committed slice {keys} of table {table} at the same time; this run's rows were "
            "taken out again, so the slice holds the other run's: rerun it to replace the slice"
        )

    def update(self, table: str, keys: dict, values: dict) -> int:
        """Set `values` on the rows selected by `keys` (like replace_slice); returns rows updated."""
        spec = declared(table)
        invalid = [name for name in values if name not in spec.column_names]
        if invalid:
            raise SchemaError(f"table {table} has no columns {invalid}")
        # SQL expressions built here: delta-rs's own `new_values` pastes strings between quotes unescaped
        updates = {name: update_value(spec.column(name).type, value) for name, value in values.items()}
        predicate = slice_predicate(spec, keys)
        metrics = _on_a_fresh_snapshot(lambda: self.open(table).update(updates=updates, predicate=predicate))
        return metrics["num_updated_rows"]

    def optimize(self, table: str) -> dict:
        """Compact small files into bigger ones: a new version with the same rows (the old files stay
        until vacuum). A table whose slices keep files of their own (`files_per_slice`: the vector
        tables, by fingerprint) is compacted partition by partition so that they still do: a slice's
        small files are merged and files mixing slices are split (delta-rs' bin-packing would mix
        them). Others by delta-rs. Returns the numbers of files removed and added, as delta-rs."""
        spec = declared(table)
        if not spec.files_per_slice:
            return self.open(table).optimize.compact()
        by_partition: dict[str, tuple[dict, list]] = {}
        for action in pa.table(self.open(table).get_add_actions(flatten=True)).to_pylist():
            values = {column: str(action[f"partition.{column}"]) for column in spec.partition_by}
            by_partition.setdefault(json.dumps(values, sort_keys=True), (values, []))[1].append(action)
        removed = added = skipped = 0
        for values, actions in by_partition.values():
            chosen = files_to_compact(actions, spec.files_per_slice)
            if chosen:
                sizes = {a["path"]: a["size_bytes"] for a in actions if a["path"] in chosen}
                counts = self._rewrite_files(table, values, sizes)
                removed, added, skipped = removed + counts[0], added + counts[1], skipped + (counts == (0, 0))
        return {"numFilesRemoved": removed, "numFilesAdded": added, "partitionsSkipped": skipped}

    def _rewrite_files(self, table: str, partition_values: dict, sizes: dict) -> tuple[int, int]:
        """Rewrites the partition's files `sizes` names (path -> bytes) with the same rows, each value
        of the table's `files_per_slice` in files of its own, in one commit of actions marked as no
        change of data (change-feed readers skip it). (files removed, added); (0, 0) when another
        writer changed the partition meanwhile: nothing is committed, the next compaction tries again.
        A file whose pages or vectors fail their checks is not rewritten (LakeError naming it)."""
        spec = declared(table)
        # the latest snapshot: a snapshot older than the previous partition's commit would be refused
        delta = self.open(table)
        # the schema from the log: a dataset of the whole table would make a fragment per file
        fragments, schema = partition_fragments(delta, partition_values), pa.schema(delta.schema().to_arrow())
        if not set(sizes) <= {fragment.path for fragment in fragments}:
            return 0, 0  # a writer replaced some of them since they were chosen
        files = SliceFiles(delta, spec.arrow_schema, partition_values, self.storage_options, spec.files_per_slice)
        try:
            for fragment in fragments:
                if fragment.path in sizes:
                    self._copy_checked(table, fragment, schema, files)
            now = int(time.time() * 1000)
            removes = [RemoveAction(p, False, now, size=n, partition_values=partition_values) for p, n in sizes.items()]
            added = files.finish(data_change=False)
            self._commit_partition(table, delta, [*added, *removes], partition_values, {f.path for f in fragments})
        except CommitFailedError:
            files.discard()
            return 0, 0
        except BaseException:
            files.discard()
            raise
        return len(removes), len(added)

    @staticmethod
    def _copy_checked(table: str, fragment, schema: pa.Schema, files: SliceFiles) -> None:
        """The file's rows into `files`, its Parquet pages and vectors checked on the way."""
        where = f"table {table}, file {fragment.path}"
        batches = fragment.to_batches(
            schema=schema, columns=files.schema.names, use_threads=False, fragment_scan_options=VERIFY_PAGES
        )
        while True:
            try:  # a failed read names the file; a failed write (files.write) is the writer's own error
                batch = next(batches, None)
                if batch is None:
                    return
                check_vectors(batch, where)
            except (OSError, pa.ArrowException, CorruptVector) as error:
                raise LakeError(
                    f"{where}: not compacted, it does not read back whole ({error}); run `python -m jobs verify`"
                ) from error
            files.write(pa.Table.from_batches([batch]).cast(files.schema))  # string_view back to string

    def vacuum(self, table: str, retention_hours: int) -> list[str]:
        """Delete files no longer referenced by versions newer than retention_hours; returns them.

        Time travel to versions older than the retention stops working afterwards.
        """
        return self.open(table).vacuum(retention_hours=retention_hours, dry_run=False, enforce_retention_duration=False)


def _check_rows_in_slice(spec: Table, data: pa.Table, keys: dict) -> None:
    for name, value in keys.items():
        column = data.column(name)
        inside = (
            pc.is_null(column)
            if value is None
            else pc.is_in(column, pa.array(value, column.type))
            if isinstance(value, (list, tuple))
            else pc.equal(column, value)
        )
        outside = pc.sum(pc.invert(pc.fill_null(inside, False)))
        if outside.as_py():
            raise SchemaError(
                f"table {spec.name}: {outside.as_py()} row(s) have {name} != {value!r}, "
                "outside the slice being replaced"
            )


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
