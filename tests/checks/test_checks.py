"""The check logic fails on bad data and says which expectation failed on how many rows."""

import numpy as np
import polars as pl

from checks.gx import outcomes_metadata, run_suite
from checks.ingestion import covariate_expectations, scan_expectations
from cbp_platform.imaging.qc import fat_water_swap
from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom


def _cov(**over):
    base = dict(pseudonym=["AAAAAAAAAA", "BBBBBBBBBB", "CCCCCCCCCC"], site=["Berlin", "Essen", "Mannheim"],
                exam_date=["2015-01-02"] * 3, age=[40, 50, 60], sex=["F", "M", "F"], height_cm=[170.0, 180.0, 160.0],
                weight_kg=[70.0, 80.0, 60.0], cbp=[True, False, None], nrs_pain=[2, 5, None],
                met_min_week=[100, 1000, 6000], diabetes=[False] * 3, dyslipidemia=[False] * 3,
                osteoporosis=[False] * 3, osteoarthritis=[True, False, False])
    base.update(over)
    return pl.DataFrame(base)


def test_covariate_suite_passes_on_good_rows():
    md = outcomes_metadata(run_suite("cov_ok", _cov(), covariate_expectations()))
    assert md["failed_expectations"] == 0 and md["expectations"] >= 12


def test_covariate_suite_names_the_failing_expectation_and_count():
    bad = _cov(age=[7, 50, 112], site=["Berlin", "Hamburg", "Essen"], pseudonym=["AAAAAAAAAA"] * 2 + ["CCCCCCCCCC"])
    md = outcomes_metadata(run_suite("cov_bad", bad, covariate_expectations()))
    assert md["failed_expectations"] == 3
    assert "expect_column_values_to_be_between(age): 2 of 3 rows" in md["failures"]
    assert "expect_column_values_to_be_in_set(site): 1 of 3 rows" in md["failures"]
    assert any(f.startswith("expect_column_values_to_be_unique(pseudonym)") for f in md["failures"])
    assert "| FAIL |" in md["results"]


def test_scan_suite_catches_bad_spacing():
    df = pl.DataFrame(dict(pseudonym=["A", "B"], water_sha256=["x", "y"], fat_sha256=["x", "y"], affine=["[]", "[]"],
                           orientation=["LAS", "LAS"], spacing_x=[4.0, 40.0], spacing_y=[4.0, 4.0], spacing_z=[6.0, 6.0],
                           shape_x=[96, 96], shape_y=[72, 72], shape_z=[48, 48], dtype=["int16", "int16"],
                           water_min=[0.0, 0.0], fat_min=[0.0, 0.0]))
    md = outcomes_metadata(run_suite("scans", df, scan_expectations()))
    assert md["failures"] == ["expect_column_values_to_be_between(spacing_x): 1 of 2 rows"]


def test_swap_detector_on_phantoms():
    """Detection and false alarms against known truth (the benchmark reports the same on more scans)."""
    preset = PRESETS["fast"]
    rng = np.random.default_rng(0)
    flags = {"none": [], "full": [], "slab": []}
    for i in range(48):
        kind = ("none", "none", "full", "slab")[i % 4]
        s = Subject(female=bool(rng.random() < 0.45), age=float(rng.integers(19, 75)),
                    height_cm=float(rng.normal(172, 9)), weight_kg=float(rng.normal(78, 16)),
                    imat_pct=float(rng.uniform(3, 15)), mfi=0.04, lean_ml=(400, 390, 120, 120), swap=kind)
        ph = render_phantom(s, preset, np.random.default_rng(i))
        flags[kind].append(fat_water_swap(ph.water, ph.fat, preset.spacing).suspected)
    assert sum(flags["none"]) == 0
    assert np.mean(flags["full"] + flags["slab"]) >= 0.95


def test_analysis_cohort_expectations_cover_every_exposure(cohort):
    """The cohort's expectations come from the registry: each exposure in its plausible range and standardised
    (mean 0, SD 1/2), the secondary fat fraction included; a fat fraction above 100 % is named."""
    from checks.analysis import MODEL_COLUMNS, cohort_expectations

    exp = cohort_expectations()
    cols = {kw["column"] for _, kw in exp}
    assert {"lmm", "imat", "ff", "lmm_z2", "imat_z2", "ff_z2"} <= cols and "ff_z2" not in MODEL_COLUMNS
    md = outcomes_metadata(run_suite("cohort_ok", cohort.frame, exp))
    assert md["failed_expectations"] == 0
    bad = cohort.frame.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(150.0).otherwise(pl.col("ff"))
                                    .alias("ff"))
    md = outcomes_metadata(run_suite("cohort_bad", bad, exp))
    assert md["failures"] == ["expect_column_values_to_be_between(ff): 1 of %d rows" % bad.height]
