"""The QC review app driven like a reviewer, in headless Debian Chromium (Playwright, no browser download).

``cbp qc serve`` on a free loopback port against a temp data root whose warehouse holds 6 participants in 2
batches (tests/qc/test_review_store.py writes it, with real PNG QC images) and a fresh ``$DAGSTER_HOME``. The test
opens a batch's filtered link, checks that the queue shows only that batch in triage order, rejects the first
participant with nothing but keys (``r`` then ``2``: misregistered), and reads the decision back from the
warehouse and the Dagster instance. The server's log must name no pseudonym. Screenshot: ``artifacts/ui/``
(``CBP_UI_ARTIFACTS``).
"""

import os
import sys
from pathlib import Path

import pytest

from tests.qc.test_review_store import build_warehouse
from tests.system import chromium_page, chromium_path, free_port, require, served

pytestmark = pytest.mark.ui
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("CBP_UI_ARTIFACTS", ROOT / "artifacts" / "ui"))
BATCH = "b002"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    require("Chromium", chromium_path() is not None, "install Debian's chromium package (make sysdeps)")
    root = tmp_path_factory.mktemp("qc-app")
    wh = build_warehouse(root)
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("# default sqlite storage in this folder\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("CBP_REVIEWER",)}
    env.update({"CBP_DATA_ROOT": str(root), "DAGSTER_HOME": str(home), "GX_ANALYTICS_ENABLED": "False",
                "CBP_DEPLOYMENT": "local", "CBP_AUTOMATION": "stopped"})
    log_path = root / "qc-serve.log"
    with served([sys.executable, "-m", "cbp_platform.cli", "qc", "serve", "--port", str(port), "--reviewer",
                 "alice"], env=env, cwd=ROOT, log_path=log_path, ready_url=f"http://127.0.0.1:{port}/static/app.css",
                timeout_s=60, stop_timeout_s=20):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        yield {**wh, "url": f"http://127.0.0.1:{port}", "home": home, "log": log_path}


@pytest.fixture(scope="module")
def page(app):
    with chromium_page({"width": 1600, "height": 900}, 20_000) as pg:
        yield pg


def test_reject_with_the_keyboard(app, page):
    import dagster as dg

    from cbp_platform.qc import reviews as rv
    from resources.warehouse import DuckDBWarehouse

    external: list[str] = []
    page.on("request", lambda req: None if req.url.startswith(app["url"]) else external.append(req.url))
    page.goto(f"{app['url']}/?batch={BATCH}", wait_until="networkidle")
    page.wait_for_selector("body[data-ready='1']")

    rows = page.locator("#queue-body tr")
    expected = sorted((r for r in app["rows"].values() if r["batch_key"] == BATCH),
                      key=lambda r: -r["triage_score"])
    assert rows.count() == len(expected) == 3
    shown = [rows.nth(i).get_attribute("data-pseudonym") for i in range(rows.count())]
    assert shown == [r["pseudonym"] for r in expected]                         # triage order, riskiest first
    assert {rows.nth(i).get_attribute("data-batch") for i in range(rows.count())} == {BATCH}
    assert page.input_value("#reviewer") == "alice"
    assert page.input_value("#f-batch") == BATCH
    first, second = shown[0], shown[1]
    assert first in page.inner_text("#d-title")
    page.wait_for_function("document.getElementById('d-image').naturalWidth > 0")   # the QC image loaded
    assert "Keys" in page.inner_text("#help")

    # keys only: down and back up, then r, then reason key 2
    page.keyboard.press("j")
    assert second in page.inner_text("#d-title")
    page.keyboard.press("k")
    assert first in page.inner_text("#d-title")
    page.keyboard.press("r")
    page.wait_for_selector("#reject-panel:not([hidden])")
    assert "misregistered" in page.inner_text("#reject-panel")
    page.keyboard.press("2")
    page.wait_for_selector("#message.ok")
    message = page.inner_text("#message")
    assert "rejected (misregistered) by alice" in message and first in message
    assert second in page.inner_text("#d-title")                                 # moved on to the next one
    assert "reject" in (rows.nth(0).get_attribute("class") or "")
    assert "reject: misregistered" in rows.nth(0).inner_text()
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
        first, "reject", "misregistered", "alice", "app")
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
