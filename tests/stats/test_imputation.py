"""Multiple imputation (cbp_platform.stats.imputation) and the MAR missingness of the simulator.

Reference values: ``tests/fixtures/mice/small.json``, written by ``tools/mice_reference.R`` from the completed data
sets in ``tests/fixtures/mice/small.imputations.parquet`` (lme4::glmer nAGQ = 25 with tight control on each,
pooled with mice::pool). Regenerate both (docs/statistics.md, "Missing data") when the simulator changes.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
from scipy import stats

from cbp_platform.stats.design import DESIGN_ATOL, INEXACT_DESIGN_COLUMNS, PAPER_COVARIATES
from cbp_platform.stats.glmm import TIDY_COLUMNS
from cbp_platform.stats.imputation import (ALL_SITES, MIResult, barnard_rubin_df, fit_glmm_mi, impute,
                                           missingness_table, pool_rubin, simulated_mi_design, stack_imputations,
                                           unstack_imputations)
from cbp_platform.stats.logistic import logistic_mle
from cbp_platform.synth.cohort import CohortParameters, simulate_cohort

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mice"
BINARY = ("diabetes", "dyslipidemia", "osteoporosis", "osteoarthritis")


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((FIXTURES / "small.json").read_text())


@pytest.fixture(scope="module")
def completed(reference) -> list[pl.DataFrame]:
    return unstack_imputations(pl.read_parquet(FIXTURES / reference["design"]["values"]))


@pytest.fixture(scope="module")
def design(reference) -> pl.DataFrame:
    d = reference["design"]
    return simulated_mi_design(d["n_simulated"], d["seed"])


@pytest.fixture(scope="module")
def mi(completed, reference) -> MIResult:
    d = reference["design"]
    return fit_glmm_mi(completed, d["outcome"], d["fixed"], d["group"], nagq=reference["nAGQ"])


# ------------------------------------------------------------------------------------------------------------
# Rubin's rules


def test_pool_rubin_matches_a_hand_computation():
    q = [[0.10, -1.0], [0.16, -1.2], [0.13, -0.9]]
    se = [[0.05, 0.30], [0.06, 0.28], [0.04, 0.33]]
    dfcom = 120.0
    pooled = pool_rubin(q, se, ["a", "b"], dfcom).to_dicts()
    m = 3
    for j, row in enumerate(pooled):
        col_q = [r[j] for r in q]
        col_u = [r[j] ** 2 for r in se]
        qbar = sum(col_q) / m
        ubar = sum(col_u) / m
        b = sum((x - qbar) ** 2 for x in col_q) / (m - 1)
        t = ubar + (1 + 1 / m) * b
        lam = (1 + 1 / m) * b / t
        nu_old = (m - 1) / lam ** 2
        nu_obs = (dfcom + 1) / (dfcom + 3) * dfcom * (1 - lam)
        df = nu_old * nu_obs / (nu_old + nu_obs)
        riv = (1 + 1 / m) * b / ubar
        assert row["qbar"] == pytest.approx(qbar, rel=1e-14)
        assert row["ubar"] == pytest.approx(ubar, rel=1e-14)
        assert row["b"] == pytest.approx(statistics.variance(col_q), rel=1e-12)
        assert row["b"] == pytest.approx(b, rel=1e-12)
        assert row["t"] == pytest.approx(t, rel=1e-14)
        assert row["lambda"] == pytest.approx(lam, rel=1e-12)
        assert row["riv"] == pytest.approx(riv, rel=1e-12)
        assert row["df"] == pytest.approx(df, rel=1e-12)
        assert row["fmi"] == pytest.approx((riv + 2 / (df + 3)) / (riv + 1), rel=1e-12)
    # infinite complete-data df: the old Rubin df (m - 1) / lambda^2; no between-imputation variance: lambda floor
    inf = pool_rubin(q, se, ["a", "b"]).to_dicts()
    assert inf[0]["df"] == pytest.approx((m - 1) / inf[0]["lambda"] ** 2, rel=1e-12)
    flat = pool_rubin([[1.0], [1.0]], [[0.2], [0.2]]).row(0, named=True)
    assert flat["b"] == 0.0 and flat["lambda"] == 0.0 and flat["df"] == pytest.approx(1 / 1e-8)
    assert barnard_rubin_df(2, np.array([0.0]), np.array([0.04]), 10.0)[0] < 10.0
    with pytest.raises(ValueError):
        pool_rubin([[1.0]], [[0.1]])


def test_pool_rubin_reproduces_mice_pool_on_rs_own_fits(reference):
    """The pooling arithmetic alone: R's per-imputation estimates and SEs pooled here equal mice::pool's."""
    est = [f["estimate"] for f in reference["fits"]]
    se = [f["se"] for f in reference["fits"]]
    dfcom = reference["pooled"]["dfcom"][0]
    got = pool_rubin(est, se, reference["terms"], dfcom)
    for col, key in (("qbar", "estimate"), ("ubar", "ubar"), ("b", "b"), ("t", "t"), ("df", "df"),
                     ("riv", "riv"), ("lambda", "lambda"), ("fmi", "fmi")):
        np.testing.assert_allclose(got.get_column(col).to_numpy(), reference["pooled"][key], rtol=1e-10, atol=0,
                                   err_msg=col)


# ------------------------------------------------------------------------------------------------------------
# agreement with lme4 + mice on the same completed data sets


def test_mi_glmm_agrees_with_lme4_and_mice_pool(mi, reference):
    assert mi.terms == reference["terms"]
    assert mi.m == reference["m"] == 20
    assert mi.dfcom == reference["pooled"]["dfcom"][0]                 # lme4's df.residual, via broom's glance
    R = reference["pooled"]
    np.testing.assert_allclose(mi.params.to_numpy(), R["estimate"], rtol=0, atol=1e-6)
    # variances come from the observed information: relative agreement, as the lme4 comparison (test_glmm.py)
    np.testing.assert_allclose(mi.pooled["ubar"].to_numpy(), R["ubar"], rtol=1e-4, atol=0)
    np.testing.assert_allclose(mi.pooled["t"].to_numpy(), R["t"], rtol=1e-4, atol=0)
    np.testing.assert_allclose(mi.pooled["b"].to_numpy(), R["b"], rtol=1e-3, atol=1e-10)
    np.testing.assert_allclose(mi.bse.to_numpy(), reference["summary"]["std_error"], rtol=1e-4, atol=0)
    np.testing.assert_allclose(mi.df.to_numpy(), R["df"], rtol=1e-4, atol=0)
    np.testing.assert_allclose(mi.fmi.to_numpy(), R["fmi"], rtol=0, atol=1e-5)
    ci = mi.conf_int()
    np.testing.assert_allclose(ci[0].to_numpy(), reference["summary"]["conf_low"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ci[1].to_numpy(), reference["summary"]["conf_high"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(mi.pvalues.to_numpy(), reference["summary"]["p_value"], rtol=1e-3, atol=1e-8)
    # each completed data set's fit too
    for fit, r in zip(mi.fits, reference["fits"]):
        np.testing.assert_allclose(fit.coefficients["estimate"].to_numpy(), r["estimate"], rtol=0, atol=1e-6)


def test_mi_result_is_shaped_like_statsmodels_results(mi):
    terms = mi.terms
    for s in (mi.params, mi.bse, mi.pvalues, mi.df, mi.fmi, mi.tvalues):
        assert isinstance(s, pd.Series) and list(s.index) == terms
    ci = mi.conf_int()
    assert isinstance(ci, pd.DataFrame) and list(ci.columns) == [0, 1] and list(ci.index) == terms
    assert (ci[0] < mi.params).all() and (mi.params < ci[1]).all()
    wider = mi.conf_int(alpha=0.01)
    assert (wider[0] < ci[0]).all()
    tidy = mi.coefficients
    assert tuple(tidy.columns) == TIDY_COLUMNS and set(tidy["model"]) == {"mi_glmm"}
    np.testing.assert_allclose(tidy["or"].to_numpy(), np.exp(mi.params.to_numpy()))
    np.testing.assert_allclose(tidy["p"].to_numpy(), mi.pvalues.to_numpy())
    text = mi.summary()
    assert "m = 20" in text and all(t in text for t in terms)
    # between-imputation variance is positive where something was imputed, and the FMI is small (~3 % missing)
    fmi = dict(zip(terms, mi.fmi))
    assert 0 < fmi["pa_high"] < 0.3 and 0 < fmi["lmm_z2"] < 0.3


# ------------------------------------------------------------------------------------------------------------
# the completed data sets


def test_committed_imputations_are_those_of_the_simulated_design(completed, design, reference):
    """The fixture's observed cells are the regenerated design's; its imputed cells are valid values."""
    meta = reference["design"]
    assert design.height == meta["n_obs"] and int(design["cbp"].sum()) == meta["events"]
    assert len(completed) == meta["m"]
    missing = {c: int(design[c].null_count()) for c in PAPER_COVARIATES}
    assert missing == meta["missing"]
    assert design.drop_nulls().height == meta["complete_cases"]
    for fr in completed:
        assert fr.columns == design.columns and fr.null_count().sum_horizontal().item() == 0
        for c in design.columns:
            obs = design[c].is_not_null().to_numpy()
            a, b = fr[c], design[c]
            if c in INEXACT_DESIGN_COLUMNS:
                assert np.allclose(a.to_numpy()[obs], b.to_numpy()[obs], rtol=0, atol=DESIGN_ATOL), c
            elif b.dtype == pl.String:
                assert (a.to_numpy()[obs] == b.to_numpy()[obs]).all(), c
            else:
                assert np.array_equal(a.cast(pl.Float64).to_numpy()[obs], b.cast(pl.Float64).to_numpy()[obs]), c
        for c in (*BINARY, "pa_moderate", "pa_high"):
            assert set(fr[c].unique().to_list()) <= {0.0, 1.0}, c
        assert (fr["pa_moderate"] + fr["pa_high"]).max() <= 1.0


def test_imputation_is_deterministic_in_the_seed(design, completed, reference):
    """Each completed data set is its own chain, seeded by SeedSequence(seed).spawn(m): the first two of the
    fixture's m = 20 (imputed when it was written) come back from m = 2 with the same seed, and differ under
    another seed."""
    seed = reference["design"]["imputation_seed"]
    first = impute(design, "cbp", PAPER_COVARIATES, "site", m=2, seed=seed)
    for a, b in zip(first, completed[:2]):
        for c in (*BINARY, "pa_moderate", "pa_high"):
            assert a[c].equals(b[c]), c
    other = impute(design, "cbp", PAPER_COVARIATES, "site", m=2, seed=seed + 1)
    imputed = design["pa_moderate"].is_null().to_numpy()
    assert any(not np.array_equal(o["pa_high"].to_numpy()[imputed], f["pa_high"].to_numpy()[imputed])
               or not np.array_equal(o["pa_moderate"].to_numpy()[imputed], f["pa_moderate"].to_numpy()[imputed])
               for o, f in zip(other, first))
    long = stack_imputations(first)
    assert long.columns[:2] == [".imp", ".id"] and long.height == 2 * design.height
    assert all(a.equals(b) for a, b in zip(unstack_imputations(long), first))


def test_impute_rejects_missing_outcomes_and_keeps_complete_frames():
    df = pl.DataFrame({"site": ["a", "b", "a", "b"], "cbp": [1, None, 0, 1], "x": [0.1, 0.2, 0.3, 0.4]})
    with pytest.raises(ValueError, match="MID"):
        impute(df, "cbp", ["x"], "site", m=2)
    done = impute(df.drop_nulls(), "cbp", ["x"], "site", m=3)
    assert len(done) == 3 and all(d["x"].to_list() == [0.1, 0.3, 0.4] for d in done)


# ------------------------------------------------------------------------------------------------------------
# missingness


def test_missingness_table_counts_match_direct_counts(design):
    t = missingness_table(design, ["pa_high", "diabetes", "age_10y"], "site")
    sites = sorted(design["site"].unique().to_list())
    assert t.height == 3 * (len(sites) + 1)
    for r in t.iter_rows(named=True):
        part = design if r["site"] == ALL_SITES else design.filter(pl.col("site") == r["site"])
        assert r["participants_n"] == part.height
        assert r["missing_n"] == part[r["variable"]].null_count()
        assert r["missing_pct"] == pytest.approx(100 * r["missing_n"] / part.height)
    per_site = t.filter(pl.col("site") != ALL_SITES).group_by("variable").agg(pl.col("missing_n").sum())
    total = t.filter(pl.col("site") == ALL_SITES).select("variable", "missing_n")
    assert per_site.sort("variable").equals(total.sort("variable"))
    assert t.filter(pl.col("variable") == "age_10y")["missing_n"].sum() == 0
    nan = missingness_table(pl.DataFrame({"site": ["a", "a"], "v": [float("nan"), 1.0]}), ["v"])
    assert nan["missing_n"].to_list() == [1, 1]


# ------------------------------------------------------------------------------------------------------------
# the simulator's MAR missingness


@pytest.fixture(scope="module")
def big_cohort() -> pl.DataFrame:
    return simulate_cohort(30000, 17)


def _missing_model(cohort: pl.DataFrame, flag: pl.Series, with_cbp: bool):
    sites = sorted(cohort["site"].unique().to_list())
    cols = [np.ones(cohort.height), ((cohort["age"] - 50) / 10).to_numpy(), (cohort["sex"] == "F").to_numpy()]
    names = ["intercept", "age10", "female"]
    if with_cbp:
        cols.append(cohort["cbp_true"].to_numpy())
        names.append("cbp")
    for s in sites[1:]:
        cols.append((cohort["site"] == s).to_numpy())
        names.append(s)
    X = np.column_stack(cols).astype(np.float64)
    y = flag.cast(pl.Float64).to_numpy()
    fit = logistic_mle(y, X)
    mu = 1 / (1 + np.exp(-X @ fit.beta))
    se = np.sqrt(np.diag(np.linalg.inv(X.T @ (X * (mu * (1 - mu))[:, None]))))
    return dict(zip(names, zip(fit.beta, se)))


def test_simulated_missingness_is_at_random_given_covariates(big_cohort):
    """Logistic regressions of the missing flags recover the documented directions (age +, women -, CBP +)."""
    p = CohortParameters()
    c = big_cohort
    rates = {"cbp": c["missing_cbp"].mean(), "met": c["missing_met"].mean(),
             "comorbidity": c["missing_comorbidity"].is_not_null().mean()}
    for k, target in (("cbp", p.p_missing_cbp), ("met", p.p_missing_met),
                      ("comorbidity", p.p_missing_comorbidity)):
        assert abs(rates[k] - target) < 4 * math.sqrt(target * (1 - target) / c.height), k
    cbp = _missing_model(c, c["missing_cbp"], with_cbp=False)
    met = _missing_model(c, c["missing_met"], with_cbp=True)
    com = _missing_model(c, c["missing_comorbidity"].is_not_null(), with_cbp=True)
    z = stats.norm.ppf(0.999)
    for fit, coef in ((cbp, p.missing_cbp_logit), (met, p.missing_met_logit), (com, p.missing_comorbidity_logit)):
        est, se = fit["age10"]
        assert est - z * se > 0 and abs(est - coef[0]) < 4 * se
    assert cbp["female"][0] + z * cbp["female"][1] < 0
    assert met["cbp"][0] - z * met["cbp"][1] > 0 and com["cbp"][0] - z * com["cbp"][1] > 0
    # the site offsets: Berlin (+0.45) above Augsburg (0), Essen (-0.35) below, in the activity answer
    assert met["Berlin"][0] > 0 > met["Essen"][0]


def test_mar_changes_only_which_answers_are_missing():
    """With no covariate effects the model is MCAR at p_missing_*: the same uniform draws in the same order, so
    every other column of the cohort is the same as with the MAR defaults, and the flags are the MCAR ones."""
    mar = simulate_cohort(3000, 8)
    p = CohortParameters()
    mcar = simulate_cohort(3000, 8, p.with_(missing_cbp_logit=(0.0, 0.0), missing_met_logit=(0.0, 0.0, 0.0),
                                            missing_comorbidity_logit=(0.0, 0.0, 0.0),
                                            missing_site_logit=(0.0,) * len(p.missing_site_logit)))
    flags = ("missing_cbp", "missing_met", "missing_comorbidity")
    assert mar.drop(flags).equals(mcar.drop(flags))
    assert any(not mar[f].equals(mcar[f]) for f in flags)
    # MCAR flags: exactly u < p for the uniforms drawn at that point of the stream
    assert abs(mcar["missing_met"].mean() - p.p_missing_met) < 0.012
    which = mar.filter(pl.col("missing_comorbidity").is_not_null())["missing_comorbidity"].unique().to_list()
    assert set(which) <= set(BINARY)
