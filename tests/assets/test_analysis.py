"""The cohort-level half of the graph through Dagster: analysis cohort, models, tables, published report, lineage.

The per-batch tables are written straight into the warehouse from the simulator's truth (exact metrics, no MRI;
``tests/support/synthetic.py``), so these tests exercise the analysis assets in seconds; the whole graph from
NIfTI files runs in ``tests/segmentation`` and in ``make demo``.
"""

import json
import re
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest

from tests.support.synthetic import write_warehouse
from tests.support.warehouse import query as _q
from cbp_platform.paths import DataLayout

COHORT_ASSETS = ("analysis_cohort", "cbp_association_model", "pain_intensity_model", "table_one",
                 "stratified_comparisons", "physical_activity_prevalence", "published_results")


def _refresh(root: Path):
    """Cut the next data release when the data changed (as make demo's runner does), then the cohort refresh."""
    from cbp_platform.definitions import build_definitions
    from orchestration.releases import cut_release

    defs = build_definitions()
    inst = dg.DagsterInstance.get()
    cut_release(inst, if_changed=True, log=lambda *_: None)
    job = defs.resolve_job_def("cohort_refresh")
    return inst, job.execute_in_process(instance=inst, raise_on_error=False)



@pytest.fixture(scope="module")
def refreshed(tmp_path_factory):
    from orchestration.runner import pipeline_environment

    root = tmp_path_factory.mktemp("analysis")
    with pipeline_environment(root):
        tables = write_warehouse(root, 4000, seed=11)
        inst, res = _refresh(root)
        yield root, inst, res, tables


def test_refresh_materialises_every_cohort_asset_and_check(refreshed):
    root, inst, res, _ = refreshed
    assert res.success
    for a in COHORT_ASSETS:
        assert inst.get_latest_materialization_event(dg.AssetKey(a)) is not None, a
    for asset, check in (("analysis_cohort", "analysis_cohort_expectations"),
                         ("cbp_association_model", "cbp_model_checks"),
                         ("pain_intensity_model", "pain_model_checks")):
        rec = inst.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey(asset), check), limit=1)[0]
        assert rec.event.dagster_event.event_specific_data.passed, (asset, check)


def test_cohort_flow_reconciles_and_hash_is_the_data_version(refreshed):
    root, inst, _, tables = refreshed
    flow = _q(root, "SELECT * FROM exclusion_flow ORDER BY step")
    n = _q(root, "SELECT count(*) AS n FROM analysis_cohort")["n"][0]
    assert flow["remaining"][0] == 4000
    assert flow["remaining"][0] - flow["excluded"].fill_null(0).sum() == n == flow["remaining"][-1]
    from cbp_platform.synth.cohort import exclusion_cause

    assert n == int(exclusion_cause(tables["truth"]).is_null().sum())
    t1 = _q(root, "SELECT * FROM table_one")
    part = t1.filter(pl.col("key") == "participants")
    assert part["all_n"][0] == n == part["cbp_n"][0] + part["no_cbp_n"][0]
    ev = inst.get_latest_materialization_event(dg.AssetKey("analysis_cohort")).asset_materialization
    meta = _q(root, "SELECT cohort_hash FROM analysis_cohort_meta")
    assert ev.tags["dagster/data_version"] == meta["cohort_hash"][0] == ev.metadata["cohort_hash"].value


def test_models_recover_the_generating_odds_ratios(refreshed):
    root, _, _, tables = refreshed
    from cbp_platform.synth.cohort import CohortParameters

    p = CohortParameters()
    res = _q(root, "SELECT * FROM model_results WHERE model = 'glmm_agq25'")
    cbp = {r["term"]: r for r in res.filter(pl.col("analysis") == "cbp_association_model").iter_rows(named=True)}
    # the exposures were standardised on this cohort's SD, the generating ORs on the reference SD: rescale
    std = json.loads(_q(root, "SELECT standardisation FROM analysis_cohort_meta")["standardisation"][0])
    for term, or_2sd, ref_sd, sd in (("lmm_z2", p.or_lmm_2sd, p.lmm_ref[1], std["lmm"]["sd"]),
                                     ("imat_z2", p.or_imat_2sd, p.imat_ref[1], std["imat"]["sd"])):
        true_or = float(np.exp(np.log(or_2sd) * sd / ref_sd))
        assert cbp[term]["or_low"] <= true_or <= cbp[term]["or_high"], (term, true_or, cbp[term])
    fits = _q(root, "SELECT * FROM model_fits ORDER BY analysis")
    assert fits["converged"].all() and (fits["method"] == "agq").all()
    pain = fits.filter(pl.col("analysis") == "pain_intensity_model")
    cohort = _q(root, "SELECT count(*) AS n FROM analysis_cohort WHERE nrs_high IS NOT NULL")
    assert pain["nobs"][0] == cohort["n"][0]
    # every analysis of the registry: the paper's two, and per secondary exposure one extending each
    from cbp_platform import study

    assert set(res["analysis"]) == {a.name for a in study.ANALYSES} >= {"cbp_association_model", "pain_intensity_model"}
    for a in study.SECONDARY_ANALYSES:
        fit = fits.filter(pl.col("analysis") == a.name).row(0, named=True)
        assert (fit["role"], fit["extends"], fit["error"]) == ("secondary", a.extends, None)
        terms = set(res.filter(pl.col("analysis") == a.name)["term"])
        assert set(a.exposure_terms) <= terms
        assert not terms - set(a.exposure_terms) - set(res.filter(pl.col("analysis") == a.extends)["term"])
    primary_terms = set(res.filter(pl.col("analysis").is_in([a.name for a in study.PRIMARY_ANALYSES]))["term"])
    assert not primary_terms & {e.z_column for e in study.SECONDARY_EXPOSURES}   # the paper's models stay the paper's
    sens = _q(root, "SELECT DISTINCT model FROM model_results")["model"].to_list()
    assert {"glmm_agq25", "glmm_laplace", "site_fixed", "gee"} <= set(sens)


def test_report_has_every_section_and_no_pseudonym(refreshed):
    root, _, _, tables = refreshed
    latest = json.loads((root / "published" / "latest.json").read_text())
    out = DataLayout(root).resolve(latest["path"])
    md = (out / "report.md").read_text()
    for heading in ("Exclusion flow", "Table 1", "Physical activity", "Mixed logistic regression",
                    "Stratified comparisons", "Paper vs this run", "Secondary exposures", "Lineage"):
        assert heading in md, heading
    pvr = (out / "tables" / "paper_vs_run.csv").read_text()
    assert "Fat fraction" not in pvr and "LMM, per 2 SD" in pvr            # secondary never beside a paper value
    assert "Fat fraction, per 2 SD" in md.split("Secondary exposures")[1]
    for fig in ("flow", "pa_prevalence", "forest", "forest_secondary"):
        png = (out / "figures" / f"{fig}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (out / "report.html").read_text().count("<img") >= 3
    pseudonyms = set(tables["truth"]["pseudonym"].to_list())
    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".md", ".html", ".csv", ".json"):
            text = f.read_text()
            assert not any(p in text for p in pseudonyms), f


def test_lineage_manifest_ties_the_report_to_its_inputs(refreshed):
    root, inst, _, _ = refreshed
    latest = json.loads((root / "published" / "latest.json").read_text())
    m = json.loads((DataLayout(root).resolve(latest["path"]) / "lineage.json").read_text())
    meta = _q(root, "SELECT * FROM analysis_cohort_meta")
    assert m["cohort"]["cohort_hash"] == meta["cohort_hash"][0]
    assert [b["batch_key"] for b in m["batches"]] == json.loads(meta["batches"][0])
    assert m["inputs"]["segmentation_weights_sha256"] == ["d" * 64]
    assert re.fullmatch(r"[0-9a-f]{40}", m["code"]["git_commit"]) or m["code"]["git_commit"].startswith("unknown")
    assert m["packages"]["statsmodels"] and m["packages"]["torch"].startswith("2.13.0")
    run = inst.get_latest_materialization_event(dg.AssetKey("cbp_association_model")).run_id
    assert m["cohort_assets"]["cbp_association_model"]["run_id"] == run
    for k, f in m["files"].items():
        assert (DataLayout(root).resolve(latest["path"]) / f["path"]).exists(), k


def test_cbp_lineage_prints_the_chain_and_a_participant_path(refreshed, capsys):
    from cbp_platform.cli import main

    root, _, _, tables = refreshed
    assert main(["lineage", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "published_results" in out and "cbp_association_model" in out and "analysis cohort" in out
    assert "segmentation weights sha256 " + "d" * 64 in out
    assert main(["lineage", "--data-root", str(root), "--asset", "table_one"]) == 0
    assert "table_one" in capsys.readouterr().out
    truth = tables["truth"]
    excluded = truth.filter(pl.col("missing_cbp"))["pseudonym"][0]
    assert main(["lineage", "--data-root", str(root), "--participant", excluded]) == 0
    out = capsys.readouterr().out
    assert "excluded" in out and "cbp_not_answered" in out
    from cbp_platform.synth.cohort import exclusion_cause

    included = truth.filter(exclusion_cause(truth).is_null())["pseudonym"][0]
    assert main(["lineage", "--data-root", str(root), "--participant", included]) == 0
    assert "included" in capsys.readouterr().out
    assert main(["lineage", "--data-root", str(root), "--participant", "not-a-pseudonym"]) == 2


def test_the_disclosure_limit_is_configured_and_the_report_says_which(refreshed):
    """published_results' config min_count: under 10 the report says 10 and marks hidden cells '<10' (it said '<5'
    whatever the limit); the default run restores the report of the default limit."""
    from cbp_platform.definitions import build_definitions

    root, inst, _, _ = refreshed
    job = build_definitions().resolve_job_def("cohort_refresh")
    for limit in (10, None):
        config = {"ops": {"published_results": {"config": {"min_count": limit}}}} if limit else None
        res = job.execute_in_process(instance=inst, raise_on_error=False, run_config=config,
                                     asset_selection=[dg.AssetKey("published_results")])
        assert res.success
        md = (DataLayout(root).resolve(json.loads((root / "published" / "latest.json").read_text())["path"])
              / "report.md").read_text()
        shown = limit or 5
        assert f"Counts below {shown} and every statistic computed from them are shown as '<{shown}'" in md
        assert (re.search(r"<5(?!00)", md) is None) == (limit == 10)
        ev = inst.get_latest_materialization_event(dg.AssetKey("published_results")).asset_materialization
        assert ev.metadata["disclosure_min_count"].value == shown


def test_too_few_events_fails_with_a_named_model_check(tmp_path):
    from orchestration.runner import pipeline_environment

    with pipeline_environment(tmp_path):
        write_warehouse(tmp_path, 250, seed=12)
        inst, res = _refresh(tmp_path)
    assert not res.success
    failures = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"]
    text = " ".join(e.event_specific_data.error.message for e in failures
                    if e.step_key in ("cbp_association_model", "pain_intensity_model"))
    assert "model checks failed" in text and "events_per_variable" in text
    # the cohort and descriptive tables still materialise; nothing is published from a failed model
    assert inst.get_latest_materialization_event(dg.AssetKey("analysis_cohort")) is not None
    assert inst.get_latest_materialization_event(dg.AssetKey("published_results")) is None


def test_the_refresh_computes_cohort_level_assets_only():
    """The daily refresh recomputes the analysis from all batches but never a batch (those run per delivery)."""
    from assets.schedules import COHORT_LEVEL
    from cbp_platform.definitions import build_definitions

    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    keys = COHORT_LEVEL.resolve(graph)
    assert {k.to_user_string() for k in keys} >= set(COHORT_ASSETS)
    assert all(graph.get(k).partitions_def is None for k in keys)
    sched = defs.resolve_schedule_def("daily_cohort_refresh")
    assert sched.job_name == "cohort_refresh" and sched.default_status == dg.DefaultScheduleStatus.RUNNING


def test_report_refuses_inputs_from_another_analysis_cohort(tmp_path):
    """Re-materialising analysis_cohort (here with another LMM normaliser) makes every table and model stale; the
    report is not published from such a mix."""
    from orchestration.runner import pipeline_environment
    from cbp_platform.definitions import build_definitions

    with pipeline_environment(tmp_path):
        write_warehouse(tmp_path, 1500, seed=13)
        inst, res = _refresh(tmp_path)
        assert res.success
        job = build_definitions().resolve_job_def("cohort_refresh")
        res = job.execute_in_process(
            instance=inst, raise_on_error=False, asset_selection=[dg.AssetKey("analysis_cohort")],
            run_config={"ops": {"analysis_cohort": {"config": {"lmm_normaliser": "per_height2"}}}})
        assert res.success
        res = job.execute_in_process(instance=inst, raise_on_error=False,
                                     asset_selection=[dg.AssetKey("published_results")])
    assert not res.success
    (failure,) = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"]
    msg = failure.event_specific_data.error.message
    assert "not computed on the current analysis cohort" in msg and "cbp_association_model" in msg
    assert "table_one" in msg


@pytest.mark.postgres
def test_the_postgres_warehouse_gives_the_same_cohort_and_odds_ratios(refreshed, postgres_server, tmp_path,
                                                                     monkeypatch):
    """The same per-batch tables in the production warehouse (PostgreSQL, chosen by configuration only), the same
    cohort refresh through Dagster: the same cohort hash, exclusion flow, tables and odds ratios as DuckDB."""
    from polars.testing import assert_frame_equal

    from orchestration.runner import pipeline_environment
    from orchestration.profiles import warehouse

    root = refreshed[0]
    schema = "analysis_equivalence"
    for k, v in postgres_server.warehouse_env(schema).items():
        monkeypatch.setenv(k, v)
    pg_root = tmp_path / "pg"
    with pipeline_environment(pg_root):
        wh = warehouse()
        assert type(wh).__name__ == "PostgresWarehouse" and wh.schema_name == schema
        write_warehouse(pg_root, 4000, seed=11, warehouse=wh)
        _, res = _refresh(pg_root)
    assert res.success
    assert not (pg_root / "warehouse").exists()                 # nothing went to a DuckDB file
    pg = postgres_server.warehouse(schema)
    meta = pg.table("analysis_cohort_meta").row(0, named=True)
    duck = _q(root, "SELECT * FROM analysis_cohort_meta").row(0, named=True)
    assert (meta["cohort_hash"], meta["n_analysed"]) == (duck["cohort_hash"], duck["n_analysed"])
    cols = ["analysis", "model", "term", "or", "or_low", "or_high", "p"]
    order = ["analysis", "model", "term"]
    assert_frame_equal(pg.table("model_results", columns=cols, order_by=order),
                       _q(root, f"SELECT {', '.join(chr(34) + c + chr(34) for c in cols)} FROM model_results "
                                "ORDER BY analysis, model, term"), rtol=1e-9, atol=1e-12)
    assert_frame_equal(pg.table("exclusion_flow", order_by=["step"]),
                       _q(root, "SELECT * FROM exclusion_flow ORDER BY step"))
    for t in ("table_one", "stratified_comparisons", "physical_activity_prevalence"):    # rows in builder order
        assert_frame_equal(pg.table(t, order_by=["row_order"]), _q(root, f"SELECT * FROM {t} ORDER BY row_order"),
                           rtol=1e-9)
    latest = json.loads((pg_root / "published" / "latest.json").read_text())
    assert latest["cohort_hash"] == duck["cohort_hash"]
    # the living cohort on PostgreSQL: a correction of 40 answers, its impact, release 2, and both reproduce
    from cbp_platform.cli import main
    from orchestration.releases import pending_impact, reproduce
    from resources import DataRootResource
    from tests.support.synthetic import correct_covariates

    with pipeline_environment(pg_root):
        wh = warehouse()
        chosen = wh.table("analysis_cohort", columns=["pseudonym"], order_by=["pseudonym"])["pseudonym"][:40]
        correct_covariates(wh, chosen.to_list(), "fix-pg", 70)
        doc = pending_impact(wh, DataRootResource(root=str(pg_root)))
        assert doc["changed_participants"] == 40 and not doc["withheld"]
        assert any(abs(o["or_change"]) > 1e-4 for o in doc["odds_ratios"] if o["or_change"] is not None)
        _, res = _refresh(pg_root)
        assert res.success and pg.table("analysis_cohort_meta")["release_id"][0] == 2
        lines = []
        assert reproduce(1, out=lines.append) and reproduce(2, out=lines.append), lines
        assert lines[-1] == "reproduced exactly"
    assert main(["release", "list", "--data-root", str(pg_root)]) == 0


def test_a_rejection_reaches_the_flow_the_numbers_and_the_lineage(refreshed, capsys):
    """A reviewer's rejection makes the cohort stale; the refresh excludes the participant at qc_rejected,
    changes the published numbers and names the reviews in the lineage; once the label map is replaced, the old
    rejection is outdated and the participant is analysed again. (Last in this module: it adds a review.)"""
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.loader import LoadingContextForTest

    from cbp_platform.cli import main
    from cbp_platform.definitions import build_definitions
    from cbp_platform.qc.reviews import digest
    from resources import DuckDBWarehouse
    from resources.reviews import ReviewStore

    root, inst, _, _ = refreshed
    wh = DuckDBWarehouse(database=str(DataLayout(root).warehouse_file))
    before = _q(root, "SELECT * FROM analysis_cohort_meta").row(0, named=True)
    flow0 = {r["criterion"]: r for r in _q(root, "SELECT * FROM exclusion_flow").iter_rows(named=True)}
    assert flow0["qc_rejected"]["excluded"] == 0 and before["reviews_count"] == 0
    p = _q(root, "SELECT pseudonym FROM analysis_cohort ORDER BY pseudonym LIMIT 1")["pseudonym"][0]

    row = ReviewStore(wh, instance=inst).record(p, "reject", reviewer="dr-test", reason="misregistered",
                                                note="labels one vertebra low")
    # the release the analysis reads was cut before the review: it is stale, and the next cut would differ
    from orchestration.releases import unchanged_since_latest
    from resources import DataRootResource

    graph = build_definitions().resolve_asset_graph()
    latest = _q(root, "SELECT max(release_id) AS r FROM releases")["r"][0]
    status = CachingStaleStatusResolver(inst, graph, LoadingContextForTest(inst)).get_status(
        dg.AssetKey("data_release"), str(latest))
    assert status == StaleStatus.STALE
    assert unchanged_since_latest(wh, DataRootResource(root=str(root))) is None

    _, res = _refresh(root)
    assert res.success
    flow = {r["criterion"]: r for r in _q(root, "SELECT * FROM exclusion_flow").iter_rows(named=True)}
    assert flow["qc_rejected"]["excluded"] == 1
    assert flow["analysed"]["remaining"] == flow0["analysed"]["remaining"] - 1
    assert _q(root, "SELECT reason FROM analysis_exclusions WHERE pseudonym = ?", [p])["reason"][0] == "qc_rejected"
    after = _q(root, "SELECT * FROM analysis_cohort_meta").row(0, named=True)
    n, sha = digest(_q(root, "SELECT * FROM qc_reviews"))
    assert (after["reviews_count"], after["reviews_sha256"], after["qc_rejected"]) == (1, sha, 1)
    assert after["cohort_hash"] != before["cohort_hash"]
    latest = json.loads((root / "published" / "latest.json").read_text())
    assert latest["cohort_hash"] == after["cohort_hash"]
    manifest = json.loads((DataLayout(root).resolve(latest["path"]) / "lineage.json").read_text())
    assert manifest["reviews"]["count"] == 1 and manifest["reviews"]["sha256"] == sha
    assert manifest["reviews"]["rejected_in_force"] == 1
    report = (DataLayout(root).resolve(latest["path"]) / "report.md").read_text()
    assert sha in report
    for f in DataLayout(root).resolve(latest["path"]).rglob("*"):
        if f.is_file() and f.suffix in (".md", ".html", ".csv", ".json"):
            assert p not in f.read_text(), f
    assert main(["lineage", "--data-root", str(root), "--participant", p]) == 0
    out = capsys.readouterr().out
    assert re.search(r"qc_review\s+rejected \[.+\]: by dr-test at .+ misregistered \(labels one vertebra low\)", out)
    assert "excluded: qc_rejected" in out and row["label_sha256"][:12] in out

    # a re-run replaces the label map and measures it: the rejection is outdated, never applied to the new map
    wh.replace_rows("muscle_segmentations", _q(root, "SELECT * FROM muscle_segmentations").with_columns(
        pl.when(pl.col("pseudonym") == p).then(pl.lit("e" * 64)).otherwise(pl.col("label_sha256"))
        .alias("label_sha256")), {})
    wh.replace_rows("provenance", _q(root, "SELECT * FROM provenance").with_columns(
        pl.when(pl.col("pseudonym") == p).then(pl.lit(json.dumps({"labels": "e" * 64})))
        .otherwise(pl.col("input_checksums")).alias("input_checksums")), {})
    _, res = _refresh(root)                 # the next release freezes the new map (and the outdated review)
    assert res.success
    again = _q(root, "SELECT * FROM analysis_cohort_meta").row(0, named=True)
    assert again["qc_rejected"] == 0 and again["qc_outdated"] == 1
    assert again["cohort_hash"] == before["cohort_hash"]
    assert main(["lineage", "--data-root", str(root), "--participant", p]) == 0
    assert "outdated" in capsys.readouterr().out
