"""Every Delta table of the lake, declared once.

A declaration gives each column its type, nullability and a one-line description, the partition
columns and the schema version. The Arrow schema (delta-rs writers, readers), the Spark DDL
(Spark jobs, `CREATE TABLE`) and validation are all derived from it. The version is stored as the
table property `trackstar.schema_version`; a table written under another version is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

VERSION_PROPERTY = "trackstar.schema_version"

# type name -> (arrow type, Spark SQL type)
TYPES = {
    "string": (pa.string(), "STRING"),
    "int": (pa.int32(), "INT"),
    "bigint": (pa.int64(), "BIGINT"),
    "float": (pa.float32(), "FLOAT"),
    "double": (pa.float64(), "DOUBLE"),
    "binary": (pa.binary(), "BINARY"),
    "timestamp": (pa.timestamp("us", tz="UTC"), "TIMESTAMP"),
    "array<int>": (pa.list_(pa.int32()), "ARRAY<INT>"),
    "array<bigint>": (pa.list_(pa.int64()), "ARRAY<BIGINT>"),
    "array<string>": (pa.list_(pa.string()), "ARRAY<STRING>"),
}


class SchemaError(ValueError):
    """Data or a table does not match its declaration."""


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    description: str
    nullable: bool = False

    @property
    def arrow_field(self) -> pa.Field:
        return pa.field(self.name, TYPES[self.type][0], nullable=self.nullable)

    @property
    def ddl(self) -> str:
        return f"{self.name} {TYPES[self.type][1]}{'' if self.nullable else ' NOT NULL'}"


@dataclass(frozen=True)
class Table:
    name: str
    description: str
    columns: tuple
    partition_by: tuple = ()
    version: int = 1

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([c.arrow_field for c in self.columns])

    @property
    def spark_ddl(self) -> str:
        return ", ".join(c.ddl for c in self.columns)

    @property
    def properties(self) -> dict:
        return {VERSION_PROPERTY: str(self.version)}

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    def conform(self, data: pa.Table) -> pa.Table:
        """`data` in this table's column order and types; a SchemaError says what is wrong."""
        names = set(data.column_names)
        missing = [c.name for c in self.columns if c.name not in names and not c.nullable]
        if missing:
            raise SchemaError(f"{self.name}: missing column(s) {missing}")
        extra = sorted(names - {c.name for c in self.columns})
        if extra:
            raise SchemaError(f"{self.name}: unknown column(s) {extra}")
        arrays = []
        for c in self.columns:
            if c.name not in names:
                arrays.append(pa.nulls(data.num_rows, TYPES[c.type][0]))
                continue
            array = data.column(c.name)
            try:
                array = array.cast(TYPES[c.type][0])
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                raise SchemaError(f"{self.name}.{c.name}: expected {c.type}, got {array.type} ({error})") from None
            if not c.nullable and array.null_count:
                raise SchemaError(f"{self.name}.{c.name}: {array.null_count} null value(s) in a non-nullable column")
            arrays.append(array)
        return pa.Table.from_arrays(arrays, schema=self.arrow_schema)

    def check_version(self, properties: dict) -> None:
        found = (properties or {}).get(VERSION_PROPERTY)
        if found != str(self.version):
            raise SchemaError(f"table {self.name!r} was written with schema version {found}, this code expects "
                              f"{self.version}: migrate it or point at a fresh lake")


def _c(name, type_, description, nullable=False):
    return Column(name, type_, description, nullable)


RUN_ID = _c("run_id", "string", "the run that wrote the row (see `runs`)")
CHECKPOINT_ID = _c("checkpoint_id", "string", "model checkpoint the row belongs to")
DOC_ID = _c("doc_id", "string", "document id: the C4 url")
PARTITION = _c("partition", "int", "source partition number (c4-train.NNNNN)")
QUERY_SET = _c("query_set", "string", "name of a registered query set")
QUERY_ID = _c("query_id", "string", "query id within its set")
VECTOR_COLUMNS = (
    _c("vector", "binary", "projected gradient, little-endian, encoded by `dtype`"),
    _c("dtype", "string", "vector encoding: float32, float16, bfloat16 or int8"),
    _c("scale", "float", "int8 only: value = int8 × scale", nullable=True),
    _c("norm", "float", "L2 norm of the decoded vector"),
    _c("fingerprint", "string", "projection fingerprint (seed, k per matrix, normaliser, dtype, code version)"),
)

TABLES = {t.name: t for t in [
    Table("documents", "validated raw documents", (
        DOC_ID, PARTITION, _c("source", "string", "raw file name"), _c("line", "int", "line number in the file (1-based)"),
        _c("text", "string", "document text"), _c("timestamp", "string", "C4 timestamp"),
        _c("n_chars", "int", "characters of text"), RUN_ID), partition_by=("partition",)),
    Table("tokens", "token chunks of each document, at most the model context long", (
        DOC_ID, PARTITION, _c("chunk", "int", "chunk index within the document"),
        _c("token_start", "int", "first token of the chunk in the document's token stream"),
        _c("token_end", "int", "end (exclusive)"), _c("input_ids", "array<int>", "token ids of the chunk"),
        _c("n_tokens", "int", "len(input_ids)"), _c("tokenizer_fingerprint", "string", "sha256 of the tokenizer"),
        RUN_ID), partition_by=("partition",)),
    Table("quarantine", "rows that failed validation, with the reason", (
        _c("source", "string", "file, table or query set the row came from"),
        _c("position", "string", "where in the source (file:line, doc_id/chunk)"),
        _c("stage", "string", "job that rejected it"), _c("reason", "string", "why"),
        _c("raw_value", "string", "the offending value, truncated to 1000 characters", nullable=True),
        RUN_ID, _c("recorded_at", "timestamp", "when"))),
    Table("checkpoints", "registered model checkpoints", (
        CHECKPOINT_ID, _c("step", "bigint", "training step"), _c("path", "string", "folder or s3:// prefix"),
        _c("optimizer", "string", "adam or adafactor"), _c("learning_rate", "double", "lr at that step"),
        _c("tokens_seen", "bigint", "training tokens seen"), _c("model_fingerprint", "string", "sha256 of the weights file"),
        _c("registered_at", "timestamp", "when"), RUN_ID)),
    Table("train_gradients", "projected gradients of training chunks", (
        CHECKPOINT_ID, PARTITION, DOC_ID, _c("chunk", "int", "chunk index"),
        _c("n_tokens", "int", "tokens in the chunk"), *VECTOR_COLUMNS, RUN_ID), partition_by=("checkpoint_id", "partition")),
    Table("query_sets", "registered query sets", (
        QUERY_SET, _c("path", "string", "JSONL it was loaded from"), _c("n_queries", "int", "queries"),
        _c("registered_at", "timestamp", "when"), RUN_ID)),
    Table("queries", "fact-tracing queries", (
        QUERY_SET, QUERY_ID, _c("fact_id", "string", "fact of the knowledge base", nullable=True),
        _c("subject", "string", "subject entity"), _c("relation", "string", "relation type"),
        _c("object", "string", "object entity"), _c("target", "string", "text the model should produce"),
        _c("aliases", "array<string>", "other names of the object"),
        _c("prompt0", "string", "cloze prompt"), _c("prompt1", "string", "paraphrase"), _c("prompt2", "string", "paraphrase"),
        _c("frequency_bucket", "int", "about how many documents state the fact"),
        _c("stating_doc_ids", "array<string>", "ground truth: documents that state it"), RUN_ID),
        partition_by=("query_set",)),
    Table("query_gradients", "projected gradients of queries (target loss given the prompt)", (
        QUERY_SET, CHECKPOINT_ID, QUERY_ID, _c("prompt_index", "int", "which prompt (0..2)"), *VECTOR_COLUMNS, RUN_ID),
        partition_by=("query_set", "checkpoint_id")),
    Table("hessians", "registry of autocorrelation matrices and inverse roots (safetensors files)", (
        CHECKPOINT_ID, _c("query_set", "string", "task whose R_query was mixed in", nullable=True),
        _c("fingerprint", "string", "projection fingerprint"), _c("kind", "string", "r_train, r_query or inverse_root"),
        _c("path", "string", "safetensors file"), _c("shape", "array<bigint>", "block sizes"),
        _c("sha256", "string", "checksum of the file"), _c("lambda", "double", "task mixing weight", nullable=True),
        _c("damping", "double", "damping added to eigenvalues", nullable=True),
        _c("n_samples", "bigint", "vectors averaged"), RUN_ID, _c("created_at", "timestamp", "when"))),
    Table("proponents", "top-k training chunks per query and method", (
        QUERY_SET, CHECKPOINT_ID, QUERY_ID, _c("method", "string", "scoring method"), _c("rank", "int", "1 = best"),
        DOC_ID, _c("chunk", "int", "chunk index"), _c("score", "double", "score"), RUN_ID),
        partition_by=("query_set", "method")),
    Table("eval_metrics", "evaluation results", (
        RUN_ID, QUERY_SET, CHECKPOINT_ID, _c("method", "string", "scoring method"), _c("metric", "string", "metric name"),
        _c("bucket", "string", "frequency bucket or 'all'", nullable=True), _c("value", "double", "value"),
        _c("n", "int", "queries averaged"), _c("created_at", "timestamp", "when"))),
    Table("runs", "every run with its full configuration", (
        RUN_ID, _c("command", "string", "job name"), _c("config_json", "string", "the run's configuration"),
        _c("started_at", "timestamp", "start"), _c("finished_at", "timestamp", "end", nullable=True),
        _c("status", "string", "running, succeeded or failed"), _c("counts_json", "string", "row counts", nullable=True))),
]}


def spark_ddl_of(schema: pa.Schema) -> str:
    """Spark DDL for an Arrow schema built from the declared types (for mapInArrow outputs)."""
    by_arrow = {arrow: spark for arrow, spark in TYPES.values()}
    return ", ".join(f"{f.name} {by_arrow[f.type]}" for f in schema)
