"""The QC review app driven like a reviewer, in headless Debian Chromium (Playwright, no browser download).

``cbp qc serve`` on a free loopback port against a temp data root whose warehouse holds 6 participants in 2
batches (tests/support/review.py writes it, with real PNG QC images; :func:`_as_in_production` then gives it
the production's batch keys, ``<delivery>.bNNN``, and flags as long as the triage writes them) and a fresh
``$DAGSTER_HOME``. The server runs in the data root, not the repository: the page's files come from the package.
The browser window is 1400 x 1000.

- The page's files are served with the security headers, nothing else of their folder is, and the page loads with
  no CSP violation, no console error and no request elsewhere.
- The queue across both batches: # counts 1..n in the queue's order (the rank within the batch is the tooltip),
  and no cell is clipped (flags, decision, batch keys); the facts say InterMAT.
- The QC image: larger by default, ``z`` or a click shows it at full size, ``Esc`` closes it.
- A batch's filtered link, in triage order; rejecting the first participant with nothing but keys (``r`` then
  ``5``: fat_water_swap, the widest reason in the queue's decision column), read back from the warehouse and the Dagster instance. The server's log names no
  pseudonym.

Screenshots: ``artifacts/ui/`` (``CBP_UI_ARTIFACTS``): qc_queue.png, qc_zoom.png, qc_review.png.
"""

import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.review import build_warehouse
from tests.support.system import chromium_page, chromium_path, free_port, require, served

pytestmark = pytest.mark.ui
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("CBP_UI_ARTIFACTS", ROOT / "artifacts" / "ui"))
VIEWPORT = {"width": 1400, "height": 1000}
BATCH = "sim1-d2.b002"

# every cell of the queue whose content is wider or taller than its box (what the reviewer would not see)
CLIPPED = """() => [...document.querySelectorAll('#queue th, #queue td')]
    .filter((c) => c.scrollWidth > c.clientWidth || c.scrollHeight > c.clientHeight)
    .map((c) => c.className + ': ' + c.textContent)"""
# the queue's table against its scroll box: nothing to scroll sideways, no column past the box's right edge
OVERFLOW = """() => { const w = document.getElementById('queue-wrap'); const t = document.getElementById('queue');
    return {wrap: w.clientWidth, scroll: w.scrollWidth,
            past: t.getBoundingClientRect().right - w.getBoundingClientRect().right}; }"""


def _as_in_production(wh: dict) -> dict:
    """The production's batch keys (``sim1-d1.b001``, as ``cbp_platform.ingest.deliveries.batch_key`` writes
    them) in the QC and segmentation tables, and flags like the triage's: the features above FLAG_Z, highest
    first, with its longest labels (a row whose score is under FLAG_Z has none)."""
    import polars as pl

    from cbp_platform.ingest.deliveries import batch_key
    from cbp_platform.qc.features import FEATURES, FLAG_Z
    from resources.warehouse import DuckDBWarehouse

    labels = sorted((f.label for f in FEATURES), key=len, reverse=True)[:4]

    def flags(score: float) -> str:
        zs = [score - 0.9 * k for k in range(len(labels))]
        return "; ".join(f"{lab} z {z:.1f}" for lab, z in zip(labels, zs) if z > FLAG_Z)

    def key() -> pl.Expr:
        return pl.struct("delivery_id", "batch_key").map_elements(
            lambda r: batch_key(r["delivery_id"], int(r["batch_key"].lstrip("b"))), return_dtype=pl.String)

    db = DuckDBWarehouse(database=str(wh["db"]))
    qc = db.table("segmentation_qc")
    qc = qc.with_columns(key().alias("batch_key"),
                         pl.col("triage_score").map_elements(flags, return_dtype=pl.String).alias("triage_flags"))
    segs = db.table("muscle_segmentations")
    segs = segs.with_columns(key().alias("batch_key"))
    db.replace_many([("segmentation_qc", qc, {}), ("muscle_segmentations", segs, {})])
    return {**wh, "rows": {r["pseudonym"]: r for r in qc.to_dicts()}}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    require("Chromium", chromium_path() is not None, "install Debian's chromium package (make sysdeps)")
    root = tmp_path_factory.mktemp("qc-app")
    wh = _as_in_production(build_warehouse(root))
    assert BATCH in {r["batch_key"] for r in wh["rows"].values()}
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("# default sqlite storage in this folder\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("CBP_REVIEWER",)}
    env.update({"CBP_DATA_ROOT": str(root), "DAGSTER_HOME": str(home), "GX_ANALYTICS_ENABLED": "False",
                "CBP_DEPLOYMENT": "local", "CBP_AUTOMATION": "stopped"})
    log_path = root / "qc-serve.log"
    # cwd: the data root, where no static/ folder is (the app must find its files in the package)
    with served([sys.executable, "-m", "cbp_platform.cli", "qc", "serve", "--port", str(port), "--reviewer",
                 "alice"], env=env, cwd=root, log_path=log_path, ready_url=f"http://127.0.0.1:{port}/static/app.css",
                timeout_s=60, stop_timeout_s=20):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        yield {**wh, "url": f"http://127.0.0.1:{port}", "port": port, "home": home, "log": log_path}


@pytest.fixture(scope="module")
def page(app):
    with chromium_page(VIEWPORT, 20_000) as pg:
        yield pg


def _get(url: str, host: str | None = None):
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def _open(page, url: str) -> None:
    page.goto(url, wait_until="networkidle")
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_function("document.getElementById('d-image').naturalWidth > 0")    # the QC image loaded


def test_the_page_files_are_served_from_the_package_with_the_security_headers(app):
    import cbp_platform.qc.app as qc_app

    static = Path(qc_app.__file__).parent / "static"
    assert not (app["root"] / "static").exists()                    # the server's cwd holds no copy
    expected = {"/static/app.js": "text/javascript", "/static/app.css": "text/css",
                "/static/favicon.svg": "image/svg+xml", "/": "text/html"}
    for path, ctype in expected.items():
        status, headers, body = _get(app["url"] + path)
        assert status == 200, path
        assert headers["content-type"].split(";")[0] == ctype, path
        for k, v in qc_app.SECURITY_HEADERS.items():
            assert headers.get(k) == v, (path, k, headers.get(k))
        if path != "/":
            assert body == (static / path.rsplit("/", 1)[1]).read_bytes(), path
    page = _get(app["url"] + "/")[2].decode()
    head, tail = (static / "index.html").read_text().split("__CONFIG__")
    assert page.startswith(head) and page.endswith(tail) and '"reviewer": "alice"' in page
    # everything the page loads is the app's own (a path on this origin), and nothing is inline script or style
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert refs and all(r.startswith("/") and not r.startswith("//") for r in refs), refs
    assert " style=" not in page and "<style" not in page
    assert all(s.startswith(('<script type="application/json"', '<script src="/static/'))
               for s in re.findall(r"<script[^>]*>", page))
    # only the listed files: not the page's template, not the module beside the folder, no path from the request
    for path in ("/static/index.html", "/static/nope.js", "/static/..%2Fapp.py", "/static/%2E%2E/app.py",
                 "/static/../app.py", "/static/", "/static/app.js/x"):
        status, headers, body = _get(app["url"] + path)
        assert status == 404, path
        assert b"import" not in body and headers["cache-control"] == "no-store", path
    status, _, _ = _get(app["url"] + "/static/app.js", host="evil.example")    # DNS rebinding: refused
    assert status == 400


def test_the_page_files_ship_with_the_package():
    """pyproject's package data names every file of the folder the app reads (a wheel without them would serve
    a page that cannot load); the app reads them all."""
    import tomllib

    import cbp_platform.qc.app as qc_app

    package = Path(qc_app.__file__).parent
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "cbp_platform.qc"]
    files = sorted(str(p.relative_to(package)) for p in (package / "static").rglob("*") if p.is_file()
                   and "__pycache__" not in p.parts)
    shipped = {str(p.relative_to(package)) for pat in patterns for p in package.glob(pat) if p.is_file()}
    assert files and set(files) <= shipped, (files, patterns)     # setuptools' glob: static/* is not static/x/y
    assert sorted(qc_app.static_files()) == sorted(f.removeprefix("static/") for f in files)


def test_the_page_loads_without_csp_violation_or_console_error(app, page):
    problems: list[str] = []
    requests: list[tuple[str, int]] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.on("response", lambda r: requests.append((r.url, r.status)))
    page.add_init_script("window.cspViolations = [];"
                         "document.addEventListener('securitypolicyviolation',"
                         " (e) => window.cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));")
    _open(page, f"{app['url']}/?status=all")
    page.keyboard.press("z")                                         # the full-size view loads its image too
    page.wait_for_function("document.getElementById('zoom-image').naturalWidth > 0")
    page.keyboard.press("Escape")
    page.wait_for_timeout(300)                                       # a late favicon or error has arrived
    assert page.evaluate("window.cspViolations") == []
    assert problems == []
    urls = {u.split("?")[0].removeprefix(app["url"]) for u, _ in requests}
    assert {"/", "/static/app.js", "/static/app.css", "/static/favicon.svg", "/api/queue"} <= urls, urls
    assert all(u.startswith(app["url"] + "/") for u, _ in requests), requests      # nothing from elsewhere
    assert [(u, s) for u, s in requests if s >= 400] == []


def test_the_queue_across_batches_is_numbered_in_its_order_and_nothing_is_clipped(app, page):
    _open(page, f"{app['url']}/?status=all")
    expected = sorted(app["rows"].values(), key=lambda r: (-r["triage_score"], r["pseudonym"]))
    assert len({r["batch_key"] for r in expected}) == 2
    assert [r["triage_rank"] for r in expected] != list(range(1, 7))     # the batch ranks interleave: 1, 1, 2, ...
    rows = page.locator("#queue-body tr")
    assert rows.count() == len(expected) == 6
    assert [rows.nth(i).get_attribute("data-pseudonym") for i in range(6)] == [r["pseudonym"] for r in expected]
    assert page.locator("#queue-body td.pos").all_inner_texts() == [str(i) for i in range(1, 7)]
    assert page.inner_text("#queue thead th >> nth=0") == "#"
    for i, r in enumerate(expected):                                   # the rank within the batch: the tooltip
        title = page.locator("#queue-body td.pos").nth(i).get_attribute("title")
        assert f"position {i + 1} in this queue" in title
        assert f"rank {r['triage_rank']} in batch {r['batch_key']}" in title, title
        flags = page.locator("#queue-body td.flags").nth(i)
        shown = flags.inner_text().replace("\u00a0", " ").replace("\n", "; ")
        assert shown == (r["triage_flags"] or "\u2013")                 # every flag, none cut short
        assert r["batch_key"] in page.locator("#queue-body td.batch").nth(i).inner_text()
    assert any(r["triage_flags"].count(";") >= 3 for r in expected)      # long flags are in the test

    assert page.evaluate(CLIPPED) == []                                # no cell is cut off (flags, batch keys)
    fit = page.evaluate(OVERFLOW)
    assert fit["scroll"] <= fit["wrap"] and fit["past"] <= 0.5, fit    # the decision column is in view
    box = page.locator("#queue-body td.flags").first.bounding_box()
    assert box["x"] + box["width"] <= VIEWPORT["width"] and box["width"] >= 200, box

    page.locator("#queue-body tr").nth(2).click()                      # the facts of the 3rd in the queue
    r = expected[2]
    assert "(3 of 6)" in page.inner_text("#d-title")
    facts = dict(zip(page.locator("#d-facts dt").all_inner_texts(), page.locator("#d-facts dd").all_inner_texts()))
    assert facts["queue position"] == "3 of 6"
    assert facts["triage rank"] == f"{r['triage_rank']} in batch {r['batch_key']}"
    assert facts["InterMAT"] == f"{r['imat_pct']:.2f} %"               # the platform's word, not IMAT
    assert not re.search(r"\bIMAT\b", page.inner_text("body")), "the page says IMAT"
    page.screenshot(path=str(ARTIFACTS / "qc_queue.png"))
    assert (ARTIFACTS / "qc_queue.png").stat().st_size > 10_000


def test_the_qc_image_is_larger_and_opens_at_full_size(app, page):
    _open(page, f"{app['url']}/?status=all")
    first, second = page.locator("#queue-body tr").evaluate_all("rs => rs.map(r => r.dataset.pseudonym)")[:2]
    small = page.evaluate("""() => { const i = document.getElementById('d-image');
        return {w: i.clientWidth, nat: i.naturalWidth, rendering: getComputedStyle(i).imageRendering}; }""")
    assert small["w"] >= 0.7 * small["nat"], small                   # was 58 % at this window size
    assert small["rendering"] == "auto", small                        # smooth when smaller: labels keep strokes
    zoom = page.locator("#zoom")
    assert zoom.is_hidden()

    def full_size() -> dict:
        page.wait_for_function("""() => { const i = document.getElementById('zoom-image');
            return i.complete && i.naturalWidth > 0 && i.dataset.scale; }""")
        return page.evaluate("""() => { const i = document.getElementById('zoom-image'); const b = i.getBoundingClientRect();
            return {w: b.width, h: b.height, x: b.x, y: b.y, nw: i.naturalWidth, nh: i.naturalHeight,
                    scale: Number(i.dataset.scale), src: i.getAttribute('src'),
                    rendering: getComputedStyle(i).imageRendering}; }""")

    page.keyboard.press("z")
    zoom.wait_for(state="visible")
    z = full_size()
    assert z["scale"] >= 1 and z["w"] == z["nw"] * z["scale"] and z["h"] == z["nh"] * z["scale"], z
    assert z["x"] >= 0 and z["y"] >= 0 and z["x"] + z["w"] <= VIEWPORT["width"], z    # all of it in the window
    assert z["src"] == f"/qc/{first}.png" and z["rendering"] == "pixelated"
    assert first in page.inner_text("#zoom-caption")
    page.screenshot(path=str(ARTIFACTS / "qc_zoom.png"))
    page.keyboard.press("j")                                          # walks the queue, still at full size
    page.wait_for_function(f"document.getElementById('zoom-image').getAttribute('src') === '/qc/{second}.png'")
    assert full_size()["w"] == z["w"] and second in page.inner_text("#zoom-caption")
    assert second in page.inner_text("#d-title")
    page.keyboard.press("Escape")
    zoom.wait_for(state="hidden")
    page.keyboard.press("k")                                          # the keys act on the queue again
    assert first in page.inner_text("#d-title")

    page.click("#d-image")                                            # a click opens, a click closes
    zoom.wait_for(state="visible")
    page.click("#zoom")
    zoom.wait_for(state="hidden")
    page.keyboard.press("z")
    zoom.wait_for(state="visible")
    page.keyboard.press("z")
    zoom.wait_for(state="hidden")
    page.keyboard.press("z")                                          # r from the full-size view: the reject panel
    zoom.wait_for(state="visible")
    page.keyboard.press("r")
    zoom.wait_for(state="hidden")
    page.wait_for_selector("#reject-panel:not([hidden])")
    page.keyboard.press("Escape")
    page.wait_for_selector("#reject-panel", state="hidden")


def test_reject_with_the_keyboard(app, page):
    import dagster as dg

    from cbp_platform.qc import reviews as rv
    from resources.warehouse import DuckDBWarehouse

    external: list[str] = []
    page.on("request", lambda req: None if req.url.startswith(app["url"]) else external.append(req.url))
    _open(page, f"{app['url']}/?batch={BATCH}")

    rows = page.locator("#queue-body tr")
    expected = sorted((r for r in app["rows"].values() if r["batch_key"] == BATCH),
                      key=lambda r: -r["triage_score"])
    assert rows.count() == len(expected) == 3
    shown = [rows.nth(i).get_attribute("data-pseudonym") for i in range(rows.count())]
    assert shown == [r["pseudonym"] for r in expected]                         # triage order, riskiest first
    assert {rows.nth(i).get_attribute("data-batch") for i in range(rows.count())} == {BATCH}
    assert page.locator("#queue-body td.pos").all_inner_texts() == ["1", "2", "3"]
    assert page.input_value("#reviewer") == "alice"
    assert page.input_value("#f-batch") == BATCH
    first, second = shown[0], shown[1]
    assert first in page.inner_text("#d-title")
    assert "Keys" in page.inner_text("#help")

    # keys only: down and back up, then r, then reason key 5
    page.keyboard.press("j")
    assert second in page.inner_text("#d-title")
    page.keyboard.press("k")
    assert first in page.inner_text("#d-title")
    page.keyboard.press("r")
    page.wait_for_selector("#reject-panel:not([hidden])")
    assert "fat_water_swap" in page.inner_text("#reject-panel")
    page.keyboard.press("5")
    page.wait_for_selector("#message.ok")
    message = page.inner_text("#message")
    assert "rejected (fat_water_swap) by alice" in message and first in message
    assert second in page.inner_text("#d-title")                                 # moved on to the next one
    assert "reject" in (rows.nth(0).get_attribute("class") or "")
    assert rows.nth(0).locator("td.decision").inner_text().split() == ["reject:", "fat_water_swap"]
    assert page.evaluate(CLIPPED) == []                                          # the decision fits its column
    page.screenshot(path=str(ARTIFACTS / "qc_review.png"), full_page=True)
    assert (ARTIFACTS / "qc_review.png").stat().st_size > 10_000

    # Escape cancels a rejection; nothing is recorded
    page.keyboard.press("r")
    page.wait_for_selector("#reject-panel:not([hidden])")
    page.keyboard.press("Escape")
    page.wait_for_selector("#reject-panel", state="hidden")

    # no reviewer, no decision: the page says so (and the server would refuse it too)
    page.fill("#reviewer", "")
    page.keyboard.press("Escape")                   # leaves the field: the keys act on the queue again
    page.keyboard.press("a")
    page.wait_for_selector("#message.error")
    assert "every decision names its reviewer" in page.inner_text("#message")

    reviews = DuckDBWarehouse(database=str(app["db"])).table("qc_reviews")
    assert reviews.height == 1
    row = reviews.row(0, named=True)
    assert (row["pseudonym"], row["decision"], row["reason"], row["reviewer"], row["source"]) == (
        first, "reject", "fat_water_swap", "alice", "app")
    seg = DuckDBWarehouse(database=str(app["db"])).table("muscle_segmentations", columns=["label_sha256"],
                                                         where={"pseudonym": first})
    assert row["label_sha256"] == seg["label_sha256"][0] == app["rows"][first]["label_sha256"]
    assert row["batch_key"] == BATCH

    with dg.DagsterInstance.from_config(str(app["home"])) as inst:                # reported to $DAGSTER_HOME
        ev = inst.get_latest_materialization_event(dg.AssetKey("qc_reviews"))
        assert ev.asset_materialization.tags["dagster/data_version"] == rv.digest(reviews)[1]

    assert external == []                                                       # self-contained page
    text = app["log"].read_text()
    assert "review app on http://127.0.0.1:" in text
    assert "decision recorded: reject (this session: 0 accept, 1 reject)" in text
    assert not any(p in text for p in app["pseudonyms"]), text                   # no pseudonym in the server log
