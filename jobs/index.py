"""index: builds the TrackStar index of a checkpoint (`jobs/trackstar_index.py` holds what it is and
how it is built; `score` brings it up to date the same way before it scores).

    python -m jobs index [--kinds inverse_root inverse_root_train_only] [--dtype int8]
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from infra.cli import add_config_arguments, config_from_args, option
from infra.lake import Lake
from jobs.catalog import SliceConfig
from jobs.threads import use_cpu_threads
from jobs.trackstar_index import BATCH_BYTES, DTYPES, KINDS, ensure_index


@dataclass
class IndexConfig(SliceConfig):
    kinds: list[str] = option(factory=lambda: ["inverse_root"], choices=KINDS, nargs="+")
    dtype: str = option("int8", choices=DTYPES)
    batch_bytes: int = option(BATCH_BYTES)


def run(config: IndexConfig) -> dict:
    from infra.names import check_names
    from infra.runs import finish_run, start_run
    from jobs.catalog import latest_checkpoint_id
    from jobs.catalog import only_fingerprint

    check_names(query_set=config.query_set, checkpoint_id=config.checkpoint_id, fingerprint=config.fingerprint)
    use_cpu_threads(config.cpu_threads, "index")
    lake = Lake(config.lake)
    checkpoint_id = config.checkpoint_id or latest_checkpoint_id(lake)
    fingerprint = config.fingerprint or only_fingerprint(lake, checkpoint_id)
    run_id = start_run(lake, "index", asdict(config) | {"checkpoint_id": checkpoint_id, "fingerprint": fingerprint})
    try:
        results = [
            ensure_index(
                lake, checkpoint_id, fingerprint, config.query_set, kind, config.dtype, run_id, config.batch_bytes
            )
            for kind in config.kinds
        ]
    except Exception:
        finish_run(lake, run_id, "failed", {})
        raise
    result = {
        "checkpoint_id": checkpoint_id,
        "fingerprint": fingerprint,
        "query_set": config.query_set,
        "run_id": run_id,
        "indexes": results,
    }
    finish_run(lake, run_id, "succeeded", result)
    return result


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, IndexConfig)


def main(args):
    import json

    print(json.dumps(run(config_from_args(IndexConfig, args)), indent=1, default=str))
