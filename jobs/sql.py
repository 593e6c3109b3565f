"""Documented SQL over the lake's Delta tables, run with Spark (embedded Sail or SPARK_REMOTE).

    python -m jobs sql --list
    python -m jobs sql "SELECT method, count(*) AS n FROM proponents GROUP BY method"
    python -m jobs sql top_proponents --param query_set=trex --param query_id=q17 --lake lake

Each table the query names is registered as a temp view over its Delta folder; parameters are
bound as Spark SQL named parameters (`:name`), never pasted into the text. SQL text is read-only
(one SELECT-like statement) unless `--allow-writes` is given. The queries:

- top_proponents(query_set, query_id, method): a query's top-ranked training chunks with the text
  of their documents (proponents joined with documents), per checkpoint.
- proponent_frequency(query_set, method, limit): documents that are proponents of the most queries.
- gradient_coverage(): per checkpoint, projection fingerprint and partition, chunks in `tokens`
  against vectors in `train_gradients`; coverage below 1 means extraction has not finished that slice.
- quarantine_by_reason(): refused input rows per run, stage and reason.
- runs_history(): every run, newest first, with status and counts.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from infra.config import load_config
from infra.lake import Lake, TableNotFoundError
from infra.spark import spark_session
from schemas.tables import TABLES


class SqlQuery(NamedTuple):
    description: str
    sql: str
    params: dict[str, type] = {}


SQL_QUERIES: dict[str, SqlQuery] = {
    "top_proponents": SqlQuery(
        "a query's top-ranked training chunks with their document text, per checkpoint",
        """
        SELECT p.checkpoint_id, p.`rank`, p.score, p.doc_id, p.chunk, substr(d.text, 1, 200) AS text
        FROM proponents p JOIN documents d ON d.doc_id = p.doc_id
        WHERE p.query_set = :query_set AND p.query_id = :query_id AND p.method = :method
        ORDER BY p.checkpoint_id, p.`rank`
        """,
        {"query_set": str, "query_id": str, "method": str},
    ),
    "proponent_frequency": SqlQuery(
        "documents that are proponents of the most queries (across checkpoints)",
        """
        SELECT doc_id, count(DISTINCT query_id) AS n_queries, count(*) AS n_rows, min(`rank`) AS best_rank
        FROM proponents
        WHERE query_set = :query_set AND method = :method
        GROUP BY doc_id
        ORDER BY n_queries DESC, doc_id
        LIMIT :limit
        """,
        {"query_set": str, "method": str, "limit": int},
    ),
    "gradient_coverage": SqlQuery(
        "per checkpoint, projection fingerprint and partition: chunks in tokens vs vectors in train_gradients",
        """
        WITH expected AS (SELECT `partition`, count(*) AS n_chunks FROM tokens GROUP BY `partition`),
             done AS (SELECT checkpoint_id, fingerprint, `partition`, count(*) AS n_vectors
                      FROM train_gradients GROUP BY checkpoint_id, fingerprint, `partition`),
             indexes AS (SELECT DISTINCT checkpoint_id, fingerprint FROM train_gradients)
        SELECT i.checkpoint_id, i.fingerprint, e.`partition`, e.n_chunks, coalesce(d.n_vectors, 0) AS n_vectors,
               round(coalesce(d.n_vectors, 0) / e.n_chunks, 4) AS coverage
        FROM expected e CROSS JOIN indexes i
        LEFT JOIN done d ON d.checkpoint_id = i.checkpoint_id AND d.fingerprint = i.fingerprint
                        AND d.`partition` = e.`partition`
        ORDER BY i.checkpoint_id, i.fingerprint, e.`partition`
        """,
    ),
    "quarantine_by_reason": SqlQuery(
        "refused input rows per run, stage and reason",
        """
        SELECT run_id, stage, reason, count(*) AS n
        FROM quarantine GROUP BY run_id, stage, reason
        ORDER BY n DESC, run_id, stage, reason
        """,
    ),
    "runs_history": SqlQuery(
        "every run, newest first, with status and counts",
        """
        SELECT run_id, command, status, started_at, finished_at, counts_json
        FROM runs ORDER BY started_at DESC
        """,
    ),
}


def tables_used(sql: str) -> list[str]:
    return [name for name in TABLES if re.search(rf"\b(FROM|JOIN)\s+{name}\b", sql, re.IGNORECASE)]


def bind_params(name: str, given: dict[str, str]) -> dict:
    """The query's parameters converted to their declared types; clear errors for missing or unknown."""
    query = _query(name)
    missing = sorted(set(query.params) - set(given))
    unknown = sorted(set(given) - set(query.params))
    if missing or unknown:
        raise ValueError(
            f"query {name} takes {sorted(query.params) or 'no parameters'}; missing {missing}, unknown {unknown}"
        )
    try:
        return {key: query.params[key](value) for key, value in given.items()}
    except ValueError as error:
        raise ValueError(f"query {name}: bad parameter value: {error}") from None


def run_query(spark, lake: Lake, name: str, params: dict[str, str] | None = None):
    """The DataFrame of a named query over the lake's tables."""
    query = _query(name)
    return run_sql(spark, lake, query.sql, bind_params(name, params or {}), what=f"query {name}")


READ_KEYWORDS = ("SELECT", "WITH", "VALUES", "EXPLAIN", "SHOW", "DESCRIBE", "DESC", "TABLE", "FROM")
WRITE_KEYWORDS = (
    "INSERT",
    "UPDATE",
    "DELETE",
    "MERGE",
    "DROP",
    "CREATE",
    "ALTER",
    "TRUNCATE",
    "OVERWRITE",
    "VACUUM",
    "OPTIMIZE",
    "RESTORE",
    "CACHE",
    "UNCACHE",
    "REFRESH",
    "SET",
    "RESET",
    "LOAD",
    "MSCK",
    "CALL",
    "USE",
    "ADD",
    "GRANT",
    "REVOKE",
)
_COMMENTS_AND_STRINGS = re.compile(r"--[^\n]*|/\*.*?\*/|'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`[^`]*`", re.DOTALL)


class WriteRefused(PermissionError):
    """A statement that could change the lake, sent without allow_writes."""


def check_read_only(sql: str) -> None:
    """Refuse anything but one reading statement: the first word must read (SELECT, WITH, ...), no
    word outside quotes and comments may write (a CTE can end in an INSERT), and no second statement."""
    code = _COMMENTS_AND_STRINGS.sub(" ", sql).strip().rstrip(";")
    words = re.findall(r"[A-Za-z_]+", code.upper())
    writing = sorted(set(words) & set(WRITE_KEYWORDS))
    if not words or words[0] not in READ_KEYWORDS or writing or ";" in code:
        raise WriteRefused(
            f"jobs sql is read-only: refused {' '.join(sql.split())[:80]!r}"
            f"{' (it writes: ' + ', '.join(writing) + ')' if writing else ''}; "
            "only one SELECT-like statement runs unless --allow-writes is given"
        )


def run_sql(spark, lake: Lake, sql: str, args: dict | None = None, what: str = "the query", allow_writes: bool = False):
    """Any SQL over the lake: each table it names becomes a temp view over its Delta folder.
    Read-only unless allow_writes: on Sail a DELETE through such a view deletes from the table."""
    if not allow_writes:
        check_read_only(sql)
    for table in tables_used(sql):
        if not lake.exists(table):
            raise TableNotFoundError(f"{what} needs table {table}, which does not exist under {lake.root} yet")
        lake.spark_read(spark, table).createOrReplaceTempView(table)
    return spark.sql(sql, args=args or None)


def _query(name: str) -> SqlQuery:
    if name not in SQL_QUERIES:
        raise ValueError(f"unknown query {name!r}; queries: {', '.join(SQL_QUERIES)}")
    return SQL_QUERIES[name]


def add_arguments(parser) -> None:
    parser.add_argument("name", nargs="?", help=f"a documented query ({', '.join(SQL_QUERIES)}) or any SQL text")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="query parameter")
    parser.add_argument("--lake", help="lake root (default: the configured lake_root)")
    parser.add_argument("--rows", type=int, default=50, help="rows to print")
    parser.add_argument("--list", action="store_true", help="list the queries and their parameters")
    parser.add_argument(
        "--allow-writes",
        action="store_true",
        help="let SQL text change tables (INSERT, DELETE, MERGE, ...); refused otherwise",
    )


def main(args) -> int:
    if args.list or not args.name:
        for name, query in SQL_QUERIES.items():
            usage = " ".join([name, *(f"--param {key}=..." for key in query.params)])
            print(f"{usage}\n    {query.description}")
        return 0
    params = dict(_key_value(item) for item in args.param)
    config = load_config()
    lake = Lake(args.lake or config.lake_root)
    spark = spark_session(config.spark_remote)
    if args.name in SQL_QUERIES:
        result = run_query(spark, lake, args.name, params)
    elif " " in args.name.strip():  # SQL text, e.g. "SELECT method, count(*) FROM proponents GROUP BY method"
        try:
            result = run_sql(spark, lake, args.name, params, allow_writes=args.allow_writes)
        except WriteRefused as error:
            raise SystemExit(f"error: {error}") from None
    else:
        raise SystemExit(
            f"unknown query {args.name!r}; documented queries: {', '.join(SQL_QUERIES)} (or pass SQL text)"
        )
    result.show(n=args.rows, truncate=False)
    return 0


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--param {item!r}: expected KEY=VALUE")
    return key.strip(), value
