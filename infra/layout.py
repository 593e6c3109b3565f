"""Where everything lives under a lake root: the one module that spells the lake's folders and files.

    <root>/<table>/                                   Delta tables (infra/lake.py, schemas/tables.py)
    <root>/raw/c4-*.json.gz                           raw C4 partitions
    <root>/world/                                     the demo world (kb.json, queries.jsonl, ...)
    <root>/model/tokenizer/                           the demo model's tokenizer
    <root>/model/checkpoints/<checkpoint id>/         checkpoints (unless the setting `checkpoints` says)
    <root>/model/train_summary.json                   what the demo training produced
    <root>/_autocorrelation/<checkpoint>/<fingerprint>/<kind>/<item>.safetensors   Σ p pᵀ per slice
    <root>/_matrices/hessians/<checkpoint>/<query set>/<fingerprint>/              fitted Hessians
    <root>/_second_moments/<checkpoint>/<hash>.pt     data-estimated second moments (+ sample-<n>.json)
    <root>/_text_embeddings/<key>.npy                  dense retrieval's document embeddings, by their texts
    <root>/_plans/extract-<time>-<id>.json            an extraction's plan for its ranks
    <root>/_takedown_plans/<run id>.json              a takedown's plan, taken over if it dies
    <root>/reports/                                   evaluation reports, Hessian spectra

Every function takes the root as a folder or s3:// prefix (str or Path) and returns a location as a
string (infra/storage.py): callers wrap it in a Path where they need one.
"""

from __future__ import annotations

from pathlib import Path

from infra import storage

# the two kinds of work item and of autocorrelation file: a training partition, a query set
TRAIN, QUERY = "train", "query"


def raw(root: str | Path) -> str:
    return storage.join(root, "raw")


def world(root: str | Path, *name: str) -> str:
    return storage.join(root, "world", *name)


def model(root: str | Path) -> str:
    return storage.join(root, "model")


def tokenizer(root: str | Path) -> str:
    return storage.join(root, "model", "tokenizer")


def train_summary(root: str | Path) -> str:
    return storage.join(root, "model", "train_summary.json")


def checkpoints(root: str | Path) -> str:
    """Where trained checkpoint folders live, outside every Delta table's folder (inside the
    `checkpoints` table's, a vacuum deleted them)."""
    return storage.join(root, "model", "checkpoints")


def checkpoint(root: str | Path, checkpoint_id: str) -> str:
    """A trained checkpoint's folder or s3:// prefix; lakes written before the move keep it in
    <root>/checkpoints/."""
    path = storage.join(checkpoints(root), checkpoint_id)
    legacy = storage.join(root, "checkpoints", checkpoint_id)
    if not storage.exists(storage.join(path, "config.json")) and storage.exists(storage.join(legacy, "config.json")):
        return legacy
    return path


def checkpoints_path(root: str | Path) -> Path:
    """`checkpoints` of a local lake, as a Path."""
    return Path(checkpoints(root))


def checkpoint_path(root: str | Path, checkpoint_id: str) -> Path:
    """`checkpoint` of a local lake, as a Path."""
    return Path(checkpoint(root, checkpoint_id))


def legacy_checkpoints(root: str | Path) -> str:
    """Where lakes written before checkpoints moved to model/checkpoints kept them."""
    return storage.join(root, "checkpoints")


def autocorrelation(root: str | Path, checkpoint_id: str, fingerprint: str | None = None) -> str:
    """The autocorrelation sums of a checkpoint (or of one of its projection fingerprints)."""
    return storage.join(root, "_autocorrelation", checkpoint_id, *([fingerprint] if fingerprint else []))


def autocorrelation_file(root: str | Path, checkpoint_id: str, fingerprint: str, kind: str, item) -> str:
    """One slice's sums: kind "train" with a partition number, or "query" with a query set."""
    name = f"partition={item:05d}" if kind == TRAIN else f"query_set={item}"
    return storage.join(autocorrelation(root, checkpoint_id, fingerprint), kind, f"{name}.safetensors")


def hessians(root: str | Path, checkpoint_id: str, query_set: str | None = None, fingerprint: str | None = None) -> str:
    """The fitted Hessian matrices of a checkpoint (or of one query set and fingerprint)."""
    return storage.join(root, "_matrices", "hessians", checkpoint_id, *[p for p in (query_set, fingerprint) if p])


def takedown_plans(root: str | Path) -> str:
    return storage.join(root, "_takedown_plans")


def second_moments(root: str | Path, checkpoint_id: str, name: str) -> str:
    """A checkpoint's data-estimated second moments (`<hash>.pt`) or the record of its sample
    (`sample-<chunks>.json`)."""
    return storage.join(root, "_second_moments", checkpoint_id, name)


def text_embeddings(root: str | Path, key: str) -> str:
    """The dense baseline's embeddings of one set of document texts (`key`: their hash and the model's)."""
    return storage.join(root, "_text_embeddings", f"{key}.npy")


def plan(root: str | Path, name: str) -> str:
    return storage.join(root, "_plans", f"{name}.json")


def reports(root: str | Path, *name: str) -> str:
    return storage.join(root, "reports", *name)
