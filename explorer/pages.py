"""The explorer's pages, rendered from explorer/templates/ (Jinja2, every value escaped unless
marked safe): the query list (`/`), a query's proponents per method (`/query/<id>`), one query's
top-k on two checkpoints (`/drift/<id>`) and a new prompt traced (`/trace`). Each takes the
`Explorer` and the request's parameters, and raises BadRequest or LookupError for what it cannot show."""

from __future__ import annotations

import functools
import html
import re
from pathlib import Path
from urllib.parse import quote, urlencode

from explorer.data import BadRequest, Explorer, metrics
from jobs.c4_batches import EOS

PREDICTIONS = ("correct", "incorrect")
MAX_TRACE_CHARACTERS = 2000  # prompt + target of /trace: a forward and backward pass each


def link(path: str, **params) -> str:
    clean = {k: v for k, v in params.items() if v not in (None, "", [])}
    return path + ("?" + urlencode(clean) if clean else "")


def query_path(query_id: str, page: str = "query") -> str:
    """/query/<id> (or /drift/<id>) with every character of the id escaped (`/`, `?`, `#`, quotes,
    spaces, non-ASCII)."""
    return f"/{page}/" + quote(query_id, safe="")


def _top(k: str) -> int:
    try:
        k = int(k)
        if not 1 <= k <= 50:
            raise ValueError
    except ValueError:
        raise BadRequest(f"k must be a whole number from 1 to 50, got {k!r}") from None
    return k


@functools.cache
def templates():
    """The pages' Jinja2 templates (explorer/templates/), every value HTML-escaped unless marked safe."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape())
    env.globals.update(link=link, query_path=query_path)
    return env


def list_page(explorer: Explorer, checkpoint=None, relation=None, bucket=None, prediction=None, q=None) -> str:
    checkpoint = explorer.checkpoint(checkpoint)
    queries = explorer.queries()
    if bucket is not None:
        try:
            bucket = int(bucket)
        except ValueError:
            raise BadRequest(f"bucket must be a whole number, got {bucket!r}") from None
    if prediction and prediction not in PREDICTIONS:
        raise BadRequest(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    relations = sorted({x["relation"] for x in queries.values()})
    if relation and relation not in relations:
        raise BadRequest(f"unknown relation {relation!r}")
    predicted = explorer.predictions(checkpoint)
    chosen = [
        x
        for x in sorted(queries.values(), key=lambda x: x["query_id"])
        if (not relation or x["relation"] == relation)
        and (bucket is None or x["frequency_bucket"] == bucket)
        and (not prediction or predicted[x["query_id"]][0] == (prediction == "correct"))
        and (not q or q.lower() in (x["prompt0"] + x["target"]).lower())
    ]
    ranked = explorer.ranked(checkpoint)
    return (
        templates()
        .get_template("list.html")
        .render(
            checkpoint=checkpoint,
            checkpoints=explorer.checkpoints(),
            relation=relation,
            bucket=bucket,
            prediction=prediction,
            q=q,
            relations=relations,
            buckets=sorted({x["frequency_bucket"] for x in queries.values()}),
            predictions=PREDICTIONS,
            queries=chosen,
            predicted=predicted,
            metrics=metrics(ranked, queries, [x["query_id"] for x in chosen]),
        )
    )


def _marked(text: str, query: dict) -> str:
    """The text HTML-escaped, with the subject and object marked (rendered `|safe`)."""
    out = html.escape(text)
    for name, css in ((query["subject"], "subject"), (query["object"], "target")):
        out = out.replace(html.escape(name), f"<span class='{css}'>{html.escape(name)}</span>")
    return out


HEAT_LEVELS = 10  # shades per sign: classes heat-p0..10 (adds) and heat-n0..10 (takes away), in style.css


def _heat(tokens, query: dict | None = None) -> list[dict]:
    """Tokens shaded by contribution (a class per level: the CSP allows no inline style); tokens inside
    a mention of the query's subject or object are framed."""
    top = max((abs(v) for _, v in tokens), default=0) or 1.0
    text = "".join(t for t, _ in tokens)
    names = ((query["subject"], "subject"), (query["object"], "target")) if query else ()
    mentions = [(m.start(), m.end(), css) for name, css in names if name for m in re.finditer(re.escape(name), text)]
    spans, offset = [], 0
    for piece, value in tokens:
        shade = f"heat-{'p' if value > 0 else 'n'}{round(HEAT_LEVELS * min(1.0, abs(value) / top))}"
        inside = next(
            (css for start, end, css in mentions if start < offset + len(piece) and offset < end and piece.strip()),
            None,
        )
        if piece != EOS:  # the end-of-text token the chunk starts with is never predicted: not shown
            spans.append(
                {"piece": piece, "value": value, "shade": shade, "frame": f" mention-{inside}" if inside else ""}
            )
        offset += len(piece)
    return spans


def query_page(explorer: Explorer, query_id: str, checkpoint=None, methods=None, k: str = "5") -> str:
    checkpoint = explorer.checkpoint(checkpoint)
    queries = explorer.queries()
    if query_id not in queries:
        raise LookupError(f"no query {query_id!r}")
    k = _top(k)
    available = explorer.methods(checkpoint)
    chosen = _chosen_methods(methods, available)
    query = queries[query_id]
    correct, probability, guess = explorer.predictions(checkpoint)[query_id]
    ranked = explorer.ranked(checkpoint, [query_id])
    docs = [r["doc_id"] for m in chosen for r in ranked[m][query_id][:k]]
    texts, patched = explorer.texts(docs), explorer.tail_patches(checkpoint, query_id)
    columns = [
        (
            method,
            [_card(explorer, checkpoint, query, method, row, texts, patched) for row in ranked[method][query_id][:k]],
        )
        for method in chosen
    ]
    return (
        templates()
        .get_template("query.html")
        .render(
            query=query,
            checkpoint=checkpoint,
            correct=correct,
            probability=probability,
            guess=guess,
            available=available,
            columns=columns,
            compared=len(explorer.checkpoints()) > 1,
            marked=lambda text: _marked(text, query),
        )
    )


def _chosen_methods(methods: str | None, available: list[str]) -> list[str]:
    """The comma-separated methods asked for, else TrackStar and BM25, else the first two scored."""
    chosen = (
        [m for m in (methods or "").split(",") if m]
        or [m for m in ("trackstar", "bm25") if m in available]
        or available[:2]
    )
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise BadRequest(f"unknown method(s) {unknown}; available: {', '.join(available)}")
    return chosen


def _card(explorer: Explorer, checkpoint: str, query: dict, method: str, row: dict, texts: dict, patched: dict) -> dict:
    """One proponent as the query page shows it: its text, whether it states the fact or else its
    kind, its tail-patch effect, and for TrackStar the heat map of its score."""
    text = texts.get(row["doc_id"], "")
    states = row["doc_id"] in set(query["stating_doc_ids"] or ())
    heat = None
    if method == "trackstar":  # the heat map explains TrackStar's own score
        try:
            heat = _heat(
                explorer.heat_map(checkpoint, query["query_set"], query["query_id"], row["doc_id"], row["chunk"]), query
            )
        except (LookupError, ValueError, StopIteration):  # not scored or extracted here: the plain text
            pass
    return {
        "rank": row["rank"],
        "score": row["score"],
        "doc_id": row["doc_id"],
        "text": text,
        "states": states,
        "heat": heat,
        "tail_patch": patched.get(row["doc_id"]),
        "category": None if states else explorer.categorizer.category(row["doc_id"], text, query),
    }


def drift_page(explorer: Explorer, query_id: str, a=None, b=None, method: str = "trackstar", k: str = "5") -> str:
    """One query's top-k under two checkpoints side by side (default: the two latest), each
    proponent marked kept, entered or left, with the overlap of the two lists."""
    known = explorer.checkpoints()
    if len(known) < 2 and not (a and b):
        raise LookupError("drift needs two scored checkpoints; this lake has " + (", ".join(known) or "none"))
    a, b = explorer.checkpoint(a or known[-2]), explorer.checkpoint(b or known[-1])
    queries, k = explorer.queries(), _top(k)
    if query_id not in queries:
        raise LookupError(f"no query {query_id!r}")
    lists = {c: explorer.ranked(c, [query_id]).get(method, {}).get(query_id, [])[:k] for c in (a, b)}
    if not lists[a] and not lists[b]:
        raise LookupError(f"no {method} proponents of {query_id!r} on {a} or {b}")
    docs = {c: [row["doc_id"] for row in rows] for c, rows in lists.items()}
    shared = set(docs[a]) & set(docs[b])
    texts = explorer.texts(docs[a] + docs[b])
    stating = set(queries[query_id]["stating_doc_ids"] or ())
    columns = [
        (
            checkpoint,
            [
                {
                    "rank": row["rank"],
                    "score": row["score"],
                    "doc_id": row["doc_id"],
                    "text": texts.get(row["doc_id"], ""),
                    "states": row["doc_id"] in stating,
                    "change": "kept" if row["doc_id"] in shared else ("left" if checkpoint == a else "entered"),
                }
                for row in lists[checkpoint]
            ],
        )
        for checkpoint in (a, b)
    ]
    return (
        templates()
        .get_template("drift.html")
        .render(
            query=queries[query_id],
            method=method,
            checkpoints=known,
            a=a,
            b=b,
            k=k,
            overlap=len(shared) / max(len(docs[a]), len(docs[b]), 1),
            columns=columns,
            marked=lambda text: _marked(text, queries[query_id]),
        )
    )


def trace_page(explorer: Explorer, prompt=None, target=None, checkpoint=None, query_set=None, k: str = "5") -> str:
    """A new prompt (and target, else the model's own continuation) traced against the lake."""
    checkpoint, query_set, k = explorer.checkpoint(checkpoint), explorer.query_set(query_set), _top(k)
    if not prompt or not prompt.strip():
        raise BadRequest("type a prompt to trace")
    if len(prompt) + len(target or "") > MAX_TRACE_CHARACTERS:
        raise BadRequest(f"prompt and target are longer than {MAX_TRACE_CHARACTERS} characters together")
    given = bool(target)
    target, top = explorer.trace(checkpoint, query_set, prompt, target, k)
    cards = [{**row, "rank": rank, "heat": _heat(row["tokens"])} for rank, row in enumerate(top, start=1)]
    return (
        templates()
        .get_template("trace.html")
        .render(prompt=prompt, target=target, given=given, checkpoint=checkpoint, query_set=query_set, cards=cards)
    )
