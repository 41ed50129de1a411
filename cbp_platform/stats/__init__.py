"""Statistics of the association analysis: the mixed logistic regression, its checks and sensitivity fits.

Framework-free (no Dagster): the assets call these functions and attach what they return as metadata.

* :func:`fit_glmm`: ``outcome ~ fixed + (1 | site)``, binomial, ML by Laplace (``nagq=1``) or adaptive
  Gauss-Hermite quadrature (``nagq > 1``) with the objective of ``lme4::glmer``; returns a :class:`GLMMResult`.
* :func:`model_checks` / :func:`fit_checks`: named :class:`CheckOutcome` s (too few events, one-participant
  site, constant covariate, separation, non-convergence, non-finite CIs ...); :class:`ModelCheckError`.
* :mod:`cbp_platform.stats.sensitivity`: site as a fixed effect, GEE, variational Bayes, in the same tidy shape.

See ``docs/statistics.md``.
"""

from cbp_platform.stats.checks import (DATA_CHECKS, FIT_CHECKS, CheckOutcome, ModelCheckError, fit_checks,
                                       model_checks, raise_for_failures)
from cbp_platform.stats.design import (PAPER_COVARIATES, Design, build_design, per_sd_odds_ratio,
                                       simulated_design, standardise_2sd)
from cbp_platform.stats.glmm import (TIDY_COLUMNS, ConvergenceDiagnostics, GLMMResult, RandomInterceptLogit,
                                     coefficient_table, fit_glmm)
from cbp_platform.stats.sensitivity import fit_bayes_mixed, fit_gee, fit_site_fixed, sensitivity_table

__all__ = [
    "fit_glmm", "GLMMResult", "ConvergenceDiagnostics", "RandomInterceptLogit", "coefficient_table",
    "TIDY_COLUMNS", "model_checks", "fit_checks", "raise_for_failures", "CheckOutcome", "ModelCheckError",
    "DATA_CHECKS", "FIT_CHECKS", "build_design", "Design", "standardise_2sd", "per_sd_odds_ratio",
    "simulated_design", "PAPER_COVARIATES", "fit_site_fixed", "fit_gee", "fit_bayes_mixed",
    "sensitivity_table",
]
