"""The lake: Delta tables under one root, a local folder or `s3://bucket/prefix`.

Python-side writers and readers use delta-rs (`deltalake`); Spark jobs use `format("delta")`
through `spark_read` / `spark_write`. Every write is validated against the table's declaration
in `schemas.tables`. `replace_slice` is the idempotent write: it replaces exactly the rows of one
slice (e.g. one checkpoint × partition) in a single commit, so a retried or killed task that
reruns never duplicates rows.

S3: standard AWS settings from the environment (AWS_ENDPOINT_URL, AWS_REGION, credentials);
`AWS_ALLOW_HTTP=true` for a plain-http endpoint such as a loopback test server.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError

from schemas.tables import TABLES, Table

_AWS_OPTIONS = {"AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3": "AWS_ENDPOINT_URL",
                "AWS_REGION": "AWS_REGION", "AWS_DEFAULT_REGION": "AWS_REGION", "AWS_ALLOW_HTTP": "AWS_ALLOW_HTTP",
                "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN": "AWS_SESSION_TOKEN"}


def is_s3(uri: str) -> bool:
    return str(uri).startswith(("s3://", "s3a://"))


def _sql_literal(value) -> str:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"unsupported slice key value {value!r}")
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def slice_predicate(**keys) -> str:
    """SQL predicate selecting one slice, e.g. checkpoint_id = 'c1' AND partition = 3."""
    if not keys:
        raise ValueError("a slice needs at least one key")
    return " AND ".join(f"{name} = {_sql_literal(value)}" for name, value in keys.items())


class Lake:
    def __init__(self, root: str | os.PathLike):
        self.root = str(root).rstrip("/")
        if not is_s3(self.root):
            self.root = str(Path(self.root).resolve())

    def __repr__(self):
        return f"Lake({self.root!r})"

    @property
    def storage_options(self) -> dict | None:
        if not is_s3(self.root):
            return None
        options = {target: os.environ[source] for source, target in _AWS_OPTIONS.items() if os.environ.get(source)}
        # concurrent writers on S3 are safe without a lock table where the store honours If-None-Match
        options.setdefault("AWS_S3_ALLOW_UNSAFE_RENAME", "true")
        options.setdefault("conditional_put", "etag")
        return options

    def path(self, table: str) -> str:
        return f"{self.root}/{_declaration(table).name}"

    def file_path(self, *parts: str) -> str:
        """A path for files kept next to the tables (matrices, reports)."""
        return "/".join([self.root, *parts])

    # ---------------------------------------------------------------- tables
    def exists(self, table: str) -> bool:
        return DeltaTable.is_deltatable(self.path(table), storage_options=self.storage_options)

    def open(self, table: str, version: int | None = None) -> DeltaTable:
        declaration = _declaration(table)
        try:
            dt = DeltaTable(self.path(table), version=version, storage_options=self.storage_options)
        except TableNotFoundError:
            raise FileNotFoundError(f"table {table!r} does not exist under {self.root}") from None
        declaration.check_version(dt.metadata().configuration)
        return dt

    def create(self, table: str) -> DeltaTable:
        """The table, created empty with its declared schema and properties if it does not exist."""
        declaration = _declaration(table)
        if self.exists(table):
            return self.open(table)
        return DeltaTable.create(self.path(table), declaration.arrow_schema, mode="ignore",
                                 partition_by=list(declaration.partition_by) or None,
                                 description=declaration.description, configuration=declaration.properties,
                                 storage_options=self.storage_options, raise_if_key_not_exists=False)

    def append(self, table: str, data: pa.Table) -> int:
        declaration = _declaration(table)
        dt = self.create(table)
        write_deltalake(dt, declaration.conform(data), mode="append")
        return data.num_rows

    def replace_slice(self, table: str, data: pa.Table, **keys) -> int:
        """Replace the rows matching `keys` (column = value, ANDed) by `data`, in one commit."""
        declaration = _declaration(table)
        data = declaration.conform(data)
        for name, value in keys.items():
            if name not in data.column_names:
                raise ValueError(f"{table}: slice key {name!r} is not a column")
            values = set(data.column(name).to_pylist())
            if values - {value}:
                raise ValueError(f"{table}: rows outside the slice {name}={value!r}: {sorted(map(str, values))[:3]}")
        dt = self.create(table)
        write_deltalake(dt, data, mode="overwrite", predicate=slice_predicate(**keys))
        return data.num_rows

    def read(self, table: str, filters=None, columns: list[str] | None = None, version: int | None = None) -> pa.Table:
        """Rows as Arrow; `filters` in pyarrow form, e.g. [("partition", "=", 3)].

        Reads through the dataset API single-threaded: `to_pyarrow_table()` aborts the process at
        exit at random with deltalake 1.6 (see NOTES).
        """
        if not self.exists(table):
            return _declaration(table).arrow_schema.empty_table().select(columns or _declaration(table).arrow_schema.names)

        dataset = self.open(table, version).to_pyarrow_dataset()
        expression = _filter_expression(filters) if filters else None
        return dataset.to_table(columns=columns, filter=expression, use_threads=False)

    def version(self, table: str) -> int | None:
        return self.open(table).version() if self.exists(table) else None

    def history(self, table: str) -> list[dict]:
        return self.open(table).history()

    def optimize(self, table: str) -> dict:
        return self.open(table).optimize.compact()

    def vacuum(self, table: str, retention_hours: int = 168) -> list[str]:
        return self.open(table).vacuum(retention_hours=retention_hours, enforce_retention_duration=False, dry_run=False)

    # ---------------------------------------------------------------- Spark
    def spark_read(self, spark, table: str, version: int | None = None):
        reader = spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.load(self.path(table))

    def spark_write(self, df, table: str, replace_where: str | None = None) -> None:
        """Append `df` (after creating the table with its declared schema), or replace the rows
        matching `replace_where` in one commit."""
        declaration = _declaration(table)
        self.create(table)
        df = df.select(*[df[c.name].cast(_spark_type(c)) for c in declaration.columns])
        writer = df.write.format("delta")
        if replace_where:
            writer = writer.mode("overwrite").option("replaceWhere", replace_where)
        else:
            writer = writer.mode("append")
        writer.save(self.path(table))


def _declaration(table: str) -> Table:
    if table not in TABLES:
        raise KeyError(f"unknown table {table!r}; tables: {sorted(TABLES)}")
    return TABLES[table]


def _spark_type(column) -> str:
    from schemas.tables import TYPES

    return TYPES[column.type][1]


def _filter_expression(filters):
    import pyarrow.compute as pc

    ops = {"=": lambda f, v: f == v, "==": lambda f, v: f == v, "!=": lambda f, v: f != v, "<": lambda f, v: f < v,
           "<=": lambda f, v: f <= v, ">": lambda f, v: f > v, ">=": lambda f, v: f >= v,
           "in": lambda f, v: f.isin(list(v)), "not in": lambda f, v: ~f.isin(list(v))}
    expression = None
    for name, op, value in filters:
        term = ops[op](pc.field(name), value)
        expression = term if expression is None else expression & term
    return expression
