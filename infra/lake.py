"""The lake: one Delta table per declared schema under a root folder or s3://bucket/prefix.

Python-side writers and readers go through delta-rs (`Lake`); Spark jobs through `Lake.spark_read` /
`Lake.spark_write` (format("delta")). Every write is validated against `schemas.tables` first, and
every open checks the table's stored schema version.

Idempotence: a task rewrites its own slice with `replace_slice` (one atomic Delta commit that
removes the slice's old files and adds the new ones), so a retried or crashed-and-rerun task never
duplicates rows, and a task killed mid-way leaves no partial commit behind.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import RemoveAction

from infra import storage
from infra.slice_files import SliceFiles, partition_fragments, replaced_files, rows_of_slice_elsewhere
from schemas.tables import SchemaError, Table, table as declared
from schemas.vectors import CorruptVector, check_vectors

# Parquet page CRCs (written by `infra.slice_files`) are checked by every pyarrow read.
VERIFY_PAGES = ds.ParquetFragmentScanOptions(page_checksum_verification=True)


# How Sail ("Failed to commit transaction", "Missing commit file") and Delta on Apache Spark
# (Concurrent*Exception) report a commit that lost to another writer's.
_LOST_COMMIT = re.compile(
    r"Failed to commit transaction|Missing commit file|Concurrent\w*Exception|ConcurrentModification"
)

# commits of a streamed slice tried before giving up, while other partitions' commits keep landing
COMMIT_ATTEMPTS = 20


class LakeError(RuntimeError):
    """An operation on the lake is not possible."""


class TableNotFoundError(FileNotFoundError):
    """A table that must exist has not been written yet."""


class Lake:
    def __init__(self, root: str | Path):
        root = str(root)
        self.root = root.rstrip("/") if storage.is_s3(root) else str(Path(root).resolve())

    def __repr__(self) -> str:
        return f"Lake({self.root!r})"

    def relative(self, location: str | Path) -> str:
        """`location` as the lake's tables store it: relative to the root when it lies inside the
        lake, so a lake copied or moved to another folder or bucket finds its files; else absolute."""
        absolute = storage.absolute(location)
        if absolute.startswith(self.root + "/"):
            return absolute[len(self.root) + 1 :]
        return absolute

    def resolve(self, stored: str) -> str:
        """A location read from the lake's tables (see `relative`), made absolute."""
        if storage.is_s3(stored) or Path(stored).is_absolute():
            return stored
        return storage.join(self.root, stored)

    @property
    def is_s3(self) -> bool:
        return storage.is_s3(self.root)

    @property
    def storage_options(self) -> dict[str, str]:
        return storage.delta_storage_options() if self.is_s3 else {}

    def path(self, table: str) -> str:
        return f"{self.root}/{declared(table).name}"

    def exists(self, table: str) -> bool:
        return DeltaTable.is_deltatable(self.path(table), storage_options=self.storage_options)

    def create(self, table: str) -> DeltaTable:
        """The table, created empty with its declared schema, partitioning and properties if missing."""
        spec = declared(table)
        if not self.exists(table):
            # raise_if_key_not_exists=False: delta-rs refuses non-"delta." properties otherwise.
            DeltaTable.create(
                self.path(table),
                spec.arrow_schema,
                mode="ignore",
                partition_by=list(spec.partition_by),
                name=spec.name,
                description=spec.description,
                configuration=spec.table_properties,
                storage_options=self.storage_options,
                raise_if_key_not_exists=False,
            )
        return self.open(table)

    def open(self, table: str, version: int | None = None) -> DeltaTable:
        """The existing table (at `version`), after checking its schema version and columns."""
        spec = declared(table)
        if not self.exists(table):
            raise TableNotFoundError(f"table {table} does not exist at {self.path(table)} (nothing written to it yet)")
        delta = DeltaTable(self.path(table), version=version, storage_options=self.storage_options)
        metadata = delta.metadata()
        spec.check_version(metadata.configuration)
        if list(metadata.partition_columns) != list(spec.partition_by):
            raise SchemaError(
                f"table {table}: stored partition columns {metadata.partition_columns}, "
                f"declared {list(spec.partition_by)}"
            )
        stored = [f.name for f in delta.schema().fields]
        added = [c for c in spec.columns if c.name not in stored and c.nullable]
        if added and version is None:
            delta = self._add_columns(table, delta, added)
            stored = [f.name for f in delta.schema().fields]
        spec.check_column_names(stored)
        return delta

    def _add_columns(self, table: str, delta: DeltaTable, columns: list) -> DeltaTable:
        """A table written by an older version gains the declared nullable columns it lacks (one
        metadata-only commit; its rows read null there). Two processes may race to do it."""
        from deltalake.schema import Field, PrimitiveType

        delta_types = {"BIGINT": "long", "INT": "integer", "FLOAT": "float", "DOUBLE": "double", "STRING": "string"}
        fields = [Field(c.name, PrimitiveType(delta_types[c.type]), nullable=True) for c in columns]
        try:
            delta.alter.add_columns(fields)
        except Exception as error:  # noqa: BLE001 - delta-rs raises several kinds; retry on the latest state
            delta = DeltaTable(self.path(table), storage_options=self.storage_options)
            if any(c.name not in [f.name for f in delta.schema().fields] for c in columns):
                raise LakeError(f"table {table}: could not add the new column(s) {[c.name for c in columns]}: {error}")
            return delta
        print(f"[lake] table {table}: added column(s) {[c.name for c in columns]} (rows written before hold null)")
        return DeltaTable(self.path(table), storage_options=self.storage_options)

    def append(self, table: str, data: pa.Table | pa.RecordBatch) -> int:
        """Validate and append rows; returns the new table version."""
        spec, delta = declared(table), self.create(table)
        write_deltalake(delta, spec.validate(data), mode="append")
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
        files = SliceFiles(self.create(table), spec.arrow_schema, partition_values, self.storage_options)
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
        updates = {name: _update_value(spec.column(name).type, value) for name, value in values.items()}
        metrics = self.open(table).update(updates=updates, predicate=slice_predicate(spec, keys))
        return metrics["num_updated_rows"]

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
        dataset = self.open(table, version=version).to_pyarrow_dataset()
        reading, expression = _with_checksum_columns(spec, columns), _filter_expression(spec, filters)
        try:
            # use_threads=False: threaded delta-rs reads have aborted the interpreter at exit here.
            rows = dataset.to_table(
                columns=reading, filter=expression, use_threads=False, fragment_scan_options=VERIFY_PAGES
            )
            if reading != columns:
                check_vectors(rows, f"table {table}")
        except (OSError, pa.ArrowException, CorruptVector) as error:
            self.raise_file_problems(table, filters, error)
            raise LakeError(f"table {table}: {error}") from error
        return rows.select(columns)

    def read_batches(self, table: str, filters=None, columns: list[str] | None = None, rows: int = 8192):
        """The rows of `read`, as tables of at most `rows` rows each, read as they are consumed,
        file by file (without pyarrow's read-ahead: over 1.9 GB of vectors it held 0.78 GB; without,
        0.31 GB, at the same speed), checked like `read`'s."""
        spec = declared(table)
        if not self.exists(table):
            return
        columns = columns or spec.column_names
        reading, expression = _with_checksum_columns(spec, columns), _filter_expression(spec, filters)
        dataset = self.open(table).to_pyarrow_dataset()
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
                        if reading != columns:
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
        dataset = self.open(table).to_pyarrow_dataset()
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
        actions = pa.table(delta.get_add_actions(flatten=True)).to_pylist()
        constant, varying = [], set()
        for action in actions:
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
        dataset = delta.to_pyarrow_dataset()
        fragments = [f for f in dataset.get_fragments() if f.path in varying]
        return constants, ds.FileSystemDataset(fragments, dataset.schema, dataset.format, dataset.filesystem)

    def version(self, table: str) -> int | None:
        """The latest version, None if the table has not been written yet."""
        return self.open(table).version() if self.exists(table) else None

    def history(self, table: str, limit: int | None = None) -> list[dict]:
        """Commits, newest first: version, timestamp, operation, operationParameters, ..."""
        return self.open(table).history(limit)

    def optimize(self, table: str) -> dict:
        """Compact small files into bigger ones (a new version; old files stay until vacuum)."""
        return self.open(table).optimize.compact()

    def vacuum(self, table: str, retention_hours: int) -> list[str]:
        """Delete files no longer referenced by versions newer than retention_hours; returns them.

        Time travel to versions older than the retention stops working afterwards.
        """
        return self.open(table).vacuum(retention_hours=retention_hours, dry_run=False, enforce_retention_duration=False)

    # Spark jobs (Sail embedded or any Spark Connect cluster with Delta)

    def spark_read(self, spark, table: str, version: int | None = None):
        """A DataFrame over the Delta table, after the same schema-version check as `open`."""
        self.open(table, version=version)
        reader = spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.load(self.path(table))

    def spark_write(self, df, table: str, mode: str | None = None, replace_where: str | dict | None = None) -> None:
        """Write a DataFrame with exactly the declared columns (cast to the declared types).

        replace_where replaces one slice atomically (Delta replaceWhere): {key: value} (values
        quoted safely) or a Spark SQL predicate string. mode defaults to "overwrite" with
        replace_where, else "append"; "overwrite" without it replaces the whole table. The Delta
        writer enforces NOT NULL.
        """
        from pyspark.sql import functions as F

        spec = declared(table)
        spec.check_column_names(df.columns)
        mode = mode or ("overwrite" if replace_where else "append")
        if mode not in ("append", "overwrite") or (replace_where and mode != "overwrite"):
            raise ValueError(f"mode must be append or overwrite (overwrite with replace_where), got {mode!r}")
        from infra.spark import is_embedded

        if is_embedded(df.sparkSession):
            self.create(table)  # declared schema, partitioning and properties come from delta-rs
        else:
            self.spark_create(df.sparkSession, table)  # Apache Spark: created and written by Spark alone
        columns = [F.col(c.name).cast(c.type).alias(c.name) for c in spec.columns]
        writer = df.select(columns).write.format("delta").mode(mode)
        if replace_where:
            predicate = replace_where if isinstance(replace_where, str) else slice_predicate(spec, replace_where, "`")
            writer = writer.option("replaceWhere", predicate)
        try:
            writer.save(self.path(table))
        except Exception as error:  # noqa: BLE001 - the engines raise their own classes; the text tells a lost race
            if not _LOST_COMMIT.search(str(error)):
                raise
            raise LakeError(
                f"another run committed to table {table} at the same time{f' (slice {replace_where})' if replace_where else ''}; "
                "nothing of this write was committed: rerun it. The files it had written are referenced by no "
                "version and `maintenance` vacuums them after the retention (deleting them now could delete a "
                "third writer's files before its commit)"
            ) from error

    def spark_create(self, spark, table: str) -> None:
        """Create the table with its declared schema, partitioning and properties through Spark SQL."""
        spec = declared(table)
        if self.exists(table):
            return
        partitioned = f" PARTITIONED BY ({', '.join(f'`{c}`' for c in spec.partition_by)})" if spec.partition_by else ""
        properties = ", ".join(f"'{key}' = '{value}'" for key, value in spec.table_properties.items())
        spark.sql(
            f"CREATE TABLE IF NOT EXISTS delta.`{self.path(table)}` ({spec.spark_ddl}) USING delta{partitioned} "
            f"TBLPROPERTIES ({properties})"
        )


def slice_predicate(spec: Table, keys: dict, quote: str = '"') -> str:
    """SQL predicate selecting one slice, values quoted as literals; `quote` quotes identifiers
    (double quotes for delta-rs, backticks for Spark)."""
    if not keys:
        raise SchemaError(f"table {spec.name}: a slice needs at least one key of {list(spec.key_columns)}")
    return " AND ".join(_equals(spec, name, value, quote) for name, value in sorted(keys.items()))


def _equals(spec: Table, name: str, value, quote: str) -> str:
    if name not in spec.key_columns:
        raise SchemaError(f"table {spec.name}: {name!r} is not a slice key; keys are {list(spec.key_columns)}")
    column = f"{quote}{name}{quote}"
    if value is None:
        return f"{column} IS NULL"
    if isinstance(value, (list, tuple)):  # several slices replaced at once
        if not value:
            raise SchemaError(f"table {spec.name}: an empty list of {name} values selects no slice")
        literals = [_literal(spec.column(name).type, v, f"{spec.name}.{name}", spark=quote == "`") for v in value]
        return f"{column} IN ({', '.join(literals)})"
    return f"{column} = {_literal(spec.column(name).type, value, f'{spec.name}.{name}', spark=quote == '`')}"


def _literal(sql_type: str, value, where: str, spark: bool = False) -> str:
    """A value as an SQL literal. Spark reads backslash escapes and takes 'a''b' for two adjacent
    literals ("ab"); delta-rs (DataFusion) reads '' as one quote and backslashes as themselves."""
    if sql_type in ("INT", "BIGINT") and isinstance(value, int) and not isinstance(value, bool):
        return str(int(value))
    if sql_type == "STRING" and isinstance(value, str) and spark:
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if sql_type == "STRING" and isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise SchemaError(f"{where}: slice key value {value!r} is not a {sql_type}")


def _update_value(sql_type: str, value) -> str:
    """A value as a delta-rs SQL expression: strings quoted with quotes doubled, timestamps in microseconds."""
    if value is None:
        return "NULL"
    if isinstance(value, dt.datetime):
        return str(int(value.timestamp() * 1_000_000))
    if isinstance(value, str):
        return _literal("STRING", value, sql_type)
    if isinstance(value, (bool, int, float)):
        return str(value).lower() if isinstance(value, bool) else repr(value)
    raise SchemaError(f"cannot store a {type(value).__name__} in a {sql_type} column")


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


_OPERATORS = {
    "=": "__eq__",
    "==": "__eq__",
    "!=": "__ne__",
    "<": "__lt__",
    "<=": "__le__",
    ">": "__gt__",
    ">=": "__ge__",
}


def _with_checksum_columns(spec: Table, columns: list[str]) -> list[str]:
    """`columns`, plus what checking the vectors among them needs (their checksum and scale)."""
    if "vector" not in columns or "checksum" not in spec.column_names:
        return columns
    return [*columns, *(c for c in ("scale", "checksum") if c not in columns)]


def _filter_columns(filters) -> list[str]:
    if not filters:
        return []
    return list(filters) if isinstance(filters, dict) else [name for name, _, _ in filters]


def _filter_expression(spec: Table, filters) -> ds.Expression | None:
    if not filters:
        return None
    conditions = [(n, "=", v) for n, v in filters.items()] if isinstance(filters, dict) else filters
    expression = None
    for name, op, value in conditions:
        spec.column(name)
        field = ds.field(name)
        if op in _OPERATORS:
            condition = getattr(field, _OPERATORS[op])(value)
        elif op in ("in", "not in"):
            condition = field.isin(list(value)) if op == "in" else ~field.isin(list(value))
        else:
            raise ValueError(f"unknown filter operator {op!r}; use one of {[*_OPERATORS, 'in', 'not in']}")
        expression = condition if expression is None else expression & condition
    return expression


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
