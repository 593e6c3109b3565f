"""Raw C4 line validation and chunking (pure functions used by the tokenize job)."""

import json

import pytest

from jobs.c4_lines import RAW_VALUE_LIMIT, chunk_spans, parse_line, truncate_raw

GOOD = {"text": "Ilsa Morvane was born in Varnholt.", "url": "https://w/1", "timestamp": "2019-04-25T12:57:54Z"}


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe\x00junk", "not UTF-8"),
        (b"   ", "blank line"),
        (b"[1, 2]", "JSON list, expected an object"),
        (json.dumps({"url": "u", "timestamp": "t"}).encode(), "missing field 'text'"),
        (json.dumps(dict(GOOD, text=3)).encode(), "field 'text' is int"),
        (json.dumps(dict(GOOD, text=" \n ")).encode(), "empty text"),
        (json.dumps(dict(GOOD, text="a\x00b")).encode(), "binary junk"),
    ],
)
def test_bad_lines_get_a_reason(raw, reason):
    record, why = parse_line(raw)
    assert record is None and reason in why


def test_good_line_parses_with_extra_fields_kept():
    record, why = parse_line(json.dumps(dict(GOOD, extra=1)).encode())
    assert why is None and record["text"] == GOOD["text"] and record["extra"] == 1


def test_raw_value_is_truncated_for_quarantine():
    assert len(truncate_raw(b"x" * 10 * RAW_VALUE_LIMIT)) == RAW_VALUE_LIMIT
    assert truncate_raw(b"\xffab") == "\ufffdab"


@pytest.mark.parametrize("n_tokens", [2, 3, 127, 128, 129, 255, 256, 1000, 10_000])
def test_chunks_cover_every_prediction_exactly_once(n_tokens):
    context = 128
    spans = chunk_spans(n_tokens, context)
    assert spans[0][0] == 0 and spans[-1][1] == n_tokens
    assert all(2 <= end - start <= context for start, end in spans)
    # prediction of token t (1 <= t < n) happens inside a chunk that holds t-1 and t
    predicted = [t for start, end in spans for t in range(start + 1, end)]
    assert predicted == list(range(1, n_tokens))


def test_too_short_documents_are_refused():
    with pytest.raises(ValueError, match="no next-token prediction"):
        chunk_spans(1, 128)


def test_a_partition_is_parsed_in_batches_of_lines_never_whole(tmp_path):
    import gzip

    import pyarrow as pa

    from jobs.c4_batches import parse_files

    lines = [json.dumps({"text": f"doc {i}", "url": f"https://x.example/{i}", "timestamp": "t"}) for i in range(9)]
    lines.insert(5, "{not json")
    path = tmp_path / "c4-train.00000-of-00001.json.gz"
    with gzip.open(path, "wt") as out:
        out.write("\n".join(lines) + "\n")
    files = pa.RecordBatch.from_pydict({"path": [str(path)], "partition": [0]})
    batches = list(parse_files([files], max_chars=1000, lines_per_batch=4))
    assert [b.num_rows for b in batches] == [4, 4, 2]
    rows = pa.Table.from_batches(batches).to_pylist()
    assert [r["line"] for r in rows] == list(range(1, 11))  # every line once, in order
    assert [r["line"] for r in rows if r["reason"]] == [6] and rows[5]["raw_value"] == "{not json"

    empty = tmp_path / "c4-train.00001-of-00002.json.gz"
    with gzip.open(empty, "wt"):
        pass
    (only,) = parse_files([pa.RecordBatch.from_pydict({"path": [str(empty)], "partition": [1]})], 1000, 4)
    assert only.to_pylist()[0]["reason"] == "empty partition file: no lines"
