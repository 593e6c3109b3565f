"""Importing a user's corpus and queries into a lake, without ever deleting what the user made.

    <lake>/raw/c4-*.json.gz     the corpus partitions, copied as they are (the tokenize job validates
                                and quarantines their lines)
    <lake>/world/queries.jsonl  the queries, validated as a whole (`schemas.queries`), targets normalised
    <lake>/world/import.json    the marker: where each file came from and its checksum, so that the
                                generator (`world`, `make run`) refuses to overwrite an imported world
    <lake>/world/summary.json   real counts: documents, unreadable lines, words, queries

Re-importing into the same lake adds new partitions and replaces the queries; a partition whose
bytes changed since its import, or a lake holding the generated world, is refused: use a fresh lake.
"""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from jobs import c4_lines
from jobs.checkpoints import checkpoints_root, sha256_file
from schemas.queries import QueryFileError, load_queries

MARKER = "import.json"


class ImportedDataError(RuntimeError):
    """An operation would overwrite or mix data it did not create."""


@dataclass
class WorldSummary:
    """What a world holds, generated or imported (`<lake>/world/summary.json`)."""

    raw_dir: str
    world_dir: str
    documents: int
    facts: int
    queries: int
    partitions: int
    words: int
    unreadable_lines: int = 0
    documents_per_category: dict = field(default_factory=dict)
    facts_per_bucket: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def imported_world(lake_root: str | Path) -> dict | None:
    """The import marker of a lake (where its corpus and queries came from), or None."""
    marker = Path(lake_root) / "world" / MARKER
    return json.loads(marker.read_text()) if marker.exists() else None


def refuse_to_overwrite(lake_root: str | Path) -> None:
    """Raise unless the lake's raw partitions are absent or the generator's own (it then replaces them)."""
    root = Path(lake_root)
    marker = imported_world(root)
    if marker:
        linked = [
            json.loads(m.read_text()).get("imported_from")
            for m in sorted(Path(checkpoints_root(root)).glob("*/manifest.json"))
        ]
        checkpoint = "".join(f" --checkpoint {folder}" for folder in linked[-1:] if folder)
        raise ImportedDataError(
            f"{root.resolve()} holds an imported world (corpus {marker['corpus']}, queries {marker['queries']}, "
            f"imported {marker['imported_at']}); generating the embedded world would delete it. Rerun on your data "
            f"with `python -m jobs pipeline --lake {root} --corpus {marker['corpus']} --queries {marker['queries']}"
            f"{checkpoint}`, "
            "or generate into another lake (--lake / --out)"
        )
    if any((root / "raw").glob("c4-*.json.gz")) and not (root / "world" / "kb.json").exists():
        raise ImportedDataError(
            f"{(root / 'raw').resolve()} holds C4 partitions the generator did not write; "
            "generating the embedded world would delete them. Use another lake (--lake / --out)"
        )


def _count_corpus(raw_dir: Path) -> tuple[int, int, int, set]:
    """(documents, unreadable lines, words, urls) over every partition, by the tokenize job's own rules."""
    documents = bad = words = 0
    urls = set()
    for path in sorted(raw_dir.glob("c4-*.json.gz")):
        try:
            with gzip.open(path, "rb") as fh:
                for raw in fh:
                    record, _reason = c4_lines.parse_line(raw.rstrip(b"\n"))
                    if record is None:
                        bad += 1
                        continue
                    documents += 1
                    words += len(record["text"].split())
                    urls.add(record["url"])
        except (OSError, EOFError):  # not gzip or truncated: tokenize quarantines it with the reason
            bad += 1
    return documents, bad, words, urls


def _check_ground_truth(path: Path, query_file, urls: set) -> list[str]:
    """Problems (no stating document in the corpus) and notes (some missing), by line."""
    problems, partial = [], []
    for query, line in zip(query_file.queries, query_file.lines):
        missing = [u for u in query["stating_doc_ids"] if u not in urls]
        if len(missing) == len(query["stating_doc_ids"]):
            problems.append(
                f"{path}:{line}: none of the {len(missing)} stating_doc_ids is a url of the corpus "
                f"(first: {missing[0]!r})"
            )
        elif missing:
            partial.append(line)
    if problems:
        raise QueryFileError(path, problems)
    return (
        [
            f"{len(partial)} query(ies) name stating documents missing from the corpus (lines "
            f"{', '.join(map(str, partial[:8]))}); their metrics count only the documents found"
        ]
        if partial
        else []
    )


def import_world(lake_root: str | Path, corpus: str | Path, queries: str | Path) -> WorldSummary:
    root, corpus, queries = Path(lake_root), Path(corpus), Path(queries)
    sources = sorted(corpus.glob("c4-*.json.gz"))
    if not sources:
        raise FileNotFoundError(f"{corpus}: no c4-*.json.gz partitions to import")
    query_file = load_queries(queries)  # before touching the lake: a bad file changes nothing
    raw_dir, world_dir = root / "raw", root / "world"
    if (world_dir / "kb.json").exists():
        raise ImportedDataError(
            f"{root.resolve()} holds the generated world; import your data into a fresh lake "
            "(--lake) rather than mixing the two corpora"
        )
    marker = imported_world(root) or {"partitions": {}}
    unknown = sorted(p.name for p in raw_dir.glob("c4-*.json.gz") if p.name not in marker["partitions"])
    if unknown:
        raise ImportedDataError(
            f"{raw_dir.resolve()} holds partitions no import recorded ({', '.join(unknown[:3])}); "
            "import into a fresh lake"
        )
    checksums = {path.name: sha256_file(path) for path in sources}
    changed = sorted(n for n, s in checksums.items() if marker["partitions"].get(n, s) != s)
    if changed:
        raise ImportedDataError(
            f"partition(s) {', '.join(changed[:3])} of {corpus} differ from the ones imported "
            f"into {root.resolve()} before: tokens and gradients of the old bytes would stay. "
            "Give changed data a new partition name, or import into a fresh lake"
        )
    raw_dir.mkdir(parents=True, exist_ok=True)
    world_dir.mkdir(parents=True, exist_ok=True)
    added = [p for p in sources if p.name not in marker["partitions"]]
    for path in added:
        shutil.copyfile(path, raw_dir / path.name)
    documents, bad, words, urls = _count_corpus(raw_dir)
    notes = query_file.notes + _check_ground_truth(queries, query_file, urls)
    (world_dir / "queries.jsonl").write_text(
        "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in query_file.queries), encoding="utf-8"
    )
    marker = {
        "kind": "imported",
        "corpus": str(corpus.resolve()),
        "queries": str(queries.resolve()),
        "imported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "partitions": marker["partitions"] | checksums,
        "queries_sha256": sha256_file(queries),
    }
    (world_dir / MARKER).write_text(json.dumps(marker, indent=1))
    per_bucket = {}
    for query in query_file.queries:
        cell = per_bucket.setdefault(str(query["frequency_bucket"]), {"facts": 0, "stating_docs": 0})
        cell["facts"] += 1
        cell["stating_docs"] += sum(u in urls for u in query["stating_doc_ids"])
    summary = WorldSummary(
        str(raw_dir),
        str(world_dir),
        documents=documents,
        facts=len(query_file.queries),
        queries=len(query_file.queries),
        partitions=len(marker["partitions"]),
        words=words,
        unreadable_lines=bad,
        facts_per_bucket=dict(sorted(per_bucket.items(), key=lambda i: int(i[0]))),
        notes=notes + [f"{len(added)} partition(s) copied, {len(sources) - len(added)} already imported"],
    )
    (world_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def import_checkpoint(lake_root: str | Path, folder: str | Path) -> Path:
    """A checkpoint trained elsewhere, into `<lake>/model/checkpoints/<checkpoint_id>/` as links to the
    user's files (nothing copied, nothing of theirs changed) plus a manifest; its tokenizer becomes
    the lake's (`<lake>/model/tokenizer`), which the tokenize job and the DAGs use."""
    from jobs.checkpoints import load_manifest

    root, folder = Path(lake_root), Path(folder).resolve()
    if not (folder / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"{folder}: no tokenizer.json; save the model's fast tokenizer next to it "
            "(`tokenizer.save_pretrained(folder)`)"
        )
    tokenizer_dir = root / "model" / "tokenizer"
    if (tokenizer_dir / "tokenizer.json").exists() and (
        (tokenizer_dir / "tokenizer.json").read_bytes() != (folder / "tokenizer.json").read_bytes()
    ):
        raise ImportedDataError(
            f"{root.resolve()} is tokenized with another tokenizer ({tokenizer_dir}) than "
            f"{folder}'s; index this checkpoint into a fresh lake (--lake)"
        )
    manifest = load_manifest(folder)
    target = Path(checkpoints_root(root)) / manifest["checkpoint_id"]
    if target.exists():
        known = json.loads((target / "manifest.json").read_text()) if (target / "manifest.json").exists() else {}
        if known.get("imported_from") != str(folder):
            raise ImportedDataError(f"{target} exists and was not imported from {folder}")
        return target
    target.mkdir(parents=True)
    for item in folder.iterdir():
        if item.name != "manifest.json":
            (target / item.name).symlink_to(item)
    (target / "manifest.json").write_text(json.dumps(manifest | {"imported_from": str(folder)}, indent=2, default=str))
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (folder / name).exists():
            shutil.copyfile(folder / name, tokenizer_dir / name)
    return target
