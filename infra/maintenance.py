"""Lake maintenance: compaction, vacuum with the retention Delta expects, log checkpoints (delta-rs).

    maintain_lake(Lake("lake"))   # what the `trackstar_maintenance` DAG runs weekly

Per table: small files are compacted into bigger ones (a new version, the same rows; in the vector
tables each fingerprint keeps files of its own, `Lake.optimize`), files no version younger than the
table's retention (Delta's default, 7 days) references are vacuumed, the log is checkpointed and
expired log entries are cleaned up. A vacuum deletes every file of the
table folder the log does not know (a full vacuum: the data files of writers killed before their
commit too, once older than the retention, with the half-written `<file>.parquet#N` a writer killed
mid-file leaves on a local disk), so a table whose folder holds foreign files (a model checkpoint
folder, say, as lakes did before checkpoints moved to `model/checkpoints`) is not vacuumed: its
files are named in the result instead.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from infra.lake import Lake
from schemas.tables import TABLES

TABLE_FILE_SUFFIXES = (".parquet", ".crc", ".bin")  # data files, checksums, deletion vectors
TABLE_FOLDERS = ("_delta_log", "_change_data")
# what a local write killed mid-file leaves: the data file's temporary name (the rename never came)
INTERRUPTED_WRITE = re.compile(r"\.parquet#\d+$")
RETENTION_HOURS = 168  # Delta's default delta.deletedFileRetentionDuration (7 days)


def foreign_files(lake: Lake, table: str) -> list[str]:
    """Files in a local table folder that are not part of a Delta table (none listed on S3)."""
    if lake.is_s3:
        return []
    root = Path(lake.path(table))
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file()
        and path.relative_to(root).parts[0] not in TABLE_FOLDERS
        and not path.name.endswith(TABLE_FILE_SUFFIXES)
        and not INTERRUPTED_WRITE.search(path.name)
    )


def remove_interrupted_writes(lake: Lake, table: str, older_than_hours: float = RETENTION_HOURS) -> list[str]:
    """Deletes the half-written files of killed writers older than the retention (local tables;
    an object store never shows a file before its upload completes)."""
    if lake.is_s3:
        return []
    root, cutoff = Path(lake.path(table)), time.time() - older_than_hours * 3600
    stale = [p for p in root.rglob("*.parquet#*") if INTERRUPTED_WRITE.search(p.name) and p.stat().st_mtime < cutoff]
    for path in stale:
        path.unlink()
    return sorted(str(p.relative_to(root)) for p in stale)


def maintain_table(lake: Lake, table: str) -> dict:
    """Compact, vacuum (default retention, unless foreign files are present), checkpoint the log."""
    compacted = lake.optimize(table)
    foreign = foreign_files(lake, table)
    vacuumed = []
    if not foreign:
        vacuumed = lake.open(table).vacuum(
            retention_hours=None, dry_run=False, enforce_retention_duration=True, full=True
        ) + remove_interrupted_writes(lake, table)
    delta = lake.open(table)
    delta.create_checkpoint()
    delta.cleanup_metadata()
    return {
        "version": delta.version(),
        "files_removed": compacted["numFilesRemoved"],
        "files_added": compacted["numFilesAdded"],
        # partitions a writer changed while they were being compacted: left for the next run
        "partitions_left_for_next_run": compacted.get("partitionsSkipped", 0),
        "vacuumed": len(vacuumed),
        "not_vacuumed_foreign_files": foreign[:20],
    }


def maintain_lake(lake: Lake, tables: list[str] | None = None) -> dict:
    """maintain_table for every declared table the lake holds; {table: result}."""
    results = {}
    for table in tables or list(TABLES):
        if lake.exists(table):
            results[table] = maintain_table(lake, table)
            print(f"[maintenance] {table}: {results[table]}", flush=True)
    return results
