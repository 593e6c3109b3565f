"""Importing a user's corpus and queries into a lake, without ever deleting what the user made.

    <lake>/raw/c4-*.json.gz     the corpus partitions, copied as they are (the tokenize job validates
                                and quarantines their lines)
    <lake>/world/queries.jsonl  the queries, validated as a whole (`schemas.queries`), targets normalised
    <lake>/world/import.json    the marker: the name, where each file came from and its checksum, so
                                that the generator (`world`, `make run`) refuses to overwrite an imported world
    <lake>/world/summary.json   real counts: documents, unreadable lines, words, queries

An import is transactional: `check_import` runs every check first (the corpus's partition names and
lines, the queries file, the stating documents' urls against the corpus, the checkpoint and its
tokenizer) and reads nothing but the inputs and the lake; only when it found no problem does
`write_import` write, and a refusal (`ImportRefused`, every problem listed) leaves the lake byte for
byte as it was. Re-importing into the same lake adds new partitions and replaces the queries; a
partition whose bytes changed since its import, or a lake holding the generated world, is refused.

A lake left half-imported (partitions in raw/ that no import recorded: an interrupted import, or a
refused one by a version before the checks ran first) is repaired by
`python -m jobs pipeline --lake LAKE --repair-import` (`repair_import`): what no import recorded is
moved, not deleted, to `<lake>/import-repair/<time>/`.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from jobs import c4_lines
from jobs.checkpoints import CheckpointError, sha256_file
from schemas.queries import QueryFile, QueryFileError, load_queries
from infra import layout

MARKER = "import.json"
REPAIR_COMMAND = "python -m jobs pipeline --lake {lake} --repair-import"
# a name (infra.names) short enough that the checkpoint ids it prefixes stay names (at most 128 characters:
# "gpt2-<name>-v002-s<seed>-step000512")
NAME_LENGTH = 90


class ImportedDataError(RuntimeError):
    """An operation would overwrite or mix data it did not create."""


class ImportRefused(ValueError):
    """An import whose checks found problems; nothing was written. `problems` lists each one."""

    def __init__(self, lake_root, problems: list[str]):
        self.problems = problems
        super().__init__(
            f"import refused, {len(problems)} problem(s); nothing was written to {_shown(lake_root)}:\n"
            + "\n".join(problems)
        )


def _shown(lake_root) -> str:
    return str(lake_root) if str(lake_root).startswith("s3://") else str(Path(lake_root).resolve())


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
    name: str = ""


def name_from(text: str, fallback: str = "corpus") -> str:
    """A valid name (infra.names) made of any text, such as a folder's name: runs of other characters
    become '-', it starts with a letter or digit, holds no '..' and has at most NAME_LENGTH characters."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    name = re.sub(r"\.{2,}", ".", name)
    name = re.sub(r"^[^A-Za-z0-9]+", "", name)[:NAME_LENGTH].rstrip("-._")
    return name or fallback


def check_name(name: str) -> str:
    """`name` if it can name a query set, the checkpoints it prefixes and a report; else InvalidName."""
    from infra.names import InvalidName, check_name as check

    check(name, "--name")
    if len(name) > NAME_LENGTH:
        raise InvalidName(f"--name {name!r} is {len(name)} characters long: at most {NAME_LENGTH}")
    return name


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
            for m in sorted(Path(layout.checkpoints_path(root)).glob("*/manifest.json"))
        ]
        checkpoint = "".join(f" --checkpoint {folder}" for folder in linked[-1:] if folder)
        name = f" --name {marker['name']}" if marker.get("name") else ""
        raise ImportedDataError(
            f"{root.resolve()} holds an imported world (corpus {marker['corpus']}, queries {marker['queries']}, "
            f"imported {marker['imported_at']}); generating the embedded world would delete it. Rerun on your data "
            f"with `python -m jobs pipeline --lake {root} --corpus {marker['corpus']} --queries {marker['queries']}"
            f"{checkpoint}{name}`, "
            "or generate into another lake (--lake / --out)"
        )
    if any(Path(layout.raw(root)).glob("c4-*.json.gz")) and not Path(layout.world(root, "kb.json")).exists():
        raise ImportedDataError(
            f"{(root / 'raw').resolve()} holds C4 partitions the generator did not write; "
            "generating the embedded world would delete them. Use another lake (--lake / --out), or, if an "
            f"import was interrupted, repair it with `{REPAIR_COMMAND.format(lake=root)}`"
        )


@dataclass
class CorpusCount:
    documents: int = 0
    unreadable_lines: int = 0
    words: int = 0
    urls: set = field(default_factory=set)
    duplicate_urls: int = 0
    unreadable_files: list = field(default_factory=list)


def _count_corpus(paths: list[Path]) -> CorpusCount:
    """Documents, unreadable lines, words and urls over the partitions, by the tokenize job's own rules."""
    count = CorpusCount()
    for path in paths:
        try:
            with gzip.open(path, "rb") as fh:
                for raw in fh:
                    record, _reason = c4_lines.parse_line(raw.rstrip(b"\n"))
                    if record is None:
                        count.unreadable_lines += 1
                        continue
                    count.documents += 1
                    count.words += len(record["text"].split())
                    if record["url"] in count.urls:
                        count.duplicate_urls += 1
                    count.urls.add(record["url"])
        except (OSError, EOFError, gzip.BadGzipFile):  # not gzip or truncated: tokenize quarantines it
            count.unreadable_lines += 1
            count.unreadable_files.append(path.name)
    return count


def _check_ground_truth(path: Path, query_file: QueryFile, urls: set) -> tuple[list[str], list[str]]:
    """(problems: queries none of whose stating documents is in the corpus, notes: some missing), by line."""
    problems, partial = [], []
    for query, line in zip(query_file.queries, query_file.lines):
        missing = [u for u in query["stating_doc_ids"] if u not in urls]
        if len(missing) == len(query["stating_doc_ids"]):
            problems.append(
                f"{path}:{line}: none of the query's {len(missing)} stating document(s) (stating_doc_ids) is the "
                f"url of a document in the corpus (first: {missing[0]!r})"
            )
        elif missing:
            partial.append(line)
    notes = (
        [
            f"{len(partial)} query(ies) name stating documents missing from the corpus (lines "
            f"{', '.join(map(str, partial[:8]))}); their metrics count only the documents found"
        ]
        if partial
        else []
    )
    return problems, notes


@dataclass
class ImportPlan:
    """What `check_import` found and `write_import` / `link_checkpoint` will write."""

    lake: Path
    corpus: Path
    queries: Path
    name: str
    query_file: QueryFile
    previous: dict  # the lake's import marker so far ({"partitions": {}} for a fresh lake)
    checksums: dict  # partition file name -> sha256, of every partition of the corpus folder
    added: list  # corpus partitions the lake does not hold yet
    count: CorpusCount  # of the lake's partitions once imported
    notes: list
    checkpoint: dict | None = None  # {"folder", "manifest", "target"} of a --checkpoint folder


def check_import(
    lake_root: str | Path,
    corpus: str | Path,
    queries: str | Path,
    checkpoint: str | Path | None = None,
    name: str | None = None,
) -> ImportPlan:
    """Every check of an import, before anything is written: ImportRefused listing every problem, or
    the plan. Reads the inputs and the lake, writes nothing (not even a folder). Each check adds
    what it finds to `problems` and the checks go on, so that one refusal lists them all."""
    root, corpus, queries = Path(lake_root), Path(corpus), Path(queries)
    problems: list[str] = []
    name = name or name_from(corpus.resolve().name)
    previous = imported_world(root) or {"partitions": {}}
    _check_lake(str(lake_root), root, previous, problems)
    checksums, added, count = _check_corpus(root, corpus, previous, problems)
    notes = _corpus_notes(count)

    # the queries, then their stating documents against the corpus
    query_file = _load_query_file(queries, problems)
    if query_file is not None and count.documents:
        missing, partial = _check_ground_truth(queries, query_file, count.urls)
        problems += missing
        notes += query_file.notes + partial

    # the checkpoint, its tokenizer against the lake's, and the targets against its tokenizer
    linked = None
    if checkpoint is not None:
        linked = _check_checkpoint(root, Path(checkpoint), problems)
    if query_file is not None:
        notes += _check_targets(root, query_file, queries, linked, problems)

    if problems:
        raise ImportRefused(root, problems)
    return ImportPlan(root, corpus, queries, name, query_file, previous, checksums, added, count, notes, linked)


def _check_lake(lake_root: str, root: Path, previous: dict, problems: list[str]) -> None:
    """The lake can take an import: a local folder, no generated world, no partitions no import recorded."""
    raw_dir, world_dir = root / "raw", root / "world"
    if lake_root.startswith("s3://"):
        problems.append(
            f"{lake_root}: importing your own data into an s3:// lake is not supported yet; import into a folder, "
            "then copy the lake to S3 (stored paths are relative to the lake's root)"
        )
    if (world_dir / "kb.json").exists():
        problems.append(
            f"{root.resolve()} holds the generated world: import your data into a fresh lake (--lake) rather "
            "than mixing the two corpora"
        )
    unknown = sorted(p.name for p in raw_dir.glob("c4-*.json.gz") if p.name not in previous["partitions"])
    if unknown and not (world_dir / "kb.json").exists():
        problems.append(
            f"{raw_dir.resolve()} holds partitions no import recorded ({', '.join(unknown[:3])}"
            f"{', ...' if len(unknown) > 3 else ''}): an import was interrupted, or refused by an older version "
            f"after copying them. Repair the lake with `{REPAIR_COMMAND.format(lake=root)}` (it moves them "
            "aside, deleting nothing), or import into a fresh lake"
        )


def _check_corpus(root: Path, corpus: Path, previous: dict, problems: list[str]) -> tuple[dict, list, CorpusCount]:
    """(sha256 of each partition of the corpus folder, the partitions the lake does not hold yet, the
    count of the lake's partitions once imported): partition names, their numbers, changed bytes,
    then every line."""
    if not corpus.is_dir():
        problems.append(f"{corpus}: the corpus folder does not exist")
        sources = []
    else:
        sources = sorted(corpus.glob("c4-*.json.gz"))
        if not sources:
            problems.append(f"{corpus}: no c4-*.json.gz partitions to import")
    _check_partition_numbers(corpus, sorted({p.name for p in sources} | set(previous["partitions"])), problems)
    checksums = {path.name: sha256_file(path) for path in sources}
    changed = sorted(n for n, s in checksums.items() if previous["partitions"].get(n, s) != s)
    if changed:
        problems.append(
            f"partition(s) {', '.join(changed[:3])} of {corpus} differ from the ones imported into "
            f"{root.resolve()} before: tokens and gradients of the old bytes would stay. Give changed data a new "
            "partition name, or import into a fresh lake"
        )
    added = [p for p in sources if p.name not in previous["partitions"]]
    kept = [root / "raw" / n for n in sorted(previous["partitions"]) if (root / "raw" / n).exists()]
    count = _count_corpus(sorted(kept + added, key=lambda p: p.name))
    if sources and not count.documents:
        problems.append(
            f"{corpus}: no readable document in the corpus ({count.unreadable_lines} unreadable line(s)); each "
            'line must be a JSON object with the strings "text", "url" and "timestamp"'
        )
    return checksums, added, count


def _check_partition_numbers(corpus: Path, file_names: list[str], problems: list[str]) -> None:
    """Every partition (the corpus's and the lake's) has a C4 partition name, and its own number."""
    from jobs.tokenize import PARTITION_NAME

    numbers: dict[int, str] = {}
    for file_name in file_names:
        match = PARTITION_NAME.search(file_name)
        if not match:
            problems.append(f"{corpus / file_name}: not a C4 partition name (c4-<split>.NNNNN-of-MMMMM.json.gz)")
        elif int(match.group(1)) in numbers:
            problems.append(
                f"{file_name} and {numbers[int(match.group(1))]} have the same partition number "
                f"{int(match.group(1))}: the lake keys partitions by it; renumber one of them"
            )
        else:
            numbers[int(match.group(1))] = file_name


def _corpus_notes(count: CorpusCount) -> list[str]:
    """What the tokenize job will quarantine: unreadable lines and repeated urls (no refusal)."""
    notes = []
    if count.unreadable_lines:
        notes.append(
            f"{count.unreadable_lines} unreadable line(s)"
            + (
                f" (files that are not gzip or are truncated: {', '.join(count.unreadable_files[:3])})"
                if count.unreadable_files
                else ""
            )
            + ": the tokenize job puts each into the quarantine table with its reason"
        )
    if count.duplicate_urls:
        notes.append(
            f"{count.duplicate_urls} document(s) repeat the url of an earlier one: the tokenize job keeps the first "
            "and quarantines the others (one url, one document)"
        )
    return notes


def _load_query_file(queries: Path, problems: list[str]) -> QueryFile | None:
    """The queries file validated as a whole, else None (its problems added, by line)."""
    if not queries.is_file():
        problems.append(f"{queries}: the queries file does not exist")
        return None
    try:
        return load_queries(queries)
    except QueryFileError as error:
        problems += error.problems
        return None


def _check_checkpoint(root: Path, folder: Path, problems: list[str]) -> dict | None:
    """{"folder", "manifest", "target"} of a checkpoint folder the lake can take, else None (problems added)."""
    from jobs.checkpoints import load_manifest, weights_files

    folder = folder.resolve()
    if not folder.is_dir():
        problems.append(f"{folder}: the checkpoint folder does not exist")
        return None
    found = len(problems)
    if not (folder / "tokenizer.json").exists():
        problems.append(
            f"{folder}: no tokenizer.json; save the model's fast tokenizer next to it (`tokenizer.save_pretrained(folder)`)"
        )
    tokenizer_dir = root / "model" / "tokenizer"
    if (
        (tokenizer_dir / "tokenizer.json").exists()
        and (folder / "tokenizer.json").exists()
        and (tokenizer_dir / "tokenizer.json").read_bytes() != (folder / "tokenizer.json").read_bytes()
    ):
        problems.append(
            f"{root.resolve()} is tokenized with another tokenizer ({tokenizer_dir}) than {folder}'s; index this "
            "checkpoint into a fresh lake (--lake)"
        )
    try:
        weights_files(folder)
        manifest = load_manifest(folder)
    except CheckpointError as error:
        problems.append(str(error))
        return None
    target = Path(layout.checkpoints_path(root)) / manifest["checkpoint_id"]
    if target.exists():
        known = json.loads((target / "manifest.json").read_text()) if (target / "manifest.json").exists() else {}
        if known.get("imported_from") != str(folder):
            problems.append(f"{target} exists and was not imported from {folder}")
    return None if len(problems) > found else {"folder": folder, "manifest": manifest, "target": target}


def _check_targets(root: Path, query_file: QueryFile, path: Path, linked: dict | None, problems: list[str]) -> list:
    """Problems when the model's tokenizer can encode none of the targets; notes of those it will quarantine.

    The tokenizer is the checkpoint's; without one, the lake's tokenizer is retrained on the corpus
    (byte-level BPE: it encodes any text except its end-of-text token)."""
    from schemas.queries import check_targets

    if linked is not None:
        from transformers import AutoTokenizer

        refused, _warnings = check_targets(query_file.queries, AutoTokenizer.from_pretrained(linked["folder"]))
        tokenizer = f"the tokenizer of {linked['folder']}"
    else:
        from jobs.c4_batches import EOS

        refused = [
            (i, f"target {q['target']!r} holds the end-of-text token {EOS}")
            for i, q in enumerate(query_file.queries)
            if EOS in q["target"]
        ]
        tokenizer = "the tokenizer trained on the corpus"
    if refused and len(refused) == len(query_file.queries):
        problems.append(f"{path}: {tokenizer} can encode none of the targets (first: {refused[0][1]})")
        return []
    return (
        [
            f"{len(refused)} target(s) {tokenizer} cannot encode go to the quarantine table (lines "
            f"{', '.join(str(query_file.lines[i]) for i, _ in refused[:8])})"
        ]
        if refused
        else []
    )


def _write_atomically(path: Path, text: str) -> None:
    """The whole text or the old file, never half of it: written beside it, then renamed over it."""
    part = path.with_name(f".{path.name}.part")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)


def write_import(plan: ImportPlan) -> WorldSummary:
    """Write a checked import: new partitions, the queries, the marker (last), the summary."""
    raw_dir, world_dir = plan.lake / "raw", plan.lake / "world"
    raw_dir.mkdir(parents=True, exist_ok=True)
    world_dir.mkdir(parents=True, exist_ok=True)
    for path in plan.added:  # a hidden part file renamed once whole: no partition is ever half there
        part = raw_dir / f".{path.name}.part"
        shutil.copyfile(path, part)
        os.replace(part, raw_dir / path.name)
    queries = plan.query_file.queries
    _write_atomically(world_dir / "queries.jsonl", "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in queries))
    marker = {
        "kind": "imported",
        "name": plan.name,
        "corpus": str(plan.corpus.resolve()),
        "queries": str(plan.queries.resolve()),
        "imported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "partitions": plan.previous["partitions"] | plan.checksums,
        "queries_sha256": sha256_file(plan.queries),
    }
    _write_atomically(world_dir / MARKER, json.dumps(marker, indent=1))
    per_bucket = {}
    for query in queries:
        cell = per_bucket.setdefault(str(query["frequency_bucket"]), {"facts": 0, "stating_docs": 0})
        cell["facts"] += 1
        cell["stating_docs"] += sum(u in plan.count.urls for u in query["stating_doc_ids"])
    summary = WorldSummary(
        str(raw_dir),
        str(world_dir),
        documents=plan.count.documents,
        facts=len(queries),
        queries=len(queries),
        partitions=len(marker["partitions"]),
        words=plan.count.words,
        unreadable_lines=plan.count.unreadable_lines,
        facts_per_bucket=dict(sorted(per_bucket.items(), key=lambda i: int(i[0]))),
        notes=plan.notes
        + [f"{len(plan.added)} partition(s) copied, {len(plan.checksums) - len(plan.added)} already imported"],
        name=plan.name,
    )
    _write_atomically(world_dir / "summary.json", json.dumps(asdict(summary), indent=2))
    return summary


def import_world(
    lake_root: str | Path, corpus: str | Path, queries: str | Path, name: str | None = None
) -> WorldSummary:
    """Check, then write, an import of a corpus and its queries (`check_import`, `write_import`)."""
    return write_import(check_import(lake_root, corpus, queries, name=name))


def repair_import(lake_root: str | Path) -> list[str]:
    """Move aside what no import recorded: partitions in raw/ the marker does not list (and the world
    files of an import that never wrote its marker), into `<lake>/import-repair/<time>/`; nothing is
    deleted. Refused (ImportRefused) when the lake tokenized one of them: its documents would stay."""
    if str(lake_root).startswith("s3://"):  # imports go to folders (check_import): none half-written on S3
        return [f"{lake_root}: imports are written to folders only, so there is no half-written import to repair"]
    root = Path(lake_root)
    raw_dir, world_dir = root / "raw", root / "world"
    if (world_dir / "kb.json").exists():
        return [f"{root.resolve()} holds the generated world: its partitions are the generator's, nothing to repair"]
    marker = imported_world(root)
    recorded = (marker or {"partitions": {}})["partitions"]
    stray = sorted(p for p in raw_dir.glob("c4-*.json.gz") if p.name not in recorded)
    stray += sorted(raw_dir.glob(".c4-*.json.gz.part"))  # a copy an interrupted import left
    if marker is None:
        stray += [world_dir / n for n in ("queries.jsonl", "summary.json") if (world_dir / n).exists()]
    if not stray:
        return [f"{root.resolve()}: every partition in raw/ was recorded by an import; nothing to repair"]
    tokenized = _tokenized_sources(root) & {p.name for p in stray}
    if tokenized:
        raise ImportRefused(
            root,
            [
                f"{raw_dir / n}: no import recorded it, but the lake tokenized it; moving it aside would leave its "
                "documents in the tables. Import into a fresh lake"
                for n in sorted(tokenized)
            ],
        )
    aside = root / "import-repair" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    lines = []
    for path in stray:
        destination = aside / path.parent.name / path.name
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
        lines.append(f"moved {path} -> {destination}")
    lines.append(
        f"{len(stray)} file(s) no import recorded moved to {aside} (delete it once you no longer need them); "
        "now rerun your import"
    )
    return lines


def _tokenized_sources(root: Path) -> set[str]:
    """File names of the raw partitions the lake's tables hold rows of (documents, tokenize quarantine)."""
    from infra.lake import Lake

    lake = Lake(root)
    names = set()
    for table, filters in (("documents", None), ("quarantine", [("stage", "=", "tokenize")])):
        if lake.exists(table):
            names |= {Path(str(s)).name for (s,) in lake.distinct(table, ["source"], filters=filters)}
    return names


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def link_checkpoint(linked: dict, lake_root: str | Path) -> Path:
    """Write a checked checkpoint (`check_import`'s `checkpoint`, or `check_checkpoint`): links to the
    user's files plus a manifest, and its tokenizer as the lake's."""
    root, folder, manifest, target = Path(lake_root), linked["folder"], linked["manifest"], linked["target"]
    if target.exists():  # imported from this folder before
        return target
    target.mkdir(parents=True)
    for item in folder.iterdir():
        if item.name != "manifest.json":
            (target / item.name).symlink_to(item)
    _write_atomically(
        target / "manifest.json", json.dumps(manifest | {"imported_from": str(folder)}, indent=2, default=str)
    )
    tokenizer_dir = root / "model" / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (folder / name).exists():
            shutil.copyfile(folder / name, tokenizer_dir / name)
    return target


def check_checkpoint(lake_root: str | Path, folder: str | Path) -> dict:
    """The checks of a checkpoint folder alone (`check_import` runs them with the corpus's): ImportRefused
    listing every problem, or what `link_checkpoint` writes."""
    problems: list[str] = []
    linked = _check_checkpoint(Path(lake_root), Path(folder), problems)
    if problems or linked is None:
        raise ImportRefused(lake_root, problems)
    return linked


def import_checkpoint(lake_root: str | Path, folder: str | Path) -> Path:
    """A checkpoint trained elsewhere, into `<lake>/model/checkpoints/<checkpoint_id>/` as links to the
    user's files (nothing copied, nothing of theirs changed) plus a manifest; its tokenizer becomes
    the lake's (`<lake>/model/tokenizer`), which the tokenize job and the DAGs use. Checked first:
    a refused folder (ImportRefused) changes nothing."""
    return link_checkpoint(check_checkpoint(lake_root, folder), lake_root)
