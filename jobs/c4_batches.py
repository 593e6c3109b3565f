"""The bodies of tokenize's `mapInArrow` steps, batch by batch on Arrow: raw gzip lines of a C4
partition -> validated document rows (a bad line a row with its reason) -> token chunks. They run
on Spark workers, so they take what they need as values (the tokenizer as its JSON text), never
the lake's files.
"""

from __future__ import annotations

import gzip
import json
import zlib

import pyarrow as pa

from infra import storage
from jobs import c4_lines

EOS = "<|endoftext|>"  # GPT-2's end-of-text token: the default of a tokenizer that names none


# raw lines per parsed batch: a C4 partition (~356k documents, ~0.8 GB of text) is never one batch
PARSED_LINES_PER_BATCH = 4096
PARSED_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("partition", pa.int32()),
        ("source", pa.string()),
        ("line", pa.int32()),
        ("text", pa.string()),
        ("timestamp", pa.string()),
        ("n_chars", pa.int32()),
        ("reason", pa.string()),
        ("raw_value", pa.string()),
    ]
)


def raw_lines(path: str, max_line_bytes: int):
    """(line number, bytes) of a gzip file; a line longer than max_line_bytes comes back as None
    (read past, never held in memory whole). `path` is a local file or an s3:// URI."""
    with storage.open_read(path) as stored, gzip.open(stored, "rb") as fh:
        number = 0
        while True:
            raw = fh.readline(max_line_bytes + 1)
            if not raw:
                return
            number += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):
                    raw = fh.readline(max_line_bytes)
                yield number, None
            else:
                yield number, raw.rstrip(b"\n")


def parse_files(batches, max_chars: int, lines_per_batch: int = PARSED_LINES_PER_BATCH):
    """(path, partition) rows -> one row per raw line: a document or a reason, yielded in batches of
    `lines_per_batch` lines, so a worker holds a batch of a partition, never the whole of it. An
    empty or unreadable file gives one row with the reason, so it is reported, never silently
    skipped. A line is parsed in isolation: nothing it holds can fail the file or the run."""
    max_line_bytes = 4 * max_chars + 4096  # UTF-8 needs at most 4 bytes a character, JSON a little more
    for batch in batches:
        for path, partition in zip(batch.column("path").to_pylist(), batch.column("partition").to_pylist()):
            rows = {name: [] for name in PARSED_SCHEMA.names}
            seen = 0

            def add(number, record, reason, raw):
                good = record is not None
                rows["doc_id"].append(record["url"] if good else None)
                rows["partition"].append(partition)
                rows["source"].append(storage.name(path))
                rows["line"].append(number)
                rows["text"].append(record["text"] if good else None)
                rows["timestamp"].append(record["timestamp"] if good else None)
                rows["n_chars"].append(len(record["text"]) if good else None)
                rows["reason"].append(reason)
                rows["raw_value"].append(None if good or raw is None else c4_lines.truncate_raw(raw))

            number = 0
            try:
                for number, raw in raw_lines(path, max_line_bytes):
                    if raw is None:
                        add(number, None, f"document too large: line longer than {max_line_bytes:,} bytes", None)
                        continue
                    try:
                        record, reason = c4_lines.parse_line(raw)
                    except Exception as error:  # a defect in validation must cost one line, not the run
                        record, reason = None, f"unexpected error: {type(error).__name__}: {error}"
                    if record is not None and len(record["text"]) > max_chars:
                        record, reason = None, f"document too large: {len(record['text']):,} characters > {max_chars:,}"
                    add(number, record, reason, raw)
                    if len(rows["line"]) == lines_per_batch:
                        seen += lines_per_batch
                        yield pa.RecordBatch.from_pydict(rows, schema=PARSED_SCHEMA)
                        rows = {name: [] for name in PARSED_SCHEMA.names}
            except (OSError, EOFError, zlib.error) as error:  # not gzip, truncated, corrupt: keep what was read
                add(number + 1, None, f"unreadable file: after line {number}: {error}", None)
            if number == 0 and not rows["line"] and not seen:
                add(0, None, "empty partition file: no lines", None)
            if rows["line"]:
                yield pa.RecordBatch.from_pydict(rows, schema=PARSED_SCHEMA)


TOKEN_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("partition", pa.int32()),
        ("chunk", pa.int32()),
        ("token_start", pa.int32()),
        ("token_end", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
    ]
)
_tokenizers = {}


def end_of_text(tokenizer_json: str, tokenizer_config: bytes | None) -> str:
    """The tokenizer's own end-of-text token (`</s>` for Llama-style ones), default GPT-2's."""
    eos = json.loads(tokenizer_config).get("eos_token") if tokenizer_config else None
    return (eos.get("content") if isinstance(eos, dict) else eos) or EOS


def tokenize_documents(batches, tokenizer_json: str, context: int, eos_token: str = EOS):
    """documents -> chunk rows; the fast (Rust) tokenizer encodes a whole batch at once. The
    tokenizer travels as its JSON text, so Spark workers need no access to the lake's files."""
    from tokenizers import Tokenizer

    if tokenizer_json not in _tokenizers:
        _tokenizers[tokenizer_json] = Tokenizer.from_str(tokenizer_json)
    tokenizer = _tokenizers[tokenizer_json]
    eos = tokenizer.token_to_id(eos_token)
    if eos is None:
        raise ValueError(f"the tokenizer has no id for the end-of-text token {eos_token!r}")
    for batch in batches:
        rows = {name: [] for name in TOKEN_SCHEMA.names}
        encodings = tokenizer.encode_batch(batch.column("text").to_pylist(), add_special_tokens=False)
        for doc_id, partition, encoding in zip(
            batch.column("doc_id").to_pylist(), batch.column("partition").to_pylist(), encodings
        ):
            ids = [eos] + encoding.ids
            for chunk, (start, end) in enumerate(c4_lines.chunk_spans(len(ids), context)):
                rows["doc_id"].append(doc_id)
                rows["partition"].append(partition)
                rows["chunk"].append(chunk)
                rows["token_start"].append(start)
                rows["token_end"].append(end)
                rows["input_ids"].append(ids[start:end])
                rows["n_tokens"].append(end - start)
        yield pa.RecordBatch.from_pydict(rows, schema=TOKEN_SCHEMA)


def good_lines(batches):
    """mapInArrow body: only the lines that became documents."""
    import pyarrow.compute as pc

    for batch in batches:
        yield batch.filter(pc.is_null(batch.column("reason")))
