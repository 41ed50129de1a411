"""Statistics of the association analysis: the mixed logistic regression, its checks and sensitivity fits.

Framework-free (no Dagster): the assets call these functions and attach what they return as metadata.

* :func:`fit_glmm`: ``"outcome ~ fixed + (1 | site)"`` (or the list form), binomial, ML by Laplace (``nagq=1``) or
  adaptive Gauss-Hermite quadrature (``nagq > 1``) with the objective of ``lme4::glmer``; returns a
  :class:`GLMMResult`.
* :func:`model_checks` / :func:`fit_checks`: named :class:`CheckOutcome` s (too few events, one-participant
  site, constant covariate, separation, non-convergence, non-finite CIs ...); :class:`ModelCheckError`.
* :mod:`cbp_platform.stats.sensitivity`: site as a fixed effect, GEE, variational Bayes, in the same tidy shape.
* :mod:`~cbp_platform.stats.formula` (lme4 formulas), :mod:`~cbp_platform.stats.inference` (profile CIs, LRT,
  the variance test at its boundary, ICC and MOR), :mod:`~cbp_platform.stats.prediction` (AUC, calibration,
  average marginal effects), :mod:`~cbp_platform.stats.imputation` (chained-equation MI, Rubin's rules).

See ``docs/statistics.md``.
"""

from cbp_platform.stats.checks import (DATA_CHECKS, FIT_CHECKS, CheckOutcome, ModelCheckError, fit_checks,
                                       model_checks, raise_for_failures)
from cbp_platform.stats.design import (PAPER_COVARIATES, Design, build_design, per_sd_odds_ratio,
                                       simulated_design, standardise_2sd)
from cbp_platform.stats.glmm import (TIDY_COLUMNS, ConvergenceDiagnostics, GLMMResult, RandomInterceptLogit,
                                     coefficient_table, fit_glmm)
from cbp_platform.stats.formula import FormulaError, parse_formula
from cbp_platform.stats.imputation import MIResult, fit_glmm_mi, impute, missingness_table, pool_rubin
from cbp_platform.stats.inference import (GLMMSummary, LRTest, VarianceTest, icc_latent, lr_test, median_odds_ratio,
                                          profile_intervals, variance_test)
from cbp_platform.stats.prediction import auc_delong, average_marginal_effect, calibration, discrimination
from cbp_platform.stats.sensitivity import fit_bayes_mixed, fit_gee, fit_site_fixed, sensitivity_table

__all__ = [
    "fit_glmm", "GLMMResult", "ConvergenceDiagnostics", "RandomInterceptLogit", "coefficient_table",
    "TIDY_COLUMNS", "model_checks", "fit_checks", "raise_for_failures", "CheckOutcome", "ModelCheckError",
    "DATA_CHECKS", "FIT_CHECKS", "build_design", "Design", "standardise_2sd", "per_sd_odds_ratio",
    "simulated_design", "PAPER_COVARIATES", "fit_site_fixed", "fit_gee", "fit_bayes_mixed",
    "sensitivity_table", "FormulaError", "parse_formula", "MIResult", "fit_glmm_mi", "impute", "missingness_table",
    "pool_rubin", "GLMMSummary", "LRTest", "VarianceTest", "icc_latent", "median_odds_ratio", "lr_test",
    "profile_intervals", "variance_test", "auc_delong", "average_marginal_effect", "calibration", "discrimination",
]
