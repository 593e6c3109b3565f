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

This module is the app (routes, guards, the command); the pages are in explorer/pages.py, what they
read from the lake in explorer/data.py.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import secrets
import threading
from dataclasses import dataclass

from explorer.data import BadRequest, Explorer
from explorer.pages import HEAT_LEVELS, drift_page, list_page, query_page, templates, trace_page
from infra.cli import add_config_arguments, config_from_args, option
from infra.config import from_settings
from infra.lake import Lake

LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # as a Host header names them (any port)
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
    from fastapi import FastAPI

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
    app.middleware("http")(token_check(token))
    add_routes(app, explorer)
    return Guard(app, LOOPBACK_HOSTS + tuple(hosts))


def token_check(token: str | None):
    """The middleware that lets a request through only with the access token (as `?token=` or the
    cookie it sets), when there is one."""
    from fastapi import Request
    from fastapi.responses import PlainTextResponse

    async def require_token(request: Request, call_next):
        given = request.query_params.get("token") or request.cookies.get("trackstar_token") or ""
        if token and not secrets.compare_digest(given.encode(), token.encode()):  # str: ASCII only, else TypeError
            return PlainTextResponse("an access token is required (?token=...)", status_code=401)
        response = await call_next(request)
        if token:
            response.set_cookie("trackstar_token", token, httponly=True, samesite="strict")
        return response

    return require_token


def answer(explorer: Explorer, render, *args, **kwargs):
    """A page as HTML, or what keeps it from being shown as plain text with its status code."""
    from fastapi.responses import HTMLResponse, PlainTextResponse

    from jobs.checkpoints import CheckpointMismatch

    try:
        return HTMLResponse(render(explorer, *args, **kwargs))
    except BadRequest as error:
        return PlainTextResponse(str(error), status_code=400)
    except CheckpointMismatch as error:  # the lake's vectors belong to other weights than the folder's
        return PlainTextResponse(str(error), status_code=409)
    except LookupError as error:
        return PlainTextResponse(str(error), status_code=404)


def add_routes(app, explorer: Explorer) -> None:
    """The pages' URLs; an empty parameter counts as none given."""
    from fastapi.responses import Response

    @app.get("/")
    def index(
        checkpoint: str | None = None,
        relation: str | None = None,
        bucket: str | None = None,
        prediction: str | None = None,
        q: str | None = None,
    ):
        return answer(explorer, list_page, checkpoint, relation or None, bucket or None, prediction or None, q or None)

    @app.get("/query/{query_id:path}")  # `path`: an id may hold any character, `/` included
    def query(query_id: str, checkpoint: str | None = None, methods: str | None = None, k: str = "5"):
        return answer(explorer, query_page, query_id, checkpoint, methods, k)

    @app.get("/drift/{query_id:path}")
    def drift(query_id: str, a: str | None = None, b: str | None = None, method: str = "trackstar", k: str = "5"):
        return answer(explorer, drift_page, query_id, a or None, b or None, method, k)

    @app.get("/trace")
    def trace(
        prompt: str | None = None,
        target: str | None = None,
        checkpoint: str | None = None,
        query_set: str | None = None,
        k: str = "5",
    ):
        return answer(explorer, trace_page, prompt, target or None, checkpoint or None, query_set or None, k)

    @app.get("/style.css")
    def style():
        return Response(templates().get_template("style.css").render(levels=HEAT_LEVELS), media_type="text/css")


def needs_token(host: str) -> bool:
    if host in LOOPBACK:
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


@dataclass
class ExploreConfig:
    lake: str = from_settings("lake_root", help="lake root: a folder or s3://bucket/prefix")
    host: str = option("127.0.0.1", help="bind address (a token is required off loopback)")
    port: int = option(8765)
    allowed_host: list[str] = option(
        factory=list,
        action="append",
        help="a host name the explorer is reached by, besides loopback and the bound address (repeatable)",
    )
    openapi: bool = option(False, help="serve the API schema at /openapi.json")


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, ExploreConfig)


def bound_name(host: str) -> list[str]:
    """The bound address as a name to answer to: none for 0.0.0.0 or ::, which no request names."""
    try:
        return [] if ipaddress.ip_address(host).is_unspecified else [host]
    except ValueError:  # a host name
        return [host]


def main(args):
    import uvicorn

    args = config_from_args(ExploreConfig, args)
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
