"""takedown: documents removed by url from every table derived from them, in one audited run.

    python -m jobs takedown --urls urls.txt --reason "request 2026-031"          # now
    python -m jobs takedown --urls urls.txt --reason "request 2026-031" --queue  # filed: the maintenance DAG runs it
    python -m jobs takedown --pending                                            # what the maintenance DAG runs

A url is a document's `doc_id`. One `runs` row (command `takedown`) covers the whole run:

1. The rows of the urls are counted in every table that holds a `doc_id`: documents, tokens,
   train_gradients, train_outliers, trackstar_index, proponents, tail_patches (`DOC_TABLES`).
2. R_train's sums lose the documents exactly, without re-extraction: for each extracted
   (checkpoint, fingerprint, partition) holding one of them, the partition's autocorrelation file
   (`infra.layout.autocorrelation_file`) gets the stored vectors' outer products subtracted (read
   BEFORE the rows are deleted). Stored float32 vectors are exactly what extraction summed; for a
   lossy dtype (float16, bfloat16, int8) the partition's sums are rebuilt from its remaining stored
   vectors. The file records which chunks it no longer holds (hashed keys), so a run killed between
   this and the deletes never subtracts twice when rerun.
3. The rows are deleted, one Delta commit per table carrying the run id in its commit metadata:
   the files holding them are rewritten without them (`infra/row_deletes.py`). The urls are values of a
   pyarrow filter, never pasted into SQL, so quotes and backslashes in them are data.
4. Every Hessian fitted on the changed sums is refitted (`jobs.fit_hessian.run`, with its last
   fit's settings), then every (checkpoint, query set, method) scored from them or whose proponents
   held a removed document is rescored (`jobs.score.run`, with its last scoring's settings; the
   index is rebuilt for the new Hessian). Proponents of methods `score` does not make (the
   evaluation's text baselines) lose the rows and are listed as `not_rescored`: rerun `evaluate`.
5. No table may hold the urls afterwards (a concurrent writer that put one back fails the run:
   rerun it); then one `takedowns` row per url records the reason, the request and the rows removed.

A run that fails or is killed is completed by the next takedown run (any: `--pending` with nothing
filed does it too, and so does the weekly DAG task): each run writes its plan before its first
delete (`<lake>/_takedown_plans/<run_id>.json`), and the plans of dead runs are taken over.

What stays: `quarantine` (refused input lines, the audit of what tokenize refused; a line refused
as a duplicate or as taken down holds the url, never the text), `queries.stating_doc_ids` (ground
truth the user supplied), the raw partitions (the corpus as received: tokenize refuses a taken-down
url that comes back, reason "taken down: <reason>"), and the files of older table versions, which
time travel still reads until `maintenance` vacuums them after Delta's retention (7 days).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, fields
from typing import NamedTuple

import pyarrow as pa

from infra import storage
from infra.cli import add_config_arguments, config_from_args, option
from infra.config import from_settings
from infra.lake import Lake, LakeError, utc_now
from infra.row_deletes import delete_rows
from jobs.autocorrelation import correct_sums
from jobs.takedown_plans import unfinished_plans, with_owed_work, write_plan
from schemas.tables import TABLES

# every table whose rows name a document (doc_id), in the order their rows are deleted: what is
# derived last first, so a run killed mid-way leaves nothing that points at a missing document
DOC_TABLES = (
    "proponents",
    "tail_patches",
    "trackstar_index",
    "train_outliers",
    "train_gradients",
    "tokens",
    "documents",
)
# the columns read beside doc_id to know what a takedown touches
_CONTEXT = {
    "proponents": ["query_set", "checkpoint_id", "method"],
    "train_gradients": ["checkpoint_id", "fingerprint", "partition"],
    "train_outliers": ["checkpoint_id", "fingerprint"],
    "trackstar_index": ["partition"],
    "tokens": ["partition"],
    "documents": ["partition"],
}


@dataclass
class TakedownConfig:
    lake: str = from_settings("lake_root", help="lake root: a folder or s3://bucket/prefix")
    urls: str = option(
        "", help="file of urls (documents' doc_id), one per line; blank lines and lines starting with # are skipped"
    )
    reason: str = option("", help="why the documents are taken down (recorded with every url)")
    queue: bool = option(False, help="only file the urls in takedown_requests; the maintenance DAG carries them out")
    pending: bool = option(False, help="carry out the pending takedown_requests (what the maintenance DAG does)")


class Item(NamedTuple):
    """One url to take down, why, and the request it comes from (None: the command line)."""

    url: str
    reason: str
    request_id: str | None = None


# ------------------------------------------------------------------ entry points
def run(config: TakedownConfig) -> dict:
    lake = Lake(config.lake)
    if config.pending:
        if config.urls:
            raise ValueError("--pending carries out the filed requests: give no --urls with it")
        return run_pending(lake)
    if not config.urls or not config.reason.strip():
        raise ValueError("a takedown needs --urls FILE and a --reason")
    urls = read_urls(config.urls)
    if config.queue:
        return {"request_id": file_request(lake, urls, config.reason.strip()), "urls": len(urls)}
    return take_down(lake, [Item(url, config.reason.strip()) for url in urls], {"urls_file": config.urls})


def read_urls(location: str) -> list[str]:
    """The urls of a file (local or s3://), one per line, in order, each once."""
    lines = storage.read_text(location).splitlines()
    urls = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not urls:
        raise ValueError(f"{location}: no urls (one per line)")
    return list(dict.fromkeys(urls))


def file_request(lake: Lake, urls: list[str], reason: str) -> str:
    """Files the urls in takedown_requests; returns the request id (the filing run's id)."""
    from infra.runs import finish_run, start_run

    run_id = start_run(lake, "takedown-request", {"urls": len(urls), "reason": reason})
    now = utc_now()
    rows = [{"url": url, "reason": reason, "run_id": run_id, "requested_at": now} for url in urls]
    lake.replace_slice(
        "takedown_requests", pa.Table.from_pylist(rows, TABLES["takedown_requests"].arrow_schema), run_id=run_id
    )
    finish_run(lake, run_id, "succeeded", {"urls": len(urls)})
    print(f"[takedown] {len(urls)} url(s) filed as request {run_id}; the maintenance DAG carries it out", flush=True)
    return run_id


def pending_requests(lake: Lake) -> list[Item]:
    """The filed (request, url) pairs no takedown has carried out yet, oldest request first."""
    requests = lake.read("takedown_requests").to_pylist()
    done = {(r["request_id"], r["url"]) for r in lake.read("takedowns", columns=["request_id", "url"]).to_pylist()}
    requests.sort(key=lambda r: (r["requested_at"], r["run_id"]))
    return [Item(r["url"], r["reason"], r["run_id"]) for r in requests if (r["run_id"], r["url"]) not in done]


def run_pending(lake: Lake) -> dict:
    """Carries out every pending request in one takedown run (one refit and rescoring for all), and
    completes the takedown runs that failed or were killed (`take_down`)."""
    items = pending_requests(lake)
    if not items and not unfinished_plans(lake):
        print("[takedown] no pending takedown requests", flush=True)
        return {"pending": 0}
    return take_down(lake, items, {"requests": sorted({i.request_id for i in items})})


# ------------------------------------------------------------------ the takedown
def take_down(lake: Lake, items: list[Item], config: dict | None = None) -> dict:
    """Removes the items' documents from every derived table, corrects R_train's sums, refits and
    rescores what they changed, and records one `takedowns` row per item (module docstring); a plan
    written before the first delete lets the next run finish what this one owed (jobs/takedown_plans.py)."""
    from infra.runs import finish_run, start_run

    seconds, started = {}, time.perf_counter()

    def lap(step: str) -> None:
        seconds[step] = time.perf_counter() - started - sum(seconds.values())

    run_id = start_run(lake, "takedown", (config or {}) | {"urls": len({item.url for item in items})})
    try:
        owed = unfinished_plans(lake)
        items = list(dict.fromkeys([*items, *(Item(*item) for plan in owed for item in plan["items"])]))
        urls = list(dict.fromkeys(item.url for item in items))
        found = {table: rows_of(lake, table, urls) for table in DOC_TABLES}
        lap("count")
        sums = correct_sums(lake, found["train_gradients"], urls)
        lap("sums")
        sums, to_score, per_url = with_owed_work(
            owed, sums, scorings_to_redo(lake, found, sums), counts_per_url(found, urls)
        )
        plan_file = write_plan(lake, run_id, items, per_url, sums, to_score)
        metadata = {"trackstar.takedown_run": run_id}
        deleted = {table: delete_rows(lake, table, "doc_id", urls, found[table], metadata) for table in DOC_TABLES}
        lap("delete")
        refitted = refit(lake, sums)
        lap("refit")
        rescored, not_rescored = rescore(lake, to_score)
        lap("rescore")
        refuse_rows_back(lake, urls)
        record(lake, items, per_url, run_id)
    except BaseException as error:
        finish_run(lake, run_id, "failed", {"error": f"{type(error).__name__}: {error}"})
        raise
    for done in [plan_file, *(plan["file"] for plan in owed)]:
        storage.delete(done)
    seconds["total"] = time.perf_counter() - started
    result = {
        "run_id": run_id,
        "urls": len(urls),
        "urls_found": sum(1 for counts in per_url.values() if counts),
        "taken_over": [plan["run_id"] for plan in owed],
        "deleted": deleted,
        "sums": sums,
        "refitted": refitted,
        "rescored": rescored,
        "not_rescored": not_rescored,
        "seconds": {step: round(value, 3) for step, value in seconds.items()},
    }
    finish_run(lake, run_id, "succeeded", result)
    print(
        f"[takedown] {len(urls)} url(s) ({result['urls_found']} in the lake): deleted {deleted}; refitted "
        f"{len(refitted)} Hessian(s), rescored {len(rescored)} scoring(s) in {seconds['total']:.1f} s",
        flush=True,
    )
    return result


def refuse_rows_back(lake: Lake, urls: list[str]) -> None:
    """Fails the run when a table holds the urls again (a concurrent write re-added them)."""
    left = {table: n for table in DOC_TABLES if (n := rows_of(lake, table, urls).num_rows)}
    if left:
        raise LakeError(
            f"rows of the taken-down urls are back in {left} (a concurrent write re-added them): rerun the takedown"
        )


def rows_of(lake: Lake, table: str, urls: list[str]) -> pa.Table:
    """The table's rows naming one of the urls (doc_id and the columns a takedown needs)."""
    columns = ["doc_id", *_CONTEXT.get(table, [])]
    if not lake.exists(table):
        return TABLES[table].arrow_schema.empty_table().select(columns)
    return lake.read(table, filters=[("doc_id", "in", urls)], columns=columns)


def counts_per_url(found: dict[str, pa.Table], urls: list[str]) -> dict[str, dict[str, int]]:
    counts = {url: {} for url in urls}
    for table, rows in found.items():
        for url in rows["doc_id"].to_pylist():
            counts[url][table] = counts[url].get(table, 0) + 1
    return counts


def record(lake: Lake, items: list[Item], per_url: dict, run_id: str) -> None:
    """One `takedowns` row per item: what tokenize refuses from now on, and the audit of the run."""
    now = utc_now()
    rows = [
        {
            "url": item.url,
            "reason": item.reason,
            "request_id": item.request_id,
            "counts_json": json.dumps(per_url[item.url], sort_keys=True),
            "run_id": run_id,
            "taken_at": now,
        }
        for item in items
    ]
    lake.replace_slice("takedowns", pa.Table.from_pylist(rows, TABLES["takedowns"].arrow_schema), run_id=run_id)


# ------------------------------------------------------------------ R_train's sums
# ------------------------------------------------------------------ refit and rescore
def _config_of(config_class, stored: dict, **overrides):
    """A stage config from a run's stored configuration (fields it lacks keep their defaults)."""
    names = {f.name for f in fields(config_class)}
    values = {k: v for k, v in stored.items() if k in names} | overrides
    if "r_query_exclude" in values:
        values["r_query_exclude"] = tuple(values["r_query_exclude"] or ())
    return config_class(**values)


def refit(lake: Lake, sums: list[dict]) -> list[dict]:
    """Refits every Hessian registered for a (checkpoint, fingerprint) whose sums changed, with the
    settings of its last fit; returns [{checkpoint_id, query_set, fingerprint, run_id, n_train}]."""
    from jobs import fit_hessian
    from jobs.catalog import runs_of

    changed = sorted({(s["checkpoint_id"], s["fingerprint"]) for s in sums if s["how"] != "no sums file"})
    fits = sorted(
        (c, q, f)
        for c, q, f in lake.distinct(
            "hessians", ["checkpoint_id", "query_set", "fingerprint"], [("kind", "=", "r_train")]
        )
        if (c, f) in changed and q is not None
    )
    last = {}
    for _, config, counts in runs_of(lake, "fit-hessian"):  # newest first
        last.setdefault((counts.get("checkpoint_id"), counts.get("query_set"), counts.get("fingerprint")), config)
    done = []
    for checkpoint_id, query_set, fingerprint in fits:
        config = _config_of(
            fit_hessian.FitHessianConfig,
            last.get((checkpoint_id, query_set, fingerprint), {}),
            lake=lake.root,
            checkpoint_id=checkpoint_id,
            query_set=query_set,
            fingerprint=fingerprint,
        )
        result = fit_hessian.run(config)
        done.append(
            {
                "checkpoint_id": checkpoint_id,
                "query_set": query_set,
                "fingerprint": fingerprint,
                "run_id": result["run_id"],
                "n_train": result["n_train"],
            }
        )
    return done


def scorings_to_redo(lake: Lake, found: dict[str, pa.Table], sums: list[dict]) -> dict:
    """{(checkpoint, query set, method): the last score run's configuration} for the proponents that
    must change: those scored from vectors whose sums changed (their Hessian is refitted) and those
    that held a removed document; None for methods `score` did not make (no score run found)."""
    from jobs.catalog import runs_of

    changed = {(s["checkpoint_id"], s["fingerprint"]) for s in sums}
    scored = {}
    for _, config, counts in runs_of(lake, "score"):  # newest first
        for method in config.get("methods", ()):
            key = (counts.get("checkpoint_id"), config.get("query_set"), method)
            scored.setdefault(key, config | {"fingerprint": counts.get("fingerprint")})
    present = (
        lake.distinct("proponents", ["checkpoint_id", "query_set", "method"]) if lake.exists("proponents") else set()
    )
    held = found["proponents"]
    holding = set(zip(held["checkpoint_id"].to_pylist(), held["query_set"].to_pylist(), held["method"].to_pylist()))
    redo = {}
    for key in sorted(present):
        config = scored.get(key)
        if key in holding or (config is not None and (key[0], config["fingerprint"]) in changed):
            redo[key] = config
    return redo


def rescore(lake: Lake, to_score: dict) -> tuple[list[dict], list[dict]]:
    """Reruns `score` for each (checkpoint, query set) with the settings of the methods' last runs
    (methods sharing settings in one run); returns (rescored, not rescored)."""
    from jobs import score

    groups, not_rescored = {}, []
    for (checkpoint_id, query_set, method), config in sorted(to_score.items()):
        if config is None or method not in score.METHODS:
            not_rescored.append({"checkpoint_id": checkpoint_id, "query_set": query_set, "method": method})
            continue
        settings = {k: v for k, v in config.items() if k not in ("methods", "lake")}
        settings |= {"checkpoint_id": checkpoint_id, "query_set": query_set}
        groups.setdefault(json.dumps(settings, sort_keys=True, default=str), []).append(method)
    done = []
    for settings, methods in groups.items():
        config = _config_of(score.ScoreConfig, json.loads(settings), lake=lake.root, methods=methods)
        result = score.run(config)
        done.append(
            {
                "checkpoint_id": config.checkpoint_id,
                "query_set": config.query_set,
                "methods": methods,
                "run_id": result["run_id"],
            }
        )
    if not_rescored:
        print(
            f"[takedown] proponents of {not_rescored} lost the removed rows but were not made by `score`: "
            "rerun `python -m jobs evaluate` to refill them",
            flush=True,
        )
    return done, not_rescored


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, TakedownConfig)


def main(args):
    print(json.dumps(run(config_from_args(TakedownConfig, args)), indent=1, default=str))
