"""extract (DeepSpeed): `tokens` × one checkpoint -> `train_gradients`; `queries` -> `query_gradients`.

The launcher side resolves the checkpoint (a local folder, or `s3://` downloaded with boto3),
registers it, works out which slices are missing (a slice = one (checkpoint, partition) for a
given projection fingerprint; `--force` redoes them) and starts the ranks with the DeepSpeed
launcher. Each rank takes every world_size-th work item, loads the model and the optimizer's
second moments (consolidated `optimizer.pt` or the ZeRO shards), computes projected vectors with
`gradient_kernels` in batches sized by a token budget, and writes each item as one idempotent
slice with delta-rs: a killed rank's partition is simply redone. On the way it accumulates the
autocorrelation sums Σ p pᵀ of each slice into a safetensors file next to the tables, so the
Hessian fit needs no second pass over the data.

CPU ranks here (`DS_ACCELERATOR=cpu`); the same command runs GPU ranks on a GPU node.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from infra import storage
from infra.lake import Lake
from infra.names import check_name, check_names
from jobs.launch import bind_rank_device, end_rank, init_rank, launch_ranks, node_ranks, rank_arguments
from infra.cli import add_config_arguments, config_from_args, option
from infra.config import from_settings, load_config

TRAIN, QUERY = "train", "query"
# Queries are few and every score leans on them: never rounded to int8 or 16 bits with the corpus.
QUERY_DTYPE = "float32"
# a partition's chunks are read this many at a time (and batched by length within each window)
TOKEN_WINDOW_ROWS = 8192


@dataclass
class ExtractConfig:
    lake: str = from_settings("lake_root", help="lake root: a folder or s3://bucket/prefix")
    checkpoint: str = option("", help="checkpoint folder or s3:// prefix (default: newest trained)")
    projection_k: int = from_settings(
        "projection_k", help="projection size per side of every weight matrix (block k × k)"
    )
    projection_seed: int = from_settings("projection_seed")
    normalizer: str = option(
        "auto", choices=["auto", "adafactor", "adam-floored", "adam-factored", "adam-exact", "none"]
    )
    vector_dtype: str = from_settings("vector_dtype", choices=["float32", "float16", "bfloat16", "int8"])
    token_budget: int = from_settings("batch_token_budget", help="padded tokens per batch")
    ranks: int = from_settings("extract_ranks", help="DeepSpeed ranks on this node (0: one per GPU, else 2 CPU ranks)")
    cpu_threads: int = from_settings(
        "cpu_threads", help="CPU threads per rank (0: the idle cores split among the ranks; OMP_NUM_THREADS wins)"
    )
    optimizer_source: str = option("auto", choices=["auto", "consolidated", "zero"])
    query_set: str | None = option("fact-world", help="also extract this registered query set's gradients")
    force: bool = option(False)
    partitions: list[int] = option(factory=list, help="restrict to these source partitions")
    queries_only: bool = option(False, help="extract only the query set's gradients, no training partitions")


# ------------------------------------------------------------------ shared by both sides
def checkpoint_uri(lake: Lake, checkpoint: str) -> str:
    """Where the checkpoint lives, as it resolves from anywhere (absolute path or s3:// URI): as
    given, or the newest one the lake's model was trained to."""
    if checkpoint:
        return storage.absolute(checkpoint)
    summary = storage.join(lake.root, "model", "train_summary.json")
    if not storage.exists(summary):
        raise FileNotFoundError(f"no checkpoint given and no trained model under {lake.root}")
    from jobs.checkpoints import checkpoint_location

    return checkpoint_location(lake.root, json.loads(storage.read_bytes(summary))["checkpoints"][-1])


def resolve_checkpoint(lake: Lake, checkpoint: str) -> Path:
    """A local folder holding the checkpoint (one on S3 is downloaded into the cache first)."""
    return storage.local_folder(checkpoint_uri(lake, checkpoint), load_config().cache_dir)


def projection_spec(checkpoint_dir: Path, config: ExtractConfig):
    """The spec (hence fingerprint) for this checkpoint's architecture, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from gradient_kernels.modules import uniform_k, weight_matrices
    from gradient_kernels.projection import ProjectionSpec
    from jobs.checkpoints import CheckpointError, load_manifest, optimizer_state_source

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint_dir))
    normalizer = config.normalizer
    has_state = optimizer_state_source(checkpoint_dir, config.optimizer_source) is not None
    if normalizer == "auto":
        # no optimizer state: index without the correction (recorded in the fingerprint and the run)
        normalizer = auto_normalizer(
            load_manifest(checkpoint_dir)["optimizer"] if has_state else "none",
            sum(p.numel() for p in model.parameters()),
        )
    elif normalizer != "none" and not has_state:
        raise CheckpointError(
            f"{checkpoint_dir}: normaliser {normalizer!r} needs the optimizer's state "
            f"({config.optimizer_source}), and the folder has none; use --normalizer none or auto"
        )
    return ProjectionSpec(
        seed=config.projection_seed,
        k=uniform_k(weight_matrices(model), config.projection_k),
        normalizer=normalizer,
        dtype="float32",
    )


EXACT_ADAM_MAX_PARAMETERS = 50_000_000


def auto_normalizer(optimizer: str, parameters: int) -> str:
    """Adafactor states are factored already; Adam's is applied exactly (with its floor on
    untrained coordinates: gradient_kernels/normalizers.py) on small models and through the rank-1
    fit on big ones, where per-example gradients would not fit. Without optimizer state: none."""
    if optimizer in ("adafactor", "none"):
        return optimizer
    return "adam-floored" if parameters <= EXACT_ADAM_MAX_PARAMETERS else "adam-factored"


def autocorrelation_path(lake: Lake, checkpoint_id: str, fingerprint: str, kind: str, item) -> str:
    name = f"partition={item:05d}" if kind == TRAIN else f"query_set={item}"
    return storage.join(lake.root, "_autocorrelation", checkpoint_id, fingerprint, kind, f"{name}.safetensors")


def model_fingerprint(checkpoint_dir: Path) -> str:
    from jobs.checkpoints import weights_fingerprint

    return weights_fingerprint(checkpoint_dir)


# ------------------------------------------------------------------ launcher side
class CheckpointMismatch(ValueError):
    """A checkpoint id already indexed with other weights: its vectors would be silently wrong."""


def check_checkpoint(lake: Lake, checkpoint_dir: Path, force: bool) -> tuple[dict, str]:
    """(manifest, weights fingerprint); refuses a known checkpoint id whose weights changed."""
    from jobs.checkpoints import load_manifest

    manifest = load_manifest(checkpoint_dir)
    check_name(manifest.get("checkpoint_id"), f"checkpoint id in {checkpoint_dir}/manifest.json")
    weights = model_fingerprint(checkpoint_dir)
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
    return {i for i in items if storage.exists(autocorrelation_path(lake, checkpoint_id, fingerprint, kind, i))}


def run(config: ExtractConfig) -> dict:
    return run_many([config])[0]


def run_many(configs: list[ExtractConfig]) -> list[dict]:
    """Several extractions of one checkpoint (other projection seeds, sizes or normalisers) with one
    start of the ranks: each config is its own run with its own fingerprint and slices, and the
    ranks share the work items of all of them (the model and optimizer state load once per rank).
    Returns one result per config, as `run` does."""
    from infra.runs import finish_run, start_run
    from jobs.checkpoints import check_complete

    first = configs[0]
    shared = {"lake", "checkpoint", "ranks", "cpu_threads", "query_set", "force", "token_budget"}
    differing = sorted(f for f in shared for c in configs if getattr(c, f) != getattr(first, f))
    if differing:
        raise ValueError(f"extractions launched together must share {sorted(shared)}; these differ: {differing}")
    check_names(query_set=first.query_set)
    lake = Lake(first.lake)
    checkpoint_dir = resolve_checkpoint(lake, first.checkpoint)
    manifest, weights = check_checkpoint(lake, checkpoint_dir, first.force)
    checkpoint_id = manifest["checkpoint_id"]
    tokenized = tokenized_partitions(lake, checkpoint_dir)
    results, jobs, planned = [], [], {}
    for config in configs:
        spec = projection_spec(checkpoint_dir, config)
        if spec.fingerprint() in planned:  # e.g. "auto" resolving to "none" for a checkpoint without optimizer state
            results.append(planned[spec.fingerprint()])
            continue
        check_complete(
            checkpoint_dir, config.optimizer_source if spec.normalizer != "none" else None
        )  # before registering
        items = missing_items(lake, checkpoint_id, spec.fingerprint(), config, tokenized)
        result = {
            "checkpoint_id": checkpoint_id,
            "fingerprint": spec.fingerprint(),
            "dim": spec.dim,
            "normalizer": spec.normalizer,
            "items": [f"{kind}:{item}" for kind, item in items],
        }
        results.append(result)
        planned[result["fingerprint"]] = result
        if not items:  # nothing to do: write nothing, not even a runs row
            print(
                f"[extract] every slice of {checkpoint_id} is already extracted (fingerprint {result['fingerprint']}); "
                f"nothing to do"
            )
            continue
        correction = optimizer_correction(checkpoint_dir, config, spec)
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
        jobs.append({"config": asdict(config), "spec": spec.as_dict(), "run_id": result["run_id"], "items": items})
    if not jobs:
        return results
    register_checkpoint(lake, manifest, weights, checkpoint_uri(lake, first.checkpoint), jobs[0]["run_id"])
    plan_path = storage.join(lake.root, "_plans", f"{jobs[0]['run_id']}.json")
    storage.write_text(
        plan_path,
        json.dumps(
            {
                "checkpoint_dir": str(checkpoint_dir.resolve()),
                "lake": lake.root,
                "checkpoint_id": checkpoint_id,
                "jobs": jobs,
            }
        ),
    )
    # a rank per partition at most: the query set is small, and an idle rank's cores go unused
    ranks = node_ranks(first.ranks, len({item for job in jobs for kind, item in job["items"] if kind == TRAIN}))
    print(
        f"[extract] {sum(len(j['items']) for j in jobs)} slice(s) of {len(jobs)} extraction(s) on {ranks} rank(s)",
        flush=True,
    )
    launched = [r for r in planned.values() if "run_id" in r]
    try:
        launch_ranks("jobs.extract", plan_path, ranks, first.cpu_threads)
    except Exception:
        for result in launched:
            finish_run(lake, result["run_id"], "failed", result)
        raise
    for result in launched:
        result["train_vectors"] = lake.count_rows(
            "train_gradients", [("checkpoint_id", "=", checkpoint_id), ("fingerprint", "=", result["fingerprint"])]
        )
        finish_run(lake, result["run_id"], "succeeded", result)
    return results


def missing_items(lake: Lake, checkpoint_id: str, fingerprint: str, config: ExtractConfig, tokenized: list) -> list:
    """The (kind, item) work items of this extraction: the query set first, then every tokenized
    partition (or those asked for; none with `queries_only`), less those already extracted unless `force`."""
    if config.queries_only and not config.query_set:
        raise ValueError("--queries-only needs a --query-set")
    partitions = [p for p in tokenized if p in set(config.partitions)] if config.partitions else tokenized
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
    spec = projection_spec(checkpoint_dir, config)
    check_complete(checkpoint_dir, config.optimizer_source if spec.normalizer != "none" else None)
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


def optimizer_correction(checkpoint_dir: Path, config: ExtractConfig, spec) -> str:
    """One line for the run's lineage: which correction the vectors carry, and why."""
    from jobs.checkpoints import optimizer_state_source

    source = optimizer_state_source(checkpoint_dir, config.optimizer_source)
    if spec.normalizer != "none":
        return f"{spec.normalizer} from the {source} optimizer state"
    if source is None:
        return "none: the checkpoint has no optimizer state (neither optimizer.pt nor zero/latest)"
    return "none: asked for (--normalizer none)"


# ------------------------------------------------------------------ rank side
def token_budget_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped so that (rows × longest row) stays within the budget; similar lengths together."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current, longest = [], [], 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if current and longest_if_added * (len(current) + 1) > budget:
            batches.append(current)
            current, longest_if_added = [], lengths[i]
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


class Extraction:
    """One extraction of the plan as a rank sees it: its config, spec, run and output."""

    def __init__(self, job: dict, checkpoint_id: str):
        from gradient_kernels.projection import ProjectionSpec

        self.config, self.spec = ExtractConfig(**job["config"]), ProjectionSpec(**job["spec"])
        self.fingerprint, self.run_id, self.checkpoint_id = self.spec.fingerprint(), job["run_id"], checkpoint_id

    def vector_columns(self, vectors, dtype: str | None = None) -> dict:
        import numpy as np

        from schemas.vectors import decode_vectors, encode_vectors, vector_checksums

        dtype, n = dtype or self.config.vector_dtype, len(vectors)
        cells, scales = encode_vectors(vectors, dtype)
        stored = decode_vectors(cells, dtype, scales, vectors.shape[1])  # the norm of what readers will see
        return {
            "vector": cells,
            "dtype": [dtype] * n,
            "scale": scales if scales is not None else pa.nulls(n, pa.float32()),
            "norm": np.linalg.norm(stored, axis=1).astype(np.float32),
            "fingerprint": [self.fingerprint] * n,
            "checksum": vector_checksums(cells, scales),
            "run_id": [self.run_id] * n,
        }


class RankWorker:
    """One rank's work on one work item (the query set or a partition) for every extraction of the
    plan that needs it: one forward and backward pass per batch serves them all
    (`GradientProjector.project`), and the item's slices of all of them are one commit."""

    def __init__(self, lake: Lake, extractions: list[Extraction], rank: int, model, tokenizer, normalizers_for):
        from gradient_kernels.hooks import GradientProjector

        self.lake, self.extractions, self.rank = lake, extractions, rank
        self.model, self.tokenizer = model, tokenizer
        self.token_budget = extractions[0].config.token_budget
        specs = [(e.spec, normalizers_for(e.spec.normalizer, e.config.optimizer_source)) for e in extractions]
        self.projector = GradientProjector(model, *specs[0], more=specs[1:])

    def vectors(self, batches_of_batch, progress):
        """Yields (row indices, [vectors of each extraction]) per batch, with progress."""
        for indices, batch in batches_of_batch:
            vectors = [v.cpu() for v in self.projector.project(batch)]
            progress.update(len(indices), int(batch.attention_mask.sum()))
            yield indices, vectors

    def extract_partition(self, partition: int):
        """Streams the partition: its chunks are read in windows of TOKEN_WINDOW_ROWS (batched by
        length within each), and each batch's vectors are encoded and written as soon as they are
        computed (one commit at the end), so a rank's memory does not grow with the partition."""
        from gradient_kernels.hessian import Autocorrelation
        from gradient_kernels.losses import document_batch
        from jobs.progress import Progress

        where = [("partition", "=", partition)]
        lengths = self.lake.read("tokens", filters=where, columns=["n_tokens"])["n_tokens"]
        longest, positions = max(lengths.to_pylist(), default=0), self.model.config.max_position_embeddings
        if longest > positions:
            raise ValueError(
                f"partition {partition} holds chunks of {longest} tokens, the model takes {positions}: "
                f"re-tokenize with `python -m jobs tokenize --context {positions} --force`"
            )
        pad = self.tokenizer.eos_token_id or 0
        progress = Progress(f"extract rank {self.rank} partition {partition}", len(lengths), unit="rows")
        windows = self.lake.read_batches(
            "tokens", filters=where, columns=["doc_id", "chunk", "input_ids", "n_tokens"], rows=TOKEN_WINDOW_ROWS
        )
        sums = [Autocorrelation(e.spec.block_sizes()) for e in self.extractions]
        nonfinite: list[list[str]] = [[] for _ in self.extractions]

        def batches(rows: pa.Table):
            ids = rows["input_ids"]
            for b in token_budget_batches(rows["n_tokens"].to_pylist(), self.token_budget):
                yield b, document_batch(ids.take(b).to_pylist(), pad)

        def encoded():  # one table per batch holding the rows of every extraction
            for rows in windows:
                keys = rows.select(["doc_id", "chunk", "n_tokens"])
                for indices, per_extraction in self.vectors(batches(rows), progress):
                    chunks = keys.take(indices)
                    yield pa.concat_tables(
                        [
                            self._batch_rows(e, partition, chunks, vectors.numpy(), its_sums, its_nonfinite)
                            for e, vectors, its_sums, its_nonfinite in zip(
                                self.extractions, per_extraction, sums, nonfinite
                            )
                        ]
                    )

        # the partition's slices of every extraction in one commit: all written, or none
        self.lake.replace_slice_batches(
            "train_gradients",
            encoded(),
            checkpoint_id=self.extractions[0].checkpoint_id,
            partition=partition,
            fingerprint=[e.fingerprint for e in self.extractions],
        )
        for e, its_sums, its_nonfinite in zip(self.extractions, sums, nonfinite):
            self._quarantine_nonfinite(e, its_nonfinite, f"train_gradients/partition={partition}")
            self._save_sums(e, TRAIN, partition, its_sums)

    @staticmethod
    def _batch_rows(e: Extraction, partition: int, chunks: pa.Table, vectors, sums, nonfinite: list) -> pa.Table:
        """One extraction's rows of one batch (`chunks`, in the order of `vectors`): rows with
        non-finite vectors are left out and named in `nonfinite`; the kept ones are added to `sums`."""
        import numpy as np
        import torch

        finite = np.isfinite(vectors).all(axis=1)
        nonfinite.extend(f"{row['doc_id']}#{row['chunk']}" for row in chunks.filter(pa.array(~finite)).to_pylist())
        kept, vectors = chunks.filter(pa.array(finite)), vectors[finite]
        sums.add(torch.from_numpy(vectors))
        return pa.table(
            {
                "checkpoint_id": [e.checkpoint_id] * len(kept),
                "partition": [partition] * len(kept),
                "doc_id": kept["doc_id"],
                "chunk": kept["chunk"],
                "n_tokens": kept["n_tokens"],
                **e.vector_columns(vectors),
            }
        )

    def extract_queries(self, query_set: str):
        import numpy as np
        import torch

        from gradient_kernels.hessian import Autocorrelation
        from gradient_kernels.losses import query_batch
        from jobs.progress import Progress

        rows = self.lake.read("queries", filters=[("query_set", "=", query_set)])
        if rows.num_rows == 0:
            raise ValueError(f"query set {query_set!r} has no queries in {self.lake.path('queries')}")
        eos = self.tokenizer.eos_token_id
        prompts, targets, keys = [], [], []
        for query in rows.to_pylist():
            for index in range(3):
                prompts.append([eos] + self.tokenizer(query[f"prompt{index}"], add_special_tokens=False)["input_ids"])
                targets.append(self.tokenizer(query["target"], add_special_tokens=False)["input_ids"])
                keys.append((query["query_id"], index))
        lengths = [len(p) + len(t) for p, t in zip(prompts, targets)]
        batches = (
            (b, query_batch([prompts[i] for i in b], [targets[i] for i in b], eos or 0))
            for b in token_budget_batches(lengths, self.token_budget)
        )
        vectors = [np.zeros((len(keys), e.spec.dim), dtype=np.float32) for e in self.extractions]
        progress = Progress(f"extract rank {self.rank} queries {query_set}", len(keys), unit="rows")
        for indices, per_extraction in self.vectors(batches, progress):
            for its_vectors, batch_vectors in zip(vectors, per_extraction):
                its_vectors[indices] = batch_vectors.numpy()
        for e, its_vectors in zip(self.extractions, vectors):
            finite = np.isfinite(its_vectors).all(axis=1)
            self._quarantine_nonfinite(
                e, [f"{q}/prompt{i}" for (q, i), ok in zip(keys, finite) if not ok], f"query_gradients/{query_set}"
            )
            keep = np.flatnonzero(finite).tolist()
            table = pa.table(
                {
                    "query_set": [query_set] * len(keep),
                    "checkpoint_id": [e.checkpoint_id] * len(keep),
                    "query_id": [keys[i][0] for i in keep],
                    "prompt_index": [keys[i][1] for i in keep],
                    **e.vector_columns(its_vectors[keep], QUERY_DTYPE),
                }
            )
            self.lake.replace_slice(
                "query_gradients", table, query_set=query_set, checkpoint_id=e.checkpoint_id, fingerprint=e.fingerprint
            )
            self._save_sums(
                e, QUERY, query_set, Autocorrelation(e.spec.block_sizes()).add(torch.from_numpy(its_vectors[keep]))
            )

    def _quarantine_nonfinite(self, e: Extraction, positions: list[str], source: str):
        """Rows with NaN/inf vectors go to quarantine with the reason (the rest are kept)."""
        from infra.quarantine import quarantine_rows

        if positions:
            quarantine_rows(
                self.lake,
                [
                    {
                        "source": source,
                        "position": position,
                        "reason": "non-finite gradient (NaN or inf loss or activations)",
                        "raw_value": None,
                    }
                    for position in positions
                ],
                stage="extract",
                run_id=e.run_id,
            )
            print(
                f"[extract rank {self.rank}] {len(positions)} row(s) of {source} quarantined: non-finite gradients",
                flush=True,
            )

    def _save_sums(self, e: Extraction, kind: str, item, sums):
        from infra.matrices import save_matrices

        save_matrices(
            autocorrelation_path(self.lake, e.checkpoint_id, e.fingerprint, kind, item),
            {f"block{i:03d}": s for i, s in enumerate(sums.sums)},
            {"count": sums.count},
        )


def extract_rank(plan_path: str):
    from functools import cache

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradient_kernels.modules import weight_matrices
    from gradient_kernels.normalizers import normalizers_from_state
    from jobs.checkpoints import load_second_moments

    plan = json.loads(storage.read_bytes(plan_path))
    rank, world = init_rank()  # threads per rank: OMP_NUM_THREADS, set by launch_ranks on a CPU node
    checkpoint_dir = Path(plan["checkpoint_dir"])
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir).to(bind_rank_device()).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)

    @cache  # one normaliser object per kind: extractions sharing it share its division (GradientProjector)
    def normalizers_for(normalizer: str, source: str) -> dict:
        if normalizer == "none":
            return {}
        return normalizers_from_state(load_second_moments(checkpoint_dir, source), weight_matrices(model), normalizer)

    extractions = [Extraction(job, plan["checkpoint_id"]) for job in plan["jobs"]]
    needed: dict[tuple, list[int]] = {}  # work item -> the extractions that need it
    for index, job in enumerate(plan["jobs"]):
        for kind, item in job["items"]:
            needed.setdefault((kind, item), []).append(index)
    lake, workers = Lake(plan["lake"]), {}
    for (kind, item), indices in list(needed.items())[rank::world]:
        key = tuple(indices)
        if key not in workers:
            workers[key] = RankWorker(lake, [extractions[i] for i in indices], rank, model, tokenizer, normalizers_for)
        if kind == QUERY:
            workers[key].extract_queries(item)
        else:
            workers[key].extract_partition(item)


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, ExtractConfig)


def main(args):
    print(json.dumps(run(config_from_args(ExtractConfig, args)), indent=1))


if __name__ == "__main__":  # a DeepSpeed rank
    extract_rank(rank_arguments().plan)
    end_rank()
