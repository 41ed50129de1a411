"""The review store, ``cbp qc`` and the review app (in-process) on a small temp warehouse.

The warehouse holds what the pipeline would have written for 6 participants in 2 batches: ``segmentation_qc``
(triage score and rank, flags, QC image), ``muscle_segmentations`` (the current label maps) and
``participant_covariates``. The warehouse is :func:`tests.support.review.build_warehouse`, shared with the browser test.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import polars as pl
import pytest

from cbp_platform.qc import reviews as rv
from tests.support.review import build_warehouse


@pytest.fixture()
def wh(tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)      # the CLI reports to no instance unless a test says so
    monkeypatch.delenv("CBP_REVIEWER", raising=False)
    monkeypatch.setenv("CBP_DATA_ROOT", str(tmp_path))
    return build_warehouse(tmp_path)


def _store(wh, instance=None):
    from resources.reviews import ReviewStore
    from resources.warehouse import DuckDBWarehouse

    return ReviewStore(DuckDBWarehouse(database=str(wh["db"])), instance=instance)


def _cli(*argv: str) -> int:
    from cbp_platform.cli import main

    return main(list(argv))


def _effective(store, p: str) -> dict:
    return rv.effective_reviews(store.reviews(), store.current_maps()).filter(pl.col("pseudonym") == p).row(
        0, named=True)


def _by_score(wh, batch: str | None = None) -> list[str]:
    rows = [r for r in wh["rows"].values() if batch is None or r["batch_key"] == batch]
    return [r["pseudonym"] for r in sorted(rows, key=lambda r: (-r["triage_score"], r["pseudonym"]))]


# --- the store and the CLI --------------------------------------------------------------------------------------

def test_reject_then_accept_keeps_the_history_and_the_accept_is_in_force(wh, capsys):
    p = wh["pseudonyms"][0]
    root = str(wh["root"])
    assert _cli("qc", "reject", p, "--reason", "misregistered", "--reviewer", "alice", "--data-root", root) == 0
    assert "rejected (misregistered) by alice" in capsys.readouterr().out
    assert _cli("qc", "accept", p, "--reviewer", "bob", "--note", "fine on second look", "--data-root", root) == 0

    store = _store(wh)
    hist = store.reviews().sort("reviewed_at")
    assert hist.height == 2
    assert hist["decision"].to_list() == ["reject", "accept"]
    assert hist["reason"].to_list() == ["misregistered", None]
    assert set(hist["source"]) == {"cli"}
    assert set(hist["label_sha256"]) == {wh["rows"][p]["label_sha256"]}
    eff = _effective(store, p)
    assert (eff["decision"], eff["reviewer"], eff["n_reviews"], eff["outdated"]) == ("accept", "bob", 2, False)
    assert p in store.queue(status="accepted")["pseudonym"].to_list()
    assert p not in store.queue(status="todo")["pseudonym"].to_list()
    assert rv.rejected(store.reviews(), store.current_maps()).height == 0


def test_a_review_of_a_replaced_label_map_is_outdated_and_not_in_force(wh):
    from resources.warehouse import DuckDBWarehouse

    store = _store(wh)
    p = wh["pseudonyms"][1]
    store.record(p, "reject", reviewer="alice", reason="segmentation_error")
    assert rv.rejected(store.reviews(), store.current_maps())["pseudonym"].to_list() == [p]

    # a new model run replaces the participant's label map (and its QC row)
    new_sha = "f" * 64
    w = DuckDBWarehouse(database=str(wh["db"]))
    segs = w.table("muscle_segmentations").with_columns(
        pl.when(pl.col("pseudonym") == p).then(pl.lit(new_sha)).otherwise(pl.col("label_sha256")).alias("label_sha256"))
    qc = w.table("segmentation_qc").with_columns(
        pl.when(pl.col("pseudonym") == p).then(pl.lit(new_sha)).otherwise(pl.col("label_sha256")).alias("label_sha256"))
    w.replace_rows("muscle_segmentations", segs, {})
    w.replace_rows("segmentation_qc", qc, {})

    eff = _effective(store, p)
    assert eff["decision"] is None and eff["outdated"] is True and eff["n_outdated"] == 1
    assert rv.rejected(store.reviews(), store.current_maps()).height == 0       # never applied to the new map
    assert store.queue(status="outdated")["pseudonym"].to_list() == [p]
    assert p in store.queue(status="todo")["pseudonym"].to_list()               # back in the queue
    assert store.reviews().height == 1                                          # the history stays


def test_a_decision_on_a_map_replaced_since_it_was_shown_is_refused(wh, capsys):
    """The app sends the sha256 of the map it showed (the CLI may, --label-sha): a re-run that replaced the map
    in between makes the decision fail, instead of landing on a map nobody saw."""
    from resources.warehouse import DuckDBWarehouse

    store = _store(wh)
    p = wh["pseudonyms"][2]
    shown = wh["rows"][p]["label_sha256"]
    w = DuckDBWarehouse(database=str(wh["db"]))
    w.replace_rows("muscle_segmentations", w.table("muscle_segmentations").with_columns(
        pl.when(pl.col("pseudonym") == p).then(pl.lit("e" * 64)).otherwise(pl.col("label_sha256"))
        .alias("label_sha256")), {})
    with pytest.raises(rv.ReviewError, match="replaced since it was shown"):
        store.record(p, "reject", reviewer="alice", reason="misregistered", label_sha256=shown)
    c = _client(store, reviewer="alice")
    r = c.post("/api/review", json={"pseudonym": p, "decision": "accept", "reviewer": "alice",
                                    "label_sha256": shown})
    assert r.status_code == 400 and "reload and review the new map" in r.json()["error"]
    assert _cli("qc", "accept", p, "--reviewer", "alice", "--label-sha", shown[:12], "--data-root",
                str(wh["root"])) == 2
    assert "replaced since it was shown" in capsys.readouterr().err
    assert store.reviews().height == 0
    assert store.record(p, "accept", reviewer="alice", label_sha256="e" * 12)["label_sha256"] == "e" * 64


def test_the_analysis_judges_the_map_its_numbers_come_from():
    """A batch segmented again but not yet measured: its metrics still come from the rejected map, so the
    rejection stays in force; once the metrics come from the new map, it is outdated."""
    import json as _json

    segs = pl.DataFrame({"pseudonym": ["P1", "P2"], "label_sha256": ["new1", "b2"]})
    prov = pl.DataFrame({"pseudonym": ["P1", "P2"], "input_checksums": [_json.dumps({"labels": "old1"}),
                                                                      _json.dumps({"labels": "b2"})]})
    maps = rv.analysed_maps(segs, prov).sort("pseudonym")
    assert maps["label_sha256"].to_list() == ["old1", "b2"]
    reviews = pl.DataFrame({"review_id": ["r1"], "pseudonym": ["P1"], "decision": ["reject"],
                            "reason": ["misregistered"], "reviewer": ["alice"], "label_sha256": ["old1"],
                            "reviewed_at": [dt.datetime(2026, 12, 3, tzinfo=dt.timezone.utc)]})
    assert rv.rejected(reviews, maps)["pseudonym"].to_list() == ["P1"]
    assert rv.rejected(reviews, segs).height == 0                   # judged on the segmentation alone: outdated
    measured_again = prov.with_columns(pl.lit(_json.dumps({"labels": "new1"})).alias("input_checksums"))
    assert rv.rejected(reviews, rv.analysed_maps(segs, measured_again)).height == 0
    assert rv.analysed_maps(segs, None).equals(segs)


@pytest.mark.parametrize("argv, needle", [
    (["accept", "{p}"], "name the reviewer: --reviewer NAME or $CBP_REVIEWER"),
    (["reject", "{p}", "--reviewer", "alice", "--reason", "blurry"], "a rejection needs a reason, one of"),
    (["reject", "{p}", "--reviewer", "alice"], "a rejection needs a reason"),
    (["accept", "ZZZZZZZZZZ", "--reviewer", "alice"], "ZZZZZZZZZZ: no current segmentation in the warehouse"),
])
def test_refused_decisions_exit_2_with_one_line_naming_the_problem(wh, capsys, argv, needle):
    p = wh["pseudonyms"][0]
    code = _cli("qc", *[a.format(p=p) for a in argv], "--data-root", str(wh["root"]))
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and err.count("\n") == 1, err
    assert err.startswith(f"cbp qc {argv[0]}: error: ")
    assert _store(wh).reviews().height == 0


def test_reviewer_from_the_environment(wh, monkeypatch, capsys):
    monkeypatch.setenv("CBP_REVIEWER", "carol")
    assert _cli("qc", "accept", wh["pseudonyms"][2], "--data-root", str(wh["root"])) == 0
    assert _store(wh).reviews()["reviewer"].to_list() == ["carol"]


def test_no_warehouse_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert _cli("qc", "list", "--data-root", str(tmp_path / "nothing")) == 2
    assert "holds no tables yet (run the pipeline first" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()            # a list never creates a warehouse


def test_qc_list_json_is_in_triage_order_and_filters(wh, capsys):
    root = str(wh["root"])
    assert _cli("qc", "list", "--json", "--status", "all", "--data-root", root) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["pseudonym"] for r in rows] == _by_score(wh)
    scores = [r["triage_score"] for r in rows]
    assert scores == sorted(scores, reverse=True)

    assert _cli("qc", "list", "--json", "--batch", "b002", "--limit", "2", "--data-root", root) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["pseudonym"] for r in rows] == _by_score(wh, "b002")[:2]
    assert [r["triage_rank"] for r in rows] == [1, 2]

    first = _by_score(wh)[0]
    assert _cli("qc", "reject", first, "--reason", "fov_truncated", "--reviewer", "alice", "--data-root", root) == 0
    capsys.readouterr()
    assert _cli("qc", "list", "--data-root", root) == 0        # the table; default status todo
    out = capsys.readouterr().out
    assert first not in out and _by_score(wh)[1] in out
    assert "(5 of 5 shown; status todo; riskiest first)" in out
    assert _cli("qc", "list", "--status", "rejected", "--data-root", root) == 0
    assert "reject: fov_truncated" in capsys.readouterr().out
    assert _cli("qc", "list", "--status", "bogus", "--data-root", root) == 2
    assert "status must be one of" in capsys.readouterr().err


def test_record_reports_a_materialisation_of_qc_reviews_without_pseudonyms(wh):
    import dagster as dg

    with dg.DagsterInstance.ephemeral() as instance:
        store = _store(wh, instance)
        for p in wh["pseudonyms"][:2]:
            store.record(p, "accept", reviewer="alice")
        ev = instance.get_latest_materialization_event(dg.AssetKey("qc_reviews"))
        assert ev is not None
        mat = ev.asset_materialization
        n, sha = rv.digest(store.reviews())
        assert n == 2
        assert mat.tags["dagster/data_version"] == sha
        assert mat.metadata["reviews"].value == 2 and mat.metadata["reviews_sha256"].value == sha
        text = repr(mat.metadata) + repr(mat.tags) + repr(mat.description)
        assert not any(p in text for p in wh["pseudonyms"])


def test_cli_reports_to_the_dagster_home_instance_and_closes_it(wh, tmp_path_factory, monkeypatch, capsys):
    import dagster as dg

    home = tmp_path_factory.mktemp("dagster_home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    from orchestration.instance import review_store

    store = review_store(str(wh["root"]))
    try:
        assert store.instance is not None and store.warehouse.path == wh["db"]
    finally:
        store.instance.dispose()
    assert _cli("qc", "reject", wh["pseudonyms"][3], "--reason", "other", "--note", "odd", "--reviewer", "dana",
                "--data-root", str(wh["root"])) == 0
    with dg.DagsterInstance.get() as inst:
        ev = inst.get_latest_materialization_event(dg.AssetKey("qc_reviews"))
        assert ev.asset_materialization.tags["dagster/data_version"] == rv.digest(_store(wh).reviews())[1]


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("0.0.0.0", False)])
def test_qc_serve_warns_off_loopback_and_runs_uvicorn_without_access_log(wh, monkeypatch, capsys, host, loopback):
    import uvicorn
    from starlette.testclient import TestClient

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("CBP_REVIEWER", "erin")
    assert _cli("qc", "serve", "--host", host, "--port", "8799", "--data-root", str(wh["root"])) == 0
    out, err = capsys.readouterr()
    assert f"review app on http://{host}:8799/" in out
    assert ("pseudonyms" in err and "secure environment" in err) is not loopback
    assert seen["access_log"] is False and (seen["host"], seen["port"]) == (host, 8799)
    foreign = TestClient(seen["app"], base_url="http://qc.example.org").get("/")
    assert foreign.status_code == (400 if loopback else 200)
    page = TestClient(seen["app"], base_url="http://127.0.0.1:8799").get("/")
    assert '"reviewer": "erin"' in page.text


def test_app_statuses_mirror_the_store():
    from cbp_platform.qc.app import STATUSES
    from resources.reviews import QUEUE_STATUSES

    assert STATUSES == QUEUE_STATUSES


# --- the review app, in-process ---------------------------------------------------------------------------------

def _client(store, host: str = "127.0.0.1", **kw):
    from starlette.testclient import TestClient

    from cbp_platform.qc.app import create_app

    return TestClient(create_app(store, **kw), base_url=f"http://{host}")


def test_app_page_and_queue(wh):
    c = _client(_store(wh), reviewer="alice")
    r = c.get("/?batch=b001")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '"reviewer": "alice"' in r.text and '"batch": "b001"' in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store"
    assert "http://" not in r.text.replace("http://www.w3.org", "") and "https://" not in r.text  # nothing external
    for asset in ("/static/app.js", "/static/app.css"):
        a = c.get(asset)
        assert a.status_code == 200 and len(a.text) > 1000 and "http" not in a.text

    q = c.get("/api/queue", params={"batch": "b001"}).json()
    assert [i["pseudonym"] for i in q["items"]] == _by_score(wh, "b001")
    assert {i["batch_key"] for i in q["items"]} == {"b001"}
    assert [i["triage_rank"] for i in q["items"]] == [1, 2, 3]
    assert "qc_image" not in q["items"][0]                           # no server path goes to the page
    assert q["options"]["batch"] == ["b001", "b002"] and q["options"]["model"] == ["cbp-default"]
    assert q["filters"]["status"] == "todo"
    assert c.get("/api/queue", params={"status": "bogus"}).status_code == 400
    # an injected filter value cannot close the config block
    assert "</script><script>" not in c.get("/", params={"batch": "</script><script>alert(1)"}).text


def test_app_review_post(wh, caplog):
    store = _store(wh)
    c = _client(store, reviewer="alice")
    p = _by_score(wh, "b001")[0]
    caplog.set_level(logging.DEBUG)
    ok = c.post("/api/review", json={"pseudonym": p, "decision": "reject", "reason": "misregistered",
                                     "note": "", "reviewer": "alice"})
    assert ok.status_code == 200, ok.text
    rev = ok.json()["review"]
    assert (rev["decision"], rev["reason"], rev["reviewer"], rev["source"]) == ("reject", "misregistered", "alice",
                                                                                "app")
    assert rev["label_sha256"] == wh["rows"][p]["label_sha256"]
    for body, needle in [
        ({"pseudonym": p, "decision": "reject", "reason": "blurry", "reviewer": "alice"}, "a rejection needs a reason"),
        ({"pseudonym": p, "decision": "accept", "reviewer": "  "}, "every decision names its reviewer"),
        ({"pseudonym": "ZZZZZZZZZZ", "decision": "accept", "reviewer": "alice"}, "no current segmentation"),
        ({"pseudonym": p, "decision": "maybe", "reviewer": "alice"}, "decision must be one of"),
        ({"pseudonym": p, "decision": "accept", "reviewer": 3}, "reviewer: must be text"),
    ]:
        bad = c.post("/api/review", json=body)
        assert bad.status_code == 400 and needle in bad.json()["error"], (body, bad.text)
    # a cross-site form or a foreign page cannot submit a decision
    assert c.post("/api/review", content=json.dumps({"pseudonym": p}),
                  headers={"content-type": "text/plain"}).status_code == 415
    assert c.post("/api/review", json={"pseudonym": p, "decision": "accept", "reviewer": "x"},
                  headers={"origin": "http://evil.example"}).status_code == 403
    assert c.post("/api/review", json={"pseudonym": p, "decision": "accept", "reviewer": "x"},
                  headers={"origin": "http://127.0.0.1"}).status_code == 200
    assert store.reviews().height == 2
    q = c.get("/api/queue", params={"status": "rejected"}).json()["items"]
    assert q == []                                                   # the later accept is in force
    assert not any(x in caplog.text for x in wh["pseudonyms"]), caplog.text
    assert "decision recorded: reject" in caplog.text


def test_app_serves_only_the_queue_images(wh, tmp_path):
    c = _client(_store(wh))
    p = wh["pseudonyms"][0]
    r = c.get(f"/qc/{p}.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == Path(wh["rows"][p]["qc_image"]).read_bytes()
    assert r.headers["cache-control"] == "no-store"
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG secret")
    for path in ("/qc/ZZZZZZZZZZ.png", "/qc/..%2Fsecret.png", f"/qc/{secret}.png", "/qc/%2E%2E%2Fsecret.png",
                 f"/qc/{p}.jpg"):
        assert c.get(path).status_code == 404, path


def test_app_refuses_foreign_hosts(wh):
    store = _store(wh)
    assert _client(store, host="evil.example").get("/").status_code == 400
    assert _client(store, host="evil.example").get("/api/queue").status_code == 400
    assert _client(store, host="127.0.0.1.evil.example").get("/").status_code == 400
    for host in ("127.0.0.1:8765", "localhost", "[::1]:8765"):
        assert _client(store, host=host).get("/api/queue").status_code == 200, host
    assert _client(store, host="qc.internal", loopback_only=False).get("/api/queue").status_code == 200


def test_app_errors_leak_no_pseudonym_to_the_log(wh, caplog):
    class Broken:
        def queue(self, **kw):
            raise RuntimeError(f"disk error reading {wh['pseudonyms'][0]}")

    caplog.set_level(logging.DEBUG)
    r = _client(Broken()).get("/api/queue")
    assert r.status_code == 500 and wh["pseudonyms"][0] not in r.text
    assert "request failed: RuntimeError" in caplog.text
    assert wh["pseudonyms"][0] not in caplog.text
