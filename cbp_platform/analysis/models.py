"""Fitting the study's analyses (:data:`cbp_platform.study.ANALYSES`) on the analysis cohort.

:func:`fit_analysis` fits one analysis the way the published results use it: the mixed logistic regression by
adaptive Gauss-Hermite quadrature (the reported model), its Laplace fit and the sensitivity fits (site as fixed
effect, GEE) beside it, all in the tidy shape of :data:`cbp_platform.stats.TIDY_COLUMNS` with ``analysis`` and
``model`` columns (the ``model_results`` table), and one row describing the fit (``model_fits``). The model
assets call it for the primary analysis (a failed check fails the asset) and for each secondary analysis that
extends it (a failed check is recorded by :func:`failed_fit` and reported, the paper's results stand).
Framework-free: no Dagster.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import polars as pl

from cbp_platform import study
from cbp_platform.stats import ModelCheckError, fit_glmm, sensitivity_table
from cbp_platform.stats.glmm import TIDY_COLUMNS, GLMMResult

LAPLACE_MODEL = "glmm_laplace"
UNADJUSTED_MODEL = "glmm_unadjusted"     # outcome ~ one exposure + (1 | site), per exposure (STROBE item 16a)
PROFILE_SUFFIX = "_profile"              # the reported model's rows with profile-likelihood CIs


@dataclass(frozen=True)
class FittedAnalysis:
    """One analysis fitted: its ``model_results`` rows, its ``model_fits`` row and the reported GLMM."""

    analysis: study.Analysis
    table: pl.DataFrame
    fit: dict
    result: GLMMResult | None

    def odds_ratios(self) -> dict[str, str]:
        """term -> 'OR (low-high), p' of the reported model (intercept left out), for logs and metadata."""
        if self.result is None:
            return {}
        return {r["term"]: f"{r['or']:.3f} ({r['or_low']:.3f}-{r['or_high']:.3f}), p {r['p']:.2g}"
                for r in self.result.coefficients.iter_rows(named=True) if r["term"] != "(Intercept)"}


def _identity(a: study.Analysis) -> dict:
    return {"analysis": a.name, "outcome": a.outcome, "population": a.population, "role": a.role,
            "extends": a.extends, "exposures": json.dumps(list(a.exposures))}


def exposure_correlations(frame: pl.DataFrame, a: study.Analysis) -> dict[str, float]:
    """Pearson correlation of each pair of the analysis' exposure terms in the fitted rows (collinearity of a
    secondary exposure with the paper's), keyed ``term~term``."""
    terms = a.exposure_terms
    out = {}
    for i, x in enumerate(terms):
        for y in terms[i + 1:]:
            r = frame.select(pl.corr(x, y)).item()
            out[f"{x}~{y}"] = float(r) if r is not None and math.isfinite(r) else None
    return out


def _unadjusted(frame: pl.DataFrame, a: study.Analysis, nagq: int, min_epv: float) -> pl.DataFrame:
    """One GLMM per exposure with the site alone beside it: the unadjusted ORs STROBE asks for next to the
    adjusted ones (rows of model :data:`UNADJUSTED_MODEL`)."""
    parts = []
    for term in a.exposure_terms:
        r = fit_glmm(frame, a.outcome, [term], study.SITE, nagq=nagq, min_epv=min_epv)
        parts.append(r.coefficients.filter(pl.col("term") == term))
    return pl.concat(parts).with_columns(pl.lit(UNADJUSTED_MODEL).alias("model"))


def _profile_rows(res: GLMMResult) -> pl.DataFrame:
    """The reported model's rows with profile-likelihood CIs instead of Wald's (model ``<model>_profile``)."""
    ci = res.conf_int(method="profile", terms=list(res.terms))
    lo, hi = ci["lower"].to_numpy(), ci["upper"].to_numpy()
    return res.coefficients.with_columns(
        (pl.col("model") + PROFILE_SUFFIX).alias("model"), pl.Series("ci_low", lo), pl.Series("ci_high", hi),
        pl.Series("or_low", np.exp(lo)), pl.Series("or_high", np.exp(hi)))


def model_assessment(res: GLMMResult, a: study.Analysis) -> dict:
    """What the report says about the reported model beyond its ORs, as JSON-able dicts: the site effect (SD,
    variance, latent ICC and MOR with profile CIs, the boundary test of the variance), discrimination and
    calibration of the fitted probabilities, and each exposure's average marginal effect per 2 SD."""
    from cbp_platform.stats.prediction import average_marginal_effect, calibration, discrimination

    lo, hi = res.conf_int(method="profile", terms=[res.sd_name]).iloc[0]
    site = {"sd": res.site_sd, "sd_low": float(lo), "sd_high": float(hi), "variance": res.site_variance,
            "icc": res.icc(), "mor": res.mor(), "variance_test": res.variance_test().to_dict(),
            "singular": res.singular, "sites": res.n_groups}
    cal = calibration(res)
    ame = [dataclasses.asdict(average_marginal_effect(res, t, delta=1.0)) for t in a.exposure_terms]
    return {"site_effect": site, "discrimination": discrimination(res).to_dict(), "calibration": cal.to_dict(),
            "marginal_effects": ame}


def multiple_imputation(imputation_frame: pl.DataFrame, a: study.Analysis, *, imputations: int, nagq: int,
                        min_epv: float) -> tuple[pl.DataFrame, dict]:
    """The MI sensitivity analysis of ``a``: its rows of the MI population (sorted by pseudonym, so the chains see
    the same rows in the same order wherever the frame comes from), ``imputations`` completed data sets by chained
    equations, the GLMM on each, Rubin's rules. Returns the tidy rows (model ``mi_glmm``) and a summary (m, n,
    participants with an imputed answer, fraction of missing information per exposure)."""
    from cbp_platform.stats.imputation import MODEL_NAME, fit_glmm_mi, impute

    frame = a.data(imputation_frame).sort("pseudonym")
    fixed = list(a.fixed)
    incomplete = int(frame.select(pl.any_horizontal(pl.col(c).is_null() for c in fixed).sum()).item())
    t0 = time.perf_counter()
    completed = impute(frame, a.outcome, fixed, study.SITE, m=imputations)
    mi = fit_glmm_mi(completed, a.outcome, fixed, study.SITE, nagq=nagq, min_epv=min_epv)
    info = {"m": mi.m, "nobs": mi.nobs, "imputed_participants": incomplete,
            "fmi": {t: float(mi.fmi[t]) for t in a.exposure_terms}, "seconds": time.perf_counter() - t0}
    return mi.coefficients.select(TIDY_COLUMNS).with_columns(pl.lit(MODEL_NAME).alias("model")), info


def fit_analysis(cohort_frame: pl.DataFrame, a: study.Analysis, *, cohort_hash: str, nagq: int = 25,
                 min_epv: float = 10.0, imputation_frame: pl.DataFrame | None = None,
                 imputations: int = 20) -> FittedAnalysis:
    """Fit analysis ``a`` on the analysis cohort's frame (its rows: :meth:`~cbp_platform.study.Analysis.data`).

    A primary analysis gets, beside the reported model and its sensitivity fits, the unadjusted ORs of its
    exposures, profile-likelihood CIs and :func:`model_assessment` (``model_fits`` column ``assessment``); with an
    ``imputation_frame`` (``AnalysisCohort.imputation_frame``) that adds participants to the complete cases and
    ``imputations`` >= 2, also :func:`multiple_imputation` (rows ``mi_glmm``; its summary in the assessment).
    Raises :class:`~cbp_platform.stats.ModelCheckError` when a data or fit check fails (nothing is returned then).
    """
    frame = a.data(cohort_frame)
    fixed = list(a.fixed)
    t0 = time.perf_counter()
    res = fit_glmm(frame, a.outcome, fixed, study.SITE, nagq=nagq, min_epv=min_epv)
    laplace = fit_glmm(frame, a.outcome, fixed, study.SITE, nagq=1, min_epv=min_epv)
    seconds = time.perf_counter() - t0
    table = sensitivity_table(frame, a.outcome, fixed, study.SITE, glmm=res)
    parts = [table, laplace.coefficients.with_columns(pl.lit(LAPLACE_MODEL).alias("model"))]
    primary = a.role != study.SECONDARY
    assessment = model_assessment(res, a) if primary else None
    if primary:
        parts += [_profile_rows(res), _unadjusted(frame, a, nagq, min_epv)]
        extra = 0 if imputation_frame is None else a.data(imputation_frame).height - frame.height
        if imputations >= 2 and extra > 0:
            rows, assessment["multiple_imputation"] = multiple_imputation(
                imputation_frame, a, imputations=imputations, nagq=nagq, min_epv=min_epv)
            parts.append(rows)
        else:
            assessment["multiple_imputation"] = {"m": 0, "imputed_participants": max(extra, 0)}
        assessment["multiple_imputation"]["requested"] = imputations
    table = pl.concat(parts, how="diagonal_relaxed")
    table = table.with_columns(pl.lit(a.name).alias("analysis"))
    d = res.diagnostics
    fit = {
        **_identity(a), "method": res.method, "nagq": res.nagq, "primary_model": res.coefficients["model"][0],
        "nobs": res.nobs, "events": res.events, "n_groups": res.n_groups, "loglik": res.loglik, "aic": res.aic,
        "site_variance": res.site_variance, "site_sd": res.site_sd, "laplace_loglik": laplace.loglik,
        "converged": bool(d.converged), "fit_seconds": seconds,
        "checks": json.dumps([c.to_dict() for c in res.checks], default=str),
        "summary": str(res.summary(ci="profile" if primary else "wald")),
        "assessment": json.dumps(assessment, default=float) if primary else None,
        "exposure_correlations": json.dumps(exposure_correlations(frame, a)), "error": None,
        "cohort_hash": cohort_hash}
    return FittedAnalysis(analysis=a, table=table, fit=fit, result=res)


def failed_fit(cohort_frame: pl.DataFrame, a: study.Analysis, exc: ModelCheckError, *,
               cohort_hash: str) -> FittedAnalysis:
    """A secondary analysis whose checks failed: no results, a ``model_fits`` row naming the failed checks."""
    frame = a.data(cohort_frame)
    fit = {**_identity(a), "nobs": frame.height, "converged": False,
           "checks": json.dumps([f.to_dict() for f in exc.failures], default=str),
           "error": f"model checks failed: {', '.join(exc.names)}", "cohort_hash": cohort_hash}
    return FittedAnalysis(analysis=a, table=pl.DataFrame(), fit=fit, result=None)


def fits_frame(fits: list[FittedAnalysis]) -> pl.DataFrame:
    """The ``model_fits`` rows of several fits (a failed fit's missing figures are null)."""
    keys = list(dict.fromkeys(k for f in fits for k in f.fit))
    return pl.DataFrame([{k: f.fit.get(k) for k in keys} for f in fits], infer_schema_length=None)


def results_frame(fits: list[FittedAnalysis]) -> pl.DataFrame:
    """The ``model_results`` rows of several fits, in fit order."""
    return pl.concat([f.table for f in fits if f.table.height], how="diagonal_relaxed")
