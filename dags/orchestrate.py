"""What the Airflow DAGs decide, as plain functions: what is new, what is missing, what to redo.

Each function is one DAG task (the task id is the function name) and returns a small JSON-able
dict for XCom. They only read the lake and call the stage jobs, which are themselves idempotent:
a rerun with nothing new changes no table.

Settings come from `infra.config.load_config()`, as for the CLI: the TOML file, TRACKSTAR_*
variables and, inside an Airflow task, the run's params (lake_root, checkpoints, refit_threshold,
projection_k, projection_seed, vector_dtype, batch_token_budget, hessian_*, top_k, ...).
"""

from __future__ import annotations

from dataclasses import replace

from infra.lake import Lake
from infra.names import NAME_PATTERN  # noqa: F401  (the DAGs' name params)
from jobs import catalog, extract, fit_hessian, score, tokenize
from jobs.catalog import hessian_is_stale, last_scored_inputs
from infra.config import load_config
from infra import layout

DEFAULT_METHODS = ("trackstar",)


def lake_root() -> str:
    return load_config().lake_root


# ------------------------------------------------------------------ finding work
def newest_checkpoint(location: str | None = None) -> str:
    """The checkpoint folder with the highest manifest step under `location` (default: the configured
    checkpoints folder or s3:// prefix)."""
    return catalog.newest_checkpoint_folder(location or load_config().checkpoints_folder)


def find_new_partitions(tokenizer_dir: str | None = None) -> list[int]:
    """Raw partitions not yet tokenized with the current tokenizer."""
    lake = Lake(lake_root())
    tokenizer_dir = tokenizer_dir or layout.tokenizer(lake.root)
    fingerprint = tokenize.tokenizer_fingerprint(tokenizer_dir, tokenize.model_context(lake.root))
    done = tokenize.tokenized_partitions(lake, fingerprint)
    return sorted(set(tokenize.raw_partitions(layout.raw(lake.root))) - done)


def registered_query_sets() -> list[str]:
    return sorted(set(Lake(lake_root()).read("query_sets", columns=["query_set"])["query_set"].to_pylist()))


# ------------------------------------------------------------------ doing it
def tokenize_partition(partition: int) -> dict:
    return tokenize.run(tokenize.TokenizeConfig(lake=lake_root(), partitions=[partition]))


# what an `also_extract` entry may set: the fields that make another projection of the same slices
OTHER_PROJECTION_FIELDS = ("projection_seed", "projection_k", "normalizer")


def plan_extraction(
    checkpoint: str, query_sets: list[str], partitions: list[int] | None = None, also: list[dict] | None = None
) -> dict:
    """The slices of `checkpoint` still missing (all partitions, or `partitions`), in groups of
    `extract_group_size` partitions: one mapped `extract_group` task each, so as many groups run
    at once as the device pool has slots. `also`: other projections (OTHER_PROJECTION_FIELDS) each
    group extracts of its slices with the same ranks (the DAGs' `also_extract` param)."""
    for other in also or []:
        unknown = sorted(set(other) - set(OTHER_PROJECTION_FIELDS))
        if unknown:
            raise ValueError(f"also_extract entry {other}: unknown key(s) {unknown}; known: {OTHER_PROJECTION_FIELDS}")
    settings = load_config()
    config = extract.ExtractConfig(lake=settings.lake_root, checkpoint=checkpoint, partitions=list(partitions or []))
    plan = extract.plan_groups(config, list(query_sets), settings.extract_group_size)
    for group in plan["groups"]:
        group["also"] = list(also or [])
    return plan


def extraction_groups(plan: dict) -> list[dict]:
    """The groups to map `extract_group` over; one empty group when nothing is missing, so that the
    mapping is never empty and a quiet night runs the same tasks as a busy one (an empty mapping
    leaves Airflow's test runner a pass with nothing to run, which it reports as unrunnable tasks)."""
    return plan["groups"] or [{"checkpoint": plan["checkpoint"], "partitions": [], "query_sets": []}]


def extract_group(group: dict) -> dict:
    """One group of the plan on this node's ranks, started once: its partitions and its query sets,
    projected as the index is (its result) and as the group's `also` asks. A retry redoes only the
    group's slices still missing; other groups are other tasks."""
    if not group["partitions"] and not group["query_sets"]:
        print("[extract] nothing missing: no ranks started")
        return {"fingerprint": None, "extracted": []}
    own = extract.ExtractConfig(
        lake=lake_root(),
        checkpoint=group["checkpoint"],
        partitions=list(group["partitions"]),
        queries_only=not group["partitions"],
    )
    results = extract.run_many(
        [
            replace(own, query_set=query_set, **projection)
            for projection in [{}, *group.get("also", [])]  # the index's own first
            for query_set in (group["query_sets"] or [None])
        ]
    )
    index = results[: len(group["query_sets"] or [None])]  # the index's own; the others are not scored
    return {"fingerprint": index[0]["fingerprint"], "extracted": sorted({i for r in index for i in r["items"]})}


def collect_extraction(plan: dict, groups: list) -> dict:
    """What every group extracted, for the Hessian fit and scoring that wait for all of them."""
    # indexing, not iteration: Airflow's lazy sequence of mapped results asks for one item past its end
    done = [groups[i] for i in range(len(groups))]
    stray = sorted({g["fingerprint"] for g in done} - {plan["fingerprint"], None})
    if stray:
        raise ValueError(f"extraction groups wrote fingerprints {stray}, the plan was made for {plan['fingerprint']}")
    return {
        "checkpoint_id": plan["checkpoint_id"],
        "fingerprint": plan["fingerprint"],
        "extracted": sorted({item for g in done for item in g["extracted"]}),
    }


def extract_missing(checkpoint: str, query_set: str) -> dict:
    """Gradients of one query set (and of any slice of `checkpoint` still missing) in one task."""
    result = extract.run(extract.ExtractConfig(lake=lake_root(), checkpoint=checkpoint, query_set=query_set))
    return {
        "checkpoint_id": result["checkpoint_id"],
        "fingerprint": result["fingerprint"],
        "extracted": result["items"],
    }


def refit_hessians(extraction: dict, query_sets: list[str]) -> list[str]:
    """Refit where the training sample changed by more than the threshold; returns the refitted sets."""
    settings, refitted = load_config(), []
    lake = Lake(settings.lake_root)
    for query_set in query_sets:
        if hessian_is_stale(
            lake, extraction["checkpoint_id"], extraction["fingerprint"], query_set, settings.refit_threshold
        ):
            fit_hessian.run(
                fit_hessian.FitHessianConfig(
                    lake=settings.lake_root,
                    checkpoint_id=extraction["checkpoint_id"],
                    query_set=query_set,
                    fingerprint=extraction["fingerprint"],
                    mixing_lambda=settings.hessian_lambda,
                    damping_ratio=settings.hessian_damping,
                )
            )
            refitted.append(query_set)
    return refitted


def rescore_changed(
    extraction: dict, query_sets: list[str], methods: list[str] | None = None, top_k: int | None = None
) -> list[str]:
    """Rescore the query sets whose inputs changed since their last scoring; returns them."""
    lake, rescored, top_k = Lake(lake_root()), [], top_k or score.ScoreConfig().top_k
    methods = list(methods or DEFAULT_METHODS)
    for query_set in query_sets:
        inputs = score.scoring_inputs(lake, extraction["checkpoint_id"], extraction["fingerprint"], query_set)
        if all(
            inputs == last_scored_inputs(lake, extraction["checkpoint_id"], extraction["fingerprint"], query_set, m)
            for m in methods
        ):
            continue
        score.run(
            score.ScoreConfig(
                lake=lake_root(),
                checkpoint_id=extraction["checkpoint_id"],
                query_set=query_set,
                fingerprint=extraction["fingerprint"],
                methods=methods,
                top_k=top_k,
            )
        )
        rescored.append(query_set)
    return rescored


# ------------------------------------------------------------------ comparing checkpoints
def compare_checkpoints(
    query_set: str, checkpoint_a: str, checkpoint_b: str, method: str = "trackstar", k: int = 10
) -> dict:
    """How proponents of the same queries change between two checkpoints, into `eval_metrics`:
    mean overlap@k of the top-k sets and mean Spearman correlation of the ranks of shared proponents."""
    import numpy as np
    import pyarrow as pa

    from infra.lake import utc_now

    lake = Lake(lake_root())
    top = {}
    for checkpoint in (checkpoint_a, checkpoint_b):
        rows = lake.read(
            "proponents",
            filters=[("query_set", "=", query_set), ("method", "=", method), ("checkpoint_id", "=", checkpoint)],
        ).to_pylist()
        if not rows:
            raise ValueError(f"no {method} proponents of {query_set} for {checkpoint}: score it first")
        for row in rows:
            if row["rank"] <= k:
                top.setdefault(checkpoint, {}).setdefault(row["query_id"], {})[(row["doc_id"], row["chunk"])] = row[
                    "rank"
                ]
    shared_queries = sorted(set(top[checkpoint_a]) & set(top[checkpoint_b]))
    overlaps, correlations = [], []
    for query in shared_queries:
        a, b = top[checkpoint_a][query], top[checkpoint_b][query]
        common = sorted(set(a) & set(b))
        overlaps.append(len(common) / k)
        if len(common) >= 2:
            correlations.append(float(np.corrcoef([a[c] for c in common], [b[c] for c in common])[0, 1]))
    result = {
        "overlap@k": float(np.mean(overlaps)),
        "rank_correlation": float(np.nanmean(correlations)) if correlations else float("nan"),
        "queries": len(shared_queries),
    }
    metric_rows = [
        {
            "run_id": f"compare-{checkpoint_a}-vs-{checkpoint_b}",
            "query_set": query_set,
            "checkpoint_id": checkpoint_b,
            "method": method,
            "metric": f"{name}_vs:{checkpoint_a}",
            "bucket": "all",
            "value": value,
            "n": len(shared_queries),
            "created_at": utc_now(),
        }
        for name, value in (("overlap@k", result["overlap@k"]), ("rank_correlation", result["rank_correlation"]))
    ]
    from schemas.tables import TABLES

    table = pa.Table.from_pylist(metric_rows, schema=TABLES["eval_metrics"].arrow_schema)
    lake.replace_slice("eval_metrics", table, run_id=metric_rows[0]["run_id"])
    return result


def neighbour_checkpoint(lake: Lake, checkpoint_id: str) -> tuple[str, str] | None:
    """(earlier, later): this checkpoint and its nearest registered neighbour by step, the previous
    one where it exists, else the next (a backfilled old checkpoint is compared with its successor)."""
    rows = lake.read("checkpoints", columns=["checkpoint_id", "step"]).to_pylist()
    step = next(r["step"] for r in rows if r["checkpoint_id"] == checkpoint_id)
    earlier = [(r["step"], r["checkpoint_id"]) for r in rows if r["step"] < step]
    later = [(r["step"], r["checkpoint_id"]) for r in rows if r["step"] > step]
    if earlier:
        return max(earlier)[1], checkpoint_id
    if later:
        return checkpoint_id, min(later)[1]
    return None


def compare_with_previous(extraction: dict, query_sets: list[str], method: str = "trackstar") -> list[dict]:
    lake = Lake(lake_root())
    pair = neighbour_checkpoint(lake, extraction["checkpoint_id"])
    if pair is None:
        print(f"[compare] {extraction['checkpoint_id']} is the only registered checkpoint: nothing to compare")
        return []
    return [
        dict(query_set=q, earlier=pair[0], later=pair[1], **compare_checkpoints(q, *pair, method)) for q in query_sets
    ]


def partitions_in_range(first: int | None, last: int | None) -> list[int] | None:
    """Tokenized partitions within [first, last] (None: all of them)."""
    if first is None and last is None:
        return None
    tokenized = set(Lake(lake_root()).read("tokens", columns=["partition"])["partition"].to_pylist())
    chosen = sorted(p for p in tokenized if (first is None or p >= first) and (last is None or p <= last))
    if not chosen:
        raise ValueError(f"no tokenized partitions in [{first}, {last}]")
    return chosen


def score_query_set(extraction: dict, query_set: str, methods: list[str], top_k: int) -> dict:
    return score.run(
        score.ScoreConfig(
            lake=lake_root(),
            checkpoint_id=extraction["checkpoint_id"],
            query_set=query_set,
            fingerprint=extraction["fingerprint"],
            methods=list(methods),
            top_k=top_k,
        )
    )


def evaluate_if_ground_truth(extraction: dict, query_set: str) -> dict | None:
    """MRR and recall@10 of every scored method, when the query set names its stating documents."""
    from evaluation.metric_rows import write_attribution_metrics
    from evaluation.metrics import attribution_metrics
    from evaluation.rankings import ranked_proponents

    lake = Lake(lake_root())
    queries = lake.read("queries", filters=[("query_set", "=", query_set)]).to_pylist()
    truth = {q["query_id"]: set(q["stating_doc_ids"] or ()) for q in queries}
    if not any(truth.values()):
        print(f"[evaluate] {query_set} has no ground truth (stating_doc_ids): nothing to evaluate")
        return None
    ranked = ranked_proponents(lake, query_set, extraction["checkpoint_id"])
    metrics = attribution_metrics(ranked, truth, {q["query_id"]: q["frequency_bucket"] for q in queries}, k=10)
    write_attribution_metrics(
        lake, query_set, extraction["checkpoint_id"], metrics, f"score-eval-{extraction['checkpoint_id']}"
    )
    return {method: cells["all"] for method, cells in metrics.items()}


def take_down_requested() -> dict:
    """The pending `takedown_requests` carried out in one takedown run (jobs/takedown.py), before
    maintenance vacuums: their rows are gone from every table, R_train corrected, Hessians refitted
    and proponents rescored; the files of the versions before go at the vacuum past the retention."""
    from jobs import takedown

    result = takedown.run_pending(Lake(lake_root()))
    summary = ("pending", "run_id", "urls", "urls_found", "deleted", "not_rescored", "seconds")
    return {key: result[key] for key in summary if key in result}


def maintain_lake() -> dict:
    """Compaction, vacuum with Delta's default retention and log checkpoints of every table."""
    from infra.maintenance import maintain_lake as maintain

    return maintain(Lake(lake_root()))


def find_document_changes() -> dict:
    """The documents new, changed and deleted since the previous night's read, from the table's
    change feed (jobs/document_changes.py); the version read up to is recorded for the next night."""
    from jobs.document_changes import read_since_last_run

    return read_since_last_run(Lake(lake_root()))


def describe_document_changes(changes: dict) -> str:
    """One sentence of the nightly report: what the documents' change feed said."""
    if changes["baseline"]:
        why = f" (the feed could not be read: {changes['feed_unavailable']})" if "feed_unavailable" in changes else ""
        return f"documents: change feed read from version {changes['version']} on{why}"
    message = (
        f"documents since version {changes['since_version']}: {changes['new']} new, {changes['changed']} changed, "
        f"{changes['deleted']} deleted ({changes.get('taken_down', 0)} by a takedown)"
    )
    partitions = changes.get("partitions_to_reextract")
    if partitions:
        listed = " ".join(map(str, partitions))
        message += (
            f"; partition(s) {partitions} hold gradients of other documents: "
            f"`python -m jobs extract --partitions {listed} --force`"
        )
    return message


def report_summary(
    tokenized: list | None, changes: dict, extraction: dict, refitted: list[str], rescored: list[str]
) -> str:
    # len(), never list(): iterating Airflow's lazy sequence of mapped results asks for one item past
    # its end, which Airflow's API client logs as "[error] XCom not found" in a successful run
    tokenized = len(tokenized) if tokenized else 0
    # a compaction moves the version and changes no document: not worth a line
    documents_changed = changes["baseline"] or any(changes[kind] for kind in ("new", "changed", "deleted"))
    if not tokenized and not documents_changed and not extraction["extracted"] and not refitted and not rescored:
        message = (
            f"nothing new: every raw partition is tokenized, every slice of {extraction['checkpoint_id']} is "
            f"extracted, Hessians are current and scores are up to date; no table was changed"
        )
    else:
        message = (
            f"tokenized {tokenized} partition(s); extracted {extraction['extracted'] or 'nothing'} for "
            f"{extraction['checkpoint_id']}; refitted {refitted or 'nothing'}; rescored {rescored or 'nothing'}"
        )
        if documents_changed:
            message += f"; {describe_document_changes(changes)}"
    print(f"[reindex] {message}")
    return message
