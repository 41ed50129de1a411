"""The report's STROBE tables: unadjusted and adjusted ORs, profile CIs, the site effect, one sensitivity table,
the appendix of model checks, computed from a simulated cohort (3,000 participants) through the functions the
analysis assets and ``cbp reproduce`` call."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest

from cbp_platform import study
from cbp_platform.analysis.models import PROFILE_SUFFIX, UNADJUSTED_MODEL, fit_analysis
from cbp_platform.analysis.strobe import analysis_tables, calibration_bins
from cbp_platform.stats import fit_glmm


@pytest.fixture(scope="module")
def fitted(cohort):
    a = study.PRIMARY_ANALYSES[0]
    return a, fit_analysis(cohort.frame, a, cohort_hash=cohort.cohort_hash)


def test_primary_analysis_carries_unadjusted_profile_and_assessment(cohort, fitted):
    a, f = fitted
    models = set(f.table["model"].to_list())
    primary = f.fit["primary_model"]
    assert {primary, primary + PROFILE_SUFFIX, UNADJUSTED_MODEL, "glmm_laplace", "site_fixed", "gee"} <= models
    frame = a.data(cohort.frame)
    for term in a.exposure_terms:
        # the unadjusted OR is the exposure alone with the site
        crude = fit_glmm(f"{a.outcome} ~ {term} + (1 | {study.SITE})", frame, nagq=25).params[term]
        row = f.table.filter((pl.col("model") == UNADJUSTED_MODEL) & (pl.col("term") == term)).row(0, named=True)
        assert row["estimate"] == pytest.approx(crude, abs=1e-9)
        # the profile rows keep the estimate and change the interval, which contains it
        prof = f.table.filter((pl.col("model") == primary + PROFILE_SUFFIX) & (pl.col("term") == term)).row(
            0, named=True)
        wald = f.table.filter((pl.col("model") == primary) & (pl.col("term") == term)).row(0, named=True)
        assert prof["estimate"] == wald["estimate"] and prof["ci_low"] < prof["estimate"] < prof["ci_high"]
        assert prof["ci_low"] != wald["ci_low"] and abs(prof["ci_low"] - wald["ci_low"]) < 0.05
    s = json.loads(f.fit["assessment"])
    site = s["site_effect"]
    assert site["sd_low"] <= site["sd"] <= site["sd_high"]
    assert site["icc"]["estimate"] == pytest.approx(site["sd"] ** 2 / (site["sd"] ** 2 + math.pi ** 2 / 3))
    assert 0.5 < s["discrimination"]["auc"] < 1 and s["calibration"]["slope_lower"] < 1 < s["calibration"]["slope_upper"]
    assert [m["term"] for m in s["marginal_effects"]] == list(a.exposure_terms)
    assert "ICC (latent scale)" in f.fit["summary"] and "profile" in f.fit["summary"]


def test_strobe_tables_in_display_form(fitted):
    a, f = fitted
    t = analysis_tables(f.table.with_columns(pl.lit(a.name).alias("analysis")), pl.DataFrame([f.fit]))[a.key]
    main = t["main"]
    assert main.columns == ["Exposure (per 2 SD)", "Unadjusted OR (95 % CI)", "Adjusted OR (95 % profile CI)",
                            "Adjusted OR (95 % Wald CI)", "p (adjusted, Wald)"]
    assert main["Exposure (per 2 SD)"].to_list() == [e.label for e in a.exposure_defs]
    assert t["site"]["Measure"].to_list()[:4] == ["Site SD (logit scale)", "Site variance", "ICC (latent scale)",
                                                   "Median odds ratio"]
    est = t["sensitivity"]["Estimator"].to_list()
    assert est[0].startswith("GLMM, AGQ (primary), Wald") and any("GEE" in e for e in est)
    assert t["prediction"]["Measure"].to_list()[0].startswith("AUC")


def test_calibration_bins_suppress_small_cells(fitted):
    _, f = fitted
    s = json.loads(f.fit["assessment"])
    s["calibration"]["bins"][0].update(events=3, n=200)
    s["calibration"]["bins"][1].update(events=198, n=200)
    out = calibration_bins(s, min_count=5)
    assert out["Events"][0] == "<5" and out["Observed (95 % CI)"][0] == "<5"
    assert out["Events"][1] == "<5" and out["Observed (95 % CI)"][1] == "<5"    # 2 non-events
    assert out["Events"][2] != "<5"


def test_the_report_renders_the_strobe_sections(cohort, tmp_path):
    from cbp_platform.analysis.outputs import analysis_outputs, published_tables

    tabs = analysis_outputs(cohort.frame, cohort.flow, lmm_unit="cm3/(kg/m)", cohort_hash=cohort.cohort_hash)
    pub = published_tables(tabs, standardisation=cohort.standardisation, lmm_unit="cm3/(kg/m)")
    for key in (a.key for a in study.PRIMARY_ANALYSES):
        for name in ("main_results", "site_effect", "sensitivity", "prediction", "marginal_effects", "calibration"):
            assert f"{name}_{key}.csv" in pub, (name, key)
    text = pub[f"main_results_{study.PRIMARY_ANALYSES[0].key}.csv"].decode()
    assert "Unadjusted OR" in text and "profile CI" in text
