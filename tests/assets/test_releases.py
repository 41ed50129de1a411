"""Data releases, reproduction and impact (issue 27), through Dagster on the DuckDB warehouse.

The per-batch tables of 2,500 simulated participants are written as the assets leave them
(``tests/support/synthetic.py``); release 1 is cut and published by the cohort refresh. A correction of 40
participants' pain answer is then written as the correction's batch writes it (versions that supersede the
original delivery's, ordered by registration: ``assets/writes.py``; the delivery path itself is tested in
``tests/assets/test_corrections.py``). ``cbp impact`` must give the ORs that a fit on the corrected cohort gives,
release 2 must publish them, and release 1 must still reproduce exactly. (The same release path on PostgreSQL:
``tests/assets/test_corrections.py`` and ``tests/assets/test_analysis.py``.)
"""

import contextlib
import io
import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from cbp_platform.paths import DataLayout
from tests.support.synthetic import correct_covariates, write_warehouse
from tests.support.warehouse import query as _q

N_CORRECTED = 40


def _cli(*argv: str) -> tuple[int, str]:
    from cbp_platform.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(argv))
    return rc, out.getvalue()


def _refresh():
    from cbp_platform.definitions import build_definitions
    from orchestration.releases import cut_release

    inst = dg.DagsterInstance.get()
    row = cut_release(inst, if_changed=True, log=lambda *_: None)
    res = build_definitions().resolve_job_def("cohort_refresh").execute_in_process(instance=inst,
                                                                                  raise_on_error=False)
    assert res.success
    return row


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    from orchestration.profiles import warehouse
    from orchestration.runner import pipeline_environment

    root = tmp_path_factory.mktemp("releases")
    with pipeline_environment(root):
        write_warehouse(root, 2500, seed=11)
        first = _refresh()
        yield root, warehouse(), first


def test_release_one_is_cut_published_and_named_everywhere(released):
    root, wh, first = released
    assert first["release_id"] == 1 and first["cut"]
    rc, out = _cli("release", "list", "--data-root", str(root))
    assert rc == 0 and out.splitlines()[0].startswith("1\t") and len(out.splitlines()) == 1
    summary = json.loads((root / "published" / "releases" / "1" / "release.json").read_text())
    assert summary["participants"] == 2500 and summary["content_hash"] == first["content_hash"]
    assert summary["since_previous"]["new_participants"] == 2500
    latest = json.loads((root / "published" / "latest.json").read_text())
    assert not latest["path"].startswith("/")                             # relative to the data root
    manifest = json.loads((DataLayout(root).resolve(latest["path"]) / "lineage.json").read_text())
    assert manifest["release"]["id"] == 1 and manifest["release"]["content_hash"] == first["content_hash"]
    assert f"Data release 1 (content hash {first['content_hash']})" in (DataLayout(root).resolve(latest["path"]) /
                                                                       "report.md").read_text()
    rc, out = _cli("lineage", "--data-root", str(root))
    assert f"data release 1 (content hash {first['content_hash']}" in out
    # a pseudonym is in the internal manifest (operator only), never in the public summary
    p = wh.table("analysis_cohort", columns=["pseudonym"])["pseudonym"][0]
    assert p in (root / "registry" / "releases" / "1.json").read_text()
    assert p not in (root / "published" / "releases" / "1" / "release.json").read_text()
    # in Dagster: partition 1 of data_release, its data version the content hash
    inst = dg.DagsterInstance.get()
    ev = inst.get_latest_materialization_event(dg.AssetKey("data_release")).asset_materialization
    assert ev.partition == "1" and ev.tags["dagster/data_version"] == first["content_hash"]
    # nothing changed: no second release; materialising partition 1 again changes nothing
    from orchestration.releases import cut_release

    assert not cut_release(inst, if_changed=True, log=lambda *_: None)["cut"]
    assert _q(root, "SELECT count(*) AS n FROM releases")["n"][0] == 1


def test_a_small_correction_shows_no_impact_numbers(released):
    root, wh, _ = released
    few = wh.table("analysis_cohort", columns=["pseudonym"], order_by=["pseudonym"])["pseudonym"][:3].to_list()
    correct_covariates(wh, few, "fix-small", 50)
    rc, out = _cli("impact", "--data-root", str(root), "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["pending"] and doc["withheld"] and doc["changed_participants"] == "<5"
    assert "odds_ratios" not in doc and not any(p in out for p in few)
    # taken back: the originals written again as the later version (nothing is updated in place)
    from cbp_platform.warehouse import versioned

    orig = wh.table("participant_covariates", versions="all").filter(
        pl.col("pseudonym").is_in(few) & (pl.col("delivery_id") != "fix-small")).drop(
        "supersedes", "superseded_by", "registration_seq").with_columns(
        pl.lit("fix-undo.b001").alias("batch_key"), pl.lit("fix-undo").alias("delivery_id"))
    wh.replace_many([("participant_covariates", versioned("participant_covariates", orig, 51,
                                                          {p: "fix-small" for p in few}), {"batch_key": "fix-undo.b001"})])
    assert json.loads(_cli("impact", "--data-root", str(root), "--json")[1])["changed_participants"] == "<5"


def test_a_correction_moves_the_odds_ratios_as_a_fit_on_the_corrected_data_does(released):
    from cbp_platform import study
    from cbp_platform.analysis.cohort import build_analysis_cohort
    from cbp_platform.analysis.models import fit_analysis

    root, wh, _ = released
    before = wh.table("model_results")
    analysed = wh.table("analysis_cohort", columns=["pseudonym"], order_by=["pseudonym"])["pseudonym"].to_list()
    chosen = analysed[100:100 + N_CORRECTED]
    correct_covariates(wh, chosen, "fix-cbp", 60)

    rc, out = _cli("impact", "--data-root", str(root), "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["pending"] and not doc["withheld"]
    assert doc["changed_participants"] == N_CORRECTED + 3          # and the three of the small correction
    assert not any(p in out for p in analysed)                     # no pseudonym
    # "before" is release 1's published OR, "after" a fit on the corrected data in force, made here independently
    cov, scans = wh.table("participant_covariates"), wh.table("raw_mri_scans")
    cohort = build_analysis_cohort(cov, scans, wh.table("muscle_metrics"), wh.table("quarantine"))
    primary = study.analyses_fitted_by("cbp_association_model")[0]
    from resources.warehouse import storable

    frame = storable(cohort.frame).sort("pseudonym")
    want = fit_analysis(frame, primary, cohort_hash=cohort.cohort_hash).result.coefficients
    got = {(o["analysis"], o["term"]): o for o in doc["odds_ratios"]}
    reported = before.filter((pl.col("analysis") == primary.name) & (pl.col("model") == "glmm_agq25"))
    for r in want.filter(pl.col("term") != "(Intercept)").iter_rows(named=True):
        o = got[(primary.name, r["term"])]
        assert o["or"][1] == pytest.approx(r["or"], rel=1e-9) and o["ci_low"][1] == pytest.approx(r["or_low"], rel=1e-9)
        was = reported.filter(pl.col("term") == r["term"]).row(0, named=True)
        assert o["or"][0] == pytest.approx(was["or"], rel=1e-12)
    assert any(abs(o["or_change"]) > 1e-4 for o in doc["odds_ratios"] if o["or_change"] is not None)
    # the Dagster asset says the same (and holds no pseudonym either)
    from cbp_platform.definitions import build_definitions

    inst = dg.DagsterInstance.get()
    res = build_definitions().resolve_job_def("cohort_refresh").execute_in_process(
        instance=inst, asset_selection=[dg.AssetKey("release_impact")], raise_on_error=False)
    assert res.success
    written = json.loads((root / "published" / "releases" / "impact.json").read_text())
    assert written["odds_ratios"] == doc["odds_ratios"] and written["changed_participants"] == N_CORRECTED + 3
    md = inst.get_latest_materialization_event(dg.AssetKey("release_impact")).asset_materialization.metadata
    assert md["pending"].value is True and not any(p in md["impact"].value for p in analysed)
    rc, text = _cli("impact", "--data-root", str(root))
    assert "43 participants changed (43 corrected" in text and "cbp_not_answered" not in text.split("flow:")[0]

    # release 2 publishes exactly these numbers
    second = _refresh()
    assert second["release_id"] == 2
    after = wh.table("model_results").filter((pl.col("analysis") == primary.name) & (pl.col("model") == "glmm_agq25"))
    for r in want.filter(pl.col("term") != "(Intercept)").iter_rows(named=True):
        assert after.filter(pl.col("term") == r["term"])["or"][0] == pytest.approx(r["or"], rel=1e-9)
    summary = json.loads((root / "published" / "releases" / "2" / "release.json").read_text())
    assert summary["previous"] == 1 and summary["since_previous"]["corrected_participants"] == N_CORRECTED + 3
    # the versions in force come from fix-cbp and fix-undo (fix-small's were replaced before the release)
    assert summary["since_previous"]["correction_deliveries"] == ["fix-cbp", "fix-undo"]
    assert json.loads(_cli("impact", "--data-root", str(root), "--json")[1])["pending"] is False


def test_release_one_still_reproduces_exactly(released):
    root, _, _ = released
    for release in (1, 2):
        rc, out = _cli("reproduce", "--release", str(release), "--data-root", str(root))
        assert rc == 0, out
        assert out.strip().splitlines()[-1] == "reproduced exactly"
        assert "cells that differ: 0" in out


def test_a_withdrawal_leaves_the_next_release_at_its_first_step(released, tmp_path, monkeypatch):
    """Issue 28, part 1: six participants withdraw (two first, beside six corrections: the impact is withheld while
    fewer than 5 withdrawals are pending); the register keeps keyed hashes only; the impact report counts them; the
    next release excludes them at consent_withdrawn; the earlier releases still reproduce (no erasure yet)."""
    from assets.withdrawals import withdrawal_register, withdrawals_applied_in_time
    from cbp_platform.withdrawals import Register
    from resources import DataRootResource

    root, wh, _ = released
    monkeypatch.delenv("CBP_WITHDRAWAL_KEY", raising=False)
    analysed = wh.table("analysis_cohort", columns=["pseudonym"], order_by=["pseudonym"])["pseudonym"]
    gone = analysed[500:506].to_list()
    req = tmp_path / "withdrawals.csv"

    def withdraw(people: list[str], first: int) -> str:
        req.write_text("request_id,pseudonym,scope,effective_date\n" + "".join(
            f"TTP-{first + i},{p},{'all' if i % 2 else 'imaging'},2026-12-01\n" for i, p in enumerate(people)))
        rc, out = _cli("withdraw", "--request", str(req), "--data-root", str(root))
        assert rc == 0 and not any(p in out for p in people)
        return out

    # two withdrawals beside six corrections: eight changes, but the impact would show two withdrawals' effect
    assert "2 request(s) recorded" in withdraw(gone[:2], 0)
    correct_covariates(wh, analysed[600:606].to_list(), "fix-more", 80)
    held = json.loads(_cli("impact", "--data-root", str(root), "--json")[1])
    assert held["withheld"] and held["changed_participants"] == 8 and "withdrawals" in held["why"]
    assert "odds_ratios" not in held
    assert "4 request(s) recorded" in withdraw(gone[2:], 2)
    reg = Register(DataLayout(root).withdrawals)
    assert not any(p.encode() in reg.path.read_bytes() for p in gone)
    # in Dagster: the observable source asset's data version is the register's hash; nothing is overdue yet
    inst = dg.DagsterInstance.get()
    from dagster._core.definitions.observe import observe      # what the UI's "Observe sources" runs

    res = observe([withdrawal_register], instance=inst, resources={"data_root": DataRootResource()})
    assert res.success
    obs = inst.fetch_observations(dg.AssetKey("withdrawal_register"), limit=1).records[0].asset_observation
    assert obs.tags["dagster/data_version"] == reg.digest() and obs.metadata["participants"].value == 6
    assert withdrawals_applied_in_time(data_root=DataRootResource()).passed
    doc = json.loads(_cli("impact", "--data-root", str(root), "--json")[1])
    assert doc["changed_participants"] == 12 and {"step": "consent_withdrawn", "excluded": [0, 6],
                                                 "remaining": doc["flow"][1]["remaining"]} in doc["flow"]
    third = _refresh()
    assert third["release_id"] == 3
    flow = dict(zip(*_q(root, "SELECT criterion, excluded FROM exclusion_flow ORDER BY step").to_dict().values()))
    assert flow["consent_withdrawn"] == 6
    summary = json.loads((root / "published" / "releases" / "3" / "release.json").read_text())
    assert summary["excluded_as_withdrawn"] == 6 and summary["withdrawn_since_previous"] == 6
    for release in (2, 3):
        rc, out = _cli("reproduce", "--release", str(release), "--data-root", str(root))
        assert rc == 0 and out.strip().splitlines()[-1] == "reproduced exactly", out


def test_a_retired_delivery_leaves_the_next_release_at_its_step(released):
    root, wh, _ = released
    d = wh.table("participant_covariates", columns=["delivery_id"], distinct=True, order_by=["delivery_id"])
    target = [x for x in d["delivery_id"].to_list() if not x.startswith("fix-")][0]
    rc, _ = _cli("delivery", "retire", target, "--reason", "wrong export", "--data-root", str(root))
    assert rc == 2                                          # the synthetic tables have no registry record
    from cbp_platform.ingest.registry import RetireError, retire_delivery

    with pytest.raises(RetireError, match="looks like a pseudonym"):
        retire_delivery(root, target, f"participant {wh.table('analysis_cohort')['pseudonym'][0]} is wrong")


def test_a_release_whose_versions_were_rewritten_does_not_reproduce(released):
    """A batch re-run by other code rewrites a version's rows under the same delivery: release 1's report no longer
    follows from them; reproduce names the drift, shows the cells side by side and fails. (Last in this module.)"""
    root, wh, _ = released
    metrics = wh.table("muscle_metrics", versions="all")
    key = metrics["batch_key"][0]
    batch = metrics.filter(pl.col("batch_key") == key).drop("supersedes", "superseded_by", "registration_seq")
    wh.replace_rows("muscle_metrics", batch.with_columns(pl.col("lean_ml") * 1.05), {"batch_key": key})
    rc, out = _cli("reproduce", "--release", "1", "--data-root", str(root))
    assert rc == 1
    assert "versions whose rows changed since the release was cut" in out and "muscle_metrics" in out
    assert "published" in out and "rebuilt" in out and out.strip().splitlines()[-1].startswith("NOT reproduced")
