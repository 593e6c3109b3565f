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
   the files holding them are rewritten without them (`delete_rows`). The urls are values of a
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
import hashlib
import json
import time
from dataclasses import dataclass, fields
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from infra import storage
from infra.cli import add_config_arguments, config_from_args, option
from infra.config import from_settings
from infra.lake import Lake, LakeError, utc_now
from infra import layout
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
LEDGER_KEY = "taken_down"  # metadata of an autocorrelation file: hashed (doc_id, chunk) keys no longer summed


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
    rescores what they changed, and records one `takedowns` row per item (module docstring).

    Before its first delete a run writes its plan (`<lake>/_takedown_plans/<run_id>.json`: the
    items, the rows found per url, the sums corrected, the scorings to redo); the next takedown run
    takes over the plans of runs that failed or were killed, so the refits and rescorings a dead run
    owed are done even though their rows are gone, and their takedowns rows count what it removed."""
    from infra.runs import finish_run, start_run

    seconds, started = {}, time.perf_counter()
    run_id = start_run(lake, "takedown", (config or {}) | {"urls": len({item.url for item in items})})
    try:
        owed = unfinished_plans(lake)
        items = list(dict.fromkeys([*items, *(Item(*item) for plan in owed for item in plan["items"])]))
        urls = list(dict.fromkeys(item.url for item in items))
        found = {table: rows_of(lake, table, urls) for table in DOC_TABLES}
        seconds["count"] = time.perf_counter() - started
        sums = correct_sums(lake, found["train_gradients"], urls)
        seconds["sums"] = time.perf_counter() - started - sum(seconds.values())
        to_score = scorings_to_redo(lake, found, sums)
        per_url = counts_per_url(found, urls)
        for plan in owed:  # what a dead run found and may have deleted already
            sums += [entry for entry in plan["sums"] if entry not in sums]
            to_score |= {tuple(key): settings for key, settings in plan["to_score"]}
            for url, counts in plan["per_url"].items():
                per_url[url] = per_url[url] | {t: max(n, per_url[url].get(t, 0)) for t, n in counts.items()}
        plan_file = write_plan(lake, run_id, items, per_url, sums, to_score)
        deleted = {table: delete_rows(lake, table, urls, found[table], run_id) for table in DOC_TABLES}
        seconds["delete"] = time.perf_counter() - started - sum(seconds.values())
        refitted = refit(lake, sums)
        seconds["refit"] = time.perf_counter() - started - sum(seconds.values())
        rescored, not_rescored = rescore(lake, to_score)
        seconds["rescore"] = time.perf_counter() - started - sum(seconds.values())
        left = {table: n for table in DOC_TABLES if (n := rows_of(lake, table, urls).num_rows)}
        if left:
            raise LakeError(
                f"rows of the taken-down urls are back in {left} (a concurrent write re-added them): rerun the takedown"
            )
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


def _plans_folder(lake: Lake) -> str:
    return layout.takedown_plans(lake.root)


def write_plan(lake: Lake, run_id: str, items: list[Item], per_url: dict, sums: list, to_score: dict) -> str:
    """The run's plan, written before its first delete; deleted when the run succeeded."""
    path = storage.join(_plans_folder(lake), f"{run_id}.json")
    plan = {
        "run_id": run_id,
        "items": [list(item) for item in items],
        "per_url": per_url,
        "sums": sums,
        "to_score": [[list(key), settings] for key, settings in to_score.items()],
    }
    storage.write_text(path, json.dumps(plan, default=str))
    return path


def unfinished_plans(lake: Lake) -> list[dict]:
    """The plans of takedown runs that failed or were killed (`start_run` has marked the killed ones
    failed); those of runs still running are theirs."""
    plans = []
    for path in storage.list_objects(_plans_folder(lake), suffix=".json"):
        plan = json.loads(storage.read_text(path))
        status = lake.read("runs", filters=[("run_id", "=", plan["run_id"])], columns=["status"])["status"].to_pylist()
        if status != ["running"]:
            plans.append(plan | {"file": path})
    return plans


def rows_of(lake: Lake, table: str, urls: list[str]) -> pa.Table:
    """The table's rows naming one of the urls (doc_id and the columns a takedown needs)."""
    columns = ["doc_id", *_CONTEXT.get(table, [])]
    if not lake.exists(table):
        return TABLES[table].arrow_schema.empty_table().select(columns)
    return lake.read(table, filters=[("doc_id", "in", urls)], columns=columns)


def delete_rows(lake: Lake, table: str, urls: list[str], found: pa.Table, run_id: str) -> int:
    """Deletes the urls' rows (`found`: what `rows_of` read) in one commit; returns the rows deleted.

    Not delta-rs' `DeltaTable.delete`: the files it rewrites declare their strings as Arrow
    string_view, and pyarrow's `is_in` has no kernel for those, so the next streamed slice replace of
    the partition (`Lake.replace_slice_batches`: extract --force, the index) would fail on them.
    Here each file holding one of the rows is rewritten with the project's own writer
    (`infra.slice_files`: declared types, page checksums, exact statistics) without them, and the
    old files are removed, all in one transaction carrying the run id."""
    if found.num_rows == 0:
        return 0
    spec = TABLES[table]
    if not spec.partition_by:
        return _delete_by_slices(lake, table, urls, found)
    from deltalake import CommitProperties
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import RemoveAction

    from infra.lake_reads import VERIFY_PAGES
    from infra.slice_files import SliceFiles

    delta = lake.open(table)
    dataset = delta.to_pyarrow_dataset()
    adds = pa.table(delta.get_add_actions(flatten=True)).to_pylist()
    partition_of = {
        action["path"]: {column: str(action[f"partition.{column}"]) for column in spec.partition_by} for action in adds
    }
    # the change feed (delta-rs `load_cdf`, jobs/document_changes.py) refuses a remove without its size
    size_of = {action["path"]: action["size_bytes"] for action in adds}
    holding = set(map(str, found["partition"].to_pylist())) if "partition" in found.column_names else None
    match = ds.field("doc_id").isin(urls)
    stored = [name for name in spec.column_names if name not in spec.partition_by]
    files: dict[str, SliceFiles] = {}
    removes, deleted, now = [], 0, int(time.time() * 1000)
    try:
        for fragment in dataset.get_fragments():
            values = partition_of[fragment.path]
            if holding is not None and values.get("partition") not in holding:
                continue  # data skipping: the partition holds none of them
            scan = {"schema": dataset.schema, "use_threads": False, "fragment_scan_options": VERIFY_PAGES}
            matched = fragment.scanner(columns=["doc_id"], filter=match, **scan).count_rows()
            if matched == 0:
                continue
            key = json.dumps(values, sort_keys=True)
            if key not in files:
                files[key] = SliceFiles(delta, spec.arrow_schema, values, lake.storage_options)
            for batch in fragment.to_batches(columns=stored, filter=~match, batch_size=4096, **scan):
                files[key].write(pa.Table.from_batches([batch]).cast(files[key].schema))
            removes.append(RemoveAction(fragment.path, True, now, size=size_of[fragment.path], partition_values=values))
            deleted += matched
        added = [action for written in files.values() for action in written.finish()]
        delta.create_write_transaction(
            [*removes, *added],
            mode="append",
            schema=spec.arrow_schema,
            partition_by=list(spec.partition_by),
            commit_properties=CommitProperties(custom_metadata={"trackstar.takedown_run": run_id}),
        )
    except CommitFailedError as error:
        for written in files.values():
            written.discard()
        raise LakeError(f"another run committed to {table} during the takedown: rerun it ({error})") from error
    except BaseException:
        for written in files.values():
            written.discard()
        raise
    print(f"[takedown] {table}: {deleted} row(s) deleted ({len(removes)} file(s) rewritten)", flush=True)
    return deleted


def _delete_by_slices(lake: Lake, table: str, urls: list[str], found: pa.Table) -> int:
    """An unpartitioned table (train_outliers: small) loses the rows by replacing each of its
    slices that holds one with the slice's other rows."""
    keys = list(TABLES[table].slice_keys)
    deleted = 0
    for values in sorted(set(zip(*(found[key].to_pylist() for key in keys)))):
        where = dict(zip(keys, values))
        rows = lake.read(table, filters=where)
        kept = rows.filter(pc.invert(pc.is_in(rows["doc_id"], pa.array(urls, pa.string()))))
        lake.replace_slice(table, kept, **where)
        deleted += rows.num_rows - kept.num_rows
    print(f"[takedown] {table}: {deleted} row(s) deleted", flush=True)
    return deleted


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
def chunk_key(doc_id: str, chunk: int) -> str:
    """A train chunk as an autocorrelation file's ledger names it (hashed: the url is not copied there)."""
    return hashlib.sha256(f"{doc_id}\0{chunk}".encode()).hexdigest()[:24]


def correct_sums(lake: Lake, found: pa.Table, urls: list[str]) -> list[dict]:
    """Takes the urls' vectors out of the autocorrelation file of every (checkpoint, fingerprint,
    partition) holding them; one entry each: {checkpoint_id, fingerprint, partition, vectors, how}."""
    slices = sorted(
        set(zip(found["checkpoint_id"].to_pylist(), found["fingerprint"].to_pylist(), found["partition"].to_pylist()))
        if found.num_rows
        else ()
    )
    return [
        correct_partition_sums(lake, checkpoint_id, fingerprint, partition, urls)
        for checkpoint_id, fingerprint, partition in slices
    ]


def correct_partition_sums(lake: Lake, checkpoint_id: str, fingerprint: str, partition: int, urls: list[str]) -> dict:
    """The partition's autocorrelation file without the urls' chunks: their stored float32 vectors
    subtracted (exactly what extraction summed), or, for a lossy dtype, the sums of the remaining
    stored vectors. Chunks the file's ledger already names (an earlier, killed run) are not subtracted again."""
    from infra.layout import TRAIN
    from infra.matrices import load_metadata
    from jobs.autocorrelation import save_autocorrelation, stored_autocorrelation, without_chunks

    where = [("checkpoint_id", "=", checkpoint_id), ("fingerprint", "=", fingerprint), ("partition", "=", partition)]
    removed = lake.read(
        "train_gradients", filters=[*where, ("doc_id", "in", urls)], columns=["doc_id", "chunk", "dtype"]
    )
    entry = {
        "checkpoint_id": checkpoint_id,
        "fingerprint": fingerprint,
        "partition": partition,
        "vectors": removed.num_rows,
    }
    path = layout.autocorrelation_file(lake.root, checkpoint_id, fingerprint, TRAIN, partition)
    if not storage.exists(path):  # never completed extraction: fit-hessian refuses it until re-extracted
        return entry | {"how": "no sums file"}
    sums, metadata = stored_autocorrelation(path), load_metadata(path)
    ledger = set(json.loads(metadata.get(LEDGER_KEY, "[]")))
    keys = [chunk_key(d, c) for d, c in zip(removed["doc_id"].to_pylist(), removed["chunk"].to_pylist())]
    exact = set(removed["dtype"].to_pylist()) == {"float32"}
    if exact and all(key in ledger for key in keys):
        return entry | {"how": "already subtracted"}

    def taken_down(batch):
        named = zip(batch["doc_id"].to_pylist(), batch["chunk"].to_pylist())
        wanted = set(urls)  # an exact subtraction skips what the ledger says is out already
        return pa.array([d in wanted and not (exact and chunk_key(d, c) in ledger) for d, c in named])

    scope = [*where, ("doc_id", "in", urls)] if exact else where
    sums = without_chunks(lake, sums, scope, taken_down, exact)
    how = "subtracted" if exact else "rebuilt from the remaining stored vectors"
    save_autocorrelation(path, sums, {LEDGER_KEY: json.dumps(sorted(ledger | set(keys)))})
    return entry | {"how": how, "count": sums.count}


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
