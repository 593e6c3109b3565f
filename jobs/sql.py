"""Documented SQL over the lake's Delta tables, run with Spark (embedded Sail or SPARK_REMOTE).

    python -m jobs sql --list
    python -m jobs sql "SELECT method, count(*) AS n FROM proponents GROUP BY method"
    python -m jobs sql top_proponents --param query_set=trex --param query_id=q17 --lake lake

Each table the query names is registered as a temp view over its Delta folder; parameters are
bound as Spark SQL named parameters (`:name`), never pasted into the text. Unless `--allow-writes`
is given, SQL text is parsed (sqlglot) and must be one SELECT/WITH, DESCRIBE, EXPLAIN or SHOW
TABLES/VIEWS/COLUMNS whose sources are all lake tables: no path (text.`/etc/hostname`), table
function, catalog table or second statement; what runs is the parsed statement printed back. The queries:

- top_proponents(query_set, query_id, method): a query's top-ranked training chunks with the text
  of their documents (proponents joined with documents), per checkpoint.
- proponent_frequency(query_set, method, limit): documents that are proponents of the most queries.
- gradient_coverage(): per checkpoint, projection fingerprint and partition, chunks in `tokens`
  against vectors in `train_gradients`; coverage below 1 means extraction has not finished that slice.
- quarantine_by_reason(): refused input rows per run, stage and reason.
- runs_history(): every run, newest first, with status and counts.
- influence_by_host / influence_by_crawl_month / influence_by_partition(query_set, checkpoint_id,
  method): proponent slots, summed scores, mean rank and distinct queries per url host, crawl month
  or partition (docs/sql-views.md).
- proponent_drift(query_set, method, checkpoint_a, checkpoint_b, k): per query, the overlap of two
  checkpoints' top-k, the documents that entered or left, and the correlation of shared ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
import re
from typing import NamedTuple, NoReturn

import sqlglot
from sqlglot import exp
from sqlglot.dialects.spark import Spark
from sqlglot.errors import SqlglotError

from infra.cli import add_config_arguments, config_from_args, option
from infra.config import from_settings, load_config
from infra.lake import Lake, TableNotFoundError
from infra.spark import spark_session
from schemas.tables import TABLES


class SqlQuery(NamedTuple):
    description: str
    sql: str
    params: dict[str, type] = {}


# The published views: influence of a query set's proponents at one checkpoint, grouped by a property
# of their documents (docs/sql-views.md). A proponent slot is one row of `proponents`: one (query,
# rank). Documents missing from `documents` (taken down, or never tokenized here) group under NULL.
INFLUENCE_PARAMS = {"query_set": str, "checkpoint_id": str, "method": str}
# a url's host as urllib's urlsplit(url).hostname gives it: after the scheme and any user@, before
# any port, path, query or fragment, lowercased; NULL for an id that is not such a url
URL_HOST = "nullif(lower(regexp_extract(p.doc_id, '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/?#]*@)?([^/?#:]*)', 1)), '')"


def _influence_sql(group: str, expression: str) -> str:
    return f"""
        WITH slots AS (
            SELECT {expression} AS {group}, p.query_id, p.doc_id, p.score, p.`rank`
            FROM proponents p LEFT JOIN documents d ON d.doc_id = p.doc_id
            WHERE p.query_set = :query_set AND p.checkpoint_id = :checkpoint_id AND p.method = :method
        )
        SELECT {group}, count(*) AS n_slots, sum(score) AS total_score, avg(`rank`) AS mean_rank,
               count(DISTINCT query_id) AS n_queries, count(DISTINCT doc_id) AS n_documents
        FROM slots GROUP BY {group}
        ORDER BY total_score DESC, {group}
        """


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
    "influence_by_host": SqlQuery(
        "a query set's proponent slots at one checkpoint per url host: count, sum of scores, mean rank, queries",
        _influence_sql("host", URL_HOST),
        INFLUENCE_PARAMS,
    ),
    "influence_by_crawl_month": SqlQuery(
        "a query set's proponent slots at one checkpoint per crawl month (documents.timestamp, YYYY-MM)",
        _influence_sql("crawl_month", "substr(d.`timestamp`, 1, 7)"),
        INFLUENCE_PARAMS,
    ),
    "influence_by_partition": SqlQuery(
        "a query set's proponent slots at one checkpoint per source partition of their documents",
        _influence_sql("`partition`", "d.`partition`"),
        INFLUENCE_PARAMS,
    ),
    "proponent_drift": SqlQuery(
        "per query and overall: how a query set's top-k proponent documents moved from checkpoint_a to "
        "checkpoint_b (overlap, entered, left, rank correlation over the shared documents)",
        """
        WITH a AS (SELECT query_id, doc_id, min(`rank`) AS r FROM proponents
                   WHERE query_set = :query_set AND method = :method AND checkpoint_id = :checkpoint_a
                     AND `rank` <= :k
                   GROUP BY query_id, doc_id),
             b AS (SELECT query_id, doc_id, min(`rank`) AS r FROM proponents
                   WHERE query_set = :query_set AND method = :method AND checkpoint_id = :checkpoint_b
                     AND `rank` <= :k
                   GROUP BY query_id, doc_id),
             pairs AS (SELECT coalesce(a.query_id, b.query_id) AS query_id, coalesce(a.doc_id, b.doc_id) AS doc_id,
                              a.r AS rank_a, b.r AS rank_b,
                              a.r IS NOT NULL AND b.r IS NOT NULL AS shared
                       FROM a FULL OUTER JOIN b ON a.query_id = b.query_id AND a.doc_id = b.doc_id),
             per_query AS (
                 SELECT query_id, count(rank_a) AS n_a, count(rank_b) AS n_b,
                        count(CASE WHEN shared THEN 1 END) AS n_shared,
                        sort_array(collect_list(CASE WHEN rank_a IS NULL THEN doc_id END)) AS entered,
                        sort_array(collect_list(CASE WHEN rank_b IS NULL THEN doc_id END)) AS left_docs,
                        corr(CASE WHEN shared THEN rank_a END, CASE WHEN shared THEN rank_b END) AS rank_corr
                 FROM pairs GROUP BY query_id),
             queries AS (
                 SELECT query_id, n_a, n_b, n_shared, n_shared / greatest(n_a, n_b) AS overlap,
                        size(entered) AS n_entered, size(left_docs) AS n_left, entered, left_docs,
                        CASE WHEN n_shared >= 2 THEN rank_corr END AS rank_correlation
                 FROM per_query)
        SELECT 'query' AS scope, query_id, n_a, n_b, n_shared, overlap, n_entered, n_left, entered, left_docs,
               rank_correlation, 1 AS n_queries
        FROM queries
        UNION ALL
        SELECT 'overall' AS scope, NULL AS query_id, sum(n_a), sum(n_b), sum(n_shared),
               avg(CASE WHEN n_a > 0 AND n_b > 0 THEN overlap END), sum(n_entered), sum(n_left),
               CAST(NULL AS ARRAY<STRING>), CAST(NULL AS ARRAY<STRING>), avg(rank_correlation),
               count(CASE WHEN n_a > 0 AND n_b > 0 THEN 1 END)
        FROM queries
        ORDER BY scope DESC, query_id
        """,
        {"query_set": str, "method": str, "checkpoint_a": str, "checkpoint_b": str, "k": int},
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


class WriteRefused(PermissionError):
    """SQL text refused without allow_writes: anything but one reading statement over the lake's tables."""


class ReadQuery(NamedTuple):
    sql: str  # the statement as parsed, printed back without comments: the engine runs what was checked
    tables: list[str]  # the lake tables it reads


EXPLAIN_MODES = ("EXTENDED", "CODEGEN", "COST", "FORMATTED", "LOGICAL")
# Spark functions that call Java static methods (environment, system properties); Sail has none
JVM_FUNCTIONS = {"reflect", "java_method", "try_reflect"}
# what a LATERAL may join: a subquery or a generator over the row, never another table function
LATERAL_SOURCES = (exp.Subquery, exp.Explode, exp.Inline, exp.Stack)
logging.getLogger("sqlglot").setLevel(logging.ERROR)  # SHOW and EXPLAIN parse as a Command, with a warning


def check_read_only(sql: str) -> ReadQuery:
    """The one reading statement in sql (SELECT or WITH, DESCRIBE, EXPLAIN, SHOW TABLES/VIEWS/COLUMNS)
    whose tables are all lake tables, or WriteRefused naming what was refused. The text is parsed
    (sqlglot, Spark dialect), so comments, strings, raw strings and backquotes hide nothing."""
    if "${" in sql:  # Apache Spark substitutes ${env:NAME}, ${spark:key} in the raw text, quotes or not
        _refuse(sql, "variable substitution ${...}")
    try:
        statements = [statement for statement in sqlglot.parse(sql, read="spark") if statement is not None]
    except SqlglotError as error:
        _refuse(sql, f"SQL that does not parse ({str(error).splitlines()[0]})")
    if len(statements) != 1:
        _refuse(sql, f"{len(statements)} statements")
    statement = statements[0]
    if isinstance(statement, exp.Command):
        return _check_command(sql, statement)
    if isinstance(statement, exp.Describe):
        table = statement.this
        if not isinstance(table, exp.Table) or statement.args.get("kind") not in (None, "TABLE"):
            _refuse(sql, f"DESCRIBE {statement.args.get('kind') or ''} {table.sql('spark')}")
        tables, style = _lake_tables(sql, table), statement.args.get("style")
        # Sail wants the TABLE keyword, which sqlglot leaves out
        return ReadQuery(f"DESCRIBE TABLE {style + ' ' if style else ''}{table.sql('spark')}", tables)
    if not isinstance(statement, exp.Query):
        _refuse(sql, f"a {statement.key.upper()} statement")
    for node in statement.walk():
        if isinstance(node, (exp.DML, exp.DDL, exp.Command)):  # a write nested in a CTE or subquery
            _refuse(sql, f"a nested {node.key.upper()}")
        if isinstance(node, exp.Anonymous) and node.name.lower() in JVM_FUNCTIONS:
            _refuse(sql, f"function {node.name}")
        if isinstance(node, exp.Lateral) and not isinstance(node.this, LATERAL_SOURCES):  # LATERAL read_files(...)
            _refuse(sql, f"LATERAL {node.this.sql('spark')} (only a subquery, explode, inline or stack)")
    tables = _lake_tables(sql, statement)
    return ReadQuery(statement.sql(dialect="spark", comments=False), tables)


def _lake_tables(sql: str, statement: exp.Expression) -> list[str]:
    """The lake tables the statement reads; any other source (a path such as text.`/etc/hostname`, a
    table-valued function, a catalog table) is refused. A name a WITH around it defines is a CTE.
    Lake table names are lowercased in the statement: the views are, and Sail's names are case-sensitive."""
    tables = set()
    for table in statement.find_all(exp.Table):
        if table.find_ancestor(exp.Hint):  # /*+ BROADCAST(d) */ names an alias, reads nothing
            continue
        if table.db or table.catalog or not isinstance(table.this, exp.Identifier):
            _refuse(sql, f"source {table.sql('spark')} (not a lake table)")
        name = table.name.lower()
        if _defined_by_with(table, name):
            continue
        if name not in TABLES:
            _refuse(sql, f"table {table.name} (not a lake table: {', '.join(TABLES)})")
        table.set("this", exp.to_identifier(name))
        tables.add(name)
    return sorted(tables)


def _defined_by_with(table: exp.Table, name: str) -> bool:
    node = table.parent
    while node is not None:
        ctes = node.args.get("with_")
        if ctes and any(cte.alias.lower() == name for cte in ctes.expressions):
            return True
        node = node.parent
    return False


def _check_command(sql: str, command: exp.Command) -> ReadQuery:
    """EXPLAIN [mode] of a checked statement; SHOW TABLES, SHOW VIEWS, SHOW COLUMNS FROM a lake table.
    The text that runs is rebuilt here, never the given one."""
    keyword, rest = command.name.upper(), command.expression.name
    if keyword == "EXPLAIN":
        mode = re.match(rf"({'|'.join(EXPLAIN_MODES)})\s", rest, re.IGNORECASE)
        inner = check_read_only(rest[mode.end() :] if mode else rest)
        return ReadQuery(f"EXPLAIN {mode.group(1).upper() + ' ' if mode else ''}{inner.sql}", inner.tables)
    if keyword == "SHOW":
        words = [token.text for token in Spark().tokenize(rest)]  # comments dropped, quotes removed
        kind = [word.upper() for word in words[:2]]
        if kind in (["TABLES"], ["VIEWS"]) and len(words) == 1:
            return ReadQuery(f"SHOW {kind[0]}", [])
        if kind in (["COLUMNS", "FROM"], ["COLUMNS", "IN"]) and len(words) == 3 and words[2].lower() in TABLES:
            return ReadQuery(f"SHOW COLUMNS FROM `{words[2].lower()}`", [words[2].lower()])
    _refuse(sql, f"{keyword} {' '.join(rest.split())}"[:80])


def _refuse(sql: str, what: str) -> NoReturn:
    raise WriteRefused(
        f"jobs sql is read-only: refused {' '.join(what.split())} in {' '.join(sql.split())[:80]!r}; only one SELECT, WITH, "
        "DESCRIBE, EXPLAIN or SHOW over the lake's tables runs unless --allow-writes is given"
    )


def run_sql(spark, lake: Lake, sql: str, args: dict | None = None, what: str = "the query", allow_writes: bool = False):
    """Any SQL over the lake: each table it names becomes a temp view over its Delta folder.
    Read-only unless allow_writes: on Sail a DELETE through such a view deletes from the table."""
    if allow_writes:
        tables = tables_used(sql)
    else:
        sql, tables = check_read_only(sql)
    for table in tables:
        if not lake.exists(table):
            raise TableNotFoundError(f"{what} needs table {table}, which does not exist under {lake.root} yet")
        lake.spark_read(spark, table).createOrReplaceTempView(table)
    return spark.sql(sql, args=args or None)


def _query(name: str) -> SqlQuery:
    if name not in SQL_QUERIES:
        raise ValueError(f"unknown query {name!r}; queries: {', '.join(SQL_QUERIES)}")
    return SQL_QUERIES[name]


@dataclass
class SqlConfig:
    name: str | None = option(
        None, positional=True, help=f"a documented query ({', '.join(SQL_QUERIES)}) or any SQL text"
    )
    param: list[str] = option(factory=list, action="append", help="a query parameter, KEY=VALUE (repeatable)")
    lake: str = from_settings("lake_root", help="lake root: a folder or s3://bucket/prefix")
    rows: int = option(50, help="rows to print")
    list_queries: bool = option(False, flags=["--list"], help="list the queries and their parameters")
    allow_writes: bool = option(
        False, help="run SQL text as given: it may change tables (INSERT, DELETE, MERGE, ...) and read paths"
    )


def add_arguments(parser) -> None:
    add_config_arguments(parser, SqlConfig)


def main(args) -> int:
    args = config_from_args(SqlConfig, args)
    if args.list_queries or not args.name:
        for name, query in SQL_QUERIES.items():
            usage = " ".join([name, *(f"--param {key}=..." for key in query.params)])
            print(f"{usage}\n    {query.description}")
        return 0
    params = dict(_key_value(item) for item in args.param)
    lake = Lake(args.lake)
    spark = spark_session(load_config().spark_remote)
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
