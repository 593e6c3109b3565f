"""What a rerun of the pipeline keeps, drops and reports (issue 25): incremental by default.

- `model_choice`: a rerun keeps the model the lake holds (its tokenizer and checkpoints), so that
  the reindex DAG tokenizes only the new partitions (same tokenizer fingerprint) and extracts only
  the missing slices of the same checkpoint. A new model is trained when there is none, when
  `--retrain` asks for one, or when partitions it was trained on changed (a regenerated world).
- `keep_newest`: the retention policy `--keep-checkpoints N`: the vectors of the newest N
  checkpoints that hold any (the one just indexed first, then the catalog's order: highest step,
  ties by later registration) stay; every other checkpoint loses its rows in train_gradients,
  query_gradients, trackstar_index, train_outliers, hessians and proponents, its autocorrelation
  sums and its Hessian matrices, in one `runs` row (command `keep-checkpoints`). Its folder under
  model/checkpoints, its `checkpoints` row and the evaluation's results (eval_metrics,
  tail_patches, reports) stay. 0 keeps every checkpoint's vectors.
- `coverage`: per tokenizer and checkpoint, the train chunks that have a vector: only chunks
  tokenized with the checkpoint's own tokenizer (and context) count, so vectors of chunks since
  retokenized by another tokenizer show as not covering anything.

Rows are dropped with `Lake.replace_slice_batches` and no rows (the project's own writer: a file
that also holds other checkpoints' rows is rewritten with them, declared types, never delta-rs'
`delete`, whose files carry string_view columns the streamed writers cannot filter).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from infra import storage
from infra.lake import Lake
from infra import layout

# every table holding rows of a checkpoint's vectors or what was computed from them alone
VECTOR_TABLES = ("train_gradients", "query_gradients", "trackstar_index", "train_outliers", "hessians", "proponents")
CHECKPOINT_FILES = ("config.json", "tokenizer.json")  # what a kept checkpoint needs here (extract checks the rest)


# ------------------------------------------------------------------ keep the model, or train one
@dataclass
class ModelChoice:
    reuse: bool
    reason: str
    summary: dict | None = None  # the lake's train_summary.json (the model kept, or the one trained before)
    added: list = field(default_factory=list)  # partitions the kept model was not trained on


def current_partitions(lake_root: str) -> dict[str, str]:
    """{partition file name: sha256} of the lake's raw partitions: an import's marker records them
    (imports refuse changed partitions); the generated world's are hashed."""
    from demo.import_data import imported_world

    marker = None if storage.is_s3(lake_root) else imported_world(lake_root)
    if marker:
        return dict(marker["partitions"])
    raw = storage.absolute(layout.raw(lake_root))
    return {
        storage.name(uri): hashlib.sha256(storage.read_bytes(uri)).hexdigest()
        for uri in storage.list_objects(raw, suffix=".json.gz")
        if storage.name(uri).startswith("c4-") and uri.count("/") - raw.rstrip("/").count("/") == 1
    }


def model_choice(lake_root: str, retrain: bool) -> ModelChoice:
    """Whether the pipeline keeps the lake's trained model or trains one, and why (one sentence)."""

    summary_file = layout.train_summary(lake_root)
    if not storage.exists(summary_file):
        return ModelChoice(False, "no trained model in the lake yet: training one")
    summary = json.loads(storage.read_bytes(summary_file))
    checkpoints = summary.get("checkpoints") or []
    absent = [
        c
        for c in checkpoints
        if not all(storage.exists(storage.join(layout.checkpoint(lake_root, c), f)) for f in CHECKPOINT_FILES)
    ]
    if not checkpoints or absent or not storage.exists(storage.join(layout.tokenizer(lake_root), "tokenizer.json")):
        return ModelChoice(
            False, "the lake's trained model is incomplete (checkpoints or tokenizer missing): training one", summary
        )
    if retrain:
        return ModelChoice(
            False, f"--retrain: training a new model on the whole corpus beside {checkpoints[-1]}", summary
        )
    current = current_partitions(lake_root)
    trained_on = summary.get("partitions")
    if trained_on is None:  # trained before summaries listed their partitions
        if storage.is_s3(lake_root) or not (storage.exists(layout.world(lake_root, "import.json"))):
            # the generated world: train-model keeps the model when the corpus and configuration are unchanged
            return ModelChoice(False, "a model trained before reruns were incremental: train-model decides", summary)
        return ModelChoice(
            True,
            f"keeping {checkpoints[-1]} (an import never changes a partition it copied; which partitions the "
            "model was trained on is not recorded); --retrain trains a new model on the whole corpus",
            summary,
        )
    changed = sorted(name for name, sha in trained_on.items() if current.get(name) != sha)
    if changed:
        return ModelChoice(
            False,
            f"partition(s) {', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''} changed or are gone "
            "since the model was trained on them (a regenerated world): training a new model",
            summary,
        )
    added = sorted(set(current) - set(trained_on))
    news = (
        f"{len(added)} partition(s) added since are indexed with it, not trained on; --retrain trains a new model "
        f"on all {len(current)}"
        if added
        else "trained on this very corpus"
    )
    return ModelChoice(True, f"keeping {checkpoints[-1]} and its tokenizer: {news}", summary, added)


def restore_tokenizer(lake_root: str, checkpoint_id: str) -> bool:
    """Make the lake's tokenizer (`<lake>/model/tokenizer`, what tokenize and the DAG use) the kept
    checkpoint's own again, when it differs: a training that wrote its tokenizer and then failed
    leaves the lake's tokenizer out of step with the checkpoints its summary names. True if restored."""
    from demo.import_data import TOKENIZER_FILES

    folder, tokenizer_dir = layout.checkpoint(lake_root, checkpoint_id), layout.tokenizer(lake_root)
    if storage.read_bytes(storage.join(folder, "tokenizer.json")) == storage.read_bytes(
        storage.join(tokenizer_dir, "tokenizer.json")
    ):
        return False
    for name in TOKENIZER_FILES:
        if storage.exists(storage.join(folder, name)):
            storage.write_bytes(storage.join(tokenizer_dir, name), storage.read_bytes(storage.join(folder, name)))
    return True


# ------------------------------------------------------------------ the retention policy
def checkpoints_with_vectors(lake: Lake) -> set[str]:
    found = set()
    for table in VECTOR_TABLES:
        if lake.exists(table):
            found |= {c for (c,) in lake.distinct(table, ["checkpoint_id"])}
    return found


def newest_first(lake: Lake, current: str | None, among: set[str]) -> list[str]:
    """`among`, newest first: `current` (the checkpoint just indexed), then the catalog's order (highest
    step first, ties by later registration), then ids never registered."""
    from jobs.catalog import checkpoint_ids_by_step

    registered = checkpoint_ids_by_step(lake) if lake.exists("checkpoints") else []
    order = [current] if current else []
    order += [c for c in reversed(registered) if c not in order]
    order += sorted(set(among) - set(order))
    return [c for c in order if c in among]


def drop_rows(lake: Lake, table: str, checkpoint_ids: list[str]) -> int:
    """Removes every row of `checkpoint_ids` from `table`; returns how many. One streamed slice
    replace with no rows per partition holding them (all partitions of such a checkpoint when the
    table is partitioned by checkpoint_id, else the slice of those ids in each partition)."""
    from schemas.tables import TABLES

    if not lake.exists(table):
        return 0
    where = [("checkpoint_id", "in", list(checkpoint_ids))]
    rows = lake.count_rows(table, where)
    if not rows:
        return 0
    columns = list(TABLES[table].partition_by)
    partitions = sorted(lake.distinct(table, columns, where)) if columns else [()]
    for values in partitions:
        keys = dict(zip(columns, values))
        if "checkpoint_id" not in keys:
            keys["checkpoint_id"] = list(checkpoint_ids)
        lake.replace_slice_batches(table, iter(()), **keys)
    return rows


def checkpoint_files(lake: Lake, checkpoint_id: str) -> list[str]:
    """Files of the lake computed from a checkpoint's vectors: autocorrelation sums, Hessian matrices."""
    folders = [
        layout.autocorrelation(lake.root, checkpoint_id),
        layout.hessians(lake.root, checkpoint_id),
    ]
    return [uri for folder in folders for uri in storage.list_objects(folder)]


def keep_newest(lake_root: str, keep: int, current: str | None, applied: bool = True) -> dict:
    """Apply `--keep-checkpoints keep` (0: keep all; `applied` False: only say what the lake holds);
    returns {keep, applied, kept, dropped, rows, files, run_id}."""
    from infra.runs import finish_run, start_run

    lake = Lake(lake_root)
    ranked = newest_first(lake, current, checkpoints_with_vectors(lake))
    result = {"keep": keep, "applied": applied, "kept": ranked, "dropped": [], "rows": {}, "files": 0}
    if not applied or keep <= 0 or len(ranked) <= keep:
        return result
    kept, dropped = ranked[:keep], ranked[keep:]
    result.update(kept=kept, dropped=dropped)
    run_id = start_run(lake, "keep-checkpoints", {"keep_checkpoints": keep, "kept": kept, "dropped": dropped})
    try:
        result["rows"] = {table: drop_rows(lake, table, dropped) for table in VECTOR_TABLES}
        files = [uri for checkpoint in dropped for uri in checkpoint_files(lake, checkpoint)]
        for uri in files:  # after the rows: a slice without its sums is redone by extract, never trusted
            storage.delete(uri)
        result["files"] = len(files)
    except BaseException:
        finish_run(lake, run_id, "failed", result)
        raise
    result["run_id"] = run_id
    finish_run(lake, run_id, "succeeded", result)
    return result


def retention_lines(result: dict) -> list[str]:
    kept = ", ".join(result["kept"]) or "none"
    if not result.get("applied", True):
        return [
            f"no new model in this run: the vectors of every checkpoint stay ({kept}); --keep-checkpoints N "
            "applies the policy on any run"
        ]
    if result["keep"] <= 0:
        return [f"--keep-checkpoints 0: the vectors of every checkpoint stay ({kept})"]
    line = f"--keep-checkpoints {result['keep']}: the vectors of {kept} stay"
    if not result["dropped"]:
        return [line + "; nothing to drop"]
    rows = ", ".join(f"{table} {n:,}" for table, n in result["rows"].items() if n)
    return [
        line,
        f"dropped the vectors of {', '.join(result['dropped'])}: rows {rows or 'none'}; {result['files']} file(s) of "
        f"autocorrelation sums and Hessian matrices (run {result['run_id']}; their folders under model/checkpoints "
        "stay: `python -m jobs extract --checkpoint <folder>` indexes one again)",
    ]


# ------------------------------------------------------------------ coverage per tokenizer and checkpoint
def checkpoint_tokenizer(lake: Lake, checkpoint_id: str) -> str | None:
    """The tokenizer fingerprint (tokenizer.json, context) of a registered checkpoint's folder; None
    when it is not registered or its folder is gone."""
    from jobs.catalog import registered_location
    from jobs.tokenize import tokenizer_fingerprint_of

    try:
        folder = registered_location(lake, checkpoint_id)
        config = json.loads(storage.read_bytes(storage.join(folder, "config.json")))
        tokenizer = storage.read_bytes(storage.join(folder, "tokenizer.json"))
    except (LookupError, FileNotFoundError, OSError):
        return None
    return tokenizer_fingerprint_of(tokenizer, int(config.get("n_positions") or config["max_position_embeddings"]))


def coverage(lake_root: str) -> list[dict]:
    """One row per (tokenizer, checkpoint, projection fingerprint): the partitions and chunks `tokens`
    holds of the checkpoint's tokenizer, the checkpoint's vectors on them (`vectors`, coverage =
    vectors / chunks), and its vectors on partitions tokenized with another tokenizer or not at all
    (`stale_vectors`: chunks that no longer exist, never counted as covered). A tokenizer whose
    chunks no checkpoint covers gets a row with checkpoint_id None. Newest checkpoint first."""
    lake = Lake(lake_root)
    if not lake.exists("tokens"):
        return []
    tokens = lake.read("tokens", columns=["partition", "tokenizer_fingerprint"])
    chunks = Counter(zip(tokens["partition"].to_pylist(), tokens["tokenizer_fingerprint"].to_pylist()))
    tokenizer_of = {partition: tokenizer for partition, tokenizer in chunks}
    vectors: Counter = Counter()
    if lake.exists("train_gradients"):
        rows = lake.read("train_gradients", columns=["checkpoint_id", "fingerprint", "partition"])
        vectors = Counter(zip(*(rows[c].to_pylist() for c in ("checkpoint_id", "fingerprint", "partition"))))
    found = []
    slices = sorted({(c, f) for c, f, _ in vectors})
    order = newest_first(lake, None, {c for c, _ in slices})
    for checkpoint, projection in sorted(slices, key=lambda s: (order.index(s[0]), s[1])):
        tokenizer = checkpoint_tokenizer(lake, checkpoint)
        mine = sorted(p for p, t in tokenizer_of.items() if t == tokenizer)
        held = {p: n for (c, f, p), n in vectors.items() if (c, f) == (checkpoint, projection)}
        n_chunks = sum(chunks[p, tokenizer] for p in mine)
        covered = sum(n for p, n in held.items() if p in mine)
        found.append(
            {
                "tokenizer": tokenizer,
                "checkpoint_id": checkpoint,
                "fingerprint": projection,
                "partitions": mine,
                "chunks": n_chunks,
                "vectors": covered,
                "coverage": round(covered / n_chunks, 4) if n_chunks else None,
                "stale_vectors": sum(n for p, n in held.items() if p not in mine),
                "stale_partitions": sorted(p for p in held if p not in mine),
            }
        )
    for tokenizer in sorted(set(tokenizer_of.values()) - {row["tokenizer"] for row in found}):
        mine = sorted(p for p, t in tokenizer_of.items() if t == tokenizer)
        found.append(
            {
                "tokenizer": tokenizer,
                "checkpoint_id": None,
                "fingerprint": None,
                "partitions": mine,
                "chunks": sum(chunks[p, tokenizer] for p in mine),
                "vectors": 0,
                "coverage": 0.0,
                "stale_vectors": 0,
                "stale_partitions": [],
            }
        )
    return found


def _partitions(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:8])) + (", ..." if len(numbers) > 8 else "")


def coverage_lines(rows: list[dict]) -> list[str]:
    """The coverage rows as lines, grouped by tokenizer; a checkpoint's projection fingerprints share
    one line when they cover alike."""
    lines = []
    for tokenizer in dict.fromkeys(row["tokenizer"] for row in rows):
        mine = [row for row in rows if row["tokenizer"] == tokenizer]
        partitions, n_chunks = mine[0]["partitions"], mine[0]["chunks"]
        if tokenizer is None:
            lines.append("tokenizer unknown (the checkpoint is not registered or its folder is gone):")
        elif partitions:
            lines.append(
                f"tokenizer {tokenizer}: {n_chunks:,} chunks in {len(partitions)} partition(s) ({_partitions(partitions)})"
            )
        else:
            lines.append(f"tokenizer {tokenizer}: no partition is tokenized with it now")
        for checkpoint in dict.fromkeys(row["checkpoint_id"] for row in mine):
            of = [row for row in mine if row["checkpoint_id"] == checkpoint]
            if checkpoint is None:
                lines.append("  no checkpoint holds vectors of these chunks")
                continue
            alike = len({(r["vectors"], r["stale_vectors"]) for r in of}) == 1
            if tokenizer is None:
                lines.append(
                    f"  {checkpoint}: {sum(r['stale_vectors'] for r in of[:1]):,} vector(s); its tokenizer cannot be "
                    "read, so none is counted as covered"
                )
                continue
            for row in of[:1] if alike else of:
                which = f"each of its {len(of)} projection fingerprints" if alike else row["fingerprint"]
                share = f" ({row['coverage']:.1%})" if row["coverage"] is not None else ""
                line = f"  {checkpoint}: {row['vectors']:,} / {row['chunks']:,} chunks covered{share}, {which}"
                if row["stale_vectors"]:
                    line += (
                        f"; {row['stale_vectors']:,} vector(s) of partition(s) {_partitions(row['stale_partitions'])} "
                        "are of chunks tokenized otherwise since (another tokenizer): not counted"
                    )
                lines.append(line)
    return lines
