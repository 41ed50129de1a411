"""The cohort model lands near docs/study.md's figures and recovers its generating ORs."""

from __future__ import annotations


import numpy as np
import polars as pl
import pytest

from cbp_platform.synth.calibrate import TARGETS, _population, expected_margins
from cbp_platform.synth.cohort import CohortParameters, exclusion_cause, simulate_cohort
from cbp_platform.synth.report import PAPER, calibration_table, logistic_ors, summarise


@pytest.fixture(scope="module")
def cohort():
    return simulate_cohort(20000, 2024)


def test_committed_defaults_are_the_calibrated_solution():
    p = CohortParameters()
    pop, site_u = _population(200_000, 7, p)
    m = expected_margins(p, pop, site_u)
    for k in ("cbp_prevalence_pa_low", "cbp_prevalence_pa_moderate", "cbp_prevalence_pa_high", "cbp_share_women"):
        assert abs(m[k] - TARGETS[k]) < 0.003, k
    assert abs(m["cbp_mass_below_53"] - 0.5) < 0.01
    assert abs(pop["lmm"].mean() - p.lmm_ref[0]) < 0.05 and abs(pop["lmm"].std() - p.lmm_ref[1]) < 0.05
    assert abs(pop["imat"].mean() - p.imat_ref[0]) < 0.05 and abs(pop["imat"].std() - p.imat_ref[1]) < 0.05


def test_marginal_figures_near_the_paper(cohort):
    s = summarise(cohort)
    assert abs(s["analysed"] / s["scanned"] - PAPER["analysed"] / PAPER["scanned"]) < 0.01
    assert abs(s["cbp_prevalence"] - PAPER["cbp_prevalence"]) < 1.2
    assert abs(s["women_pct"] - PAPER["women_pct"]) < 1.5
    share_women_cbp = s["cbp_women"] / (s["cbp_women"] + s["cbp_men"])
    assert abs(share_women_cbp - 2999 / 6003) < 0.03
    assert abs(s["age_cbp"][0] - 53) <= 1 and abs(s["age_nocbp"][0] - 48) <= 1 and abs(s["age_all"][0] - 49) <= 1
    for lvl in ("low", "moderate", "high"):
        assert abs(s["pa_share"][lvl] - PAPER["pa_share"][lvl]) < 0.015, lvl
        assert abs(s["pa_prev"][lvl] - PAPER["pa_prev"][lvl]) < 2.5, lvl
    # the U shape: moderate activity has the lowest prevalence
    assert s["pa_prev"]["moderate"] < min(s["pa_prev"]["low"], s["pa_prev"]["high"])


def test_exclusions_and_swaps_at_their_rates(cohort):
    ex = exclusion_cause(cohort)
    assert abs(ex.is_not_null().mean() - 3350 / 30868) < 0.008
    swaps = (cohort["fat_water_swap"] != "none").mean()
    assert abs(swaps - 0.018) < 0.004
    causes = set(ex.drop_nulls().unique().to_list())
    assert causes == {"missing_cbp_answer", "missing_physical_activity", "missing_comorbidity",
                      "image_qc_fat_water_swap"}


def _within(est: tuple[float, float, float], true_or: float) -> bool:
    return est[1] <= true_or <= est[2]


def test_logistic_fit_on_true_exposures_recovers_generating_ors(cohort):
    ors = logistic_ors(cohort)
    assert _within(ors["lmm"], 0.87), ors
    assert _within(ors["imat"], 1.22), ors
    nrs = logistic_ors(cohort.with_columns(nrs_high=pl.col("nrs_true") >= 4), "nrs_high")
    assert _within(nrs["lmm"], 0.63), nrs
    assert _within(nrs["imat"], 1.22), nrs
    # and the direction is unmistakable
    assert ors["lmm"][2] < 1.0 < ors["imat"][1]


def test_outcomes_are_associated_but_distinct(cohort):
    a = cohort.filter(exclusion_cause(cohort).is_null())
    hi = (a["nrs_true"] >= 4).to_numpy()
    cbp = a["cbp_true"].to_numpy()
    assert hi[cbp].mean() > 2 * hi[~cbp].mean()
    assert set(np.unique(a["nrs_true"].to_numpy())) <= set(range(11))


def test_calibration_report_renders():
    text = calibration_table(4000, 1)
    assert "| CBP prevalence | 21.8 % |" in text
    assert text.count("\n|") >= 15
