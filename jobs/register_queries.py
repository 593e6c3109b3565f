"""register-queries: load a queries JSONL (the world's, or your own) into `queries` and `query_sets`.

The file is validated as a whole (`jobs.world.read_queries`): a malformed line is a clear error
naming the file and line, since a query set with holes would skew every metric computed on it.
Re-registering a set replaces it.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
import pyarrow as pa

from infra import storage
from infra.lake import Lake
from jobs.world import read_queries
from schemas.tables import TABLES
from infra.config import load_config

DEFAULT_QUERY_SET = "fact-world"


def run(lake_root: str, path: str | None = None, name: str = DEFAULT_QUERY_SET, run_id: str = "manual") -> int:
    lake = Lake(lake_root)
    path = storage.absolute(path or storage.join(lake.root, "world", "queries.jsonl"))
    queries = read_queries(path)
    columns = [c.name for c in TABLES["queries"].columns]
    rows = {c: [] for c in columns}
    for query in queries:
        for c in columns:
            rows[c].append({"query_set": name, "run_id": run_id}.get(c, query.get(c)))
    lake.replace_slice("queries", pa.table(rows), query_set=name)
    lake.replace_slice("query_sets", pa.table({"query_set": [name], "path": [path], "n_queries": [len(queries)],
                                               "registered_at": [datetime.now(timezone.utc)], "run_id": [run_id]}),
                       query_set=name)
    print(f"[register-queries] {len(queries)} queries from {path} registered as query set {name!r}")
    return len(queries)


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--lake", default=load_config().lake_root)
    parser.add_argument("--path", help="queries JSONL (default <lake>/world/queries.jsonl)")
    parser.add_argument("--name", default=DEFAULT_QUERY_SET, help="query set name")


def main(args):
    run(args.lake, args.path, args.name)
