"""The lake from Spark jobs (Sail embedded, or any Spark Connect cluster with Delta): DataFrames
over the Delta tables, and writes with the declared columns and types, a slice replaced atomically
with Delta's replaceWhere.
"""

from __future__ import annotations

import re

from infra.lake_tables import LakeError, LakeTables
from infra.predicates import slice_predicate
from schemas.tables import table as declared

# How Sail ("Failed to commit transaction", "Missing commit file") and Delta on Apache Spark
# (Concurrent*Exception) report a commit that lost to another writer's.
_LOST_COMMIT = re.compile(
    r"Failed to commit transaction|Missing commit file|Concurrent\w*Exception|ConcurrentModification"
)


class LakeSpark(LakeTables):
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
