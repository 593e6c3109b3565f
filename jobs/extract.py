"""extract (DeepSpeed): `tokens` × one checkpoint -> `train_gradients`; `queries` -> `query_gradients`.

This is the driver side: it resolves the checkpoint (a local folder, or `s3://` downloaded with
boto3), registers it, works out which slices are missing (a slice = one (checkpoint, partition) for a
given projection fingerprint; `--force` redoes them), writes the plan and starts the DeepSpeed ranks
(`jobs.launch`). The ranks (`jobs/extract_rank.py`) compute the projected vectors and write each
work item as one idempotent slice, with the autocorrelation sums Σ p pᵀ of each slice beside the
tables, so the Hessian fit needs no second pass over the data: a killed rank's partition is simply
redone.

CPU ranks here (`DS_ACCELERATOR=cpu`); the same command runs GPU ranks on a GPU node.
"""

from __future__ import annotations

import argparse
import json
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from subprocess import Popen

import pyarrow as pa

from infra import storage
from infra.lake import Lake
from infra.names import check_name, check_names
from jobs.launch import node_ranks, start_ranks, stop_ranks, wait_ranks
from infra.cli import add_config_arguments, config_from_args, option
from infra.config import from_settings
from infra import layout
from infra.layout import QUERY, TRAIN
from gradient_kernels.projection import NORMALIZER_KINDS
from jobs.catalog import checkpoint_uri, resolve_checkpoint
from jobs.corrections import optimizer_correction, projection_spec, uses_optimizer_state
from jobs.checkpoints import CheckpointMismatch
from schemas.vectors import DTYPES

# Queries are few and every score leans on them: never rounded to int8 or 16 bits with the corpus.
QUERY_DTYPE = "float32"


@dataclass
class ExtractConfig:
    lake: str = from_settings("lake_root", help="lake root: a folder or s3://bucket/prefix")
    checkpoint: str = option("", help="checkpoint folder or s3:// prefix (default: newest trained)")
    projection_k: int = from_settings(
        "projection_k", help="projection size per side of every weight matrix (block k × k)"
    )
    projection_seed: int = from_settings("projection_seed")
    normalizer: str = option("auto", choices=["auto", *NORMALIZER_KINDS])
    vector_dtype: str = from_settings("vector_dtype", choices=list(DTYPES))
    token_budget: int = from_settings("batch_token_budget", help="padded tokens per batch")
    ranks: int = from_settings("extract_ranks", help="DeepSpeed ranks on this node (0: one per GPU, else 2 CPU ranks)")
    cpu_threads: int = from_settings(
        "cpu_threads", help="CPU threads per rank (0: the idle cores split among the ranks; OMP_NUM_THREADS wins)"
    )
    optimizer_source: str = option("auto", choices=["auto", "consolidated", "zero"])
    query_set: str | None = from_settings("query_set", help="also extract this registered query set's gradients")
    force: bool = option(False)
    partitions: list[int] = option(factory=list, help="restrict to these source partitions")
    queries_only: bool = option(False, help="extract only the query set's gradients, no training partitions")


# ------------------------------------------------------------------ driver side
def check_checkpoint(lake: Lake, checkpoint_dir: Path, force: bool) -> tuple[dict, str]:
    """(manifest, weights fingerprint); refuses a known checkpoint id whose weights changed."""
    from jobs.checkpoints import load_manifest, weights_fingerprint

    manifest = load_manifest(checkpoint_dir)
    check_name(manifest.get("checkpoint_id"), f"checkpoint id in {checkpoint_dir}/manifest.json")
    weights = weights_fingerprint(checkpoint_dir)
    known = lake.read(
        "checkpoints", filters=[("checkpoint_id", "=", manifest["checkpoint_id"])], columns=["model_fingerprint"]
    )["model_fingerprint"].to_pylist()
    if known and known[0] != weights and not force:
        raise CheckpointMismatch(
            f"checkpoint {manifest['checkpoint_id']!r} is registered with weights {known[0]}, "
            f"but {checkpoint_dir} holds {weights}; pass --force to reindex it"
        )
    return manifest, weights


def register_checkpoint(lake: Lake, manifest: dict, weights: str, source: str, run_id: str) -> None:
    """The checkpoint's row in `checkpoints`, written only when it is missing or names other weights
    or another place: concurrent extraction tasks of one checkpoint find it registered by their
    plan and never race to rewrite it."""
    known = lake.read(
        "checkpoints",
        filters=[("checkpoint_id", "=", manifest["checkpoint_id"])],
        columns=["model_fingerprint", "path"],
    ).to_pylist()
    source = lake.relative(source)
    if known == [{"model_fingerprint": weights, "path": source}]:
        return
    row = pa.table(
        {
            "checkpoint_id": [manifest["checkpoint_id"]],
            "step": [manifest["step"]],
            "path": [source],
            "optimizer": [manifest["optimizer"]],
            "learning_rate": [None if manifest.get("lr") is None else float(manifest["lr"])],
            "tokens_seen": [manifest.get("data_seen_tokens", 0)],
            "model_fingerprint": [weights],
            "registered_at": [datetime.now(timezone.utc)],
            "run_id": [run_id],
        }
    )
    lake.replace_slice("checkpoints", row, checkpoint_id=manifest["checkpoint_id"])


def done_items(lake: Lake, checkpoint_id: str, fingerprint: str, kind: str, query_set: str | None) -> set:
    """Work items whose rows and autocorrelation file exist for this fingerprint."""
    if kind == TRAIN:
        where = [("checkpoint_id", "=", checkpoint_id), ("fingerprint", "=", fingerprint)]
        items = {partition for (partition,) in lake.distinct("train_gradients", ["partition"], where)}
    else:
        where = [
            ("query_set", "=", query_set),
            ("checkpoint_id", "=", checkpoint_id),
            ("fingerprint", "=", fingerprint),
        ]
        items = {query_set} if lake.distinct("query_gradients", ["fingerprint"], where) else set()
    return {
        i for i in items if storage.exists(layout.autocorrelation_file(lake.root, checkpoint_id, fingerprint, kind, i))
    }


def run(config: ExtractConfig) -> dict:
    return run_many([config])[0]


def run_many(configs: list[ExtractConfig], ranks_before_plan: bool = True) -> list[dict]:
    """Several extractions of one checkpoint (other projection seeds, sizes, normalisers or query
    sets) with one start of the ranks: each fingerprint is its own run with its own slices, and the
    ranks share the work items of all of them (the model and optimizer state load once per rank).
    Configs of one fingerprint (other query sets of one extraction) are one run.
    The ranks start first and load the model while the specs and the missing slices are worked out
    (~2 s of planning, most of it importing the model's code); they are stopped if nothing is
    missing. A caller that expects nothing to be missing (the evaluation, after the DAG extracted
    its projections) passes `ranks_before_plan=False`: the ranks then start only once the plan
    shows work, and a run with nothing to do starts none. Returns one result per config, as `run` does."""
    first = configs[0]
    shared = {"lake", "checkpoint", "ranks", "cpu_threads", "force", "token_budget"}
    differing = sorted({f for f in shared for c in configs if getattr(c, f) != getattr(first, f)})
    if differing:
        raise ValueError(f"extractions launched together must share {sorted(shared)}; these differ: {differing}")
    for config in configs:
        check_names(query_set=config.query_set)
    lake = Lake(first.lake)
    checkpoint_dir = resolve_checkpoint(lake, first.checkpoint)
    manifest, weights = check_checkpoint(lake, checkpoint_dir, first.force)
    tokenized = tokenized_partitions(lake, checkpoint_dir)
    plan_path = layout.plan(lake.root, f"extract-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}")
    # a rank per partition at most: the query set is small, and an idle rank's cores go unused
    rank_count = node_ranks(first.ranks, 0 if first.queries_only else len(asked_partitions(first, tokenized)))

    def started():
        return start_ranks(
            "jobs.extract_rank",
            plan_path,
            rank_count,
            first.cpu_threads,
            ["--checkpoint-dir", str(checkpoint_dir.resolve())],
        )

    ranks = started() if ranks_before_plan else []
    try:  # the ranks are stopped unless they ran the plan to its end: nothing missing, or any failure
        results, jobs, planned = [], [], {}
        for config in configs:
            result, job = planned_extraction(
                lake, checkpoint_dir, manifest["checkpoint_id"], config, tokenized, planned
            )
            results.append(result)
            jobs += [job] if job else []
        if jobs:
            print(
                f"[extract] {sum(len(j['items']) for j in jobs)} slice(s) of {len(jobs)} extraction(s) on "
                f"{rank_count} rank(s)",
                flush=True,
            )
            source = checkpoint_uri(lake, first.checkpoint)
            results_planned = [result for result, _ in planned.values()]
            ranks = ranks or started()
            run_plan(lake, checkpoint_dir, manifest, weights, source, jobs, results_planned, plan_path, ranks)
    finally:
        stop_ranks(ranks)
    return results


def planned_extraction(
    lake: Lake, checkpoint_dir: Path, checkpoint_id: str, config: ExtractConfig, tokenized: list, planned: dict
) -> tuple[dict, dict | None]:
    """(the extraction's result, its job for the ranks, None when nothing is missing); `planned`
    (fingerprint -> (result, job)) makes configs that resolve to one fingerprint ("auto" resolving
    to "none", another query set of the same vectors) one extraction: a later config's missing
    items join the earlier one's job."""
    from infra.runs import start_run
    from jobs.checkpoints import check_complete

    spec = projection_spec(lake, checkpoint_dir, config)
    check_complete(
        checkpoint_dir, config.optimizer_source if uses_optimizer_state(spec.normalizer) else None
    )  # before registering
    items = missing_items(lake, checkpoint_id, spec.fingerprint(), config, tokenized)
    if spec.fingerprint() in planned:
        result, job = planned[spec.fingerprint()]
        more = [item for item in items if job is None or item not in job["items"]]
        if job is not None:
            job["items"] += more
            result["items"] += [f"{kind}:{item}" for kind, item in more]
        if job is not None or not more:  # else: the earlier config had nothing missing, this one has
            return result, None
    correction = optimizer_correction(checkpoint_dir, config, spec)
    result = {
        "checkpoint_id": checkpoint_id,
        "fingerprint": spec.fingerprint(),
        "dim": spec.dim,
        "normalizer": spec.normalizer,
        "optimizer_correction": correction,
        "items": [f"{kind}:{item}" for kind, item in items],
    }
    planned[result["fingerprint"]] = (result, None)
    if not items:  # nothing to do: write nothing, not even a runs row
        print(
            f"[extract] every slice of {checkpoint_id} is already extracted (fingerprint {result['fingerprint']}); "
            f"nothing to do"
        )
        return result, None
    print(f"[extract] optimizer correction: {correction}", flush=True)
    result["run_id"] = start_run(
        lake,
        "extract",
        asdict(config)
        | {"fingerprint": result["fingerprint"], "spec": spec.as_dict(), "optimizer_correction": correction},
    )
    print(
        f"[extract] {checkpoint_id}: {len(items)} slice(s), {spec.dim} dims ({len(spec.k)} matrices, "
        f"k={config.projection_k}, seed {config.projection_seed}, {spec.normalizer}), fingerprint {result['fingerprint']}",
        flush=True,
    )
    job = {"config": asdict(config), "spec": spec.as_dict(), "run_id": result["run_id"], "items": items}
    planned[result["fingerprint"]] = (result, job)
    return result, job


def run_plan(
    lake: Lake,
    checkpoint_dir: Path,
    manifest: dict,
    weights: str,
    source: str,
    jobs: list,
    planned: list,
    plan_path: str,
    ranks: list[Popen],
):
    """Registers the checkpoint, writes the plan the started ranks wait for and waits for them;
    every launched run (the `planned` results with a run id) ends failed or succeeded."""
    from infra.runs import finish_run

    checkpoint_id, launched = manifest["checkpoint_id"], [r for r in planned if "run_id" in r]
    plan = {"checkpoint_dir": str(checkpoint_dir.resolve()), "lake": lake.root, "checkpoint_id": checkpoint_id}
    try:
        register_checkpoint(lake, manifest, weights, source, jobs[0]["run_id"])
        storage.write_text(plan_path, json.dumps(plan | {"jobs": jobs}))
        wait_ranks(ranks)
    except BaseException:
        for result in launched:
            finish_run(lake, result["run_id"], "failed", result)
        raise
    for result in launched:
        result["train_vectors"] = lake.count_rows(
            "train_gradients", [("checkpoint_id", "=", checkpoint_id), ("fingerprint", "=", result["fingerprint"])]
        )
        finish_run(lake, result["run_id"], "succeeded", result)


def asked_partitions(config: ExtractConfig, tokenized: list[int]) -> list[int]:
    """The tokenized partitions this extraction covers: those asked for (`--partitions`), else all."""
    return [p for p in tokenized if p in set(config.partitions)] if config.partitions else tokenized


def missing_items(lake: Lake, checkpoint_id: str, fingerprint: str, config: ExtractConfig, tokenized: list) -> list:
    """The (kind, item) work items of this extraction: the query set first, then every tokenized
    partition (or those asked for; none with `queries_only`), less those already extracted unless `force`."""
    if config.queries_only and not config.query_set:
        raise ValueError("--queries-only needs a --query-set")
    partitions = asked_partitions(config, tokenized)
    if not partitions and not config.queries_only:
        raise ValueError(f"no tokenized partitions in {lake.path('tokens')}: run `python -m jobs tokenize` first")
    items = [] if config.queries_only else [(TRAIN, p) for p in partitions]
    if config.query_set:
        items.insert(0, (QUERY, config.query_set))
    if not config.force:
        done = {(TRAIN, p) for p in done_items(lake, checkpoint_id, fingerprint, TRAIN, None)}
        if config.query_set:
            done |= {(QUERY, q) for q in done_items(lake, checkpoint_id, fingerprint, QUERY, config.query_set)}
        items = [item for item in items if item not in done]
    return items


def plan_groups(config: ExtractConfig, query_sets: list[str], group_size: int) -> dict:
    """The extraction's missing work split for fan-out: groups of at most `group_size` missing
    partitions, each to be extracted by one task on one node's ranks (the DAGs map a task over
    them, so N device-pool slots extract N groups at once); the missing query sets ride with the
    first group, or form one alone. The checkpoint is registered here, once, so groups running at
    the same time find it registered. Returns {checkpoint_id, fingerprint, checkpoint (where it
    lives), groups: [{checkpoint, partitions, query_sets}]}; no groups when nothing is missing."""
    from dataclasses import replace

    from infra.runs import finish_run, start_run
    from jobs.checkpoints import check_complete

    for query_set in query_sets:
        check_names(query_set=query_set)
    lake = Lake(config.lake)
    checkpoint_dir = resolve_checkpoint(lake, config.checkpoint)
    manifest, weights = check_checkpoint(lake, checkpoint_dir, config.force)
    spec = projection_spec(lake, checkpoint_dir, config)
    check_complete(checkpoint_dir, config.optimizer_source if uses_optimizer_state(spec.normalizer) else None)
    checkpoint_id, fingerprint, source = (
        manifest["checkpoint_id"],
        spec.fingerprint(),
        checkpoint_uri(lake, config.checkpoint),
    )
    tokenized = tokenized_partitions(lake, checkpoint_dir)
    partitions = [
        p for _, p in missing_items(lake, checkpoint_id, fingerprint, replace(config, query_set=None), tokenized)
    ]
    queries = [
        q
        for q in query_sets
        if missing_items(lake, checkpoint_id, fingerprint, replace(config, query_set=q, queries_only=True), tokenized)
    ]
    groups = [
        {"checkpoint": source, "partitions": partitions[i : i + group_size], "query_sets": []}
        for i in range(0, len(partitions), group_size)
    ] or ([{"checkpoint": source, "partitions": [], "query_sets": []}] if queries else [])
    if groups:
        groups[0]["query_sets"] = queries
        run_id = start_run(
            lake, "extract-plan", asdict(config) | {"fingerprint": fingerprint, "group_size": group_size}
        )
        register_checkpoint(lake, manifest, weights, source, run_id)
        finish_run(lake, run_id, "succeeded", {"groups": groups})
    print(
        f"[extract] {checkpoint_id} (fingerprint {fingerprint}): {len(partitions)} partition(s) and "
        f"{len(queries)} query set(s) missing, in {len(groups)} group(s) of at most {group_size} partition(s)",
        flush=True,
    )
    return {"checkpoint_id": checkpoint_id, "fingerprint": fingerprint, "checkpoint": source, "groups": groups}


def tokenized_partitions(lake: Lake, checkpoint_dir: Path) -> list[int]:
    """The tokenized partitions, refused (CheckpointMismatch) when some of them were cut by another
    tokenizer than the checkpoint's: their vectors would be of token ids the model never read."""
    from jobs.checkpoints import tokenizer_id

    cut_by = lake.distinct("tokens", ["partition", "tokenizer_fingerprint"])
    tokenizer_file = checkpoint_dir / "tokenizer.json"
    if tokenizer_file.exists():
        own = tokenizer_id(tokenizer_file.read_bytes())
        other = sorted({p for p, tokenizer in cut_by if not tokenizer.startswith(own + "-")})
        if other:
            raise CheckpointMismatch(
                f"partition(s) {other} were tokenized by another tokenizer than checkpoint {checkpoint_dir.name}'s "
                f"({own}): tokenize them again with it (python -m jobs tokenize --force --tokenizer "
                f"{checkpoint_dir}) or extract a checkpoint of their tokenizer"
            )
    return sorted({p for p, _ in cut_by})


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, ExtractConfig)


def main(args):
    print(json.dumps(run(config_from_args(ExtractConfig, args)), indent=1))
