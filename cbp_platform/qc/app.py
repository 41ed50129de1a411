"""The QC review app: a reviewer walks the triage queue with the keyboard and accepts or rejects segmentations.

``cbp qc serve`` runs it (uvicorn) on the loopback interface of the secure environment. One self-contained page
(HTML, vanilla JS and CSS served by the app itself: no CDN, nothing fetched from outside), a small JSON API and
the QC images of the rows in the queue. Decisions go through the review store (``store.record(...,
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
        return HTMLResponse(PAGE.replace("__CONFIG__", blob))

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

    def static(content: str, media_type: str):
        def endpoint(request: Request) -> Response:
            return Response(content, media_type=media_type)
        return endpoint

    routes = [
        Route("/", page),
        Route("/api/queue", api_queue),
        Route("/api/review", api_review, methods=["POST"]),
        Route("/qc/{pid}.png", image),
        Route("/static/app.js", static(SCRIPT, "text/javascript; charset=utf-8")),
        Route("/static/app.css", static(STYLE, "text/css; charset=utf-8")),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_HOSTS))] if loopback_only else []
    middleware.append(Middleware(_Guard))
    return Starlette(routes=routes, middleware=middleware)


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cbp: segmentation QC review</title>
<link rel="stylesheet" href="/static/app.css">
<script type="application/json" id="cbp-config">__CONFIG__</script>
<script src="/static/app.js" defer></script>
</head>
<body>
<header>
  <h1>Segmentation QC review</h1>
  <label class="reviewer">Reviewer <input id="reviewer" autocomplete="off" placeholder="your name" size="18"></label>
  <div id="message" role="status" aria-live="polite"></div>
</header>
<main>
  <section id="left">
    <form id="filters" method="get" action="/">
      <label>batch <select name="batch" id="f-batch"><option value="">all</option></select></label>
      <label>site <select name="site" id="f-site"><option value="">all</option></select></label>
      <label>model <select name="model" id="f-model"><option value="">all</option></select></label>
      <label>status <select name="status" id="f-status"></select></label>
    </form>
    <p id="count">loading the queue ...</p>
    <div id="queue-wrap">
      <table id="queue">
        <thead><tr><th>rank</th><th>pseudonym</th><th>batch</th><th>site</th><th>score</th><th>flags</th>
        <th>decision</th></tr></thead>
        <tbody id="queue-body"></tbody>
      </table>
    </div>
  </section>
  <section id="detail">
    <h2 id="d-title">no participant selected</h2>
    <div id="d-image-wrap"><img id="d-image" alt="QC image of the selected participant" hidden></div>
    <dl id="d-facts"></dl>
    <label class="note">Note, sent with the next decision (n; Enter returns to the keys)
      <input id="note" autocomplete="off" maxlength="500"></label>
    <div id="actions">
      <button type="button" id="b-accept">Accept <kbd>a</kbd></button>
      <button type="button" id="b-reject">Reject ... <kbd>r</kbd></button>
    </div>
    <div id="reject-panel" hidden>
      <p><strong>Reject: pick the reason</strong> (its key; <kbd>Esc</kbd> cancels)</p>
      <ul id="reasons"></ul>
    </div>
  </section>
  <aside id="help">
    <h2>Keys</h2>
    <dl>
      <dt><kbd>j</kbd> <kbd>&darr;</kbd></dt><dd>next in the queue</dd>
      <dt><kbd>k</kbd> <kbd>&uarr;</kbd></dt><dd>previous</dd>
      <dt><kbd>a</kbd></dt><dd>accept, then next</dd>
      <dt><kbd>r</kbd></dt><dd>reject: then the reason's key</dd>
      <dt><kbd>Esc</kbd></dt><dd>cancel the rejection</dd>
      <dt><kbd>n</kbd></dt><dd>write a note</dd>
      <dt><kbd>?</kbd></dt><dd>hide / show this help</dd>
    </dl>
    <h3>Reject reasons</h3>
    <dl id="help-reasons"></dl>
    <p class="small">The queue is in triage order: the riskiest first. A decision applies to the label map shown;
      a new map of the participant returns to the queue and the older review shows as outdated.</p>
  </aside>
</main>
</body>
</html>
"""

STYLE = """
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2430;
       background: #f4f6f9; }
header { display: flex; align-items: center; gap: 1.5rem; padding: .6rem 1rem; background: #1f3a5f; color: #fff; }
header h1 { font-size: 1.15rem; margin: 0; }
header input { font: inherit; padding: .2rem .4rem; border-radius: 3px; border: 1px solid #9bb; }
#message { flex: 1; min-height: 1.4em; padding: .2rem .6rem; border-radius: 3px; }
#message.ok { background: #d8f0dc; color: #14461e; }
#message.error { background: #fbd9d6; color: #7a140c; font-weight: 600; }
#message.info { background: #e3ebf5; color: #1f3a5f; }
main { display: grid; grid-template-columns: minmax(420px, 1.1fr) minmax(420px, 1.3fr) 250px; gap: 1rem;
       padding: 1rem; align-items: start; }
section, aside { background: #fff; border: 1px solid #d5dbe3; border-radius: 5px; padding: .8rem; }
#filters { display: flex; flex-wrap: wrap; gap: .6rem; margin-bottom: .4rem; }
#filters select { font: inherit; }
#count { margin: .3rem 0; color: #556; }
#queue-wrap { max-height: 75vh; overflow-y: auto; }
#queue { border-collapse: collapse; width: 100%; font-size: 13px; }
#queue th { position: sticky; top: 0; background: #eef1f5; text-align: left; padding: .25rem .4rem; }
#queue td { padding: .25rem .4rem; border-top: 1px solid #e6e9ee; vertical-align: top; }
#queue td:nth-child(2) { font-family: ui-monospace, monospace; }
#queue td:nth-child(6) { color: #6a4b00; max-width: 16rem; }
#queue tr { cursor: pointer; }
#queue tr.selected td { background: #ffe9a8; }
#queue tr.accept td:last-child { color: #14611e; font-weight: 600; }
#queue tr.reject td:last-child { color: #a3160b; font-weight: 600; }
#detail h2 { margin: 0 0 .5rem; font-size: 1.05rem; font-family: ui-monospace, monospace; }
#d-image-wrap { background: #111; border-radius: 4px; min-height: 120px; display: flex; justify-content: center; }
#d-image { width: 100%; max-height: 60vh; object-fit: contain; image-rendering: pixelated; }
#d-facts { display: grid; grid-template-columns: max-content 1fr; gap: .15rem .8rem; margin: .7rem 0; }
#d-facts dt { color: #556; }
#d-facts dd { margin: 0; }
.badge { display: inline-block; padding: 0 .4rem; border-radius: 3px; font-weight: 600; }
.badge.accept { background: #d8f0dc; color: #14461e; }
.badge.reject { background: #fbd9d6; color: #7a140c; }
.badge.outdated { background: #fff0c2; color: #6a4b00; }
.note { display: block; margin: .5rem 0; color: #556; }
.note input { display: block; width: 100%; font: inherit; padding: .25rem .4rem; margin-top: .2rem; }
#actions { display: flex; gap: .6rem; }
#actions button { font: inherit; padding: .35rem .9rem; border-radius: 4px; border: 1px solid #889; cursor: pointer; }
#b-accept { background: #e3f4e6; }
#b-reject { background: #fbe4e1; }
#reject-panel { margin-top: .7rem; border: 2px solid #a3160b; border-radius: 5px; padding: .5rem .8rem;
                background: #fff7f6; }
#reasons { list-style: none; padding: 0; margin: 0; }
#reasons li { padding: .15rem 0; cursor: pointer; }
kbd { display: inline-block; min-width: 1.3em; padding: 0 .3em; border: 1px solid #99a; border-bottom-width: 2px;
      border-radius: 3px; background: #f7f8fa; font: 12px ui-monospace, monospace; text-align: center; color: #223; }
#help dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem .6rem; }
#help dd { margin: 0; }
#help h2, #help h3 { margin: .2rem 0 .4rem; font-size: 1rem; }
#help.hidden dl, #help.hidden h3, #help.hidden p { display: none; }
.small { font-size: 12px; color: #556; }
"""

SCRIPT = r"""
"use strict";
(function () {
  const cfg = JSON.parse(document.getElementById("cbp-config").textContent);
  const $ = (id) => document.getElementById(id);
  const REVIEWER_KEY = "cbp-qc-reviewer";
  let items = [];
  let sel = 0;
  let rejecting = false;
  let busy = false;

  function msg(text, kind) {
    const m = $("message");
    m.textContent = text;
    m.className = kind || "info";
  }

  function show(v, digits) {
    if (v === null || v === undefined || v === "") return "\u2013";
    if (typeof v === "number" && digits !== undefined) return v.toFixed(digits);
    return String(v);
  }

  function when(iso) {
    return iso ? iso.replace("T", " ").slice(0, 16) + " UTC" : "";
  }

  function decisionText(it) {
    if (!it.decision) return "not reviewed";
    const what = it.decision === "reject" ? "rejected (" + it.reason + ")" : "accepted";
    return what + " by " + it.reviewer + (it.reviewed_at ? ", " + when(it.reviewed_at) : "");
  }

  function shortDecision(it) {
    let t = it.decision ? (it.decision === "reject" ? "reject: " + it.reason : "accept") : "";
    if (it.outdated) t += (t ? " " : "") + "(outdated)";
    return t;
  }

  function cell(tr, text) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.appendChild(td);
  }

  function renderQueue() {
    const body = $("queue-body");
    body.replaceChildren();
    items.forEach((it, i) => {
      const tr = document.createElement("tr");
      tr.dataset.pseudonym = it.pseudonym;
      tr.dataset.batch = it.batch_key;
      tr.dataset.score = String(it.triage_score);
      if (it.decision) tr.classList.add(it.decision);
      cell(tr, show(it.triage_rank));
      cell(tr, it.pseudonym);
      cell(tr, show(it.batch_key));
      cell(tr, show(it.site));
      cell(tr, show(it.triage_score, 2));
      cell(tr, show(it.triage_flags));
      cell(tr, shortDecision(it));
      tr.addEventListener("click", () => select(i));
      body.appendChild(tr);
    });
    const n = items.length;
    const status = " in this queue (" + cfg.filters.status + ")";
    $("count").textContent = n ? n + " participant" + (n === 1 ? "" : "s") + status : "nothing" + status;
  }

  function fact(dl, label, value, cls) {
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    if (cls) {
      const span = document.createElement("span");
      span.className = "badge " + cls;
      span.textContent = value;
      dd.appendChild(span);
    } else {
      dd.textContent = value;
    }
    dd.dataset.field = label;
    dl.append(dt, dd);
  }

  function renderDetail() {
    const it = items[sel];
    const img = $("d-image");
    const dl = $("d-facts");
    dl.replaceChildren();
    if (!it) {
      $("d-title").textContent = "no participant selected";
      img.hidden = true;
      img.removeAttribute("src");
      return;
    }
    $("d-title").textContent = it.pseudonym + "  (" + (sel + 1) + " of " + items.length + ")";
    img.hidden = false;
    img.src = "/qc/" + encodeURIComponent(it.pseudonym) + ".png";
    fact(dl, "triage score", show(it.triage_score, 2));
    fact(dl, "triage rank", show(it.triage_rank) + " in batch " + show(it.batch_key));
    fact(dl, "flags", show(it.triage_flags));
    fact(dl, "lean muscle", show(it.lean_ml, 1) + " ml");
    fact(dl, "IMAT", show(it.imat_pct, 2) + " %");
    fact(dl, "model", show(it.model_name) + " (" + show(it.model_sha256 ? it.model_sha256.slice(0, 12) : null) + ")");
    fact(dl, "site / delivery", show(it.site) + " / " + show(it.delivery_id));
    fact(dl, "decision", decisionText(it), it.decision || null);
    if (it.decision && it.note) fact(dl, "note", it.note);
    if (it.outdated) fact(dl, "outdated", "an earlier review was of a replaced label map: not applied", "outdated");
  }

  function select(i) {
    if (!items.length) { sel = 0; renderDetail(); return; }
    sel = Math.max(0, Math.min(items.length - 1, i));
    const rows = $("queue-body").children;
    for (let k = 0; k < rows.length; k++) rows[k].classList.toggle("selected", k === sel);
    if (rows[sel]) rows[sel].scrollIntoView({block: "nearest"});
    renderDetail();
  }

  function reviewerName() {
    const name = $("reviewer").value.trim();
    if (!name) {
      msg("Enter your name in the reviewer field first: every decision names its reviewer.", "error");
      $("reviewer").focus();
    }
    return name;
  }

  function openReject() {
    if (!items[sel] || !reviewerName()) return;
    rejecting = true;
    $("reject-panel").hidden = false;
    msg("Reject " + items[sel].pseudonym + ": press the reason's key (Esc cancels).", "info");
  }

  function closeReject() {
    rejecting = false;
    $("reject-panel").hidden = true;
  }

  async function decide(decision, reason) {
    const it = items[sel];
    if (!it || busy) return;
    const reviewer = reviewerName();
    if (!reviewer) return;
    busy = true;
    try {
      const r = await fetch("/api/review", {
        method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({pseudonym: it.pseudonym, decision: decision, reason: reason || null,
                              note: $("note").value, reviewer: reviewer, label_sha256: it.label_sha256})});
      const body = await r.json().catch(() => ({}));
      if (!r.ok) {
        msg("Not recorded: " + (body.error || ("HTTP " + r.status)), "error");
        return;
      }
      const rev = body.review;
      Object.assign(it, {decision: rev.decision, reason: rev.reason, note: rev.note, reviewer: rev.reviewer,
                         reviewed_at: rev.reviewed_at, outdated: false, n_reviews: (it.n_reviews || 0) + 1});
      try { localStorage.setItem(REVIEWER_KEY, reviewer); } catch (e) { /* storage disabled: fine */ }
      $("note").value = "";
      const last = sel + 1 >= items.length;
      renderQueue();
      select(last ? sel : sel + 1);
      msg(it.pseudonym + ": " + decisionText(it) + (last ? ". End of the queue." : ""), "ok");
    } catch (e) {
      msg("Not recorded: the review app did not answer (" + e + ")", "error");
    } finally {
      busy = false;
    }
  }

  function fillSelect(id, values, current, withAll) {
    const s = $(id);
    s.replaceChildren();
    if (withAll) s.appendChild(new Option("all", ""));
    values.forEach((v) => s.appendChild(new Option(v, v)));
    if (current && !values.includes(current)) s.appendChild(new Option(current, current));
    s.value = current || "";
  }

  function applyFilters() {
    const p = new URLSearchParams();
    for (const k of ["batch", "site", "model", "status"]) {
      const v = $("f-" + k).value;
      if (v) p.set(k, v);
    }
    location.assign("/" + (p.toString() ? "?" + p.toString() : ""));
  }

  function setupStatic() {
    const saved = (() => { try { return localStorage.getItem(REVIEWER_KEY) || ""; } catch (e) { return ""; } })();
    $("reviewer").value = cfg.reviewer || saved;
    $("reviewer").addEventListener("change", () => {
      try { localStorage.setItem(REVIEWER_KEY, $("reviewer").value.trim()); } catch (e) { /* disabled */ }
    });
    const ul = $("reasons");
    const hl = $("help-reasons");
    cfg.reasons.forEach((r) => {
      const li = document.createElement("li");
      const k = document.createElement("kbd");
      k.textContent = r.key;
      li.append(k, " " + r.code + ": " + r.description);
      li.dataset.reason = r.code;
      li.addEventListener("click", () => { closeReject(); decide("reject", r.code); });
      ul.appendChild(li);
      const dt = document.createElement("dt");
      const k2 = document.createElement("kbd");
      k2.textContent = r.key;
      dt.appendChild(k2);
      const dd = document.createElement("dd");
      dd.textContent = r.code;
      dd.title = r.description;
      hl.append(dt, dd);
    });
    $("b-accept").addEventListener("click", () => decide("accept"));
    $("b-reject").addEventListener("click", () => openReject());
    fillSelect("f-status", cfg.statuses, cfg.filters.status, false);
    for (const k of ["batch", "site", "model", "status"]) $("f-" + k).addEventListener("change", applyFilters);
  }

  document.addEventListener("keydown", (e) => {
    const t = e.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA")) {
      if (e.key === "Escape" || (e.key === "Enter" && t.tagName === "INPUT")) { t.blur(); e.preventDefault(); }
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (rejecting) {
      const reason = cfg.reasons.find((r) => r.key === e.key);
      if (reason) {
        closeReject();
        decide("reject", reason.code);
      } else if (e.key === "Escape") {
        closeReject();
        msg("Rejection cancelled.", "info");
      } else {
        return;
      }
      e.preventDefault();
      return;
    }
    switch (e.key) {
      case "j": case "ArrowDown": select(sel + 1); break;
      case "k": case "ArrowUp": select(sel - 1); break;
      case "a": decide("accept"); break;
      case "r": openReject(); break;
      case "n": if (items[sel]) $("note").focus(); break;
      case "?": $("help").classList.toggle("hidden"); break;
      default: return;
    }
    e.preventDefault();
  });

  async function load() {
    const p = new URLSearchParams();
    for (const k of ["batch", "site", "model", "status"]) if (cfg.filters[k]) p.set(k, cfg.filters[k]);
    try {
      const r = await fetch("/api/queue?" + p.toString());
      const body = await r.json().catch(() => ({}));
      if (!r.ok) {
        msg("The queue could not be read: " + (body.error || ("HTTP " + r.status)), "error");
        return;
      }
      fillSelect("f-batch", body.options.batch, cfg.filters.batch, true);
      fillSelect("f-site", body.options.site, cfg.filters.site, true);
      fillSelect("f-model", body.options.model, cfg.filters.model, true);
      items = body.items;
      renderQueue();
      select(0);
      if (!$("reviewer").value.trim()) msg("Enter your name in the reviewer field, then review with the keys.", "info");
    } catch (e) {
      msg("The queue could not be read (" + e + ")", "error");
    } finally {
      document.body.dataset.ready = "1";
    }
  }

  setupStatic();
  load();
})();
"""
