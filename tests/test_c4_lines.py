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
