"""Sensitivity fits of the association model, in the GLMM's tidy shape (columns :data:`TIDY_COLUMNS`).

* :func:`fit_site_fixed`: ordinary logistic regression with the site as a fixed effect (treatment dummies
  against the first site), ML via statsmodels ``Logit``. Conditional on site like the GLMM, but the five site
  intercepts are free instead of drawn from a normal distribution; with ~5,500 participants per site the two
  agree closely.
* :func:`fit_gee`: a generalised estimating equation, binomial with logit link, exchangeable working
  correlation within site (statsmodels ``GEE``). It estimates *population-averaged* (marginal) ORs, which are
  attenuated relative to the GLMM's conditional ORs by about 1 / sqrt(1 + 0.346 sigma^2) (Zeger et al.
  1988), under 1 % at the site SDs seen here. Its robust (sandwich) SEs rest on the number of sites: with
  five they are unstable, which is why it is a sensitivity analysis and not the primary model;
  ``cov_type="bias_reduced"`` gives Mancl-DeRouen-corrected SEs.
* :func:`fit_bayes_mixed` (optional cross-check): statsmodels ``BinomialBayesMixedGLM``, the same random-
  intercept model fitted by variational Bayes; ``se`` is the posterior SD (mean-field VB understates it, the
  intercept's most), so compare estimates rather than intervals.

Each function runs the data checks of :mod:`cbp_platform.stats.checks` first (for the fixed-site model on the
design *with* the site dummies, so that a site without events shows up as separation) and raises
:class:`~cbp_platform.stats.checks.ModelCheckError` on an error-level failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import polars as pl
import statsmodels.api as sm
from statsmodels.genmod.bayes_mixed_glm import BinomialBayesMixedGLM

from cbp_platform.stats.checks import design_checks, raise_for_failures
from cbp_platform.stats.design import Design, build_design
from cbp_platform.stats.glmm import TIDY_COLUMNS, GLMMResult, coefficient_table

__all__ = ["fit_site_fixed", "fit_gee", "fit_bayes_mixed", "sensitivity_table", "TIDY_COLUMNS"]


def _checked_design(df, outcome: str, fixed: Sequence[str], group: str, min_epv: float) -> Design:
    design = build_design(df, outcome, fixed, group)
    raise_for_failures(design_checks(design, min_epv=min_epv))
    return design


def _with_site_dummies(design: Design) -> Design:
    levels = design.group_levels
    dummies = [(design.groups == j).astype(np.float64) for j in range(1, len(levels))]
    X = np.column_stack([design.X, *dummies]) if dummies else design.X
    names = design.names + tuple(f"{design.group}[{lv}]" for lv in levels[1:])
    columns = design.columns + (design.group,) * len(dummies)
    return replace(design, X=np.ascontiguousarray(X), names=names, columns=columns)


def fit_site_fixed(df, outcome: str, fixed: Sequence[str], group: str, *, alpha: float = 0.05,
                   min_epv: float = 10.0, include_sites: bool = False) -> pl.DataFrame:
    """Logistic regression ``outcome ~ fixed + group`` (site as fixed effect); tidy table, model ``site_fixed``.

    The site dummies' rows are left out unless ``include_sites``.
    """
    design = _with_site_dummies(build_design(df, outcome, fixed, group))
    raise_for_failures(design_checks(design, min_epv=min_epv))
    res = sm.Logit(design.y, design.X).fit(method="newton", maxiter=100, disp=False)
    if not res.mle_retvals.get("converged", False):
        raise RuntimeError("site-fixed logistic regression did not converge")
    table = coefficient_table("site_fixed", design.names, res.params, res.bse, alpha)
    if not include_sites:
        table = table.filter(~pl.col("term").str.starts_with(f"{group}["))
    return table


def fit_gee(df, outcome: str, fixed: Sequence[str], group: str, *, alpha: float = 0.05, min_epv: float = 10.0,
            cov_type: str = "robust") -> pl.DataFrame:
    """Binomial GEE, exchangeable working correlation within ``group``; tidy table, model ``gee``.

    ``cov_type``: ``robust`` (sandwich, default), ``bias_reduced`` (Mancl-DeRouen) or ``naive``.
    """
    design = _checked_design(df, outcome, fixed, group, min_epv)
    model = sm.GEE(design.y, design.X, groups=design.groups, family=sm.families.Binomial(),
                   cov_struct=sm.cov_struct.Exchangeable())
    res = model.fit(maxiter=100, cov_type=cov_type)
    if not res.converged:
        raise RuntimeError("GEE did not converge")
    return coefficient_table("gee", design.names, res.params, res.bse, alpha)


def fit_bayes_mixed(df, outcome: str, fixed: Sequence[str], group: str, *, alpha: float = 0.05,
                    min_epv: float = 10.0) -> pl.DataFrame:
    """Random-intercept logistic model by variational Bayes; tidy table (``se`` = posterior SD), ``bayes_vb``.

    statsmodels' default priors: N(0, 2^2) on the fixed effects, N(0, 1) on the log SD of the intercepts.
    """
    design = _checked_design(df, outcome, fixed, group, min_epv)
    G = len(design.group_levels)
    Z = np.zeros((design.nobs, G))
    Z[np.arange(design.nobs), design.groups] = 1.0
    res = BinomialBayesMixedGLM(design.y, design.X, Z, np.zeros(G, dtype=int)).fit_vb()
    return coefficient_table("bayes_vb", design.names, res.fe_mean, res.fe_sd, alpha)


def sensitivity_table(df, outcome: str, fixed: Sequence[str], group: str, *, glmm: GLMMResult | None = None,
                      alpha: float = 0.05, bayes: bool = False) -> pl.DataFrame:
    """The GLMM (if given) and the sensitivity fits stacked, one row per model and term."""
    parts = [glmm.coefficients] if glmm is not None else []
    parts.append(fit_site_fixed(df, outcome, fixed, group, alpha=alpha))
    parts.append(fit_gee(df, outcome, fixed, group, alpha=alpha))
    if bayes:
        parts.append(fit_bayes_mixed(df, outcome, fixed, group, alpha=alpha))
    return pl.concat([p.select(TIDY_COLUMNS) for p in parts], how="vertical")
