"""Where the lake's tables are, and opening or creating one with its declared schema checked.

`LakeTables` is the base of `infra.lake.Lake`; its reads (`infra.lake_reads`) and its Spark bridge
(`infra.lake_spark`) build on it. Callers use `Lake`.
"""

from __future__ import annotations

from pathlib import Path

from deltalake import DeltaTable

from infra import storage
from schemas.tables import SchemaError, table as declared


class LakeError(RuntimeError):
    """An operation on the lake is not possible."""


class TableNotFoundError(FileNotFoundError):
    """A table that must exist has not been written yet."""


class LakeTables:
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

    def version(self, table: str) -> int | None:
        """The latest version, None if the table has not been written yet."""
        return self.open(table).version() if self.exists(table) else None

    def history(self, table: str, limit: int | None = None) -> list[dict]:
        """Commits, newest first: version, timestamp, operation, operationParameters, ..."""
        return self.open(table).history(limit)
