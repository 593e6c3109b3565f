"""What the lake holds, asked in one place: checkpoints in step order and the latest one, where a
checkpoint lives, the preconditioner of a (checkpoint, query set, fingerprint), the runs of a
command with their parsed configuration, whether a Hessian is stale, what the last scoring saw.

"The latest checkpoint" has one definition: the highest training step (the `checkpoints` table's
`step`, or a folder's manifest.json before it is registered); ties go to the later registration
(or the later folder name). A backfilled older checkpoint therefore never becomes the default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from infra import layout, storage
from infra.cli import option
from infra.config import from_settings, load_config
from infra.lake import Lake


class NotInLake(LookupError):
    """What a command was asked for (a checkpoint, a scoring) is not recorded in the lake: a refusal."""


@dataclass
class SliceConfig:
    """Which vectors of the lake a stage works on: the fields fit-hessian, index and score share
    (each stage's config extends it; infra/cli.py makes their flags)."""

    lake: str = from_settings("lake_root", help="lake root: a folder or s3://bucket/prefix")
    checkpoint_id: str = option("", help="a registered checkpoint (default: the latest, by step)")
    query_set: str = from_settings("query_set")
    fingerprint: str = option(
        "", help="projection fingerprint (default: the one train_gradients holds for the checkpoint)"
    )
    cpu_threads: int = from_settings("cpu_threads", help="CPU threads (0: the cores idle at the start)")


# ------------------------------------------------------------------ checkpoints
def checkpoint_ids_by_step(lake: Lake) -> list[str]:
    """Registered checkpoint ids, lowest step first (ties: earlier registration first)."""
    rows = lake.read("checkpoints", columns=["checkpoint_id", "step", "registered_at"]).to_pylist()
    return [r["checkpoint_id"] for r in sorted(rows, key=lambda r: (r["step"], r["registered_at"], r["checkpoint_id"]))]


def latest_checkpoint_id(lake: Lake, among: set[str] | None = None) -> str:
    """The registered checkpoint with the highest step; `among`: only those ids (e.g. the scored ones)."""
    ordered = [c for c in checkpoint_ids_by_step(lake) if among is None or c in among]
    if not ordered:
        raise ValueError(
            "no registered checkpoints"
            + (" among the given ones" if among is not None else "")
            + ": run `python -m jobs extract` first"
        )
    return ordered[-1]


def checkpoint_folders_by_step(location: str) -> list[str]:
    """Checkpoint folders directly under `location` (a folder or an s3:// prefix) that hold a
    manifest.json, lowest manifest step first (ties: the manifest's `saved_at` where it has one, so a
    retrained model's checkpoints come after an older model's at the same step, then folder name)."""
    location = storage.absolute(location)
    manifests = [
        m
        for m in storage.list_objects(location, suffix="manifest.json")
        if m.count("/") - location.rstrip("/").count("/") == 2
    ]
    order = []
    for uri in manifests:
        manifest = json.loads(storage.read_bytes(uri))
        order.append((manifest["step"], manifest.get("saved_at", ""), uri.rsplit("/", 1)[0]))
    return [folder for *_, folder in sorted(order)]


def newest_checkpoint_folder(location: str) -> str:
    """The checkpoint folder under `location` with the highest manifest step."""
    folders = checkpoint_folders_by_step(location)
    if not folders:
        raise FileNotFoundError(f"no checkpoints (*/manifest.json) under {storage.absolute(location)}")
    return folders[-1]


def registered_location(lake: Lake, checkpoint_id: str) -> str:
    """Where a registered checkpoint lives (absolute path or s3:// URI), as the `checkpoints` table says."""
    rows = lake.read("checkpoints", filters=[("checkpoint_id", "=", checkpoint_id)], columns=["path"])
    if rows.num_rows == 0:
        raise NotInLake(f"checkpoint {checkpoint_id!r} is not registered")
    return lake.resolve(rows["path"][0].as_py())


def checkpoint_folder(lake: Lake, checkpoint_id: str) -> Path:
    """A local folder holding a registered checkpoint (downloaded if it was registered from S3),
    refused (CheckpointMismatch) if its weights changed since registration, as extract refuses:
    scores from other weights than the stored vectors' would be silently wrong."""
    from jobs.checkpoints import CheckpointMismatch, weights_fingerprint

    rows = lake.read(
        "checkpoints", filters=[("checkpoint_id", "=", checkpoint_id)], columns=["path", "model_fingerprint"]
    )
    if rows.num_rows == 0:
        raise NotInLake(f"checkpoint {checkpoint_id!r} is not registered")
    folder = resolve_checkpoint(lake, registered_location(lake, checkpoint_id))
    registered, found = rows["model_fingerprint"][0].as_py(), weights_fingerprint(folder)
    if found != registered:
        raise CheckpointMismatch(
            f"checkpoint {checkpoint_id!r} was indexed with weights {registered}, but {folder} now "
            f"holds {found}: re-extract it (`python -m jobs extract --checkpoint {folder} --force`)"
        )
    return folder


# ------------------------------------------------------------------ Hessians and their inputs
def load_preconditioner(lake: Lake, checkpoint_id: str, query_set: str, fingerprint: str, kind: str):
    """The registered matrix of one kind, checksum-verified, as its list of blocks."""
    from infra.matrices import load_matrices

    rows = lake.read(
        "hessians",
        filters=[
            ("checkpoint_id", "=", checkpoint_id),
            ("query_set", "=", query_set),
            ("fingerprint", "=", fingerprint),
            ("kind", "=", kind),
        ],
    )
    if rows.num_rows != 1:
        raise FileNotFoundError(f"no {kind} registered for {checkpoint_id}/{query_set}/{fingerprint}: run fit-hessian")
    row = rows.to_pylist()[0]
    tensors = load_matrices(lake.resolve(row["path"]), row["sha256"])
    return [tensors[k] for k in sorted(tensors)], row


def train_vector_count(lake: Lake, checkpoint_id: str, fingerprint: str) -> int:
    return lake.count_rows(
        "train_gradients", [("checkpoint_id", "=", checkpoint_id), ("fingerprint", "=", fingerprint)]
    )


def hessian_is_stale(lake: Lake, checkpoint_id: str, fingerprint: str, query_set: str, threshold: float) -> bool:
    """No R_train fitted yet, or the training sample changed by more than `threshold` (a share) since.
    The fit's sample is what R_train summed plus the outlier chunks it left out (`train_outliers`)."""
    fitted = lake.read(
        "hessians",
        filters=[
            ("checkpoint_id", "=", checkpoint_id),
            ("fingerprint", "=", fingerprint),
            ("query_set", "=", query_set),
            ("kind", "=", "r_train"),
        ],
        columns=["n_samples"],
    )["n_samples"].to_pylist()
    if not fitted:
        return True
    keys = [("checkpoint_id", "=", checkpoint_id), ("fingerprint", "=", fingerprint)]
    sample = fitted[0] + (lake.count_rows("train_outliers", keys) if lake.exists("train_outliers") else 0)
    now = train_vector_count(lake, checkpoint_id, fingerprint)
    return abs(now - sample) > threshold * sample


# ------------------------------------------------------------------ runs
def runs_of(lake: Lake, command: str, succeeded_only: bool = True) -> list[tuple[dict, dict, dict]]:
    """(run row, its configuration, its counts) of every run of `command`, newest first."""
    filters = [("command", "=", command)] + ([("status", "=", "succeeded")] if succeeded_only else [])
    rows = sorted(lake.read("runs", filters=filters).to_pylist(), key=lambda r: r["started_at"], reverse=True)
    return [(row, json.loads(row["config_json"]), json.loads(row["counts_json"] or "{}")) for row in rows]


def last_scored_inputs(lake: Lake, checkpoint_id: str, fingerprint: str, query_set: str, method: str) -> dict | None:
    """The inputs the stored proponents of (checkpoint, query set, method) were scored from, if they
    are this fingerprint's: a scoring of another fingerprint (another projection seed or correction)
    replaced them since, so only the newest scoring of the three counts."""
    for _, config, counts in runs_of(lake, "score"):
        if (counts.get("checkpoint_id"), config.get("query_set")) == (
            checkpoint_id,
            query_set,
        ) and method in config.get("methods", ()):
            return counts.get("inputs") if counts.get("fingerprint") == fingerprint else None
    return None


def checkpoint_uri(lake: Lake, checkpoint: str) -> str:
    """Where the checkpoint lives, as it resolves from anywhere (absolute path or s3:// URI): as
    given, or the newest one the lake's model was trained to."""
    if checkpoint:
        return storage.absolute(checkpoint)
    summary = layout.train_summary(lake.root)
    if not storage.exists(summary):
        raise FileNotFoundError(f"no checkpoint given and no trained model under {lake.root}")
    return layout.checkpoint(lake.root, json.loads(storage.read_bytes(summary))["checkpoints"][-1])


def resolve_checkpoint(lake: Lake, checkpoint: str) -> Path:
    """A local folder holding the checkpoint (one on S3 is downloaded into the cache first)."""
    return storage.local_folder(checkpoint_uri(lake, checkpoint), load_config().cache_dir)


def only_fingerprint(lake: Lake, checkpoint_id: str) -> str:
    found = sorted(
        f for (f,) in lake.distinct("train_gradients", ["fingerprint"], [("checkpoint_id", "=", checkpoint_id)])
    )
    if len(found) != 1:
        raise ValueError(f"{checkpoint_id}: train_gradients hold fingerprints {found}; pass --fingerprint")
    return found[0]
