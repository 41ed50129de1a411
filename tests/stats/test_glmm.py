"""The random-intercept logistic GLMM against lme4, the simulator's truth, its checks and the sensitivity fits.

Reference values: ``tests/fixtures/lme4/{small,paper,clustered}.json``, written by ``tools/lme4_reference.R``.
``small`` and ``paper`` are the paper's adjusted model on the design that :func:`simulated_design` rebuilds here
from (n, seed); ``clustered`` (150 clusters of 2-12, site SD 1.2, where Laplace and AGQ differ clearly) is a
committed CSV. The regenerated design is compared with the fixture's values first (``<name>.design.parquet``):
the integer, flag and site columns exactly, the two exposures (which pass through ``np.exp``, whose last bits
depend on the CPU's SIMD kernel) within ``DESIGN_ATOL``; so a change in the simulator fails loudly instead of
comparing different data, on any machine. The comparisons use lme4's "tight" refits (optimiser converged to the last digit), so
that what is compared is the objective function, and lme4's default fits with the same tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

from cbp_platform.stats import (DATA_CHECKS, FIT_CHECKS, PAPER_COVARIATES, TIDY_COLUMNS, ModelCheckError,
                                RandomInterceptLogit,
                                fit_bayes_mixed, fit_checks, fit_gee, fit_glmm, fit_site_fixed, model_checks,
                                per_sd_odds_ratio, sensitivity_table, simulated_design, standardise_2sd)
from cbp_platform.stats._likelihood import GroupedLogitLikelihood, gauss_hermite
from cbp_platform.stats.logistic import logistic_mle
from cbp_platform.stats.design import (DESIGN_ATOL, INEXACT_DESIGN_COLUMNS, INTERCEPT, build_design, design_differences,
                                      design_sha256, exact_columns)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "lme4"
CASES = ("small", "paper", "clustered")
PAPER_OR = {"lmm_z2": 0.87, "imat_z2": 1.22}     # docs/study.md, CBP, per 2 SD


def _reference(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _lme4_fit(ref: dict, nagq: int, control: str = "tight") -> dict:
    (fit,) = [f for f in ref["fits"] if f["nAGQ"] == nagq and f["control"] == control]
    return fit


@pytest.fixture(scope="module")
def designs():
    """The simulated designs of the fixtures, by name."""
    out = {}
    for name in ("small", "paper"):
        meta = _reference(name)["design"]
        out[name] = simulated_design(meta["n_simulated"], meta["seed"])
    return out


@pytest.fixture(scope="module")
def data(designs):
    """(frame, fixed effects) of every fixture."""
    out = {name: (d.frame, list(PAPER_COVARIATES)) for name, d in designs.items()}
    meta = _reference("clustered")["design"]
    out["clustered"] = (pl.read_csv(FIXTURES / meta["csv"], schema_overrides={"cbp": pl.Int8}), meta["fixed"])
    return out


@pytest.fixture(scope="module")
def fits(data):
    cache: dict[tuple[str, int], object] = {}

    def get(name: str, nagq: int):
        if (name, nagq) not in cache:
            frame, fixed = data[name]
            cache[name, nagq] = fit_glmm(frame, "cbp", fixed, "site", nagq=nagq)
        return cache[name, nagq]

    return get


# ------------------------------------------------------------------------------------------------------------
# the objective and the estimates against lme4


@pytest.mark.parametrize("name", CASES)
def test_fixture_design_is_regenerated(data, designs, name):
    """Same design as the fixture's: exact columns bit for bit (their hash too), the exposures within tolerance."""
    ref = _reference(name)["design"]
    frame, fixed = data[name]
    assert frame.height == ref["n_obs"] and int(frame["cbp"].sum()) == ref["events"]
    assert list(ref["fixed"]) == fixed
    if "values" not in ref:                 # clustered: the committed CSV is the design itself
        assert design_sha256(frame) == ref["design_sha256"]
        return
    assert design_differences(frame, pl.read_parquet(FIXTURES / ref["values"])) == []
    assert design_sha256(frame, exact_columns(frame)) == ref["exact_columns_sha256"]
    for k in ("lmm", "imat"):                # the scale the fits saw, 15 digits as the fixture stores them
        assert np.allclose(designs[name].scale[k], (ref["scale"][k]["mean"], ref["scale"][k]["sd"]),
                           rtol=1e-13, atol=0)


def test_design_check_absorbs_another_cpus_exp_and_catches_real_changes(monkeypatch, designs):
    """Another CPU's float64 exp (numpy's AVX-512 kernel on one machine, AVX2 / libm on another) differs from this
    one's by at most one ulp. Emulated here, with every np.exp result moved one ulp at random: the exposures move
    well inside DESIGN_ATOL and every other column stays bit for bit. A real change of the design is still
    caught: one exposure off by 1e-9, one outcome flipped."""
    ref = designs["small"].frame
    rng = np.random.default_rng(11)
    exp = np.exp

    def other_cpu_exp(*args, **kw):
        out = exp(*args, **kw)
        if isinstance(out, np.ndarray) and out.dtype == np.float64:
            out = np.where(rng.random(out.shape) < 0.5, np.nextafter(out, np.inf), np.nextafter(out, -np.inf))
        return out

    monkeypatch.setattr(np, "exp", other_cpu_exp)
    moved = simulated_design(2240, 3).frame
    monkeypatch.undo()
    assert design_sha256(moved) != design_sha256(ref)                  # the bits did move ...
    assert design_differences(moved, ref) == []                         # ... within the tolerance
    assert design_sha256(moved, exact_columns(moved)) == design_sha256(ref, exact_columns(ref))
    worst = max(float(np.max(np.abs(moved[c].to_numpy() - ref[c].to_numpy()))) for c in INEXACT_DESIGN_COLUMNS)
    assert 0 < worst < DESIGN_ATOL / 10
    shifted = ref.with_columns(pl.when(pl.int_range(pl.len()) == 7).then(pl.col("imat_z2") + 1e-9)
                               .otherwise(pl.col("imat_z2")).alias("imat_z2"))
    assert design_differences(shifted, ref) == [f"imat_z2: max |difference| {1e-9:.3g} > {DESIGN_ATOL:g}"]
    flipped = ref.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(1 - pl.col("cbp"))
                               .otherwise(pl.col("cbp")).alias("cbp"))
    assert design_differences(flipped, ref) == ["cbp: 1 rows differ (an exact column)"]


def test_gauss_hermite_rule_is_lme4s():
    z, w = gauss_hermite(3)                          # lme4::GHrule(3): z = -sqrt(3), 0, sqrt(3); w = 1/6, 2/3, 1/6
    assert np.allclose(z, [-math.sqrt(3), 0.0, math.sqrt(3)], atol=1e-14) and z[1] == 0.0
    assert np.allclose(w, [1 / 6, 2 / 3, 1 / 6], atol=1e-14)
    z, w = gauss_hermite(25)
    assert abs(w.sum() - 1) < 1e-14 and abs((w * z ** 4).sum() - 3.0) < 1e-10 and abs((w * z ** 8).sum() - 105) < 1e-7
    with pytest.raises(ValueError):
        gauss_hermite(0)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("nagq", [1, 25])
def test_log_likelihood_equals_lme4_at_its_estimates(data, name, nagq):
    """Same objective: our log-likelihood at lme4's estimates is lme4's logLik."""
    fit = _lme4_fit(_reference(name), nagq)
    frame, fixed = data[name]
    D = build_design(frame, "cbp", fixed, "site")
    lik = GroupedLogitLikelihood(D.y, D.X, D.groups)
    ll = lik.evaluate(np.r_[fit["estimate"], fit["theta"]], nagq).loglik
    # AGQ agrees to rounding; lme4's Laplace value carries its PIRLS tolerance (~1e-7)
    assert abs(ll - fit["loglik"]) < (1e-8 if nagq > 1 else 5e-6)


@pytest.mark.parametrize("nagq", [1, 25])
def test_gradient_is_the_exact_derivative(designs, nagq):
    D = build_design(designs["small"].frame, "cbp", PAPER_COVARIATES, "site")
    lik = GroupedLogitLikelihood(D.y, D.X, D.groups)
    theta = np.r_[np.linspace(-1.2, 0.4, D.X.shape[1]) * 0.3, 0.35]
    ev = lik.evaluate(theta, nagq)
    h = 1e-6
    num = np.array([(lik.evaluate(theta + e, nagq, remember=False).loglik
                     - lik.evaluate(theta - e, nagq, remember=False).loglik) / (2 * h)
                    for e in np.eye(theta.size) * h])
    assert np.abs(num - ev.grad).max() < 1e-5 * np.abs(ev.grad).max()


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("nagq", [1, 25])
def test_estimates_match_lme4(fits, name, nagq):
    ref = _reference(name)
    tight, default = _lme4_fit(ref, nagq, "tight"), _lme4_fit(ref, nagq, "default")
    r = fits(name, nagq)
    assert list(r.terms) == tight["terms"]
    est = r.coefficients["estimate"].to_numpy()
    se = r.coefficients["se"].to_numpy()
    assert np.abs(est - np.array(tight["estimate"])).max() < 1e-4
    assert np.abs(est - np.array(default["estimate"])).max() < 1e-4
    assert np.abs(se / np.array(tight["se"]) - 1).max() < 1e-3
    assert abs(r.site_sd - tight["theta"]) < 1e-4
    assert abs(r.site_variance / tight["site_variance"] - 1) < 1e-3
    assert abs(r.loglik - tight["loglik"]) < 1e-3
    assert abs(r.aic - tight["aic"]) < 2e-3
    assert r.nobs == tight["nobs"] and r.n_groups == len(tight["ranef"]["site"]) and r.events == ref["design"]["events"]
    re = r.random_effects
    assert re["site"].to_list() == tight["ranef"]["site"]
    assert np.abs(re["mode"].to_numpy() - np.array(tight["ranef"]["mode"])).max() < 1e-4
    assert np.abs(re["cond_sd"].to_numpy() / np.array(tight["ranef"]["cond_sd"]) - 1).max() < 1e-3
    d = r.diagnostics
    assert d.converged and d.hessian_positive_definite and d.newton_decrement < 1e-10 and not d.singular
    assert d.max_abs_gradient < 1e-2 and 1 < d.condition_number < 1e8


@pytest.mark.parametrize("name", ["small", "clustered"])
def test_agq_and_laplace_differ_as_in_lme4(fits, name):
    """The two approximations are different objectives: their optima differ by lme4's amounts."""
    ref = _reference(name)
    ours = fits(name, 25).loglik - fits(name, 1).loglik
    theirs = _lme4_fit(ref, 25)["loglik"] - _lme4_fit(ref, 1)["loglik"]
    assert ours > 1e-4 and abs(ours - theirs) < 1e-5
    sd = fits(name, 25).site_sd - fits(name, 1).site_sd
    assert abs(sd - (_lme4_fit(ref, 25)["theta"] - _lme4_fit(ref, 1)["theta"])) < 1e-5


# ------------------------------------------------------------------------------------------------------------
# the simulator's truth


def test_generating_coefficients_lie_in_the_confidence_intervals(designs, fits):
    r = fits("paper", 25)
    truth = designs["paper"].true_coefficients()
    for row in r.coefficients.iter_rows(named=True):
        assert row["ci_low"] <= truth[row["term"]] <= row["ci_high"], row["term"]
    # the paper's ORs per 2 SD lie in ours, and the direction of both exposures is recovered
    for term, paper_or in PAPER_OR.items():
        _, lo, hi = r.odds_ratio(term)
        assert lo <= paper_or <= hi, term
    assert r.odds_ratio("lmm_z2")[2] < 1 < r.odds_ratio("imat_z2")[1]
    # the generating site SD (0.20) is plausible for the estimate from five sites
    assert 0.05 < r.site_sd < 0.5


# ------------------------------------------------------------------------------------------------------------
# the statsmodels face and the design


def test_statsmodels_results_agree_with_the_tidy_table(fits):
    r = fits("small", 25)
    sm = r.sm_results
    names = list(r.terms) + ["site_sd"]
    assert list(sm.model.exog_names) == names
    assert np.allclose(np.asarray(sm.params)[:-1], r.coefficients["estimate"].to_numpy())
    assert np.allclose(np.asarray(sm.bse)[:-1], r.coefficients["se"].to_numpy())
    assert np.allclose(np.asarray(sm.pvalues)[:-1], r.coefficients["p"].to_numpy())
    ci = np.asarray(sm.conf_int())
    assert np.allclose(ci[:-1, 0], r.coefficients["ci_low"].to_numpy())
    assert np.allclose(np.exp(ci[:-1, 1]), r.coefficients["or_high"].to_numpy())
    assert abs(float(np.asarray(sm.bse)[-1]) - r.site_sd_se) < 1e-12
    assert abs(sm.llf - r.loglik) < 1e-9
    text = str(r.sm_summary())
    assert "lmm_z2" in text and "site_sd" in text and "Gauss-Hermite" in text
    assert tuple(r.coefficients.columns) == TIDY_COLUMNS
    json.dumps(r.to_dict())


def test_model_class_works_with_plain_arrays_and_statsmodels_optimisers(designs, fits):
    D = build_design(designs["small"].frame, "cbp", PAPER_COVARIATES, "site")
    ours = RandomInterceptLogit(D.y, D.X, D.groups, nagq=25).fit()
    assert np.abs(np.asarray(ours.params) - fits("small", 25).params).max() < 1e-9
    assert ours.mle_retvals["converged"] and ours.model.exog_names[-1] == "group_sd"
    bfgs = RandomInterceptLogit(D.y, D.X, D.groups, nagq=25).fit(method="bfgs", maxiter=1000, gtol=1e-8)
    assert np.abs(np.asarray(bfgs.params) - np.asarray(ours.params)).max() < 1e-4


def test_pandas_input_and_categorical_expansion_give_the_same_fit(designs, fits):
    f = designs["small"].frame.with_columns(
        pl.when(pl.col("pa_high") == 1).then(pl.lit("high"))
        .when(pl.col("pa_moderate") == 1).then(pl.lit("moderate"))
        .otherwise(pl.lit("low")).cast(pl.Enum(["low", "moderate", "high"])).alias("pa"),
        (pl.col("female") == 1).alias("female"),
    )
    fixed = [c for c in PAPER_COVARIATES if not c.startswith("pa_")] + ["pa"]
    r = fit_glmm(f.to_pandas(), "cbp", fixed, "site", nagq=25)
    assert r.terms[-2:] == ("pa[moderate]", "pa[high]")
    ref = fits("small", 25).coefficients["estimate"].to_numpy()
    assert np.abs(r.coefficients["estimate"].to_numpy() - ref).max() < 1e-7


def test_per_2sd_scale(designs):
    x = np.array([1.0, 2.0, 4.0, 7.0])
    z, mean, sd = standardise_2sd(x)
    assert mean == 3.5 and abs(sd - np.std(x, ddof=1)) < 1e-15 and np.allclose(z, (x - 3.5) / (2 * sd))
    # a coefficient per raw unit converts to the per-2-SD OR of the standardised fit
    d = designs["small"]
    mean_l, sd_l = d.scale["lmm"]
    f = d.frame.with_columns(lmm_raw=pl.col("lmm_z2") * 2 * sd_l + mean_l)
    fixed = ["lmm_raw"] + [c for c in PAPER_COVARIATES if c != "lmm_z2"]
    raw = fit_glmm(f, "cbp", fixed, "site", nagq=1).coefficient("lmm_raw")
    std = fit_glmm(d.frame, "cbp", PAPER_COVARIATES, "site", nagq=1).odds_ratio("lmm_z2")
    assert np.allclose(per_sd_odds_ratio(raw["estimate"], raw["se"], sd_l), std, rtol=1e-5)


def test_singular_fit_is_logistic_regression(designs):
    """Sites carrying no signal: the SD goes to 0, the fit converges, the warning fires, beta is plain logit."""
    rng = np.random.default_rng(0)
    f = designs["small"].frame.with_columns(pl.Series("site", rng.permutation(designs["small"].frame["site"])))
    r = fit_glmm(f, "cbp", PAPER_COVARIATES, "site", nagq=25)
    assert r.site_sd < 1e-4 and r.diagnostics.converged and r.diagnostics.singular
    warn = {c.name: c for c in r.checks}["site_variance_not_singular"]
    assert warn.failed and warn.severity == "warning" and not warn.blocking
    D = build_design(f, "cbp", PAPER_COVARIATES, "site")
    assert np.abs(r.coefficients["estimate"].to_numpy() - logistic_mle(D.y, D.X).beta).max() < 1e-5
    assert np.all(np.isfinite(r.coefficients["se"].to_numpy()))


# ------------------------------------------------------------------------------------------------------------
# model checks


def _failed(outcomes) -> set[str]:
    return {o.name for o in outcomes if o.failed}


def _raises(frame, *names, fixed=PAPER_COVARIATES):
    with pytest.raises(ModelCheckError) as exc:
        fit_glmm(frame, "cbp", list(fixed), "site", nagq=1)
    assert set(names) <= set(exc.value.names), exc.value.names
    return exc.value


def test_checks_pass_on_good_data(designs, fits):
    out = model_checks(designs["small"].frame, "cbp", PAPER_COVARIATES, "site")
    assert [o.name for o in out] == list(DATA_CHECKS) and all(o.passed for o in out)
    r = fits("small", 1)
    assert [o.name for o in r.checks] == list(DATA_CHECKS) + list(FIT_CHECKS)
    assert all(o.passed for o in r.checks)


def test_too_few_events(designs):
    f = designs["small"].frame.head(200)
    events = int(f["cbp"].sum())
    assert 0 < events < 100
    err = _raises(f, "events_per_variable")
    (o,) = err.failures
    assert o.value == pytest.approx(events / 10) and o.threshold == 10
    assert "events_per_variable" in str(err)
    assert "events_per_variable" not in _failed(model_checks(f, "cbp", PAPER_COVARIATES, "site", min_epv=2))


def test_site_with_one_participant(designs):
    f = designs["small"].frame
    lone = f.head(1).with_columns(pl.lit("Lonely").alias("site"))
    err = _raises(pl.concat([f, lone]), "min_group_size")
    assert err.failures[0].details["groups"] == {"Lonely": 1}


def test_single_site(designs):
    f = designs["small"].frame.with_columns(pl.lit("Berlin").alias("site"))
    _raises(f, "min_groups")


def test_constant_covariate(designs):
    f = designs["small"].frame.with_columns(pl.lit(0.0).alias("diabetes"))
    err = _raises(f, "no_constant_covariate", "full_rank_design")
    assert err.failures[0].details["covariates"] == ["diabetes"]


def test_collinear_covariates(designs):
    f = designs["small"].frame.with_columns((1.0 - pl.col("female")).alias("male"))
    err = _raises(f, "full_rank_design", fixed=[*PAPER_COVARIATES, "male"])
    assert {"female", "male"} & set(err.failures[0].details["aliased"])


def test_quasi_complete_separation(designs):
    f = designs["small"].frame.with_columns(
        pl.when(pl.col("osteoporosis") == 1).then(1).otherwise(pl.col("cbp")).cast(pl.Int8).alias("cbp"))
    err = _raises(f, "no_separation")
    o = err.failures[0]
    assert o.details["kind"] == "quasi-complete" and o.details["covariates"] == ["osteoporosis"]
    assert o.value == int(f["osteoporosis"].sum())


def test_complete_separation(designs):
    f = designs["small"].frame.with_columns((pl.col("imat_z2") > 0.1).cast(pl.Int8).alias("cbp"))
    err = _raises(f, "no_separation")
    o = err.failures[0]
    assert o.details["kind"] == "complete" and "imat_z2" in o.details["covariates"]


def test_separation_without_checks_gives_named_fit_failures(designs):
    """With the data checks off, a separated fit is not silently reported: the fit checks name the problem."""
    f = designs["small"].frame.with_columns(
        pl.when(pl.col("osteoporosis") == 1).then(1).otherwise(pl.col("cbp")).cast(pl.Int8).alias("cbp"))
    r = fit_glmm(f, "cbp", PAPER_COVARIATES, "site", nagq=1, check=False)
    assert {"no_divergent_estimates", "hessian_positive_definite", "finite_confidence_intervals"} <= _failed(r.checks)
    assert r.coefficient("osteoporosis")["estimate"] > 10 and math.isnan(r.coefficient("osteoporosis")["or_high"])


def test_missing_values_and_non_binary_outcome(designs):
    f = designs["small"].frame.with_columns(
        pl.when(pl.int_range(pl.len()) < 3).then(None).otherwise(pl.col("lmm_z2")).alias("lmm_z2"))
    err = _raises(f, "no_missing_values")
    assert err.failures[0].details["missing"] == {"lmm_z2": 3}
    _raises(designs["small"].frame.with_columns((pl.col("cbp") * 2).alias("cbp")), "binary_outcome")


def test_non_convergence(designs):
    """An exhausted iteration budget (here: none at all) is a named failure, not a silently returned start."""
    f = designs["small"].frame
    r = fit_glmm(f, "cbp", PAPER_COVARIATES, "site", nagq=25, max_iter=0, check=False)
    assert not r.diagnostics.converged and r.diagnostics.newton_decrement > 1e-6
    assert "did not converge" in r.diagnostics.message and "converged" in _failed(r.checks)
    with pytest.raises(ModelCheckError) as exc:
        fit_glmm(f, "cbp", PAPER_COVARIATES, "site", nagq=25, max_iter=0)
    assert exc.value.names == ("converged",) and exc.value.result is not None


def test_non_finite_confidence_intervals(fits):
    r = fits("small", 1)
    broken = r.coefficients.with_columns(
        pl.when(pl.col("term") == "osteoporosis").then(float("inf")).otherwise(pl.col("se")).alias("se"),
        pl.when(pl.col("term") == "osteoporosis").then(float("nan")).otherwise(pl.col("or_high")).alias("or_high"))
    out = {o.name: o for o in fit_checks(dataclasses.replace(r, coefficients=broken))}
    assert out["finite_confidence_intervals"].failed
    assert out["finite_confidence_intervals"].details["terms"] == ["osteoporosis"]
    assert out["converged"].passed and out["no_divergent_estimates"].passed
    bad_hessian = dataclasses.replace(r.diagnostics, hessian_positive_definite=False, min_eigenvalue=-1.0)
    assert {o.name: o for o in fit_checks(dataclasses.replace(r, diagnostics=bad_hessian))}[
        "hessian_positive_definite"].failed


# ------------------------------------------------------------------------------------------------------------
# sensitivity fits


def test_sensitivity_fits_agree_with_the_glmm(designs, fits):
    g = fits("paper", 25)
    table = sensitivity_table(designs["paper"].frame, "cbp", PAPER_COVARIATES, "site", glmm=g)
    assert tuple(table.columns) == TIDY_COLUMNS
    assert set(table["model"].unique()) == {"glmm_agq25", "site_fixed", "gee"}
    ref = dict(zip(g.coefficients["term"], g.coefficients["estimate"]))
    ref_se = dict(zip(g.coefficients["term"], g.coefficients["se"]))
    for row in table.filter(pl.col("term") != INTERCEPT).iter_rows(named=True):
        # site as fixed effect: same conditional model, five free intercepts; GEE: marginal ORs
        tol = 0.1 if row["model"] == "site_fixed" else 0.15
        assert abs(row["estimate"] - ref[row["term"]]) < tol * ref_se[row["term"]], row
        assert math.isfinite(row["or_low"]) and row["or_low"] < row["or"] < row["or_high"]
    sf = fit_site_fixed(designs["paper"].frame, "cbp", PAPER_COVARIATES, "site", include_sites=True)
    assert sf.filter(pl.col("term").str.starts_with("site[")).height == 4


def test_gee_and_bayes_cross_checks_on_the_small_design(designs, fits):
    f = designs["small"].frame
    g = fits("small", 25).coefficients
    for table in (fit_gee(f, "cbp", PAPER_COVARIATES, "site", cov_type="bias_reduced"),
                  fit_bayes_mixed(f, "cbp", PAPER_COVARIATES, "site")):
        joined = table.join(g, on="term", suffix="_glmm").filter(pl.col("term") != INTERCEPT)
        assert joined.height == 10
        assert (abs(joined["estimate"] - joined["estimate_glmm"]) < 0.25 * joined["se_glmm"]).all()


def test_sensitivity_fits_run_the_checks(designs):
    f = designs["small"].frame
    no_events_in_one_site = f.with_columns(
        pl.when(pl.col("site") == "Essen").then(0).otherwise(pl.col("cbp")).cast(pl.Int8).alias("cbp"))
    with pytest.raises(ModelCheckError) as exc:
        fit_site_fixed(no_events_in_one_site, "cbp", PAPER_COVARIATES, "site")
    assert exc.value.names == ("no_separation",)
    assert "site[Essen]" in exc.value.failures[0].details["covariates"]
    # the GLMM's random intercept is well defined there (shrinkage): no separation in its design
    assert "no_separation" not in _failed(model_checks(no_events_in_one_site, "cbp", PAPER_COVARIATES, "site"))
    with pytest.raises(ModelCheckError):
        fit_gee(f.head(150), "cbp", PAPER_COVARIATES, "site")


def test_pandas_frame_round_trip(designs):
    pdf = designs["small"].frame.to_pandas()
    assert isinstance(pdf, pd.DataFrame)
    out = model_checks(pdf, "cbp", PAPER_COVARIATES, "site")
    assert all(o.passed for o in out)
