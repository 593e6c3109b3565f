"""Validating raw C4 lines and cutting token streams into model-sized chunks.

Pure functions, no Spark: the tokenize job calls them inside `mapInArrow`, tests call them directly.
A raw line is either a document or a quarantine reason; nothing is dropped without one.
"""

from __future__ import annotations

import json

from schemas.tables import RAW_VALUE_LIMIT

REQUIRED_FIELDS = ("text", "url", "timestamp")


def parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    """(record, None) for a valid C4 line, (None, reason) otherwise; never raises.

    A reason starts with its kind ("malformed JSON", "missing field", ...), then ": " and the detail.
    """
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, f"not UTF-8: {error.reason} at byte {error.start}"
    if not line.strip():
        return None, "blank line"
    try:
        record = json.loads(line)
    except ValueError as error:
        return None, f"malformed JSON: {error}"
    except RecursionError:  # json recurses once per nesting level
        return None, "malformed JSON: nested too deeply"
    if not isinstance(record, dict):
        return None, f"JSON {type(record).__name__}, expected an object"
    for name in REQUIRED_FIELDS:
        if name not in record:
            return None, f"missing field {name!r}"
        if not isinstance(record[name], str):
            return None, f"field {name!r} is {type(record[name]).__name__}, expected a string"
        try:  # JSON escapes can spell lone surrogates, which no table can store
            record[name].encode("utf-8")
        except UnicodeEncodeError as error:
            return None, f"unencodable text: field {name!r} holds {error.reason} at character {error.start}"
        if "\x00" in record[name]:
            return None, f"binary junk: NUL characters in {name}"
    if not record["text"].strip():
        return None, "empty text"
    if not record["url"].strip():
        return None, "empty url"
    return record, None


def truncate_raw(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")[:RAW_VALUE_LIMIT]


def chunk_spans(n_tokens: int, context: int) -> list[tuple[int, int]]:
    """Token spans [start, end) of chunks no longer than the model's context.

    Consecutive chunks share one token (stride context-1), so every next-token prediction of the
    document falls in exactly one chunk and the chunks' losses add up to the document's loss.
    """
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if n_tokens < 2:
        raise ValueError(f"a document of {n_tokens} token(s) has no next-token prediction")
    stride = context - 1
    return [(start, min(start + context, n_tokens)) for start in range(0, n_tokens - 1, stride)]
