"""register-queries: load a queries JSONL (the world's, or your own) into `queries` and `query_sets`.

The file is validated as a whole (`schemas.queries`): any malformed line is an error listing every
problem by line, since a query set with holes would skew every metric computed on it. With the
model's tokenizer at hand (default `<lake>/model/tokenizer`), queries whose target it cannot encode
are refused into `quarantine` with the reason, and targets it splits differently after the prompt
are reported. Re-registering a set replaces it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
import pyarrow as pa

from infra import storage
from infra.lake import Lake
from infra.names import check_names
from infra.quarantine import quarantine_rows
from schemas.queries import QueryFileError, check_targets, load_queries
from schemas.tables import TABLES
from infra.cli import add_config_arguments, config_from_args, option
from infra.config import from_settings, load_config
from infra import layout


def run(
    lake_root: str,
    path: str | None = None,
    name: str | None = None,
    run_id: str = "manual",
    tokenizer: str | None = None,
) -> int:
    name = name or load_config().query_set
    check_names(query_set=name, run_id=run_id)
    lake = Lake(lake_root)
    path = storage.absolute(path or layout.world(lake.root, "queries.jsonl"))
    query_file = load_queries(path, storage.read_text(path))
    for note in query_file.notes:
        print(f"[register-queries] note: {note}")
    tokenizer = tokenizer or layout.tokenizer(lake.root)
    local_tokenizer = (
        storage.local_folder(tokenizer, load_config().cache_dir)
        if storage.exists(storage.join(tokenizer, "tokenizer.json"))
        else Path(tokenizer)
    )
    queries = checked_against_tokenizer(lake, path, query_file, local_tokenizer, run_id)
    columns = [c.name for c in TABLES["queries"].columns]
    rows = {c: [] for c in columns}
    for query in queries:
        for c in columns:
            rows[c].append({"query_set": name, "run_id": run_id}.get(c, query.get(c)))
    lake.replace_slice("queries", pa.table(rows), query_set=name)
    lake.replace_slice(
        "query_sets",
        pa.table(
            {
                "query_set": [name],
                "path": [lake.relative(path)],
                "n_queries": [len(queries)],
                "registered_at": [datetime.now(timezone.utc)],
                "run_id": [run_id],
            }
        ),
        query_set=name,
    )
    print(f"[register-queries] {len(queries)} queries from {path} registered as query set {name!r}")
    return len(queries)


def checked_against_tokenizer(lake: Lake, path: Path, query_file, tokenizer_dir: Path, run_id: str) -> list[dict]:
    """The queries the tokenizer can encode; the others go to quarantine with the reason."""
    if not (tokenizer_dir / "tokenizer.json").exists():
        print(f"[register-queries] note: no tokenizer at {tokenizer_dir}: targets not checked against it")
        return query_file.queries
    from transformers import AutoTokenizer

    refused, warnings = check_targets(query_file.queries, AutoTokenizer.from_pretrained(tokenizer_dir))
    for warning in warnings:
        print(f"[register-queries] warning: {warning}")
    if refused:
        quarantine_rows(
            lake,
            [
                {
                    "source": str(path),
                    "position": f"{path}:{query_file.lines[i]}",
                    "reason": reason,
                    "raw_value": json.dumps(query_file.queries[i], ensure_ascii=False),
                }
                for i, reason in refused
            ],
            stage="register-queries",
            run_id=run_id,
        )
        for i, reason in refused[:5]:
            print(f"[register-queries] refused {path}:{query_file.lines[i]}: {reason}")
        print(f"[register-queries] {len(refused)} query(ies) refused into quarantine (stage register-queries)")
    dropped = {i for i, _ in refused}
    kept = [q for i, q in enumerate(query_file.queries) if i not in dropped]
    if not kept:
        raise QueryFileError(path, [f"the tokenizer at {tokenizer_dir} can encode none of the targets"])
    return kept


@dataclass
class RegisterQueriesConfig:
    lake: str = from_settings("lake_root", help="lake root: a folder or s3://bucket/prefix")
    path: str | None = option(None, help="queries JSONL (default <lake>/world/queries.jsonl)")
    name: str = from_settings("query_set", help="query set name")
    tokenizer: str | None = option(None, help="folder of the model's tokenizer (default <lake>/model/tokenizer)")


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, RegisterQueriesConfig)


def main(args):
    config = config_from_args(RegisterQueriesConfig, args)
    run(config.lake, config.path, config.name, tokenizer=config.tokenizer)
