"""tokenize (Spark): raw C4 partitions -> `documents`, `tokens`, and `quarantine` for bad lines.

Raw files are read as bytes line by line inside `mapInArrow` (a JSON reader would fail the whole
file on one malformed line); every line is validated (`jobs.c4_lines`), good ones become
documents, bad ones quarantine rows with the reason. Documents are tokenized with the
checkpoint's fast tokenizer, prefixed with the end-of-text token the model saw before every
training document, and cut into chunks no longer than the context.

Incremental: a partition already tokenized with the same tokenizer fingerprint is skipped;
`--force` redoes it, replacing its slice (never duplicating rows).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass

import pyarrow as pa

from infra import storage
from infra.lake import Lake
from infra.quarantine import quarantine_rows
from infra.runs import finish_run, start_run
from schemas.tables import spark_ddl_of
from jobs import c4_lines
from infra.config import load_config

PARTITION_NAME = re.compile(r"c4-[\w-]+\.(\d+)-of-(\d+)\.json\.gz$")
EOS = "<|endoftext|>"


@dataclass
class TokenizeConfig:
    lake: str = "lake"
    raw: str | None = None          # folder of c4-*.json.gz; default <lake>/raw
    tokenizer: str | None = None    # folder holding tokenizer.json; default <lake>/model/tokenizer
    context: int | None = None      # chunk length; default: the newest checkpoint's context
    max_chars: int = 200_000        # longer documents are quarantined, not tokenized
    force: bool = False
    partitions: list | None = None  # only these source partitions (default: all)


def tokenizer_fingerprint(tokenizer_dir: str, context: int) -> str:
    """Names the tokens a partition holds: the tokenizer and the chunk length."""
    return tokenizer_fingerprint_of(storage.read_bytes(storage.join(tokenizer_dir, "tokenizer.json")), context)


def tokenizer_fingerprint_of(tokenizer_json: bytes, context: int) -> str:
    return hashlib.sha256(tokenizer_json).hexdigest()[:16] + f"-ctx{context}"


def model_context(lake_root: str) -> int:
    """The context of the lake's newest checkpoint (the chunks must fit it)."""
    checkpoints = storage.join(lake_root, "checkpoints")
    configs = [c for c in storage.list_objects(checkpoints, suffix="/config.json")
               if c.count("/") - checkpoints.count("/") == 2]
    if not configs:
        raise FileNotFoundError(f"no checkpoint under {checkpoints} to take the context from; pass --context")
    config = json.loads(storage.read_bytes(configs[-1]))
    return int(config.get("n_positions") or config["max_position_embeddings"])


def raw_partitions(raw_dir: str) -> dict[int, str]:
    """partition number -> location of the c4-*.json.gz files directly under raw_dir."""
    found, raw_dir = {}, storage.absolute(raw_dir)
    for uri in storage.list_objects(raw_dir, suffix=".json.gz"):
        name = storage.name(uri)
        if not name.startswith("c4-") or uri.count("/") - raw_dir.count("/") != 1:
            continue
        match = PARTITION_NAME.search(name)
        if not match:
            raise ValueError(f"{name}: not a C4 partition name (c4-<split>.NNNNN-of-MMMMM.json.gz)")
        found[int(match.group(1))] = uri
    return found


def tokenized_partitions(lake: Lake, fingerprint: str) -> set[int]:
    """Partitions already done with this fingerprint: those with tokens, and those a successful run
    processed without finding any document (an empty or all-bad file is done, not pending forever)."""
    rows = lake.read("tokens", columns=["partition", "tokenizer_fingerprint"])
    done = {p for p, f in zip(rows["partition"].to_pylist(), rows["tokenizer_fingerprint"].to_pylist()) if f == fingerprint}
    for run in lake.read("runs", filters=[("command", "=", "tokenize"), ("status", "=", "succeeded")]).to_pylist():
        if json.loads(run["config_json"]).get("tokenizer_fingerprint") == fingerprint:
            done |= set(json.loads(run["counts_json"] or "{}").get("tokenized", ()))
    return done


# ------------------------------------------------------------------ inside mapInArrow
PARSED_SCHEMA = pa.schema([("doc_id", pa.string()), ("partition", pa.int32()), ("source", pa.string()),
                           ("line", pa.int32()), ("text", pa.string()), ("timestamp", pa.string()),
                           ("n_chars", pa.int32()), ("reason", pa.string()), ("raw_value", pa.string())])


def parse_files(batches, max_chars: int):
    """(path, partition) rows -> one row per raw line: a document or a reason. An empty or
    unreadable file gives one row with the reason, so it is reported, never silently skipped."""
    for batch in batches:
        for path, partition in zip(batch.column("path").to_pylist(), batch.column("partition").to_pylist()):
            rows = {name: [] for name in PARSED_SCHEMA.names}

            def add(number, record, reason, raw):
                good = record is not None
                rows["doc_id"].append(record["url"] if good else None)
                rows["partition"].append(partition)
                rows["source"].append(storage.name(path))
                rows["line"].append(number)
                rows["text"].append(record["text"] if good else None)
                rows["timestamp"].append(record["timestamp"] if good else None)
                rows["n_chars"].append(len(record["text"]) if good else None)
                rows["reason"].append(reason)
                rows["raw_value"].append(None if good or raw is None else c4_lines.truncate_raw(raw))

            number = 0
            try:
                with storage.open_read(path) as stored, gzip.open(stored, "rb") as fh:
                    for number, raw in enumerate(fh, start=1):
                        record, reason = c4_lines.parse_line(raw.rstrip(b"\n"))
                        if record is not None and len(record["text"]) > max_chars:
                            record, reason = None, f"document too large: {len(record['text']):,} characters > {max_chars:,}"
                        add(number, record, reason, raw)
            except (OSError, EOFError) as error:  # not gzip, truncated: keep what was read, report the rest
                add(number + 1, None, f"unreadable file after line {number}: {error}", None)
            if number == 0 and not rows["line"]:
                add(0, None, "empty partition file: no lines", None)
            yield pa.RecordBatch.from_pydict(rows, schema=PARSED_SCHEMA)


TOKEN_SCHEMA = pa.schema([("doc_id", pa.string()), ("partition", pa.int32()), ("chunk", pa.int32()),
                          ("token_start", pa.int32()), ("token_end", pa.int32()), ("input_ids", pa.list_(pa.int32())),
                          ("n_tokens", pa.int32())])
_tokenizers = {}


def tokenize_documents(batches, tokenizer_json: str, context: int):
    """documents -> chunk rows; the fast (Rust) tokenizer encodes a whole batch at once. The
    tokenizer travels as its JSON text, so Spark workers need no access to the lake's files."""
    from tokenizers import Tokenizer

    if tokenizer_json not in _tokenizers:
        _tokenizers[tokenizer_json] = Tokenizer.from_str(tokenizer_json)
    tokenizer = _tokenizers[tokenizer_json]
    eos = tokenizer.token_to_id(EOS)
    for batch in batches:
        rows = {name: [] for name in TOKEN_SCHEMA.names}
        encodings = tokenizer.encode_batch(batch.column("text").to_pylist(), add_special_tokens=False)
        for doc_id, partition, encoding in zip(batch.column("doc_id").to_pylist(), batch.column("partition").to_pylist(),
                                               encodings):
            ids = [eos] + encoding.ids
            for chunk, (start, end) in enumerate(c4_lines.chunk_spans(len(ids), context)):
                rows["doc_id"].append(doc_id)
                rows["partition"].append(partition)
                rows["chunk"].append(chunk)
                rows["token_start"].append(start)
                rows["token_end"].append(end)
                rows["input_ids"].append(ids[start:end])
                rows["n_tokens"].append(end - start)
        yield pa.RecordBatch.from_pydict(rows, schema=TOKEN_SCHEMA)


# ------------------------------------------------------------------ the job
def run(config: TokenizeConfig) -> dict:
    from pyspark.sql import functions as F

    from infra.spark import spark_session

    lake = Lake(config.lake)
    raw_dir = config.raw or storage.join(lake.root, "raw")
    tokenizer_file = storage.join(config.tokenizer or storage.join(lake.root, "model", "tokenizer"), "tokenizer.json")
    if not storage.exists(tokenizer_file):
        raise FileNotFoundError(f"no {tokenizer_file} (train the model first, or pass --tokenizer)")
    tokenizer_json = storage.read_bytes(tokenizer_file)
    context = config.context or model_context(lake.root)
    fingerprint = tokenizer_fingerprint_of(tokenizer_json, context)
    partitions = raw_partitions(raw_dir)
    if config.partitions is not None:
        unknown = sorted(set(config.partitions) - set(partitions))
        if unknown:
            raise FileNotFoundError(f"no raw partition(s) {unknown} under {raw_dir}")
        partitions = {p: path for p, path in partitions.items() if p in set(config.partitions)}
    if not partitions:
        raise FileNotFoundError(f"no c4-*.json.gz partitions under {raw_dir}")
    done = set() if config.force else tokenized_partitions(lake, fingerprint)
    pending = {p: path for p, path in partitions.items() if p not in done}
    result = {"partitions": len(partitions), "skipped": sorted(set(partitions) - set(pending)), "tokenized": sorted(pending)}
    if not pending:
        print(f"[tokenize] all {len(partitions)} partitions already tokenized with tokenizer {fingerprint}; nothing to do")
        return result | {"documents": 0, "chunks": 0, "quarantined": 0}

    run_id = start_run(lake, "tokenize", asdict(config) | {"tokenizer_fingerprint": fingerprint})
    spark = spark_session()
    files = spark.createDataFrame([(uri, p) for p, uri in sorted(pending.items())],
                                  "path string, partition int").repartition(min(len(pending), os.cpu_count() or 1))
    max_chars, tokenizer_json = config.max_chars, tokenizer_json.decode("utf-8")
    parsed = files.mapInArrow(lambda it: parse_files(it, max_chars), spark_ddl_of(PARSED_SCHEMA))
    documents = parsed.filter(F.col("reason").isNull()).drop("reason", "raw_value").withColumn("run_id", F.lit(run_id))
    tokens = (documents.mapInArrow(lambda it: tokenize_documents(it, tokenizer_json, context), spark_ddl_of(TOKEN_SCHEMA))
              .withColumn("tokenizer_fingerprint", F.lit(fingerprint)).withColumn("run_id", F.lit(run_id)))
    in_pending = f"partition IN ({', '.join(str(p) for p in sorted(pending))})"
    lake.spark_write(documents, "documents", replace_where=in_pending)
    lake.spark_write(tokens, "tokens", replace_where=in_pending)
    bad = parsed.filter(F.col("reason").isNotNull()).select("source", "line", "reason", "raw_value").collect()
    quarantined = quarantine_rows(lake, [{"source": r["source"], "position": f"{r['source']}:{r['line']}",
                                          "reason": r["reason"], "raw_value": r["raw_value"]} for r in bad],
                                  stage="tokenize", run_id=run_id)
    counts = lake.spark_read(spark, "tokens").filter(F.expr(in_pending)).agg(
        F.countDistinct("doc_id").alias("documents"), F.count("*").alias("chunks"), F.sum("n_tokens").alias("tokens")).first()
    result |= {"documents": counts["documents"], "chunks": counts["chunks"], "tokens": counts["tokens"],
               "quarantined": quarantined, "run_id": run_id}
    finish_run(lake, run_id, "succeeded", result)
    print(f"[tokenize] {len(pending)} partition(s): {counts['documents']:,} documents, {counts['chunks']:,} chunks, "
          f"{counts['tokens']:,} tokens; {quarantined} line(s) quarantined; skipped {result['skipped'] or 'none'}")
    return result


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--lake", default=load_config().lake_root)
    parser.add_argument("--raw", help="folder of c4-*.json.gz partitions (default <lake>/raw)")
    parser.add_argument("--tokenizer", help="folder with tokenizer.json (default <lake>/model/tokenizer)")
    parser.add_argument("--context", type=int, default=TokenizeConfig.context)
    parser.add_argument("--force", action="store_true", help="retokenize partitions already done")


def main(args):
    run(TokenizeConfig(lake=args.lake, raw=args.raw, tokenizer=args.tokenizer, context=args.context, force=args.force))
