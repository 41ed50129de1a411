"""The GLMM's formula interface, statsmodels-shaped results, likelihood inference and predictions, against lme4.

Reference values: ``tests/fixtures/lme4/<name>.inference.json``, written by ``tools/lme4_inference.R`` on
``clustered.csv`` (150 small sites) and ``fivesite.parquet`` (the paper's adjusted model on 2,013 simulated
participants in 5 sites), each with nAGQ = 1 and 25: profile CIs (lme4's ``confint(method = "profile")`` where
lme4 1.1-31 computes it, and the same profile solved exactly on lme4's own deviance function), the adjusted ICC
of ``performance::icc``, the MOR, ``anova`` of nested models, the variance test and the predictions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

from cbp_platform.stats import PAPER_COVARIATES, fit_glmm
from cbp_platform.stats.formula import FormulaError, lme4_name, parse_formula
from cbp_platform.stats.inference import icc_latent, median_odds_ratio
from cbp_platform.stats.logistic import logistic_mle
from cbp_platform.stats.prediction import auc_delong, average_marginal_effect, calibration, discrimination

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "lme4"
FIVESITE_RHS = " + ".join(PAPER_COVARIATES)
CASES = {"clustered": ("x1 + x2", "x2"), "fivesite": (FIVESITE_RHS, "pa_high")}
LME4_SD = "sd_(Intercept)|site"


def _frame(name: str) -> pl.DataFrame:
    if name == "clustered":
        return pl.read_csv(FIXTURES / "clustered.csv", schema_overrides={"site": pl.String})
    return pl.read_parquet(FIXTURES / "fivesite.parquet")


def _reference(name: str, nagq: int) -> dict:
    ref = json.loads((FIXTURES / f"{name}.inference.json").read_text())
    (fit,) = [f for f in ref["fits"] if f["nAGQ"] == nagq]
    return fit


@pytest.fixture(scope="module")
def fitted():
    cache = {}

    def get(name: str, nagq: int, drop: str | None = None):
        if (name, nagq, drop) not in cache:
            rhs, _ = CASES[name]
            terms = [t.strip() for t in rhs.split("+") if t.strip() != drop]
            cache[name, nagq, drop] = fit_glmm(f"cbp ~ {' + '.join(terms)} + (1 | site)", _frame(name), nagq=nagq)
        return cache[name, nagq, drop]

    return get


# ------------------------------------------------------------------------------------------------------------
# the formula


def test_formula_parsing_and_refusals():
    p = parse_formula("cbp ~ lmm_z2 + (1 | site) + age")
    assert (p.outcome, p.group) == ("cbp", "site") and p.fixed.replace(" ", "") == "lmm_z2+age"
    assert parse_formula("cbp ~ (1|site)").fixed == "1"
    for bad, why in [("cbp ~ x + (x | site)", "only a random intercept"), ("cbp ~ x", "exactly one random"),
                     ("cbp ~ x + (1|a) + (1|b)", "exactly one random"), ("cbp + y ~ x + (1|s)", "one column"),
                     ("cbp x (1|s)", "exactly one '~'")]:
        with pytest.raises(FormulaError, match=why):
            parse_formula(bad)
    assert lme4_name("Intercept") == "(Intercept)" and lme4_name("sex[T.M]") == "sexM"
    assert lme4_name("x:C(pa)[T.high]") == "x:C(pa)high"


def test_formula_and_list_forms_give_the_same_fit(fitted):
    f = _frame("fivesite")
    a = fitted("fivesite", 25)
    b = fit_glmm(f, "cbp", list(PAPER_COVARIATES), "site", nagq=25)
    assert list(a.params.index) == list(b.params.index) == ["(Intercept)", *PAPER_COVARIATES, "site_sd"]
    assert np.abs(a.params.to_numpy() - b.params.to_numpy()).max() < 1e-9
    assert a.formula.startswith("cbp ~ lmm_z2") and b.formula == f"cbp ~ {FIVESITE_RHS} + (1 | site)"


def test_factors_interactions_and_centring_follow_lme4_names_and_algebra():
    f = _frame("fivesite").with_columns(
        pl.when(pl.col("female") == 1).then(pl.lit("F")).otherwise(pl.lit("M")).alias("sex"),
        pl.when(pl.col("pa_high") == 1).then(pl.lit("high")).when(pl.col("pa_moderate") == 1)
        .then(pl.lit("moderate")).otherwise(pl.lit("low")).cast(pl.Enum(["low", "moderate", "high"])).alias("pa"))
    r = fit_glmm("cbp ~ lmm_z2 * sex + pa + center(age_10y) + (1 | site)", f, nagq=1)
    assert list(r.fe_params.index) == ["(Intercept)", "lmm_z2", "sexM", "pamoderate", "pahigh", "center(age_10y)",
                                       "lmm_z2:sexM"]
    # the enum's first category is the reference level; the dummies equal the numeric flags
    flat = fit_glmm("cbp ~ lmm_z2 * sex + pa_moderate + pa_high + age_10y + (1 | site)", f, nagq=1)
    assert abs(r.params["pahigh"] - flat.params["pa_high"]) < 1e-8
    # centring moves the intercept by slope x mean, nothing else
    assert abs(r.params["center(age_10y)"] - flat.params["age_10y"]) < 1e-8
    shift = flat.params["age_10y"] * f["age_10y"].mean()
    assert abs(r.params["(Intercept)"] - (flat.params["(Intercept)"] + shift)) < 1e-7
    # predict on new rows reuses the fit's levels and centring constant
    assert np.allclose(r.predict(f.head(7)), r.fittedvalues[:7], atol=1e-12)


def test_missing_values_are_a_named_check_failure_not_a_silent_drop():
    from cbp_platform.stats import ModelCheckError

    f = _frame("clustered").with_columns(pl.when(pl.int_range(pl.len()) < 3).then(None).otherwise(pl.col("x1"))
                                         .alias("x1"))
    with pytest.raises(ModelCheckError) as exc:
        fit_glmm("cbp ~ x1 + x2 + (1 | site)", f, nagq=1)
    assert "no_missing_values" in exc.value.names and "x1 (3)" in str(exc.value)


# ------------------------------------------------------------------------------------------------------------
# the statsmodels shape


def test_results_are_shaped_like_statsmodels(fitted):
    r = fitted("clustered", 25)
    assert isinstance(r.params, pd.Series) and list(r.params.index) == ["(Intercept)", "x1", "x2", "site_sd"]
    assert list(r.bse.index) == list(r.params.index) and r.bse["x1"] == pytest.approx(r.coefficient("x1")["se"])
    ci = r.conf_int()
    assert list(ci.columns) == ["lower", "upper"]
    assert ci.loc["x1", "lower"] == pytest.approx(r.coefficient("x1")["ci_low"])
    assert r.llf == r.loglik and r.aic == pytest.approx(-2 * r.llf + 2 * 4) and r.nobs == 1078
    assert r.cov_params().shape == (4, 4) and r.pvalues["x1"] < 1e-10
    assert np.abs(np.asarray(r.sm_results.params) - r.params.to_numpy()).max() == 0
    text = str(r.summary())
    for part in ("x1", "ICC (latent scale)", "MOR", "Gauss-Hermite", "profile CI", "mixture"):
        assert part in text, part
    json.dumps(r.to_dict())
    json.dumps(r.summary().to_dict(), default=float)


# ------------------------------------------------------------------------------------------------------------
# agreement with lme4


@pytest.mark.parametrize("nagq", [1, 25])
@pytest.mark.parametrize("name", list(CASES))
def test_profile_intervals_agree_with_lme4(fitted, name, nagq):
    r, ref = fitted(name, nagq), _reference(name, nagq)
    ours = r.conf_int(method="profile")
    ours.index = [LME4_SD if t == "site_sd" else t for t in ours.index]
    for key in ("profile", "profile_exact"):
        if not ref.get(key):
            continue       # lme4's confint(profile) stops on some data (see tools/lme4_inference.R)
        p = ref[key]
        theirs = pd.DataFrame({"lower": p["lower"], "upper": p["upper"]}, index=p["parameter"])
        diff = (ours.loc[theirs.index] - theirs).abs().to_numpy().max()
        assert diff < 1e-3, (key, diff)
    assert ref.get("profile_exact"), "the exact lme4 profile is always in the fixture"


@pytest.mark.parametrize("nagq", [1, 25])
@pytest.mark.parametrize("name", list(CASES))
def test_icc_mor_predictions_and_tests_agree_with_lme4(fitted, name, nagq):
    r, ref = fitted(name, nagq), _reference(name, nagq)
    assert abs(r.icc()["estimate"] - ref["icc_adjusted"]) < 1e-4
    assert abs(r.mor()["estimate"] - ref["mor"]) < 1e-4
    assert np.abs(r.fittedvalues - np.asarray(ref["fitted"])).max() < 1e-4
    assert np.abs(r.predict(which="population") - np.asarray(ref["predict_population"])).max() < 1e-4
    assert np.abs(r.resid_pearson - np.asarray(ref["resid_pearson"])).max() < 1e-4
    _, dropped = CASES[name]
    lrt = r.lr_test(fitted(name, nagq, drop=dropped))
    assert lrt.df == ref["lrt"]["df"] and abs(lrt.statistic - ref["lrt"]["chisq"]) < 1e-4
    assert abs(lrt.pvalue - ref["lrt"]["p"]) < 1e-4
    assert np.abs(lrt.table["AIC"].to_numpy() - np.asarray(ref["lrt"]["aic"])).max() < 1e-3
    vt = r.variance_test()
    assert abs(vt.statistic - ref["variance_test"]["statistic"]) < 1e-4
    assert abs(vt.pvalue - ref["variance_test"]["p_boundary"]) < 1e-6
    assert vt.pvalue == pytest.approx(vt.pvalue_naive / 2)


def test_icc_and_mor_intervals_are_the_sd_interval_mapped(fitted):
    r = fitted("fivesite", 25)
    lo, hi = r.conf_int(method="profile", terms=["site_sd"]).iloc[0]
    assert r.icc()["lower"] == pytest.approx(icc_latent(lo))
    assert r.mor()["upper"] == pytest.approx(median_odds_ratio(hi))
    assert icc_latent(1.0) == pytest.approx(1 / (1 + math.pi ** 2 / 3))
    assert median_odds_ratio(1.0) == pytest.approx(math.exp(math.sqrt(2) * 0.6744897501960817))


def test_nested_model_checks(fitted):
    full, small = fitted("clustered", 25), fitted("clustered", 25, drop="x2")
    with pytest.raises(ValueError, match="not nested"):
        small.lr_test(full)
    with pytest.raises(ValueError, match="same rows"):
        full.lr_test(fitted("clustered", 1, drop="x2"))


# ------------------------------------------------------------------------------------------------------------
# the singular fit


@pytest.fixture(scope="module")
def singular():
    rng = np.random.default_rng(0)
    f = _frame("fivesite")
    f = f.with_columns(pl.Series("site", rng.permutation(f["site"].to_numpy())))
    return fit_glmm(f"cbp ~ {FIVESITE_RHS} + (1 | site)", f, nagq=25)


def test_a_singular_fit_is_named_and_has_no_wald_interval_for_its_sd(singular):
    r = singular
    assert r.singular and r.site_sd < 1e-4
    assert math.isnan(r.bse["site_sd"]) and r.conf_int().loc["site_sd"].isna().all()
    lo, hi = r.conf_int(method="profile", terms=["site_sd"]).iloc[0]
    assert lo == 0.0 and 0 < hi < 1.0
    text = str(r.summary())
    assert "singular fit" in text and r.icc()["estimate"] == pytest.approx(0, abs=1e-8)
    assert r.variance_test().pvalue > 0.4
    D = r.design
    assert abs(logistic_mle(D.y, D.X).loglik - r.loglik) < 1e-6


# ------------------------------------------------------------------------------------------------------------
# predictions and model checks


def test_marginal_prediction_integrates_over_the_sites(fitted):
    r = fitted("clustered", 25)
    rng = np.random.default_rng(5)
    draws = rng.normal(0, r.site_sd, 200_000)
    eta = r.predict(which="population", scale="link")[:3]
    mc = [float(np.mean(1 / (1 + np.exp(-(e + draws))))) for e in eta]
    assert np.abs(r.predict(which="marginal")[:3] - mc).max() < 3e-3
    # averaged over the sites, the marginal probability is less extreme than the typical site's
    assert np.all(np.abs(r.predict(which="marginal") - 0.5) <= np.abs(r.predict(which="population") - 0.5) + 1e-12)


def test_auc_calibration_and_marginal_effects(fitted):
    from sklearn.metrics import roc_auc_score

    r = fitted("fivesite", 25)
    d = discrimination(r)
    assert d.auc == pytest.approx(roc_auc_score(r.design.y, r.fittedvalues), abs=1e-12) and d.lower < d.auc < d.upper
    # DeLong's SE against a bootstrap of the same data
    rng = np.random.default_rng(1)
    y, p = r.design.y, r.fittedvalues
    boot = [roc_auc_score(y[i], p[i]) for i in (rng.integers(0, y.size, y.size) for _ in range(300))]
    assert d.se == pytest.approx(np.std(boot), rel=0.25)
    c = calibration(r)
    assert c.slope_lower < 1 < c.slope_upper and c.intercept_lower < 0 < c.intercept_upper
    assert c.bins["n"].sum() == r.nobs and c.bins["events"].sum() == r.events
    assert (c.bins["mean_predicted"].diff().drop_nulls() > 0).all()
    # a miscalibrated score (too extreme) has slope < 1
    assert auc_delong(y, p).auc == d.auc
    for col in ("lmm_z2", "imat_z2"):
        m = average_marginal_effect(r, col)
        assert np.sign(m.ame) == np.sign(r.params[col]) and m.lower < m.ame < m.upper
    # a log-OR of 0 has an AME of 0; linear in small effects: AME ~ beta x mean of m'(eta)
    m = average_marginal_effect(r, "imat_z2")
    eta = r.predict(which="population", scale="link")
    z = np.polynomial.hermite_e.hermegauss(51)
    dens = (1 / (1 + np.exp(-(eta[:, None] + r.site_sd * z[0])))) * (1 - 1 / (1 + np.exp(-(eta[:, None] + r.site_sd * z[0]))))
    slope = float(np.mean(dens @ (z[1] / z[1].sum())))
    assert m.ame == pytest.approx(r.params["imat_z2"] * slope, rel=0.02)
