"""One indexed lake for tests/test_takedown.py and tests/test_views.py (built once per session).

The trained adam lake (tests/fixtures.py) plus a raw partition 2 whose urls hold a quote, double
quotes and a backslash, tokenized, its queries registered, both checkpoints extracted (k = 4),
fitted and scored with trackstar and trak (top 5, float32 index, so scores are exact). Tests that
write copy it first (`copy_lake`). A test module imports `built_indexed_lake` and asks for `indexed_lake`.
"""

import gzip
import json
import time

import pytest

from infra.lake import Lake
from infra import layout
from jobs import extract, fit_hessian, register_queries, score, tokenize

QUOTED_URL = "https://quote.example/o'brien/\"it's\"\\page?q='1'"
EXTRA_DOCS = [
    (QUOTED_URL, "Quorvath Ellin lives in Brandoria, where the weather stays mild all year.", "2019-12-01T00:00:00Z"),
    (
        "https://extra.example/kept",
        "The harbour of a quiet town fills with boats in the spring.",
        "2019-12-02T00:00:00Z",
    ),
]
METHODS = ["trackstar", "trak"]
TOP_K = 5


def write_raw_partition(raw_dir, number: int, docs) -> None:
    """A C4 partition file of (url, text, timestamp) documents."""
    lines = [json.dumps({"text": text, "url": url, "timestamp": stamp}) for url, text, stamp in docs]
    with gzip.open(raw_dir / f"c4-train.{number:05d}-of-00009.json.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def index_checkpoint(lake_dir, checkpoint) -> dict:
    """extract, fit-hessian and score of one checkpoint folder; what each returned."""
    extracted = extract.run(
        extract.ExtractConfig(lake=str(lake_dir), checkpoint=str(checkpoint), projection_k=4, token_budget=512)
    )
    keys = {"lake": str(lake_dir), "checkpoint_id": extracted["checkpoint_id"]}
    fitted = fit_hessian.run(fit_hessian.FitHessianConfig(**keys))
    scored = score.run(score.ScoreConfig(**keys, methods=METHODS, top_k=TOP_K, index="float32"))
    return {"extract": extracted, "fit": fitted, "score": scored}


@pytest.fixture(scope="session", name="indexed_lake")
def built_indexed_lake(adam_run, tmp_path_factory):
    """(lake, {"older": results, "newer": results}, seconds of the build) with both checkpoints indexed."""
    from tests.fixtures import copy_lake

    source, summary = adam_run
    lake_dir = copy_lake(source, tmp_path_factory.mktemp("takedown") / "lake")
    write_raw_partition(lake_dir / "raw", 2, EXTRA_DOCS)
    started = time.perf_counter()
    tokenize.run(tokenize.TokenizeConfig(lake=str(lake_dir)))
    register_queries.run(str(lake_dir))
    older, newer = (layout.checkpoint_path(lake_dir, c) for c in summary["checkpoints"])
    results = {"newer": index_checkpoint(lake_dir, newer)}
    build_seconds = time.perf_counter() - started
    results["older"] = index_checkpoint(lake_dir, older)
    return Lake(lake_dir), results, build_seconds
