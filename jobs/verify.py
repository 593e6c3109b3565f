"""verify: read a whole lake back and report every byte that changed since it was written.

Every file of every table is read in full: Parquet page CRCs (files written by this project's
streaming writer carry them) and each stored vector's checksum are checked, and a file that is
missing or cut short is named. The preconditioner files registered in `hessians` are checked
against their sha256. Exit status 1 when anything is wrong; one line per problem, naming the table,
file and row.

    python -m jobs verify [--lake LAKE] [--tables train_gradients trackstar_index ...]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from infra.cli import add_config_arguments, config_from_args, option
from infra.config import from_settings
from infra.lake import Lake
from infra.matrices import ChecksumMismatch, load_matrices
from schemas.tables import TABLES


@dataclass
class VerifyConfig:
    lake: str = from_settings("lake_root", help="lake root: a folder or s3://bucket/prefix")
    tables: list[str] = option(factory=list, help="only these tables (default: every table the lake holds)")


def problems_of(lake: Lake, tables: list[str]) -> dict[str, list[str]]:
    """{table: problems} for each table that exists, with progress on stdout."""
    found = {}
    for name in tables:
        if not lake.exists(name):
            continue
        files = len(lake.open(name).file_uris())
        print(f"[verify] {name}: reading {files} file(s)", flush=True)
        found[name] = lake.file_problems(name)
    if lake.exists("hessians"):
        found["hessians"] = found.get("hessians", []) + hessian_file_problems(lake)
    return found


def hessian_file_problems(lake: Lake) -> list[str]:
    problems = []
    for row in lake.read("hessians", columns=["path", "sha256"]).to_pylist():
        try:
            load_matrices(lake.resolve(row["path"]), row["sha256"])
        except (ChecksumMismatch, OSError) as error:
            problems.append(f"table hessians, file {row['path']}: {error}")
    return problems


def run(config: VerifyConfig) -> dict[str, list[str]]:
    unknown = sorted(set(config.tables) - set(TABLES))
    if unknown:
        raise SystemExit(f"verify: no table(s) {unknown}; declared: {sorted(TABLES)}")
    lake = Lake(config.lake)
    found = problems_of(lake, config.tables or sorted(TABLES))
    for name, problems in found.items():
        for problem in problems:
            print(f"[verify] {problem}", flush=True)
    total = sum(len(p) for p in found.values())
    print(f"[verify] {len(found)} table(s) read in full: {total or 'no'} problem(s)", flush=True)
    return found


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, VerifyConfig)


def main(args) -> int:
    found = run(config_from_args(VerifyConfig, args))
    return 1 if any(found.values()) else 0
