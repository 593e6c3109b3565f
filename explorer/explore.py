"""explore: a web page for looking at proponents, served straight from the lake's Delta tables.

    python -m jobs explore [--lake lake] [--host 127.0.0.1] [--port 8765] [--allowed-host NAME ...] [--openapi]

`/` lists the queries with filters (relation, frequency bucket, correct/incorrect prediction, text
search) and the metrics of every method over the filtered queries; `/query/<id>` shows the prompt
with subject and target marked, the model's prediction and probability, and the top proponents of
the chosen methods side by side, each with its score, whether it states the fact, its kind, and
its text with a per-token heat map of its TrackStar attribution. `/trace?prompt=...&target=...`
(the form on `/`) scores a new prompt against the lake as `python -m jobs trace` does, with the
model, tokenizer and preconditioner kept loaded between requests. The state (checkpoint, methods,
filters) lives in the URL. Every request reads the tables (delta-rs); nothing is copied.

Bound to 127.0.0.1 by default. On any other address an access token is required (printed at
start, or set with TRACKSTAR_EXPLORER_TOKEN) as `?token=` once, then kept in a cookie. Requests
naming another host than localhost, 127.0.0.1, [::1], the bound address or an `--allowed-host`
are refused (400), so that a web page whose name resolves to 127.0.0.1 (DNS rebinding) cannot read
the explorer. Every reply carries `X-Content-Type-Options: nosniff` and a Content-Security-Policy
that allows no script at all. No OpenAPI schema is served unless `--openapi` is given.
"""

from __future__ import annotations

import argparse
import functools
import html
import ipaddress
import os
import re
import secrets
import threading
from collections import defaultdict
from pathlib import Path
from urllib.parse import quote, urlencode

from infra.config import load_config
from infra.lake import Lake
from infra import layout
from jobs import catalog
from jobs.c4_batches import EOS

LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # as a Host header names them (any port)
PREDICTIONS = ("correct", "incorrect")
MAX_TRACE_CHARACTERS = 2000  # prompt + target of /trace: a forward and backward pass each
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    # the pages use no script at all and take their styles from /style.css
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'none'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
}
SECURITY_HEADER_LINES = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]
HOST_REFUSED = "unknown Host header: the explorer answers loopback names and those given with --allowed-host\n"


class BadRequest(ValueError):
    """A parameter the page cannot use: answered with 400 and the message."""


# ------------------------------------------------------------------ reading the lake
class Explorer:
    def __init__(self, lake_root: str):
        self.lake = Lake(lake_root)
        # one gradient computation at a time: a tracer's projector keeps per-call state in its model's hooks
        self.tracing = threading.Lock()

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

    def query_set(self, requested: str | None) -> str:
        """The query set whose preconditioner a new query is traced with (default: fact-world, or the first)."""
        known = sorted(set(self.lake.read("queries", columns=["query_set"])["query_set"].to_pylist()))
        if requested and requested not in known:
            raise BadRequest(f"unknown query set {requested!r}; registered: {', '.join(known)}")
        if not known:
            raise LookupError("no queries registered in this lake yet")
        return requested or ("fact-world" if "fact-world" in known else known[0])

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

        return Categorizer(layout.world(self.lake.root))

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
        with self.tracing:
            tracer = self.tracer(checkpoint, query_set)
            return tracer.token_contributions(tracer.stored_query_vector(query_id), doc_id, chunk)

    def warm(self):
        """Load the latest checkpoint's model, tokenizer and preconditioner before the first trace asks."""
        try:
            checkpoint, query_set = self.checkpoint(None), self.query_set(None)
            with self.tracing:
                tracer = self.tracer(checkpoint, query_set)
                tracer.projector, tracer.preconditioner
        except Exception as error:  # a lake not scored yet, say: the pages tell why when asked
            print(f"[explore] nothing loaded ahead of the first trace: {error}")

    def trace(self, checkpoint: str, query_set: str, prompt: str, target: str | None, k: int):
        """(target, [proponent rows with their token contributions]) of a new prompt, as `jobs trace`
        scores it; without a target, the model's own continuation is traced."""
        with self.tracing:
            tracer = self.tracer(checkpoint, query_set)  # kept: model, tokenizer and R^(-1/2) stay loaded
            try:
                target = target or tracer.greedy_target(prompt)
                query = tracer.query_vector(prompt, target)
            except ValueError as error:  # longer than the model reads, or nothing to trace
                raise BadRequest(str(error)) from None
            try:
                top = tracer.top_k(query, k)
            except StopIteration:  # no training vectors of this checkpoint at all
                top = []
            for row in top:
                row["tokens"] = tracer.token_contributions(query, row["doc_id"], row["chunk"])
        return target, top


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
            compared=len(explorer.checkpoints()) > 1,
            marked=lambda text: _marked(text, query),
        )
    )


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


# ------------------------------------------------------------------ the web app
def host_of(value: str) -> str | None:
    """The host a Host header (or an --allowed-host) names, lower-case and without its port:
    `LocalHost:8765` -> `localhost`, `[::1]:8765` and `::1` -> `[::1]`; None if it names none."""
    value = value.strip().lower()
    if value.count(":") > 1 and not value.startswith("["):  # a bare IPv6 address (a flag, not a header)
        value = f"[{value}]"
    match = re.fullmatch(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:[0-9]+)?", value)
    return match.group(1) if match else None


class Guard:
    """The app's outermost layer, around FastAPI's own error handling. A request naming another host
    than the allowed ones is refused before any page is read: a page on evil.example whose name
    was made to resolve to 127.0.0.1 (DNS rebinding) sends `Host: evil.example`. Every reply, the
    refusals and FastAPI's own 404 and 500 included, carries SECURITY_HEADERS."""

    def __init__(self, app, allowed_hosts):
        self.app, self.allowed_hosts = app, frozenset(allowed_hosts)

    async def __call__(self, scope, receive, send):
        from fastapi.responses import PlainTextResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_secured(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *SECURITY_HEADER_LINES]
            await send(message)

        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if host_of(host) not in self.allowed_hosts:
            return await PlainTextResponse(HOST_REFUSED, status_code=400)(scope, receive, send_secured)
        await self.app(scope, receive, send_secured)


def create_app(lake_root: str, token: str | None = None, allowed_hosts=(), openapi: bool = False, warm: bool = False):
    """The explorer as an ASGI app. It answers requests for loopback names and `allowed_hosts`
    (names or addresses, with or without a port), serves /openapi.json only if `openapi`, and with
    `warm` loads the model for /trace in the background at once (else on the first trace)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, PlainTextResponse, Response

    from jobs.checkpoints import CheckpointMismatch

    hosts = {host_of(h) for h in allowed_hosts}
    if None in hosts:
        raise ValueError(f"allowed hosts must be host names or addresses, got {list(allowed_hosts)}")
    explorer = Explorer(lake_root)
    if warm:
        threading.Thread(target=explorer.warm, daemon=True).start()
    # the interactive /docs and /redoc pages need scripts from a CDN, which the CSP forbids: never served
    app = FastAPI(
        title="TrackStar explorer", docs_url=None, redoc_url=None, openapi_url="/openapi.json" if openapi else None
    )

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

    @app.get("/query/{query_id:path}")  # `path`: an id may hold any character, `/` included
    def query(query_id: str, checkpoint: str | None = None, methods: str | None = None, k: str = "5"):
        return answer(query_page, query_id, checkpoint, methods, k)

    @app.get("/drift/{query_id:path}")
    def drift(query_id: str, a: str | None = None, b: str | None = None, method: str = "trackstar", k: str = "5"):
        return answer(drift_page, query_id, a or None, b or None, method, k)

    @app.get("/trace")
    def trace(
        prompt: str | None = None,
        target: str | None = None,
        checkpoint: str | None = None,
        query_set: str | None = None,
        k: str = "5",
    ):
        return answer(trace_page, prompt, target or None, checkpoint or None, query_set or None, k)

    @app.get("/style.css")
    def style():
        return Response(templates().get_template("style.css").render(levels=HEAT_LEVELS), media_type="text/css")

    return Guard(app, LOOPBACK_HOSTS + tuple(hosts))


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
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the explorer is reached by, besides loopback and the bound address (repeatable)",
    )
    parser.add_argument("--openapi", action="store_true", help="serve the API schema at /openapi.json")


def bound_name(host: str) -> list[str]:
    """The bound address as a name to answer to: none for 0.0.0.0 or ::, which no request names."""
    try:
        return [] if ipaddress.ip_address(host).is_unspecified else [host]
    except ValueError:  # a host name
        return [host]


def main(args):
    import uvicorn

    token = None
    if needs_token(args.host):
        token = os.environ.get("TRACKSTAR_EXPLORER_TOKEN") or secrets.token_urlsafe(16)
        print(f"[explore] bound to {args.host}: open with ?token={token}")
    hosts = bound_name(args.host) + args.allowed_host
    try:
        app = create_app(args.lake, token, hosts, args.openapi, warm=True)
    except ValueError as error:
        raise SystemExit(f"explore: {error}") from None
    print(f"[explore] http://{args.host}:{args.port}/  (lake {Lake(args.lake).root})")
    names = ", ".join(dict.fromkeys(LOOPBACK_HOSTS + tuple(hosts)))
    print(f"[explore] answers requests for {names} (--allowed-host adds a name)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
