"""Read-only `jobs sql` (no --allow-writes) parses the statement: one reading statement over the
lake's tables runs; paths, table functions, writes hidden by comments or raw strings, and a second
statement are refused with one line, and ordinary reads still return their rows on a real lake."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.sql import WriteRefused, run_query, run_sql
from tests.test_lake import document_rows, proponent_rows


@pytest.fixture
def small_lake(lake, tmp_path):
    lake.append("documents", document_rows(0, 3))
    lake.append("proponents", proponent_rows())
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the lake\n")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "outside.parquet")
    return lake


# each passed the word-matching guard; on Sail the path reads then read the file and the others the
# engine happened to reject (Apache Spark runs java_method and substitutes ${env:...})
PROBES = [
    ("SELECT * FROM text.`{tmp}/secret.txt`", "source text.`{tmp}/secret.txt`"),
    ("SELECT * FROM parquet.`{tmp}/outside.parquet`", "source parquet.`{tmp}/outside.parquet`"),
    ("SELECT * FROM csv.`{tmp}/secret.txt`", "source csv.`{tmp}/secret.txt`"),
    ("SELECT * FROM delta.`{tmp}/lake/documents`", "source delta.`{tmp}/lake/documents`"),
    ("SELECT d.* FROM documents d JOIN json.`{tmp}/secret.txt` j ON true", "source json.`{tmp}/secret.txt`"),
    ("SELECT * FROM read_files('{tmp}/secret.txt')", "source READ_FILES"),
    ("SELECT * FROM documents, LATERAL read_files('{tmp}/secret.txt')", "LATERAL READ_FILES"),
    ("SELECT 1 -- tidy up\r; DELETE FROM documents", "2 statements"),  # Spark ends a -- comment at \r
    ("SELECT r'\\', 1 FROM documents; DELETE FROM documents --'", "2 statements"),  # r'\' ends at its quote
    ("SELECT '${{env:HOME}}' AS home", "variable substitution"),  # Apache Spark substitutes it
    ("SELECT java_method('java.lang.System', 'getenv', 'HOME')", "function java_method"),
]


@pytest.mark.parametrize("probe, refused", PROBES, ids=[probe[:40] for probe, _ in PROBES])
def test_read_only_sql_refuses_reads_outside_the_lake_and_hidden_writes(spark, small_lake, tmp_path, probe, refused):
    lake = small_lake
    before = (lake.version("documents"), lake.read("documents").num_rows)
    with pytest.raises(WriteRefused) as error:
        run_sql(spark, lake, probe.format(tmp=tmp_path)).collect()
    message = str(error.value)
    assert message.startswith(f"jobs sql is read-only: refused {refused.format(tmp=tmp_path)}")
    assert "\n" not in message and "--allow-writes" in message
    assert (lake.version("documents"), lake.read("documents").num_rows) == before


def test_the_cli_refuses_a_path_in_one_line(small_lake, tmp_path):
    from jobs.__main__ import main

    with pytest.raises(SystemExit) as error:
        main(["sql", f"SELECT * FROM text.`{tmp_path}/secret.txt`", "--lake", str(small_lake.root)])
    assert str(error.value).startswith(f"error: jobs sql is read-only: refused source text.`{tmp_path}/secret.txt`")
    assert "\n" not in str(error.value)


def test_ordinary_reads_over_lake_tables_still_run(spark, small_lake):
    lake = small_lake
    ids = [f"https://example.com/0/{i}" for i in range(3)]

    def rows(sql):
        return [tuple(row) for row in run_sql(spark, lake, sql).collect()]

    # comments (with \r and \n) and strings holding DELETE are data, not statements
    assert rows(
        "SELECT doc_id FROM documents -- every id\r\n WHERE text <> 'DELETE FROM documents' /* ; DELETE */"
        ' AND text <> "x; DROP TABLE documents" ORDER BY doc_id'
    ) == [(i,) for i in ids]
    assert rows(r"SELECT count(*) FROM documents WHERE text RLIKE r'^text \d \d$'") == [(3,)]  # a raw string
    assert rows(
        "WITH best AS (SELECT doc_id, count(*) AS n FROM proponents WHERE `rank` = 1 GROUP BY doc_id)"
        " SELECT d.doc_id, d.text, b.n FROM best b JOIN documents d ON d.doc_id = b.doc_id"
    ) == [(ids[2], "text 0 2", 2)]
    assert rows(  # a comma join names its second table after a comma: it is registered too
        "SELECT p.query_id, d.text FROM Documents d, proponents p WHERE d.doc_id = p.doc_id ORDER BY p.query_id, p.`rank`"
    ) == [("q1", "text 0 2"), ("q1", "text 0 0"), ("q2", "text 0 2")]
    assert sorted(
        rows("SELECT /*+ BROADCAST(d) */ d.doc_id, x FROM documents d LATERAL VIEW explode(array(1, 2)) t AS x")
    ) == [(i, x) for i in ids for x in (1, 2)]
    assert [r[0] for r in rows("DESCRIBE documents")][:2] == ["doc_id", "partition"]
    assert [r[0] for r in rows("SHOW COLUMNS FROM `documents`")][:2] == ["doc_id", "partition"]
    assert "documents" in rows("EXPLAIN SELECT * FROM documents -- the plan")[0][0]
    named = run_query(spark, lake, "top_proponents", {"query_set": "trex", "query_id": "q1", "method": "trackstar"})
    assert [(r["rank"], r["text"]) for r in named.collect()] == [(1, "text 0 2"), (2, "text 0 0")]
