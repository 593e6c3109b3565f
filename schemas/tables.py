"""Every Delta table of the lake, declared once.

A `Table` lists its columns (Spark SQL type, nullability, one-line description), partition columns,
slice keys and schema version. Everything else is derived from that one declaration: the Arrow
schema (delta-rs writers, readers), the Spark DDL string (Spark jobs) and the validation of data
before it is written.

Types are written as Spark SQL types: STRING, INT, BIGINT, FLOAT, DOUBLE, BOOLEAN, BINARY,
TIMESTAMP (UTC, microseconds) and ARRAY<...> of those.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION_PROPERTY = "trackstar.schema_version"

_SCALAR_TYPES = {
    "STRING": pa.string(),
    "INT": pa.int32(),
    "BIGINT": pa.int64(),
    "FLOAT": pa.float32(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "BINARY": pa.binary(),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
}
_ARRAY_TYPE = re.compile(r"^ARRAY<(.+)>$")
# Spark DDL needs these names quoted (reserved or keyword-like in some SQL dialects).
_QUOTED_NAMES = {"partition", "lambda", "rank", "value", "timestamp", "position", "path", "kind"}


class SchemaError(ValueError):
    """Data or a stored table does not match the declared schema."""


class SchemaVersionError(SchemaError):
    """A stored table was written with another schema version than the code declares."""


def arrow_type(spark_type: str) -> pa.DataType:
    """The Arrow type of a Spark SQL type string; list items are named "element" as Delta names them."""
    spark_type = spark_type.strip().upper()
    array = _ARRAY_TYPE.match(spark_type)
    if array:
        return pa.list_(pa.field("element", arrow_type(array.group(1)), nullable=True))
    if spark_type not in _SCALAR_TYPES:
        raise SchemaError(f"unsupported column type {spark_type!r}")
    return _SCALAR_TYPES[spark_type]


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    description: str
    nullable: bool = False

    @property
    def arrow_field(self) -> pa.Field:
        return pa.field(self.name, arrow_type(self.type), nullable=self.nullable)

    @property
    def ddl(self) -> str:
        name = f"`{self.name}`" if self.name in _QUOTED_NAMES else self.name
        return f"{name} {self.type}" + ("" if self.nullable else " NOT NULL")


@dataclass(frozen=True)
class Table:
    name: str
    description: str
    columns: tuple[Column, ...]
    partition_by: tuple[str, ...] = ()
    # Columns besides the partition columns that may select a slice to replace (replace_slice).
    slice_keys: tuple[str, ...] = ()
    schema_version: int = 1
    properties: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        names = self.column_names
        unknown = [n for n in (*self.partition_by, *self.slice_keys) if n not in names]
        if unknown or len(set(names)) != len(names):
            raise SchemaError(f"table {self.name}: unknown key columns {unknown} or duplicate column names")

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise SchemaError(f"table {self.name} has no column {name!r}")

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([c.arrow_field for c in self.columns])

    @property
    def spark_ddl(self) -> str:
        return ", ".join(c.ddl for c in self.columns)

    @property
    def table_properties(self) -> dict[str, str]:
        """Delta table properties, the schema version among them."""
        return {**self.properties, SCHEMA_VERSION_PROPERTY: str(self.schema_version)}

    @property
    def key_columns(self) -> tuple[str, ...]:
        return (*self.partition_by, *self.slice_keys)

    @property
    def files_per_slice(self) -> tuple[str, ...]:
        """Slice keys whose every value keeps files of its own, as written and as compacted: the
        vector tables' (the fingerprint), read one value at a time. A file mixing values would make
        each such read read them all: the files' min/max statistics would cover every value."""
        return self.slice_keys if "vector" in self.column_names else ()

    def check_version(self, properties: dict[str, str]) -> None:
        """Raise SchemaVersionError unless stored table properties carry this schema version."""
        found = properties.get(SCHEMA_VERSION_PROPERTY)
        if found != str(self.schema_version):
            raise SchemaVersionError(
                f"table {self.name}: stored schema version {found or 'missing'}, this code expects "
                f"{self.schema_version}; migrate or rebuild the table"
            )

    def check_column_names(self, names: list[str]) -> None:
        missing = [n for n in self.column_names if n not in names]
        unexpected = [n for n in names if n not in self.column_names]
        if missing or unexpected:
            raise SchemaError(f"table {self.name}: missing columns {missing}, unexpected columns {unexpected}")

    def validate(self, data: pa.Table | pa.RecordBatch) -> pa.Table:
        """`data` cast to the declared schema (column order, exact types), or a SchemaError.

        Lossless widenings are accepted (int64 values into INT when they fit, float64 into FLOAT,
        large_string into STRING) and a nullable column may be left out (it is filled with nulls);
        a different kind of value (text in a number column), a missing NOT NULL column, an
        unexpected column, or a null in a NOT NULL column is an error naming the column. A vector
        table's rows without a checksum get one.
        """
        data = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
        self.check_column_names(data.column_names + [c.name for c in self.columns if c.nullable])
        rows = pa.Table.from_arrays(
            [self._conform(c, _column_or_nulls(data, c)) for c in self.columns], schema=self.arrow_schema
        )
        return _with_checksums(rows) if "checksum" in self.column_names else rows

    def _conform(self, column: Column, values: pa.ChunkedArray) -> pa.ChunkedArray:
        where = f"table {self.name}, column {column.name}"
        target = arrow_type(column.type)
        if not _same_kind(values.type, target):
            raise SchemaError(f"{where}: type {values.type}, expected {column.type}")
        if not column.nullable and values.null_count:
            first = pc.index(pc.is_null(values), True).as_py()
            raise SchemaError(f"{where}: {values.null_count} null(s) in a NOT NULL column (first at row {first})")
        try:
            return values.cast(target, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise SchemaError(f"{where}: values do not fit {column.type}: {error}") from error


def _with_checksums(rows: pa.Table) -> pa.Table:
    """Rows of a vector table, each vector without a checksum given one (from a writer that did not
    compute it, or rewritten from before checksums existed): from here on a changed byte is seen."""
    from schemas.vectors import vector_checksums

    checksums = rows.column("checksum")
    if not checksums.null_count:
        return rows
    computed = vector_checksums(rows.column("vector"), rows.column("scale"))
    filled = pc.if_else(pc.is_null(checksums), computed, checksums)
    return rows.set_column(rows.schema.get_field_index("checksum"), rows.schema.field("checksum"), filled)


def _column_or_nulls(data: pa.Table, column: Column) -> pa.ChunkedArray:
    if column.name in data.column_names:
        return data.column(column.name)
    return pa.chunked_array([pa.nulls(data.num_rows, arrow_type(column.type))])


def spark_type(arrow: pa.DataType) -> str:
    """The Spark SQL type of one of the declared Arrow types (inverse of `arrow_type`)."""
    if pa.types.is_list(arrow):
        return f"ARRAY<{spark_type(arrow.value_type)}>"
    for name, scalar in _SCALAR_TYPES.items():
        if arrow == scalar:
            return name
    raise SchemaError(f"no declared Spark type for Arrow type {arrow}")


def spark_ddl_of(schema: pa.Schema) -> str:
    """Spark DDL of an Arrow schema, e.g. the output schema of a mapInArrow function."""
    return ", ".join(Column(f.name, spark_type(f.type), "", f.nullable).ddl for f in schema)


def _kind(arrow: pa.DataType) -> str:
    checks = (
        ("integer", pa.types.is_integer),
        ("float", pa.types.is_floating),
        ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)),
        ("binary", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)),
        ("timestamp", pa.types.is_timestamp),
        ("boolean", pa.types.is_boolean),
        ("list", lambda t: pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t)),
        ("null", pa.types.is_null),
    )
    return next((name for name, check in checks if check(arrow)), str(arrow))


def _same_kind(actual: pa.DataType, target: pa.DataType) -> bool:
    actual_kind, target_kind = _kind(actual), _kind(target)
    if actual_kind == "null":  # an all-null column (e.g. pa.array([None])) casts to any type
        return True
    if actual_kind == "list" and target_kind == "list":
        return _same_kind(actual.value_type, target.value_type)
    if actual_kind == "timestamp" and target_kind == "timestamp":
        return actual.tz is not None  # a naive timestamp's zone is unknown: refuse to guess
    return actual_kind == target_kind or (actual_kind == "integer" and target_kind == "float")


# Columns shared by several tables: one definition, one description.
RUN_ID = Column("run_id", "STRING", "the run that wrote this row (runs.run_id)")
DOC_ID = Column("doc_id", "STRING", "document id: the C4 url")
PARTITION = Column("partition", "INT", "source partition number of the raw corpus")
CHUNK = Column("chunk", "INT", "index of the model-sized token chunk within the document")
CHECKPOINT_ID = Column("checkpoint_id", "STRING", "model checkpoint id (checkpoints.checkpoint_id)")
QUERY_SET = Column("query_set", "STRING", "name of a registered query set (query_sets.query_set)")
QUERY_ID = Column("query_id", "STRING", "query id, unique within its query set")
FINGERPRINT = Column(
    "fingerprint", "STRING", "projection fingerprint: seed, k per module, modules, normaliser, code version"
)
METHOD = Column("method", "STRING", "scoring method, e.g. trackstar, an ablation or a baseline")


VECTOR_COLUMNS = (
    Column("vector", "BINARY", "projected gradient, little-endian, encoded as `dtype` (schemas.vectors)"),
    Column("dtype", "STRING", "vector encoding: float32, float16, bfloat16 or int8"),
    Column("scale", "FLOAT", "int8 only: value = int8 * scale (max|x|/127); null otherwise", nullable=True),
    Column("norm", "FLOAT", "L2 norm of the vector before encoding"),
    FINGERPRINT,
    Column(
        "checksum",
        "BIGINT",
        "CRC-32 of the vector's bytes (and its int8 scale), checked by every reader that scores; null in rows "
        "written before checksums existed",
        nullable=True,
    ),
)


def _created_at(name: str = "created_at") -> Column:
    return Column(name, "TIMESTAMP", "when the row was written (UTC)")


RAW_VALUE_LIMIT = 1000  # characters of a refused row kept in quarantine.raw_value

TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table(
            "documents",
            "raw C4 documents that passed validation",
            (
                DOC_ID,
                PARTITION,
                Column("source", "STRING", "raw file name the document came from"),
                Column("line", "INT", "1-based line number in the source file"),
                Column("text", "STRING", "document text"),
                Column("timestamp", "STRING", "C4 crawl timestamp, as given"),
                Column("n_chars", "INT", "number of characters of text"),
                RUN_ID,
            ),
            partition_by=("partition",),
        ),
        Table(
            "tokens",
            "tokenized documents cut into model-sized chunks",
            (
                DOC_ID,
                PARTITION,
                CHUNK,
                Column("token_start", "INT", "first token of the chunk in the document's token stream"),
                Column("token_end", "INT", "end (exclusive) of the chunk in the document's token stream"),
                Column("input_ids", "ARRAY<INT>", "token ids of the chunk"),
                Column("n_tokens", "INT", "number of tokens in the chunk"),
                Column("tokenizer_fingerprint", "STRING", "hash of the tokenizer that produced the ids"),
                RUN_ID,
            ),
            partition_by=("partition",),
        ),
        Table(
            "quarantine",
            "input rows refused by a stage, with the reason",
            (
                Column("source", "STRING", "file or table the bad row came from"),
                Column("position", "STRING", "where in the source, e.g. file:line"),
                Column("stage", "STRING", "the pipeline stage that refused the row"),
                Column("reason", "STRING", "why the row was refused"),
                Column("raw_value", "STRING", "the raw row, truncated to 1000 characters; null if none", nullable=True),
                RUN_ID,
                _created_at("recorded_at"),
            ),
            slice_keys=("run_id", "stage", "source"),
        ),
        Table(
            "checkpoints",
            "registered model checkpoints",
            (
                CHECKPOINT_ID,
                Column("step", "BIGINT", "training step of the checkpoint"),
                Column(
                    "path",
                    "STRING",
                    "checkpoint folder: relative to the lake's root when inside it, else absolute or s3://",
                ),
                Column("optimizer", "STRING", "optimizer kind: adam, adafactor, or none (no optimizer state)"),
                Column(
                    "learning_rate",
                    "DOUBLE",
                    "learning rate at the checkpoint; null when the folder does not say",
                    nullable=True,
                ),
                Column("tokens_seen", "BIGINT", "training tokens seen up to the checkpoint"),
                Column("model_fingerprint", "STRING", "hash of the model weights and config"),
                _created_at("registered_at"),
                RUN_ID,
            ),
            slice_keys=("checkpoint_id",),
        ),
        Table(
            "train_gradients",
            "projected gradients of training chunks, one per chunk and checkpoint",
            (
                CHECKPOINT_ID,
                PARTITION,
                DOC_ID,
                CHUNK,
                Column("n_tokens", "INT", "number of tokens in the chunk"),
                *VECTOR_COLUMNS,
                RUN_ID,
            ),
            partition_by=("checkpoint_id", "partition"),
            slice_keys=("fingerprint",),
        ),
        Table(
            "query_sets",
            "registered query sets",
            (
                QUERY_SET,
                Column(
                    "path", "STRING", "file the query set was loaded from (relative to the lake's root when inside it)"
                ),
                Column("n_queries", "INT", "number of queries in the set"),
                _created_at("registered_at"),
                RUN_ID,
            ),
            slice_keys=("query_set",),
        ),
        Table(
            "queries",
            "fact queries (T-REx style) with their prompts and ground truth",
            (
                QUERY_SET,
                QUERY_ID,
                Column("fact_id", "STRING", "id of the knowledge-base fact, if any", nullable=True),
                Column("subject", "STRING", "subject entity"),
                Column("relation", "STRING", "relation id or name"),
                Column("object", "STRING", "object entity"),
                Column("target", "STRING", "target text the model should produce"),
                Column("aliases", "ARRAY<STRING>", "accepted alternative targets"),
                Column("prompt0", "STRING", "prompt template 0 filled with the subject"),
                Column("prompt1", "STRING", "prompt template 1 filled with the subject"),
                Column("prompt2", "STRING", "prompt template 2 filled with the subject"),
                Column("frequency_bucket", "INT", "how often the fact is stated in the corpus (bucket index)"),
                Column("stating_doc_ids", "ARRAY<STRING>", "documents that state the fact (ground truth)"),
                RUN_ID,
            ),
            partition_by=("query_set",),
        ),
        Table(
            "query_gradients",
            "projected gradients of queries, one per query, prompt and checkpoint",
            (
                QUERY_SET,
                CHECKPOINT_ID,
                QUERY_ID,
                Column("prompt_index", "INT", "which prompt template (0, 1, 2)"),
                *VECTOR_COLUMNS,
                RUN_ID,
            ),
            partition_by=("query_set", "checkpoint_id"),
            slice_keys=("fingerprint",),
        ),
        Table(
            "hessians",
            "fitted Hessian approximations; matrices live in <lake>/_matrices as safetensors",
            (
                CHECKPOINT_ID,
                Column(
                    "query_set",
                    "STRING",
                    "query set of the fit; null for the train-only autocorrelation",
                    nullable=True,
                ),
                FINGERPRINT,
                Column("kind", "STRING", "r_train, r_query or inverse_root"),
                Column("path", "STRING", "safetensors file holding the matrix, relative to the lake's root"),
                Column("shape", "ARRAY<BIGINT>", "shape of the matrix"),
                Column("sha256", "STRING", "checksum of the safetensors file"),
                Column("lambda", "DOUBLE", "mixing weight of R_query in R (inverse_root only)", nullable=True),
                Column("damping", "DOUBLE", "damping added before the inverse root", nullable=True),
                Column("n_samples", "BIGINT", "number of vectors the autocorrelation was estimated from"),
                RUN_ID,
                _created_at(),
            ),
            slice_keys=("checkpoint_id", "query_set", "fingerprint", "kind"),
        ),
        Table(
            "train_outliers",
            "train chunks fit-hessian left out of R_train: gradient norms far above the corpus's (gradient_kernels.robust)",
            (
                CHECKPOINT_ID,
                FINGERPRINT,
                PARTITION,
                DOC_ID,
                CHUNK,
                Column("norm", "FLOAT", "L2 norm of the chunk's stored vector"),
                Column("median_norm", "FLOAT", "median norm of the checkpoint's train vectors"),
                Column("threshold", "FLOAT", "the norm above which a chunk is an outlier"),
                RUN_ID,
                _created_at(),
            ),
            slice_keys=("checkpoint_id", "fingerprint"),
        ),
        Table(
            "trackstar_index",
            "train vectors preconditioned by R^(-1/2) and unit-normalised once, for scoring",
            (
                CHECKPOINT_ID,
                PARTITION,
                DOC_ID,
                CHUNK,
                QUERY_SET,
                FINGERPRINT,
                Column("kind", "STRING", "the hessians matrix applied: inverse_root or inverse_root_train_only"),
                Column(
                    "hessian_sha256",
                    "STRING",
                    "checksum of that matrix (hessians.sha256): a new fit rebuilds the index",
                ),
                Column("source_run_id", "STRING", "the extraction run of the train_gradients rows indexed"),
                Column(
                    "vector", "BINARY", "R^(-1/2) p / ‖R^(-1/2) p‖, little-endian, encoded as `dtype` (schemas.vectors)"
                ),
                Column("dtype", "STRING", "vector encoding: int8 (default), float16, bfloat16 or float32"),
                Column("scale", "FLOAT", "int8 only: value = int8 * scale; null otherwise", nullable=True),
                Column(
                    "sketch",
                    "BINARY",
                    "1-bit sign sketch of the vector, bits packed 8 per byte, then a float16 mean |value| per 256 "
                    "coordinates (first-stage retrieval; schemas.vectors)",
                ),
                Column(
                    "checksum",
                    "BIGINT",
                    "CRC-32 of the vector's bytes (and its int8 scale); null in rows written before checksums existed",
                    nullable=True,
                ),
                RUN_ID,
            ),
            partition_by=("checkpoint_id", "query_set", "kind", "dtype", "partition"),
            slice_keys=("fingerprint",),
        ),
        Table(
            "proponents",
            "top-k training chunks per query: the influence ranking",
            (
                QUERY_SET,
                CHECKPOINT_ID,
                QUERY_ID,
                METHOD,
                Column("rank", "INT", "1-based rank within the query's top-k"),
                DOC_ID,
                CHUNK,
                Column("score", "DOUBLE", "influence score"),
                RUN_ID,
            ),
            partition_by=("query_set", "method"),
            slice_keys=("checkpoint_id",),
        ),
        Table(
            "eval_metrics",
            "evaluation metrics of a ranking (MRR, recall@10, tail-patch)",
            (
                RUN_ID,
                QUERY_SET,
                CHECKPOINT_ID,
                METHOD,
                Column("metric", "STRING", "metric name, e.g. mrr, recall@10"),
                Column("bucket", "STRING", "frequency bucket or 'all'", nullable=True),
                Column("value", "DOUBLE", "metric value"),
                Column("n", "INT", "number of queries measured"),
                _created_at(),
            ),
            slice_keys=("run_id", "query_set", "checkpoint_id", "method"),
        ),
        Table(
            "tail_patches",
            "influence of single proponents: one optimizer step on the chunk, Δ log p(target)",
            (
                QUERY_SET,
                CHECKPOINT_ID,
                QUERY_ID,
                DOC_ID,
                Column(
                    "delta_log_prob", "DOUBLE", "change of the target's log-probability given prompt0 after the step"
                ),
                RUN_ID,
            ),
            partition_by=("query_set",),
            slice_keys=("checkpoint_id",),
        ),
        Table(
            "takedowns",
            "documents taken down (jobs/takedown.py): one row per url and takedown run, with what it removed",
            (
                Column("url", "STRING", "the document's url: its doc_id in every other table"),
                Column("reason", "STRING", "why it was taken down, as given"),
                Column(
                    "request_id",
                    "STRING",
                    "the takedown_requests run_id carried out; null when run from the command line",
                    nullable=True,
                ),
                Column("counts_json", "STRING", 'rows deleted per table as JSON, e.g. {"documents": 1, ...}'),
                RUN_ID,
                _created_at("taken_at"),
            ),
            slice_keys=("run_id",),
        ),
        Table(
            "takedown_requests",
            "urls filed for takedown (`jobs takedown --queue`); the maintenance DAG carries out the pending ones",
            (
                Column("url", "STRING", "the document's url (its doc_id)"),
                Column("reason", "STRING", "why it is to be taken down"),
                Column("run_id", "STRING", "the run that filed the request: the request's id (takedowns.request_id)"),
                _created_at("requested_at"),
            ),
            slice_keys=("run_id",),
        ),
        Table(
            "runs",
            "one row per pipeline run with its full configuration",
            (
                RUN_ID,
                Column("command", "STRING", "the command that ran, e.g. tokenize"),
                Column("config_json", "STRING", "the run's full configuration as JSON (no secrets)"),
                Column("started_at", "TIMESTAMP", "when the run started (UTC)"),
                Column("finished_at", "TIMESTAMP", "when the run ended (UTC); null while running", nullable=True),
                Column("status", "STRING", "running, succeeded or failed"),
                Column("counts_json", "STRING", "row counts and other results as JSON", nullable=True),
            ),
            slice_keys=("run_id",),
        ),
    )
}


def table(name: str) -> Table:
    if name not in TABLES:
        raise SchemaError(f"unknown table {name!r}; tables: {', '.join(TABLES)}")
    return TABLES[name]
