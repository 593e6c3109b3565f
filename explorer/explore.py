"""explore: a web page for looking at proponents, served straight from the lake's Delta tables.

    python -m jobs explore [--lake lake] [--host 127.0.0.1] [--port 8765]

`/` lists the queries with filters (relation, frequency bucket, correct/incorrect prediction, text
search) and the metrics of every method over the filtered queries; `/query/<id>` shows the prompt
with subject and target marked, the model's prediction and probability, and the top proponents of
the chosen methods side by side, each with its score, whether it states the fact, its kind, and
its text with a per-token heat map of its TrackStar attribution. The state (checkpoint, methods,
filters) lives in the URL. Every request reads the tables (delta-rs); nothing is copied.

Bound to 127.0.0.1 by default. On any other address an access token is required (printed at
start, or set with TRACKSTAR_EXPLORER_TOKEN) as `?token=` once, then kept in a cookie.
"""

from __future__ import annotations

import argparse
import functools
import html
import ipaddress
import os
import re
import secrets
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlencode

from infra import storage
from infra.config import load_config
from infra.lake import Lake
from jobs import catalog
from jobs.tokenize import EOS

LOOPBACK = ("127.0.0.1", "localhost", "::1")
PREDICTIONS = ("correct", "incorrect")


class BadRequest(ValueError):
    """A parameter the page cannot use: answered with 400 and the message."""


# ------------------------------------------------------------------ reading the lake
class Explorer:
    def __init__(self, lake_root: str):
        self.lake = Lake(lake_root)

    def checkpoints(self) -> list[str]:
        """The scored checkpoints, lowest step first (the last one is the latest: `jobs.catalog`)."""
        scored = set(self.lake.read("proponents", columns=["checkpoint_id"])["checkpoint_id"].to_pylist())
        return [c for c in catalog.checkpoint_ids_by_step(self.lake) if c in scored]

    def checkpoint(self, requested: str | None) -> str:
        known = self.checkpoints()
        if not known:
            raise LookupError("no proponents in this lake yet: run `make run` (or the score job) first")
        if requested and requested not in known:
            raise BadRequest(f"unknown checkpoint {requested!r}; indexed: {', '.join(known)}")
        return requested or known[-1]

    def methods(self, checkpoint: str) -> list[str]:
        rows = self.lake.read("proponents", filters=[("checkpoint_id", "=", checkpoint)], columns=["method"])
        return sorted(set(rows["method"].to_pylist()))

    def queries(self) -> dict:
        return {q["query_id"]: q for q in self.lake.read("queries").to_pylist()}

    def ranked(self, checkpoint: str, query_ids=None) -> dict:
        """method -> query -> [proponent rows by rank]."""
        filters = [("checkpoint_id", "=", checkpoint)]
        if query_ids is not None:
            filters.append(("query_id", "in", sorted(query_ids)))
        out = defaultdict(lambda: defaultdict(list))
        for row in sorted(self.lake.read("proponents", filters=filters).to_pylist(), key=lambda r: r["rank"]):
            out[row["method"]][row["query_id"]].append(row)
        return out

    def tail_patches(self, checkpoint: str, query_id: str) -> dict:
        """doc_id -> measured Δ log p(target) of one step on it (evaluation sample only)."""
        rows = self.lake.read(
            "tail_patches",
            filters=[("checkpoint_id", "=", checkpoint), ("query_id", "=", query_id)],
            columns=["doc_id", "delta_log_prob"],
        )
        return dict(zip(rows["doc_id"].to_pylist(), rows["delta_log_prob"].to_pylist()))

    @functools.cached_property
    def categorizer(self):
        from evaluation.evaluate import Categorizer

        return Categorizer(storage.join(self.lake.root, "world"))

    def texts(self, doc_ids) -> dict:
        rows = self.lake.read("documents", filters=[("doc_id", "in", sorted(set(doc_ids)))], columns=["doc_id", "text"])
        return dict(zip(rows["doc_id"].to_pylist(), rows["text"].to_pylist()))

    @functools.lru_cache(maxsize=4)
    def predictions(self, checkpoint: str) -> dict:
        """query -> (correct, probability of the target, predicted text) under greedy decoding of prompt0."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evaluation.answers import greedy_answers
        from jobs.catalog import checkpoint_folder

        directory = checkpoint_folder(self.lake, checkpoint)
        model, tokenizer = (
            AutoModelForCausalLM.from_pretrained(directory).eval(),
            AutoTokenizer.from_pretrained(directory),
        )
        queries = sorted(self.queries().values(), key=lambda q: q["query_id"])
        answers = greedy_answers(model, tokenizer, [(q["prompt0"], q["target"]) for q in queries])
        return {q["query_id"]: tuple(answer) for q, answer in zip(queries, answers)}

    @functools.lru_cache(maxsize=4)
    def tracer(self, checkpoint: str, query_set: str):
        from explorer.trace import TraceContext

        return TraceContext(self.lake, checkpoint, query_set)

    @functools.lru_cache(maxsize=256)
    def heat_map(self, checkpoint: str, query_set: str, query_id: str, doc_id: str, chunk: int):
        """[(token text, contribution)] of one proponent chunk to its TrackStar score."""
        tracer = self.tracer(checkpoint, query_set)
        return tracer.token_contributions(tracer.stored_query_vector(query_id), doc_id, chunk)


# ------------------------------------------------------------------ metrics
def metrics(ranked: dict, queries: dict, query_ids) -> dict:
    """method -> (MRR, recall@10, n) over the given queries that have stating documents and proponents,
    computed as the evaluation computes them (`evaluation.evaluate.attribution_metrics`)."""
    from evaluation.evaluate import attribution_metrics

    truth = {q: set(queries[q]["stating_doc_ids"] or ()) for q in query_ids}
    docs = {
        method: {q: [r["doc_id"] for r in per_query[q]] for q in query_ids if truth[q] and per_query.get(q)}
        for method, per_query in sorted(ranked.items())
    }
    docs = {method: per_query for method, per_query in docs.items() if per_query}
    k = max((len(d) for per_query in docs.values() for d in per_query.values()), default=1)
    buckets = {q: queries[q]["frequency_bucket"] for q in query_ids}
    return {
        method: (cells["all"]["mrr"], cells["all"]["recall@10"], cells["all"]["n"])
        for method, cells in attribution_metrics(docs, truth, buckets, k).items()
    }


# ------------------------------------------------------------------ pages
def link(path: str, **params) -> str:
    clean = {k: v for k, v in params.items() if v not in (None, "", [])}
    return path + ("?" + urlencode(clean) if clean else "")


@functools.cache
def templates():
    """The pages' Jinja2 templates (explorer/templates/), every value HTML-escaped unless marked safe."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape())
    env.globals["link"] = link
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


def _heat(tokens, query: dict) -> list[dict]:
    """Tokens coloured by contribution; tokens inside a mention of the subject or object are framed."""
    top = max((abs(v) for _, v in tokens), default=0) or 1.0
    text = "".join(t for t, _ in tokens)
    mentions = [
        (m.start(), m.end(), css)
        for name, css in ((query["subject"], "subject"), (query["object"], "target"))
        for m in re.finditer(re.escape(name), text)
    ]
    spans, offset = [], 0
    for piece, value in tokens:
        alpha = min(1.0, abs(value) / top)
        colour = f"rgba(220,60,40,{alpha:.2f})" if value > 0 else f"rgba(40,90,220,{alpha:.2f})"
        inside = next(
            (css for start, end, css in mentions if start < offset + len(piece) and offset < end and piece.strip()),
            None,
        )
        if piece != EOS:  # the end-of-text token the chunk starts with is never predicted: not shown
            spans.append(
                {"piece": piece, "value": value, "colour": colour, "frame": f" mention-{inside}" if inside else ""}
            )
        offset += len(piece)
    return spans


def query_page(explorer: Explorer, query_id: str, checkpoint=None, methods=None, k: str = "5") -> str:
    checkpoint = explorer.checkpoint(checkpoint)
    queries = explorer.queries()
    if query_id not in queries:
        raise LookupError(f"no query {query_id!r}")
    try:
        k = int(k)
        if not 1 <= k <= 50:
            raise ValueError
    except ValueError:
        raise BadRequest(f"k must be a whole number from 1 to 50, got {k!r}") from None
    available = explorer.methods(checkpoint)
    chosen = (
        [m for m in (methods or "").split(",") if m]
        or [m for m in ("trackstar", "bm25") if m in available]
        or available[:2]
    )
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise BadRequest(f"unknown method(s) {unknown}; available: {', '.join(available)}")
    query = queries[query_id]
    correct, probability, guess = explorer.predictions(checkpoint)[query_id]
    ranked = explorer.ranked(checkpoint, [query_id])
    docs = [r["doc_id"] for m in chosen for r in ranked[m][query_id][:k]]
    texts, patched = explorer.texts(docs), explorer.tail_patches(checkpoint, query_id)
    columns = []
    for method in chosen:
        cards = []
        for row in ranked[method][query_id][:k]:
            text = texts.get(row["doc_id"], "")
            states = row["doc_id"] in set(query["stating_doc_ids"] or ())
            heat = None
            if method == "trackstar":  # the heat map explains TrackStar's own score
                try:
                    heat = _heat(
                        explorer.heat_map(checkpoint, query["query_set"], query_id, row["doc_id"], row["chunk"]), query
                    )
                except (LookupError, ValueError, StopIteration):  # not scored or extracted here: the plain text
                    pass
            cards.append(
                {
                    "rank": row["rank"],
                    "score": row["score"],
                    "doc_id": row["doc_id"],
                    "text": text,
                    "states": states,
                    "heat": heat,
                    "tail_patch": patched.get(row["doc_id"]),
                    "category": None if states else explorer.categorizer.category(row["doc_id"], text, query),
                }
            )
        columns.append((method, cards))
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
            marked=lambda text: _marked(text, query),
        )
    )


# ------------------------------------------------------------------ the web app
def create_app(lake_root: str, token: str | None = None):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, PlainTextResponse

    from jobs.extract import CheckpointMismatch

    explorer, app = Explorer(lake_root), FastAPI(title="TrackStar explorer", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        given = request.query_params.get("token") or request.cookies.get("trackstar_token") or ""
        if token and not secrets.compare_digest(given.encode(), token.encode()):  # str: ASCII only, else TypeError
            return PlainTextResponse("an access token is required (?token=...)", status_code=401)
        response = await call_next(request)
        if token:
            response.set_cookie("trackstar_token", token, httponly=True, samesite="strict")
        return response

    def answer(render, *args, **kwargs):
        try:
            return HTMLResponse(render(explorer, *args, **kwargs))
        except BadRequest as error:
            return PlainTextResponse(str(error), status_code=400)
        except CheckpointMismatch as error:  # the lake's vectors belong to other weights than the folder's
            return PlainTextResponse(str(error), status_code=409)
        except LookupError as error:
            return PlainTextResponse(str(error), status_code=404)

    @app.get("/")
    def index(
        checkpoint: str | None = None,
        relation: str | None = None,
        bucket: str | None = None,
        prediction: str | None = None,
        q: str | None = None,
    ):
        return answer(list_page, checkpoint, relation or None, bucket or None, prediction or None, q or None)

    @app.get("/query/{query_id}")
    def query(query_id: str, checkpoint: str | None = None, methods: str | None = None, k: str = "5"):
        return answer(query_page, query_id, checkpoint, methods, k)

    return app


def needs_token(host: str) -> bool:
    if host in LOOPBACK:
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--lake", default=load_config().lake_root)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (a token is required off loopback)")
    parser.add_argument("--port", type=int, default=8765)


def main(args):
    import uvicorn

    token = None
    if needs_token(args.host):
        token = os.environ.get("TRACKSTAR_EXPLORER_TOKEN") or secrets.token_urlsafe(16)
        print(f"[explore] bound to {args.host}: open with ?token={token}")
    print(f"[explore] http://{args.host}:{args.port}/  (lake {Lake(args.lake).root})")
    uvicorn.run(create_app(args.lake, token), host=args.host, port=args.port, log_level="warning")
