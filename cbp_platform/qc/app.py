"""The QC review app: a reviewer walks the triage queue with the keyboard and accepts or rejects segmentations.

``cbp qc serve`` runs it (uvicorn) on the loopback interface of the secure environment. One self-contained page
(HTML, vanilla JS and CSS served by the app itself: no CDN, nothing fetched from outside), a small JSON API and
the QC images of the rows in the queue. The page's files are package data, ``cbp_platform/qc/static/``
(``index.html``, ``app.js``, ``app.css``, ``favicon.svg``), read from the package (not the working directory)
when the app is created: ``/`` is ``index.html`` with the page's configuration filled in, ``/static/<name>`` the
others, and nothing else of that folder is served. Decisions go through the review store (``store.record(...,
source="app")``), which appends to ``qc_reviews`` and reports the table to Dagster; the app keeps no state.

Privacy: QC images and the queue name pseudonyms. The app never writes a pseudonym (nor a path) to a log: run it
with uvicorn's access log off; its own log lines carry counts and decision kinds only, and an unexpected error
is logged by its type alone (its message may quote a participant). Every response says ``Cache-Control:
no-store``, so that no image lands in a browser's disk cache. With ``loopback_only`` a request whose Host header
is not a loopback name is refused (a DNS-rebinding page cannot reach the app), and a POST must be JSON from the
app's own origin (a foreign page cannot submit a decision).

Framework-free towards the platform: ``store`` is duck-typed (``queue``, ``record``; a
:class:`resources.reviews.ReviewStore`), so that this module imports neither Dagster nor the resources.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from datetime import date, datetime
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cbp_platform.qc.reviews import DECISIONS, REJECT_REASONS, ReviewError

log = logging.getLogger("cbp.qc.app")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# The store's queue statuses (resources.reviews.QUEUE_STATUSES; mirrored, as this layer may not import resources).
STATUSES = ("todo", "reviewed", "rejected", "accepted", "outdated", "all")
DEFAULT_STATUS = "todo"
FILTERS = ("batch", "site", "model", "status")
MAX_BODY = 64 * 1024
# What the page gets of a queue row (never the image's path: the page asks for /qc/<pseudonym>.png).
ITEM_COLUMNS = ("pseudonym", "batch_key", "delivery_id", "site", "model_name", "model_sha256", "label_sha256",
                "triage_score", "triage_rank", "triage_flags", "lean_ml", "imat_pct", "decision", "reason", "note",
                "reviewer", "reviewed_at", "n_reviews", "outdated")
# The page's files (package data in cbp_platform/qc/static/): the page, and what it loads by name with its type.
PAGE_FILE = "index.html"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
CONFIG_MARK = "__CONFIG__"
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _item(row: dict) -> dict:
    out = {c: _jsonable(row.get(c)) for c in ITEM_COLUMNS}
    out["outdated"] = bool(out["outdated"])
    out["n_reviews"] = int(out["n_reviews"] or 0)
    return out


def static_files() -> dict[str, str]:
    """The page's files by name, read from the package (``cbp_platform/qc/static``, wherever it is installed)."""
    folder = package_files(__package__).joinpath("static")
    files = {name: folder.joinpath(name).read_text(encoding="utf-8") for name in (PAGE_FILE, *ASSETS)}
    if files[PAGE_FILE].count(CONFIG_MARK) != 1:
        raise RuntimeError(f"static/{PAGE_FILE} must hold {CONFIG_MARK} once (the page's configuration)")
    return files


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _Guard:
    """Security headers on every response; and an unexpected error becomes a bare 500 whose traceback never
    reaches the server log (Starlette's error middleware would re-raise it to uvicorn, which logs the message,
    and a message may quote a pseudonym)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(raw=message.setdefault("headers", []))
                for k, v in SECURITY_HEADERS.items():
                    headers.setdefault(k, v)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:  # any failure: the type only goes to the log (privacy), the client gets a 500
            log.error("request failed: %s", type(exc).__name__)
            if not started:
                await _error("internal error (its type is in the server log)", 500)(scope, receive,
                                                                                     send_with_headers)


def create_app(store: Any, *, reviewer: str = "", loopback_only: bool = True) -> Starlette:
    """The review app on ``store`` (a ReviewStore). ``reviewer`` prefills the page's reviewer field;
    ``loopback_only`` refuses requests addressed to any host name but a loopback one (DNS rebinding)."""
    lock = threading.Lock()      # one warehouse access at a time (DuckDB file; Starlette runs handlers in threads)
    recorded = {"accept": 0, "reject": 0}       # this session's decisions: what the log may say about them
    reasons = [{"code": r.code, "description": r.description, "key": r.key} for r in REJECT_REASONS]
    files = static_files()       # read once: a missing or broken file fails here, not in front of a reviewer

    def filters_of(request: Request) -> dict[str, str]:
        f = {k: (request.query_params.get(k) or "").strip() for k in FILTERS}
        f["status"] = f["status"] or DEFAULT_STATUS
        return f

    def queue(f: dict[str, str]):
        with lock:
            return store.queue(batch=f["batch"] or None, site=f["site"] or None, model=f["model"] or None,
                               status=f["status"])

    def page(request: Request) -> Response:
        config = {"reviewer": reviewer, "filters": filters_of(request), "statuses": list(STATUSES),
                  "reasons": reasons, "decisions": list(DECISIONS)}
        # embedded as a JSON data block (not executed, so the CSP holds); escaped so that no value closes the tag
        blob = json.dumps(config).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        return HTMLResponse(files[PAGE_FILE].replace(CONFIG_MARK, blob))

    def api_queue(request: Request) -> Response:
        f = filters_of(request)
        try:
            q = queue(f)
            every = queue({"batch": "", "site": "", "model": "", "status": "all"})
        except ReviewError as exc:
            return _error(str(exc), 400)
        items = [_item(r) for r in q.iter_rows(named=True)] if q.height else []

        def distinct(col: str) -> list[str]:
            if not every.height or col not in every.columns:
                return []
            return sorted({str(v) for v in every[col].to_list() if v is not None})

        log.debug("queue served: %d item(s)", len(items))
        return JSONResponse({"items": items, "filters": f, "total": every.height,
                             "options": {"batch": distinct("batch_key"), "site": distinct("site"),
                                         "model": distinct("model_name"), "status": list(STATUSES)}})

    async def api_review(request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":     # a cross-site form or text/plain POST is refused (no CORS preflight)
            return _error("send the decision as application/json", 415)
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower():
            return _error("a decision is only accepted from the review page itself", 403)
        body = await request.body()
        if len(body) > MAX_BODY:
            return _error("request too large", 413)
        try:
            data = json.loads(body)
        except ValueError:
            return _error("the body is not JSON", 400)
        if not isinstance(data, dict):
            return _error("the body must be a JSON object", 400)
        fields = {k: data.get(k) for k in ("pseudonym", "decision", "reason", "note", "reviewer", "label_sha256")}
        bad = [k for k, v in fields.items() if v is not None and not isinstance(v, str)]
        if bad:
            return _error(f"{', '.join(bad)}: must be text", 400)
        if not fields["pseudonym"]:
            return _error("which participant? (pseudonym missing)", 400)

        def record() -> dict:
            with lock:
                return store.record(fields["pseudonym"], fields["decision"] or "", reviewer=fields["reviewer"] or "",
                                    reason=fields["reason"] or None, note=fields["note"] or "", source="app",
                                    label_sha256=fields["label_sha256"] or None)

        try:
            row = await run_in_threadpool(record)
        except ReviewError as exc:
            log.info("decision refused")
            return _error(str(exc), 400)
        with lock:
            recorded[row["decision"]] = recorded.get(row["decision"], 0) + 1
            counts = ", ".join(f"{n} {k}" for k, n in recorded.items())
        log.info("decision recorded: %s (this session: %s)", row["decision"], counts)
        return JSONResponse({"review": {k: _jsonable(v) for k, v in row.items()}})

    def image(request: Request) -> Response:
        pid = request.path_params["pid"]
        q = queue({"batch": "", "site": "", "model": "", "status": "all"})
        # the path comes from the warehouse row of that participant, never from the request
        hits = [r for r in q.iter_rows(named=True) if r.get("pseudonym") == pid] if q.height else []
        raw = hits[0].get("qc_image") if len(hits) == 1 else None
        path = Path(raw) if raw else None
        if path is None or path.suffix.lower() != ".png" or not path.is_file():
            return _error("no QC image for that participant in the queue", 404)
        return FileResponse(path, media_type="image/png")

    def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:          # a fixed list: no other file of the folder, no path from the request
            return _error("not found", 404)
        return Response(files[name], media_type=ASSETS[name])

    routes = [
        Route("/", page),
        Route("/api/queue", api_queue),
        Route("/api/review", api_review, methods=["POST"]),
        Route("/qc/{pid}.png", image),
        Route("/static/{name}", static),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_HOSTS))] if loopback_only else []
    middleware.append(Middleware(_Guard))
    return Starlette(routes=routes, middleware=middleware)

