"""tokenize (Spark): raw C4 partitions -> `documents`, `tokens`, and `quarantine` for bad lines.

Raw files are read as bytes line by line inside `mapInArrow` (a JSON reader would fail the whole
file on one malformed line); every line is validated (`jobs.c4_lines`), good ones become
documents, bad ones quarantine rows with the reason; a url already taken (by a partition the lake
holds, or an earlier line of this run) is quarantined as a duplicate: one url, one document; a url
taken down (`jobs takedown`) is quarantined with "taken down: <reason>". Documents are tokenized with the
checkpoint's fast tokenizer, prefixed with the end-of-text token the model saw before every
training document, and cut into chunks no longer than the context.

Incremental: a partition already tokenized with the same tokenizer fingerprint is skipped;
`--force` redoes it, replacing its slice (never duplicating rows).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass


from infra import storage
from infra.lake import Lake
from infra.quarantine import quarantine_rows
from infra.runs import finish_run, start_run
from schemas.tables import spark_ddl_of
from jobs.c4_batches import PARSED_SCHEMA, TOKEN_SCHEMA, end_of_text, good_lines, parse_files, tokenize_documents
from jobs.checkpoints import tokenizer_id
from infra.cli import add_config_arguments, config_from_args, option
from infra.config import from_settings
from infra import layout

PARTITION_NAME = re.compile(r"c4-[\w-]+\.(\d+)-of-(\d+)\.json\.gz$")


@dataclass
class TokenizeConfig:
    lake: str = from_settings("lake_root", help="lake root: a folder or s3://bucket/prefix")
    raw: str | None = option(None, help="folder of c4-*.json.gz partitions (default <lake>/raw)")
    tokenizer: str | None = option(None, help="folder with tokenizer.json (default <lake>/model/tokenizer)")
    context: int | None = option(None, help="chunk length (default: the newest checkpoint's context)")
    max_chars: int = option(200_000, help="longer documents are quarantined, not tokenized")
    force: bool = option(False, help="retokenize partitions already done")
    partitions: list[int] | None = option(None, help="only these source partitions (default: all)")


def tokenizer_fingerprint(tokenizer_dir: str, context: int) -> str:
    """Names the tokens a partition holds: the tokenizer and the chunk length."""
    return tokenizer_fingerprint_of(storage.read_bytes(storage.join(tokenizer_dir, "tokenizer.json")), context)


def tokenizer_fingerprint_of(tokenizer_json: bytes, context: int) -> str:
    return tokenizer_id(tokenizer_json) + f"-ctx{context}"


def model_context(lake_root: str) -> int:
    """The context of the lake's newest checkpoint (the chunks must fit it)."""
    from jobs.catalog import checkpoint_folders_by_step

    roots = [
        layout.checkpoints(lake_root),
        layout.legacy_checkpoints(lake_root),
    ]  # and the folder lakes used before
    folders = next((found for found in map(checkpoint_folders_by_step, roots) if found), None)
    if not folders:
        raise FileNotFoundError(f"no checkpoint under {roots[0]} to take the context from; pass --context")
    config = json.loads(storage.read_bytes(storage.join(folders[-1], "config.json")))
    return int(config.get("n_positions") or config["max_position_embeddings"])


class RawPartitionError(ValueError):
    """A file under raw/ the tokenize job cannot take as a C4 partition: a refusal, not a bug."""


def raw_partitions(raw_dir: str) -> dict[int, str]:
    """partition number -> location of the c4-*.json.gz files directly under raw_dir."""
    found, raw_dir = {}, storage.absolute(raw_dir)
    for uri in storage.list_objects(raw_dir, suffix=".json.gz"):
        name = storage.name(uri)
        if not name.startswith("c4-") or uri.count("/") - raw_dir.count("/") != 1:
            continue
        match = PARTITION_NAME.search(name)
        if not match:
            raise RawPartitionError(f"{name}: not a C4 partition name (c4-<split>.NNNNN-of-MMMMM.json.gz)")
        found[int(match.group(1))] = uri
    return found


def tokenized_partitions(lake: Lake, fingerprint: str) -> set[int]:
    """Partitions already done with this fingerprint: those with tokens, and those a successful run
    processed without finding any document (an empty or all-bad file is done, not pending forever)."""
    rows = lake.read("tokens", columns=["partition", "tokenizer_fingerprint"])
    done = {
        p for p, f in zip(rows["partition"].to_pylist(), rows["tokenizer_fingerprint"].to_pylist()) if f == fingerprint
    }
    from jobs.catalog import runs_of

    for _, config, counts in runs_of(lake, "tokenize"):
        if config.get("tokenizer_fingerprint") == fingerprint:
            done |= set(counts.get("tokenized", ()))
    return done


def taken_down_urls(spark, lake: Lake):
    """(doc_id, takedown_reason) of every url the `takedowns` table names (its latest reason), or
    None when nothing was ever taken down (jobs/takedown.py)."""
    from pyspark.sql import functions as F

    if not lake.exists("takedowns"):
        return None
    return (
        lake.spark_read(spark, "takedowns")
        .groupBy(F.col("url").alias("doc_id"))
        .agg(F.max_by("reason", "taken_at").alias("takedown_reason"))
    )


def with_duplicate_urls(spark, lake: Lake, parsed, pending: list[int]):
    """Parsed lines with a reason added to every document whose url (its doc_id) is taken down
    ("taken down: <reason>") or already taken: by a partition the lake holds and this run does not
    rewrite, or by an earlier line of this run (in partition, line order). One url, one document:
    the first one wins. A refused document keeps its url as raw value, never its text."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = Window.partitionBy("doc_id").orderBy("partition", "line")
    lines = parsed.withColumn("occurrence", F.row_number().over(order)).withColumn(
        "first_at", F.first(F.concat_ws(":", "source", F.col("line").cast("string"))).over(order)
    )
    earlier = F.lit(None).cast("string")
    if lake.exists("documents"):
        indexed = (
            lake.spark_read(spark, "documents")
            .filter(~F.col("partition").isin(pending))
            .select("doc_id", F.concat_ws(":", "source", F.col("line").cast("string")).alias("indexed_at"))
        )
        lines, earlier = lines.join(indexed, "doc_id", "left"), F.col("indexed_at")
    is_document = F.col("reason").isNull()
    taken_down = taken_down_urls(spark, lake)
    refused = []
    if taken_down is not None:
        lines = lines.join(taken_down, "doc_id", "left")
        refused = [
            F.when(
                is_document & F.col("takedown_reason").isNotNull(),
                F.concat(F.lit("taken down: "), F.col("takedown_reason")),
            )
        ]
    reason = F.coalesce(
        F.col("reason"),
        *refused,
        F.when(is_document & earlier.isNotNull(), F.concat(F.lit("duplicate url: first seen at "), earlier)),
        F.when(
            is_document & (F.col("occurrence") > 1), F.concat(F.lit("duplicate url: first seen at "), F.col("first_at"))
        ),
    )
    duplicate = is_document & reason.isNotNull()
    return (
        lines.withColumn("raw_value", F.when(duplicate, F.col("doc_id")).otherwise(F.col("raw_value")))
        .withColumn("reason", reason)
        .select(*PARSED_SCHEMA.names)
    )


def reason_counts(reasons) -> dict[str, int]:
    """{kind: lines} where a reason's kind is its text before the first ": "."""
    return dict(sorted(Counter(reason.split(": ", 1)[0] for reason in reasons).items()))


# ------------------------------------------------------------------ the job
def chosen_partitions(raw_dir: str, wanted: list[int] | None) -> dict[int, str]:
    """The raw partitions to tokenize: every one under raw_dir, or those `wanted` (each must exist)."""
    partitions = raw_partitions(raw_dir)
    if wanted is not None:
        unknown = sorted(set(wanted) - set(partitions))
        if unknown:
            raise FileNotFoundError(f"no raw partition(s) {unknown} under {raw_dir}")
        partitions = {p: path for p, path in partitions.items() if p in set(wanted)}
    if not partitions:
        raise FileNotFoundError(f"no c4-*.json.gz partitions under {raw_dir}")
    return partitions


def run(config: TokenizeConfig) -> dict:
    lake = Lake(config.lake)
    tokenizer_dir = config.tokenizer or layout.tokenizer(lake.root)
    tokenizer_file = storage.join(tokenizer_dir, "tokenizer.json")
    if not storage.exists(tokenizer_file):
        raise FileNotFoundError(f"no {tokenizer_file} (train the model first, or pass --tokenizer)")
    tokenizer_json = storage.read_bytes(tokenizer_file)
    context = config.context or model_context(lake.root)
    fingerprint = tokenizer_fingerprint_of(tokenizer_json, context)
    raw_dir = config.raw or layout.raw(lake.root)
    partitions = chosen_partitions(raw_dir, config.partitions)
    tokenized = tokenized_partitions(lake, fingerprint)
    done = set() if config.force else tokenized
    pending = {p: path for p, path in partitions.items() if p not in done}
    gone = sorted(tokenized - set(raw_partitions(raw_dir)))
    if gone:
        print(
            f"[tokenize] WARNING: partition(s) {gone} are tokenized in the lake but their raw files are gone from "
            f"{raw_dir}; their documents stay (they were indexed from files that no longer exist)",
            flush=True,
        )
    result = {
        "partitions": len(partitions),
        "skipped": sorted(set(partitions) - set(pending)),
        "tokenized": sorted(pending),
        "raw_missing": gone,
    }
    if not pending:
        print(
            f"[tokenize] all {len(partitions)} partitions already tokenized with tokenizer {fingerprint}; nothing to do"
        )
        return result | {"documents": 0, "chunks": 0, "quarantined": 0}

    run_id = start_run(lake, "tokenize", asdict(config) | {"tokenizer_fingerprint": fingerprint})
    tokenizer = TokenizerText(tokenizer_json.decode("utf-8"), tokenizer_dir, context, fingerprint)
    result |= tokenize_partitions(lake, pending, tokenizer, config.max_chars, run_id)
    finish_run(lake, run_id, "succeeded", result)
    print(
        f"[tokenize] {len(pending)} partition(s): {result['documents']:,} documents, {result['chunks']:,} chunks, "
        f"{result['tokens']:,} tokens; {result['quarantined']} line(s) quarantined; skipped {result['skipped'] or 'none'}"
    )
    return result


@dataclass(frozen=True)
class TokenizerText:
    """The tokenizer as the Spark job ships it: its JSON text, where it came from, the chunk length."""

    json: str
    folder: str
    context: int
    fingerprint: str

    def end_of_text(self) -> str:
        config = storage.join(self.folder, "tokenizer_config.json")
        return end_of_text(self.json, storage.read_bytes(config) if storage.exists(config) else None)


def quarantine_bad_lines(lake: Lake, lines, run_id: str) -> tuple[int, dict[str, int]]:
    """Every refused line into `quarantine` with its reason: (rows written, count per reason)."""
    from pyspark.sql import functions as F

    bad = lines.filter(F.col("reason").isNotNull()).select("source", "line", "reason", "raw_value").collect()
    rows = [
        {
            "source": r["source"],
            "position": f"{r['source']}:{r['line']}",
            "reason": r["reason"],
            "raw_value": r["raw_value"],
        }
        for r in bad
    ]
    return quarantine_rows(lake, rows, stage="tokenize", run_id=run_id), reason_counts(r["reason"] for r in bad)


def tokenize_partitions(lake: Lake, pending: dict[int, str], tokenizer: TokenizerText, max_chars: int, run_id: str):
    """The Spark job: `pending` partitions' lines into `documents` and `tokens` (their slices
    replaced) and bad lines into `quarantine`; returns the counts of what it wrote."""
    from pyspark.sql import functions as F

    from infra.spark import spark_session

    spark = spark_session()
    files = spark.createDataFrame(
        [(uri, p) for p, uri in sorted(pending.items())], "path string, partition int"
    ).repartition(min(len(pending), os.cpu_count() or 1))
    text, context, eos_token = tokenizer.json, tokenizer.context, tokenizer.end_of_text()
    parsed = files.mapInArrow(lambda it: parse_files(it, max_chars), spark_ddl_of(PARSED_SCHEMA))
    lines = with_duplicate_urls(spark, lake, parsed, sorted(pending))
    # The filter runs in Python, not as a Spark filter: Sail checks the table's NOT NULL
    # constraints on rows a Spark filter has not removed yet (a bad line's null doc_id).
    documents = (
        lines.mapInArrow(good_lines, spark_ddl_of(PARSED_SCHEMA))
        .drop("reason", "raw_value")
        .withColumn("run_id", F.lit(run_id))
    )
    tokens = (
        documents.mapInArrow(lambda it: tokenize_documents(it, text, context, eos_token), spark_ddl_of(TOKEN_SCHEMA))
        .withColumn("tokenizer_fingerprint", F.lit(tokenizer.fingerprint))
        .withColumn("run_id", F.lit(run_id))
    )
    in_pending = f"partition IN ({', '.join(str(p) for p in sorted(pending))})"
    lake.spark_write(documents, "documents", replace_where=in_pending)
    lake.spark_write(tokens, "tokens", replace_where=in_pending)
    quarantined, reasons = quarantine_bad_lines(lake, lines, run_id)
    counts = (
        lake.spark_read(spark, "tokens")
        .filter(F.expr(in_pending))
        .agg(
            F.countDistinct("doc_id").alias("documents"),
            F.count("*").alias("chunks"),
            F.sum("n_tokens").alias("tokens"),
        )
        .first()
    )
    return {
        "documents": counts["documents"],
        "chunks": counts["chunks"],
        "tokens": counts["tokens"],
        "quarantined": quarantined,
        "quarantined_by_reason": reasons,
        "run_id": run_id,
    }


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, TokenizeConfig)


def main(args):
    run(config_from_args(TokenizeConfig, args))
