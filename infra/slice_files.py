"""A slice streamed into a Delta table's Parquet files, committed as one transaction.

delta-rs' `write_deltalake` holds a whole stream in memory until it commits (measured with 17 KB
rows: 0.29 GB for 2,048 rows, 0.97 GB for 16,384, whatever its file and row-group settings), so
one partition of a C4-sized corpus would not fit a rank. `Lake.replace_slice_batches` therefore
writes the files itself with pyarrow's ParquetWriter, whose memory is one row group, and commits
them with delta-rs' `create_write_transaction`: the slice's old files out and the new ones in, in
one commit. Rows of other slices (other fingerprints) in a file that is removed are copied into
the new files first, as delta-rs' own predicate overwrite does.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake.fs import DeltaStorageHandler
from deltalake.transaction import AddAction, RemoveAction

# A file is closed once this many bytes went into it, and rows are written in row groups of this size.
FILE_BYTES = 256 << 20
ROW_GROUP_BYTES = 8 << 20
# compaction merges a slice's files below this size (delta-rs' bin-packing aims at 100 MB files)
SMALL_FILE_BYTES = 64 << 20
_SAFE_FOLDER_VALUE = re.compile(r"^[A-Za-z0-9._-]+$")


class SliceFiles:
    """Parquet files of one partition of a table (partition columns not stored, as Delta does).
    `split_by`: slice-key columns (e.g. the fingerprint) whose every value gets files of its own, so
    that the files' statistics skip the others exactly: one commit of several extractions' rows
    would otherwise mix them in every row group, and a read of one would read them all."""

    def __init__(
        self,
        delta: DeltaTable,
        schema: pa.Schema,
        partition_values: dict[str, str],
        options: dict,
        split_by: tuple[str, ...] = (),
    ):
        self.fs = pafs.PyFileSystem(DeltaStorageHandler(delta.table_uri, options))
        self.partition_values = partition_values
        self.schema = pa.schema([f for f in schema if f.name not in partition_values])
        self.split_by = [c for c in split_by if c in self.schema.names]
        # vector cells neither compress (snappy: 6.59 MB of int8 cells in, 6.59 MB out) nor repeat:
        # stored plain, they skip a codec pass and a dictionary attempt on every read and write
        cells = {f.name for f in self.schema if pa.types.is_binary(f.type)}
        self._writer_options = {
            "write_page_checksum": True,
            "compression": {f.name: "none" if f.name in cells else "snappy" for f in self.schema},
            "use_dictionary": [f.name for f in self.schema if f.name not in cells],
        }
        self.folder = _folder(partition_values)
        self.added: list[AddAction] = []
        self._streams: dict[tuple, _Stream] = {}  # value of split_by -> its pending rows and open file

    def write(self, rows: pa.Table) -> None:
        """Rows of the slice, with or without the partition columns."""
        for value, part in _split(rows.select(self.schema.names), self.split_by):
            stream = self._streams.setdefault(value, _Stream())
            stream.pending.append(part)
            stream.pending_bytes += part.nbytes
            if stream.pending_bytes >= ROW_GROUP_BYTES:
                self._flush(stream)

    def finish(self, data_change: bool = True) -> list[AddAction]:
        """The files' add actions; `data_change=False` for a rewrite of the same rows (compaction)."""
        for stream in self._streams.values():
            self._flush(stream)
            self._close_file(stream)
        for action in self.added:
            action.data_change = data_change
        return self.added

    def discard(self) -> None:
        """Deletes every file written (none of them was committed)."""
        paths = [action.path for action in self.added]
        paths += [self._end_file(stream)["path"] for stream in self._streams.values() if stream.file is not None]
        for path in paths:
            try:
                self.fs.delete_file(path)
            except OSError:  # cleaning up after a failure must not hide the failure
                pass
        self.added = []

    def _flush(self, stream: _Stream) -> None:
        if not stream.pending:
            return
        rows = pa.concat_tables(stream.pending).combine_chunks()
        stream.pending, stream.pending_bytes = [], 0
        if stream.file is None:
            path = f"{self.folder}/part-{uuid.uuid4()}.snappy.parquet"
            sink = self.fs.open_output_stream(path)
            writer = pq.ParquetWriter(sink, self.schema, **self._writer_options)
            stream.file = {"path": path, "sink": sink, "writer": writer, "bytes": 0}
            stream.file["stats"] = {"numRecords": 0, "minValues": {}, "maxValues": {}, "nullCount": {}}
        stream.file["writer"].write_table(rows, row_group_size=max(1, rows.num_rows))
        stream.file["bytes"] += rows.nbytes
        _add_stats(stream.file["stats"], rows)
        if stream.file["bytes"] >= FILE_BYTES:
            self._close_file(stream)

    def _close_file(self, stream: _Stream) -> None:
        if stream.file is None:
            return
        ended = self._end_file(stream)
        size = self.fs.get_file_info(ended["path"]).size
        now = int(time.time() * 1000)
        self.added.append(AddAction(ended["path"], size, self.partition_values, now, True, json.dumps(ended["stats"])))

    @staticmethod
    def _end_file(stream: _Stream) -> dict:
        """Closes the stream's open file (its writer, then its sink) and returns what it held."""
        ended, stream.file = stream.file, None
        ended["writer"].close()
        ended["sink"].close()
        return ended


@dataclass
class _Stream:
    """The rows of one split_by value: pending until a row group's worth, then its open file."""

    pending: list = field(default_factory=list)
    pending_bytes: int = 0
    file: dict | None = None


def _split(rows: pa.Table, columns: list[str]):
    """(value of `columns`, its rows) for each value in `rows`; one part when there are no columns."""
    if not columns or rows.num_rows == 0:
        yield (), rows
        return
    for value in rows.select(columns).group_by(columns).aggregate([]).to_pylist():
        mask = None
        for column, wanted in value.items():
            match = pc.is_null(rows[column]) if wanted is None else pc.equal(rows[column], wanted)
            mask = match if mask is None else pc.and_(mask, match)
        yield tuple(value[c] for c in columns), rows.filter(mask)


def in_slice(rows: pa.Table, other_keys: dict) -> pa.ChunkedArray | None:
    """Which of `rows` (holding the key columns) belong to the slice (non-partition key -> list of
    values); None: every row. Computed on the rows as read, not as a scan filter: a file that
    delta-rs rewrote (update, delete) stores strings as string_view, which pyarrow's filters reject."""
    mask = None
    for column, values in other_keys.items():
        keys = rows[column]
        if pa.types.is_string_view(keys.type):
            keys = keys.cast(pa.string())
        condition = pc.is_in(keys, pa.array(values, keys.type))
        mask = condition if mask is None else pc.and_(mask, condition)
    return mask


def _rows_in_slice(fragment, other_keys: dict) -> tuple[int, int]:
    """(rows of the slice, all rows) of one file."""
    total = fragment.count_rows()
    if not other_keys:
        return total, total
    mask = in_slice(fragment.to_table(columns=list(other_keys), use_threads=False), other_keys)
    return pc.sum(mask).as_py() or 0, total


def partition_fragments(delta: DeltaTable, partition_values: dict[str, str]):
    """The partition's files as pyarrow fragments (`.path` as in the Delta log)."""
    where = [(column, "=", value) for column, value in partition_values.items()]
    return list(delta.to_pyarrow_dataset(file_pruning_predicate=where).get_fragments())


def rows_of_slice_elsewhere(fragments: list, other_keys: dict, known: set) -> int:
    """Rows of the slice in the partition's files (`fragments`) other than the `known` paths: after
    a commit, rows another writer added to the same slice at the same time."""
    return sum(_rows_in_slice(fragment, other_keys)[0] for fragment in fragments if fragment.path not in known)


def replaced_files(files: SliceFiles, fragments: list, other_keys: dict) -> list[RemoveAction]:
    """The RemoveActions of the slice's old files among the partition's `fragments`: every file
    holding a row of the slice (non-partition key -> list of values; with no such keys, every file).
    A file holding rows of other slices too (other fingerprints) is removed all the same, and those
    rows are copied into `files` first; files holding only other slices are left alone."""
    removes, now = [], int(time.time() * 1000)
    for fragment in fragments:
        matched, total = _rows_in_slice(fragment, other_keys)
        if matched == 0 and other_keys:
            continue
        if matched < total:
            for batch in fragment.to_batches(columns=files.schema.names, use_threads=False):
                rows = pa.Table.from_batches([batch]).cast(files.schema)  # string_view back to string
                files.write(rows.filter(pc.invert(in_slice(rows, other_keys))))
        removes.append(RemoveAction(fragment.path, True, now, partition_values=files.partition_values))
    return removes


def files_to_compact(files: list[dict], split_by: tuple[str, ...], small_bytes: int = SMALL_FILE_BYTES) -> list[str]:
    """Which of one partition's files (flattened Delta add actions) compaction rewrites so that each
    value of `split_by` ends in files of its own: every file that mixes values (or has no statistics
    to tell), and a value's small files when there is another file to merge them with (a second
    small file of the value, or a mixed file that may hold its rows). Full files of one value stay."""
    mixed, small_by_value = [], {}
    for action in files:
        value = tuple(_constant(action, column) for column in split_by)
        if any(v is _VARIES for v in value):
            mixed.append(action["path"])
        elif action["size_bytes"] < small_bytes:
            small_by_value.setdefault(value, []).append(action["path"])
    merged = [path for paths in small_by_value.values() if len(paths) + bool(mixed) >= 2 for path in paths]
    return sorted(mixed + merged)


_VARIES = object()


def _constant(action: dict, column: str):
    """The file's one value of `column` by its statistics (None when every row is null), or _VARIES."""
    low, high, nulls = action.get(f"min.{column}"), action.get(f"max.{column}"), action.get(f"null_count.{column}")
    if nulls is not None and nulls == action.get("num_records"):
        return None
    if low is None or low != high or nulls != 0:
        return _VARIES
    return low


def _add_stats(stats: dict, rows: pa.Table) -> None:
    """Delta file statistics (row count, nulls; min/max of string and integer columns only: exact,
    so data skipping can never drop a matching file)."""
    stats["numRecords"] += rows.num_rows
    for name in rows.column_names:
        column = rows[name]
        stats["nullCount"][name] = stats["nullCount"].get(name, 0) + column.null_count
        if not (pa.types.is_string(column.type) or pa.types.is_integer(column.type)):
            continue
        if column.null_count == len(column):
            continue
        low, high = pc.min_max(column).values()
        low, high = low.as_py(), high.as_py()
        if name in stats["minValues"]:
            low, high = min(low, stats["minValues"][name]), max(high, stats["maxValues"][name])
        stats["minValues"][name], stats["maxValues"][name] = low, high


def _folder(partition_values: dict[str, str]) -> str:
    """Hive-style folders when every value is a plain name; else one folder named by a hash
    (the log's partition values are what readers use; the folder is only for people)."""
    if all(_SAFE_FOLDER_VALUE.match(value) for value in partition_values.values()):
        return "/".join(f"{column}={value}" for column, value in partition_values.items())
    return "slice-" + hashlib.sha256(json.dumps(partition_values, sort_keys=True).encode()).hexdigest()[:16]
