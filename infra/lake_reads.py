"""The lake's reads: rows as Arrow, whole or in bounded batches, every vector checked against its
checksum and every Parquet page against its CRC; distinct values and row counts from the Delta log
wherever it can tell; the file-level checks that name the file and row behind a failed read.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from infra.lake_tables import LakeError, LakeTables
from schemas.tables import Table, table as declared
from schemas.vectors import CorruptVector, check_vectors


def read_ahead(items: Iterator, depth: int = 1) -> Iterator:
    """`items`, produced by a thread up to `depth` ahead of the consumer: reading (pyarrow, the
    checksums) overlaps the consumer's compute (torch), both outside the GIL for the most part. The
    producer's error is raised in the consumer; a consumer that stops early stops the producer."""
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stopped = threading.Event()

    def put(item) -> bool:
        while not stopped.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as error:  # handed to the consumer, raised there
            put(("error", error))

    producer = threading.Thread(target=produce, name="read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            kind, item = ahead.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stopped.set()
        producer.join()


# Parquet page CRCs (written by `infra.slice_files`) are checked by every pyarrow read.
VERIFY_PAGES = ds.ParquetFragmentScanOptions(page_checksum_verification=True)


class LakeReads(LakeTables):
    def read(self, table: str, filters=None, columns: list[str] | None = None, version: int | None = None) -> pa.Table:
        """Rows of the table (at `version`) as Arrow, in declared column order; no rows if the
        table has not been written yet (asking for a version of it is an error). Vectors read are
        checked against their checksums; a failure names the table, the file and the row (LakeError).

        filters: {column: value} for equality, or [(column, op, value), ...] with op one of
        = != < <= > >= in not in; all must hold.
        """
        spec = declared(table)
        columns = columns or spec.column_names
        for name in columns:
            spec.column(name)
        if version is None and not self.exists(table):
            return spec.arrow_schema.empty_table().select(columns)
        dataset = self._dataset(table, filters, version)
        reading, expression = _with_checksum_columns(spec, columns), _filter_expression(spec, filters)
        try:
            # use_threads=False: threaded delta-rs reads have aborted the interpreter at exit here.
            rows = dataset.to_table(
                columns=reading, filter=expression, use_threads=False, fragment_scan_options=VERIFY_PAGES
            )
            if _checks_vectors(reading):
                check_vectors(rows, f"table {table}")
        except (OSError, pa.ArrowException, CorruptVector) as error:
            self.raise_file_problems(table, filters, error)
            raise LakeError(f"table {table}: {error}") from error
        return rows.select(columns)

    def read_batches(
        self, table: str, filters=None, columns: list[str] | None = None, rows: int = 8192, ahead: bool = False
    ) -> Iterator[pa.Table]:
        """The rows of `read`, as tables of at most `rows` rows each, read as they are consumed,
        file by file (without pyarrow's read-ahead: over 1.9 GB of vectors it held 0.78 GB; without,
        0.31 GB, at the same speed), checked like `read`'s. `ahead`: the next batch is read and
        checked in a thread while the caller works on this one (`read_ahead`)."""
        batches = self._read_batches(table, filters, columns, rows)
        return read_ahead(batches) if ahead else batches

    def _read_batches(self, table: str, filters, columns: list[str] | None, rows: int) -> Iterator[pa.Table]:
        spec = declared(table)
        if not self.exists(table):
            return
        columns = columns or spec.column_names
        reading, expression = _with_checksum_columns(spec, columns), _filter_expression(spec, filters)
        dataset = self._dataset(table, filters)
        for fragment in dataset.get_fragments(filter=expression):
            where = f"table {table}, file {fragment.path}"
            try:
                for batch in fragment.to_batches(
                    schema=dataset.schema,
                    columns=reading,
                    filter=expression,
                    batch_size=rows,
                    use_threads=False,
                    batch_readahead=0,
                    fragment_scan_options=VERIFY_PAGES,
                ):
                    if batch.num_rows:
                        if _checks_vectors(reading):
                            check_vectors(batch, where)
                        yield pa.Table.from_batches([batch]).select(columns)
            except CorruptVector as error:
                raise LakeError(str(error)) from error
            except (OSError, pa.ArrowException) as error:
                raise LakeError(f"{where}: cannot be read ({error}); run `python -m jobs verify`") from error

    def raise_file_problems(self, table: str, filters, error: Exception) -> None:
        """After `error` in a read of the table (`filters` as in `read`), raises a LakeError naming
        the file and row behind it (`file_problems`' first finding); returns if every file reads."""
        problems = self.file_problems(table, filters)
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise LakeError(f"{problems[0]}{more}; run `python -m jobs verify`") from error

    def file_problems(self, table: str, filters=None) -> list[str]:
        """Reads every file of the table (that `filters` can select) whole, checking Parquet page
        CRCs and vector checksums; one line per file that fails, naming the table, file and row."""
        spec = declared(table)
        dataset = self._dataset(table, filters)
        expression, problems = _filter_expression(spec, filters), []
        for fragment in dataset.get_fragments(filter=expression):
            where = f"table {table}, file {fragment.path}"
            try:
                for batch in fragment.to_batches(
                    schema=dataset.schema,
                    batch_size=4096,
                    use_threads=False,
                    batch_readahead=0,
                    fragment_scan_options=VERIFY_PAGES,
                ):
                    if "checksum" in spec.column_names:
                        check_vectors(batch, where)
            except CorruptVector as corrupt:
                problems.append(str(corrupt))
            except (OSError, pa.ArrowException) as failed:
                problems.append(f"{where}: cannot be read ({failed})")
        return problems

    def _dataset(self, table: str, filters, version: int | None = None) -> ds.Dataset:
        """The table (at `version`) as a pyarrow dataset of only the files in the partitions that
        `filters` can select: delta-rs prunes the log's file list before it makes a fragment per file,
        which costs up to ~0.35 ms a file (a train_gradients of 4,096 files: 1.45 s for every read,
        against 6 ms for one partition's; `bench/file_count.py`). The caller still filters the rows."""
        pruning = _partition_conditions(declared(table), filters)
        return self.open(table, version=version).to_pyarrow_dataset(file_pruning_predicate=pruning or None)

    def distinct(self, table: str, columns: list[str], filters=None) -> set[tuple]:
        """The distinct values of `columns` among the rows `filters` select (as in `read`), taken from
        the Delta log wherever it can tell (`_file_constants`): planning costs per file, not per row."""
        constants, unresolved = self._file_constants(table, [*columns, *_filter_columns(filters)], filters)
        found = set(zip(*(constants[c].to_pylist() for c in columns))) if constants.num_rows else set()
        if unresolved is not None:
            rows = unresolved.to_table(columns=columns, filter=_filter_expression(declared(table), filters))
            found |= set(zip(*(rows[c].to_pylist() for c in columns)))
        return found

    def count_rows(self, table: str, filters=None) -> int:
        """The number of rows `filters` select, from the Delta log's row counts wherever it can tell."""
        constants, unresolved = self._file_constants(table, _filter_columns(filters), filters)
        counted = sum(constants["_rows"].to_pylist())
        if unresolved is not None:
            counted += unresolved.count_rows(filter=_filter_expression(declared(table), filters))
        return counted

    def _file_constants(self, table: str, columns: list[str], filters) -> tuple[pa.Table, ds.Dataset | None]:
        """(one row per data file whose `columns` are constant in it and that `filters` select, with its
        row count `_rows`; a dataset of the files where some column varies, or None). A column is
        constant in a file when it is a partition column, or when the log's statistics give it equal
        min and max and no nulls, as they do for the one fingerprint or run of an extraction's file."""
        spec = declared(table)
        schema = pa.schema(
            [spec.arrow_schema.field(c) for c in dict.fromkeys(columns)] + [pa.field("_rows", pa.int64())]
        )
        if not self.exists(table):
            return schema.empty_table(), None
        delta = self.open(table)
        actions = pa.table(delta.get_add_actions(flatten=True))
        pruning = _partition_conditions(spec, filters)
        if pruning:  # only the selected partitions' actions reach Python
            actions = actions.filter(pq.filters_to_expression([(f"partition.{c}", op, v) for c, op, v in pruning]))
        constant, varying = [], set()
        for action in actions.to_pylist():
            row = {"_rows": action["num_records"]}
            for name in schema.names[:-1]:
                low, high = action.get(f"min.{name}"), action.get(f"max.{name}")
                if name in spec.partition_by:
                    row[name] = action[f"partition.{name}"]
                elif low is not None and low == high and action.get(f"null_count.{name}") == 0:
                    row[name] = low
                else:
                    varying.add(action["path"])
                    break
            else:
                if row["_rows"] is None:  # a file written without statistics: count its rows
                    varying.add(action["path"])
                else:
                    constant.append(row)
        constants = pa.Table.from_pylist(constant, schema=schema)
        expression = _filter_expression(spec, filters)
        if expression is not None and constants.num_rows:
            constants = constants.filter(expression)
        if not varying:
            return constants, None
        dataset = delta.to_pyarrow_dataset(file_pruning_predicate=pruning or None)
        fragments = [f for f in dataset.get_fragments() if f.path in varying]
        return constants, ds.FileSystemDataset(fragments, dataset.schema, dataset.format, dataset.filesystem)


def _with_checksum_columns(spec: Table, columns: list[str]) -> list[str]:
    """`columns`, plus what checking the vectors among them needs (their checksum and scale)."""
    if "vector" not in columns or "checksum" not in spec.column_names:
        return columns
    return [*columns, *(c for c in ("scale", "checksum") if c not in columns)]


def _checks_vectors(reading: list[str]) -> bool:
    """Whether a read of `reading` (`_with_checksum_columns`' list) checks vectors against their
    checksums: whenever it reads both, also when the caller asked for every column."""
    return "vector" in reading and "checksum" in reading


def _conditions(filters) -> list[tuple]:
    """`filters` (as in `LakeReads.read`) as [(column, op, value), ...]."""
    if not filters:
        return []
    return [(name, "=", value) for name, value in filters.items()] if isinstance(filters, dict) else list(filters)


def _partition_conditions(spec: Table, filters) -> list[tuple]:
    """The conditions of `filters` on partition columns with string or integer values, which delta-rs
    can apply to the log (a list for `in`: it refuses sets). Other values are left to the row filter
    alone: delta-rs fails to parse 2.0 as an integer partition value, and the Delta log writes an
    empty partition value as null, so delta-rs would match the two alike."""

    def plain(value) -> bool:
        return type(value) in (str, int) and value != ""

    kept = []
    for name, op, value in _conditions(filters):
        if name not in spec.partition_by:
            continue
        if op in ("in", "not in"):
            values = list(value)
            if values and all(map(plain, values)):
                kept.append((name, op, values))
        elif plain(value):
            kept.append((name, op, value))
    return kept


def _filter_columns(filters) -> list[str]:
    return [name for name, _, _ in _conditions(filters)]


def _filter_expression(spec: Table, filters) -> ds.Expression | None:
    """`filters` as a pyarrow expression, after checking that their columns exist."""
    conditions = _conditions(filters)
    if not conditions:
        return None
    for name, _, _ in conditions:
        spec.column(name)
    return pq.filters_to_expression(conditions)
