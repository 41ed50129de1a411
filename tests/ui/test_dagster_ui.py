"""The Dagster UI driven like a user, in headless Debian Chromium (Playwright, no browser download).

``dagster dev`` on a free loopback port, against a fresh instance and a data root holding one simulated
delivery whose batch the sensor code has registered (automation paused, ``CBP_AUTOMATION=stopped``, so that
nothing but the clicks below launches a run). The test looks at the whole asset graph, opens the batches of
``raw_mri_scans``, launches the materialisation of one batch with the Materialize dialog, waits on the Runs page
for success and reads the asset checks' results. Screenshots go to ``artifacts/ui/`` (``CBP_UI_ARTIFACTS``).
"""

import os
import re
import sys
import time
from pathlib import Path

import pytest

from tests.support.registration import register_batches
from tests.support.system import chromium_page, chromium_path, free_port, require, served

pytestmark = pytest.mark.ui
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("CBP_UI_ARTIFACTS", ROOT / "artifacts" / "ui"))
ASSETS = {"raw_mri_scans", "participant_covariates", "ingestion_summary", "segmentation_model",
          "muscle_segmentations", "muscle_metrics", "analysis_cohort", "cbp_association_model", "pain_intensity_model",
          "table_one", "stratified_comparisons", "physical_activity_prevalence", "published_results", "qc_reviews",
          "data_release", "release_impact", "withdrawal_register"}
BATCH_CHECKS = {"scan_facts_expectations", "fat_water_swap_qc"}


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    require("Chromium", chromium_path() is not None, "install Debian's chromium package (make sysdeps)")
    from cbp_platform.synth.delivery import synthesize

    root = tmp_path_factory.mktemp("ui")
    synthesize(participants=10, deliveries=1, seed=5, data_root=root, workers=2)
    keys = register_batches(root)
    port = free_port()
    env = {**os.environ, "CBP_DATA_ROOT": str(root), "DAGSTER_HOME": str(root / "dagster_home"),
           "CBP_AUTOMATION": "stopped", "GX_ANALYTICS_ENABLED": "False", "CBP_DEPLOYMENT": "local"}
    with served([str(Path(sys.executable).with_name("dagster")), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1",
                 "-p", str(port)], env=env, cwd=ROOT, log_path=root / "dagster-dev.log",
                ready_url=f"http://127.0.0.1:{port}/server_info", timeout_s=240):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        yield {"url": f"http://127.0.0.1:{port}", "keys": keys, "root": root}


@pytest.fixture(scope="module")
def page(ui):
    with chromium_page({"width": 1800, "height": 1000}, 60_000) as pg:
        yield pg


def _dismiss_welcome(pg) -> None:
    """A fresh instance greets with a 'Join the Dagster community' dialog: skip it."""
    skip = pg.get_by_role("button", name="Skip")
    try:
        skip.click(timeout=5000)
    except Exception:  # noqa: BLE001 - not shown (already dismissed)
        pass


def _expand_all_groups(pg) -> None:
    """The graph's settings menu (one of the icon buttons at its bottom right): 'Expand all groups'."""
    item = pg.get_by_role("menuitem", name=re.compile("Expand all groups"))
    size = pg.viewport_size
    icons = [b for b in pg.locator("button").all()
             if (box := b.bounding_box()) and box["x"] > size["width"] - 80 and box["y"] > size["height"] / 2
             and not b.inner_text().strip()]
    for button in icons:
        button.click()
        try:
            item.click(timeout=2000)
            pg.keyboard.press("Escape")      # close the menu (it stays open after the click)
            pg.mouse.move(10, 10)
            return
        except Exception:  # noqa: BLE001 - not this button's menu
            pg.keyboard.press("Escape")
    raise AssertionError("no 'Expand all groups' in the graph's menus")


def _shot(pg, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    pg.screenshot(path=str(path))
    assert path.stat().st_size > 10_000, path
    return path


def _matches(shown: str, full: str) -> bool:
    """Node labels are shortened in the middle when zoomed out (``mus…_segmentations``)."""
    if "…" not in shown:
        return shown == full
    head, tail = shown.split("…", 1)
    return full.startswith(head) and full.endswith(tail)


def test_asset_graph_shows_the_whole_pipeline(ui, page):
    page.set_viewport_size({"width": 1800, "height": 1300})
    page.goto(ui["url"] + "/asset-groups", wait_until="networkidle")
    _dismiss_welcome(page)
    page.get_by_text("Global asset lineage").wait_for()
    _expand_all_groups(page)
    names = page.locator("[class*='AssetNode_assetName']")
    names.first.wait_for()
    page.wait_for_timeout(1000)
    # one step of zoom out (ctrl + wheel): the four groups, expanded, fit on the screen with their names shown
    box = page.locator("svg").last.bounding_box() or {"x": 900, "y": 600, "width": 0, "height": 0}
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.keyboard.down("Control")
    page.mouse.wheel(0, 160)
    page.keyboard.up("Control")
    page.wait_for_timeout(1300)
    shown = [t.strip() for t in names.all_inner_texts()]
    missing = {a for a in ASSETS if not any(_matches(s, a) for s in shown)}
    assert not missing, (missing, sorted(shown))
    for group in ("ingestion", "segmentation", "analysis"):
        assert page.get_by_text(group, exact=True).count() >= 1
    _shot(page, "01-asset-graph")
    page.set_viewport_size({"width": 1800, "height": 1000})


def test_materialise_one_batch_from_the_ui_and_see_its_checks(ui, page):
    key = ui["keys"][0]
    page.goto(ui["url"] + "/assets/raw_mri_scans?view=partitions", wait_until="networkidle")
    _dismiss_welcome(page)
    # the batches (dynamic partitions) of the asset, none materialised yet
    page.get_by_text(key, exact=True).first.wait_for()
    page.get_by_text(f"Missing ({len(ui['keys'])})").wait_for()
    _shot(page, "02-batches-of-raw_mri_scans")

    page.get_by_role("button", name="Materialize…").click()
    dialog = page.locator("[role=dialog][aria-modal=true]")     # the launch dialog (its popovers are dialogs too)
    dialog.get_by_text("Launch runs to materialize raw_mri_scans").wait_for()
    dialog.get_by_text("Select a partition or create one").click()
    page.get_by_placeholder("Filter partitions").fill(key)
    page.get_by_text(key, exact=True).filter(visible=True).last.click()     # the batch's row in the list
    dialog.get_by_text("1 partition", exact=True).wait_for()
    box = dialog.bounding_box()                              # close the partition list: a click on the empty
    page.mouse.click(box["x"] + 30, box["y"] + box["height"] - 20)   # left end of the dialog's footer
    page.get_by_placeholder("Filter partitions").wait_for(state="hidden")
    launch = dialog.get_by_role("button", name="Launch 1 run")
    launch.wait_for()
    _shot(page, "03-launch-dialog")
    launch.click()
    dialog.wait_for(state="hidden")                          # the dialog closes once the run is submitted

    # the Runs page: the run appears, tagged with the partition, and ends in Success
    page.goto(ui["url"] + "/runs", wait_until="networkidle")
    deadline = time.monotonic() + 420
    status = ""
    while time.monotonic() < deadline:
        body = page.inner_text("body")
        m = re.search(r"\b(Success|Failure|Canceled)\b", body)
        if m:
            status = m.group(1)
            break
        page.wait_for_timeout(3000)
        page.reload(wait_until="networkidle")
    _shot(page, "04-runs")
    assert status == "Success", page.inner_text("body")[:3000]
    page.locator("a[href*='/runs/']").filter(has_text=re.compile(r"^[0-9a-f]{8}$")).first.click()
    page.get_by_text("RUN_SUCCESS").first.wait_for(timeout=120_000)
    _shot(page, "05-run-success")

    # the asset checks of the batch, with their results
    page.goto(ui["url"] + "/assets/raw_mri_scans?view=checks", wait_until="networkidle")
    for check in BATCH_CHECKS:
        page.get_by_text(check).first.wait_for()
    page.wait_for_timeout(1500)
    body = page.inner_text("body")
    assert f"Checks ({len(BATCH_CHECKS)})" in body, body[:3000]
    for check in BATCH_CHECKS:       # the list: name, then the latest execution's status
        assert re.search(rf"{check}\n(?:{check}\n)?Succeeded", body), (check, body[:3000])
    assert "Evaluation result\nPassed" in body and key in body, body[:3000]
    _shot(page, "06-asset-checks")

    # and the materialisation is there for that batch
    page.goto(ui["url"] + "/assets/raw_mri_scans?view=partitions", wait_until="networkidle")
    page.get_by_text("Materialized (1)").wait_for(timeout=60_000)
    _shot(page, "07-batch-materialised")
