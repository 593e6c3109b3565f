"""Table declarations -> Arrow schema, Spark DDL, validation; vector codecs; schema versions."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from schemas.tables import SCHEMA_VERSION_PROPERTY, TABLES, Column, SchemaError, SchemaVersionError, Table, spark_ddl_of
from schemas.vectors import decode_vectors, encode_vectors

REQUIRED_TABLES = (
    "documents",
    "tokens",
    "quarantine",
    "checkpoints",
    "train_gradients",
    "query_sets",
    "queries",
    "query_gradients",
    "hessians",
    "proponents",
    "eval_metrics",
    "tail_patches",
    "runs",
)

SMALL = Table(
    "small",
    "a test table",
    (
        Column("doc_id", "STRING", "id"),
        Column("partition", "INT", "partition"),
        Column("ids", "ARRAY<INT>", "token ids"),
        Column("score", "FLOAT", "score", nullable=True),
        Column("at", "TIMESTAMP", "when"),
    ),
    partition_by=("partition",),
)


def small_rows(**overrides) -> pa.Table:
    columns = {
        "doc_id": ["a", "b"],
        "partition": [1, 2],
        "ids": [[1, 2], []],
        "score": [0.5, None],
        "at": pa.array([dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)] * 2),
    }
    return pa.table({**columns, **overrides})


def test_every_table_is_declared_with_descriptions_and_known_keys():
    assert set(REQUIRED_TABLES) <= set(TABLES)
    for spec in TABLES.values():
        assert all(c.description for c in spec.columns), spec.name
        assert set(spec.key_columns) <= set(spec.column_names)
        assert "run_id" in spec.column_names


def test_arrow_schema_and_spark_ddl_come_from_one_declaration():
    assert SMALL.arrow_schema == pa.schema(
        [
            pa.field("doc_id", pa.string(), nullable=False),
            pa.field("partition", pa.int32(), nullable=False),
            pa.field("ids", pa.list_(pa.field("element", pa.int32())), nullable=False),
            pa.field("score", pa.float32(), nullable=True),
            pa.field("at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    )
    assert SMALL.spark_ddl == (
        "doc_id STRING NOT NULL, `partition` INT NOT NULL, ids ARRAY<INT> NOT NULL, score FLOAT, at TIMESTAMP NOT NULL"
    )
    gradients = TABLES["train_gradients"]
    assert gradients.arrow_schema.field("vector").type == pa.binary()
    assert gradients.arrow_schema.field("scale").nullable
    assert gradients.partition_by == ("checkpoint_id", "partition")
    assert gradients.table_properties[SCHEMA_VERSION_PROPERTY] == str(gradients.schema_version)


def test_validate_casts_lossless_widenings_to_the_declared_types():
    validated = SMALL.validate(small_rows().select(["at", "score", "ids", "partition", "doc_id"]))
    assert validated.schema == SMALL.arrow_schema  # order and exact types, from int64/double/list<int64>
    assert validated.column("ids").to_pylist() == [[1, 2], []]


@pytest.mark.parametrize(
    "data, message",
    [
        (small_rows().drop_columns(["ids"]), r"missing columns \['ids'\]"),  # NOT NULL: must be given
        (small_rows().append_column("extra", pa.array([1, 2])), r"unexpected columns \['extra'\]"),
        (small_rows(partition=["1", "2"]), "column partition: type string, expected INT"),
        (small_rows(ids=[["x"], []]), "column ids: type list<item: string>, expected ARRAY<INT>"),
        (small_rows(doc_id=["a", None]), r"column doc_id: 1 null\(s\) in a NOT NULL column \(first at row 1\)"),
        (small_rows(partition=[1, 2**40]), "column partition: values do not fit INT"),
        (small_rows(at=pa.array([dt.datetime(2024, 1, 1)] * 2)), "column at: type timestamp"),
    ],
)
def test_validate_names_the_problem(data, message):
    with pytest.raises(SchemaError, match=message):
        SMALL.validate(data)


def test_validate_accepts_a_record_batch_and_nulls_in_nullable_columns():
    batch = small_rows().to_batches()[0]
    assert SMALL.validate(batch).column("score").to_pylist() == [0.5, None]
    assert SMALL.validate(small_rows().drop_columns(["score"])).column("score").to_pylist() == [None, None]


def test_spark_ddl_of_an_arrow_schema():
    schema = pa.schema(
        [pa.field("partition", pa.int32(), nullable=False), ("ids", pa.list_(pa.int32())), ("raw", pa.binary())]
    )
    assert spark_ddl_of(schema) == "`partition` INT NOT NULL, ids ARRAY<INT>, raw BINARY"
    with pytest.raises(SchemaError, match="no declared Spark type"):
        spark_ddl_of(pa.schema([("x", pa.uint8())]))


def test_a_table_written_with_another_schema_version_is_refused(lake):
    lake.create("runs")
    stored = DeltaTable(lake.path("runs"))
    stored.alter.set_table_properties({SCHEMA_VERSION_PROPERTY: "99"}, raise_if_not_exists=False)
    with pytest.raises(SchemaVersionError, match="table runs: stored schema version 99, this code expects 1"):
        lake.read("runs")


@pytest.mark.parametrize("dtype, tolerance", [("float32", 0.0), ("float16", 1e-3), ("bfloat16", 4e-3), ("int8", None)])
def test_vector_round_trip(dtype, tolerance):
    vectors = np.random.default_rng(0).standard_normal((64, 33)).astype(np.float32)
    vectors[3] = 0.0  # an all-zero vector must survive int8's scale
    binary, scales = encode_vectors(vectors, dtype)
    assert len(binary) == 64 and (scales is None) == (dtype != "int8")
    decoded = decode_vectors(binary, dtype, scales, dim=33)
    assert decoded.dtype == np.float32 and decoded.shape == vectors.shape
    if dtype == "int8":
        bound = np.abs(vectors).max(axis=1, keepdims=True) / 127 / 2 + 1e-7
        assert (np.abs(decoded - vectors) <= bound).all()
    elif tolerance == 0.0:
        assert np.array_equal(decoded, vectors)
    else:
        assert np.allclose(decoded, vectors, rtol=tolerance, atol=tolerance * 1e-2)
    assert not np.array_equal(decoded, vectors) or dtype == "float32"


def test_bfloat16_rounds_to_nearest_even():
    # 1 + 2^-8 lies halfway between two bfloat16 values: ties go to the even mantissa (1.0);
    # 1 + 3*2^-8 is halfway too and rounds up to the even 1 + 2^-6.
    values = np.array([[1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.5]], dtype=np.float32)
    binary, _ = encode_vectors(values, "bfloat16")
    decoded = decode_vectors(binary, "bfloat16", dim=4)
    assert decoded.tolist() == [[1.0, 1 + 2**-6, 1 + 2**-7, -2.5]]


def test_decode_reads_a_sliced_chunked_column_of_a_table():
    vectors = np.arange(40, dtype=np.float32).reshape(10, 4)
    binary, _ = encode_vectors(vectors, "float32")
    column = pa.chunked_array([binary.slice(0, 3), binary.slice(3)]).slice(2)
    assert np.array_equal(decode_vectors(column, "float32", dim=4), vectors[2:])
    assert np.array_equal(decode_vectors(binary.slice(5, 3), "float32"), vectors[5:8])  # offset into the buffer


def test_decode_refuses_vectors_of_the_wrong_size():
    binary, _ = encode_vectors(np.ones((2, 4), np.float32), "float16")
    with pytest.raises(ValueError, match="not all 5 x float16"):
        decode_vectors(binary, "float16", dim=5)
    with pytest.raises(ValueError, match="unknown vector dtype"):
        encode_vectors(np.ones((2, 4)), "float8")
