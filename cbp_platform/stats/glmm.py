"""Mixed logistic regression with a random intercept per site, fitted by maximum likelihood like lme4::glmer.

Model (docs/statistics.md)::

    logit P(y_i = 1 | b) = x_i' beta + b_site(i),    b_site ~ N(0, sigma^2) independently

The marginal likelihood integrates each site's intercept out. :mod:`cbp_platform.stats._likelihood` evaluates
it exactly as ``lme4::glmer`` does for one scalar random intercept: the Laplace approximation (``nagq=1``) or
adaptive Gauss-Hermite quadrature with ``nagq`` nodes around each site's conditional mode (``nagq > 1``), with
an exact analytic gradient. The estimator maximises that function over theta = (beta, sigma):

1. starting values: plain logistic regression (IRLS) for beta, the best sigma of a short grid;
2. Laplace stage: quasi-Newton (BFGS updates of a finite-difference Hessian, backtracking line search) to a
   Newton decrement g' (-H)^-1 g below 1e-10;
3. AGQ stage (``nagq > 1``): the same iteration on the AGQ objective, started from the Laplace optimum and its
   curvature, which are already very close (the sites are large);
4. the observed information -H at the estimate, by central differences of the exact gradient; if the
   decrement computed with it is not below tolerance, Newton steps with fresh Hessians finish the job.

Standard errors are the square roots of the diagonal of (-H)^-1 over (beta, sigma) jointly, as lme4's
``vcov`` with its default ``use.hessian = TRUE``; Wald CIs and z-tests follow.

:class:`RandomInterceptLogit` is a ``statsmodels`` :class:`GenericLikelihoodModel`, so a fit is also a
statsmodels results object (``summary()``, ``conf_int()``, ``bse``, ``pvalues``, ``cov_params()``).
:func:`fit_glmm` is the convenient entry point: it takes a Polars or pandas frame, runs the data checks
(:mod:`cbp_platform.stats.checks`), fits, runs the fit checks and returns a :class:`GLMMResult`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import polars as pl
from scipy import stats
from statsmodels.base.model import GenericLikelihoodModel, GenericLikelihoodModelResults
from statsmodels.tools.sm_exceptions import ConvergenceWarning, HessianInversionWarning

from cbp_platform.stats._likelihood import Evaluation, GroupedLogitLikelihood, gauss_hermite
from cbp_platform.stats._optimise import Optimisation, maximise, start_values
from cbp_platform.stats.checks import CheckOutcome, design_checks, fit_checks, raise_for_failures
from cbp_platform.stats.design import Design, build_design
from cbp_platform.stats.logistic import LogisticFit, logistic_mle

DEFAULT_NAGQ = 25

TIDY_COLUMNS = ("model", "term", "estimate", "se", "z", "p", "ci_low", "ci_high", "or", "or_low", "or_high")


# ------------------------------------------------------------------------------------------------------------
# the statsmodels model


class RandomInterceptLogit(GenericLikelihoodModel):
    """Logistic regression with a normal random intercept per group, by ML (Laplace or AGQ, as lme4).

    ``endog`` 0/1, ``exog`` the fixed-effect design with its intercept column, ``groups`` one label per row,
    ``nagq`` quadrature nodes (1 = Laplace). Parameters: the fixed effects, then the group SD
    (``<group_name>_sd``, lme4's theta). ``fit()`` uses this module's optimiser (``method="glmm"``); the
    other statsmodels optimisers work too, since ``loglike`` and ``score`` are exact.
    """

    def __init__(self, endog, exog, groups, nagq: int = DEFAULT_NAGQ, group_name: str = "group", **kwds):
        gauss_hermite(nagq)   # validates nagq
        super().__init__(endog, exog, **kwds)
        self.nagq = int(nagq)
        self.group_name = group_name
        self.groups = np.asarray(groups)
        self._set_extra_params_names([f"{group_name}_sd"])
        self.likelihood = GroupedLogitLikelihood(self.endog, self.exog, self.groups)
        self.logistic: LogisticFit | None = None
        self.optimisation: Optimisation | None = None
        self._last: Evaluation | None = None
        self._hessians: dict[bytes, np.ndarray] = {}

    def _evaluate(self, params) -> Evaluation:
        params = np.asarray(params, dtype=np.float64)
        if self._last is None or not np.array_equal(self._last.theta, params):
            self._last = self.likelihood.evaluate(params, self.nagq)
        return self._last

    def loglike(self, params) -> float:
        return self._evaluate(params).loglik

    def loglike_groups(self, params) -> np.ndarray:
        """Log-likelihood contribution of each group (sorted group labels)."""
        return self._evaluate(params).loglik_groups.copy()

    def score(self, params) -> np.ndarray:
        return self._evaluate(params).grad.copy()

    def hessian(self, params) -> np.ndarray:
        key = np.asarray(params, dtype=np.float64).tobytes()
        if key not in self._hessians:
            self._hessians[key] = self.likelihood.hessian(np.asarray(params, dtype=np.float64), self.nagq)
        return self._hessians[key].copy()

    @property
    def start_params(self) -> np.ndarray:
        if self.logistic is None:
            self.logistic = logistic_mle(self.likelihood.y, self.likelihood.X)
        return start_values(self.likelihood, self.logistic)

    def _optimizer(self, f, score, start_params, fargs, kwargs, disp=False, maxiter=100, callback=None,
                   retall=False, full_output=True, hess=None):
        opt = maximise(self.likelihood, start_params, self.nagq, max_iter=maxiter)
        self.optimisation = opt
        self._last = opt.evaluation
        self._hessians[opt.x.tobytes()] = opt.hessian
        retvals = {"fopt": -opt.evaluation.loglik / self.endog.shape[0], "iterations": opt.iterations,
                   "fcalls": opt.n_evaluations, "converged": opt.converged, "message": opt.message,
                   "decrement": opt.decrement}
        return opt.x, retvals

    def fit(self, start_params=None, method: str = "glmm", maxiter: int = 100, full_output: bool = True,
            disp: bool = False, callback=None, retall: bool = False, **kwargs) -> GenericLikelihoodModelResults:
        if start_params is None:
            start_params = self.start_params
        if method == "glmm":
            kwargs["extra_fit_funcs"] = {"glmm": self._optimizer}
        return super().fit(start_params=start_params, method=method, maxiter=maxiter, full_output=full_output,
                           disp=disp, callback=callback, retall=retall, **kwargs)


# ------------------------------------------------------------------------------------------------------------
# the result


@dataclass(frozen=True)
class ConvergenceDiagnostics:
    """How trustworthy the optimum is: optimiser outcome, gradient and curvature at the estimate."""

    converged: bool
    message: str
    iterations: int
    n_evaluations: int              # objective + gradient evaluations, finite-difference Hessians included
    max_abs_gradient: float
    newton_decrement: float         # g' (-H)^-1 g at the estimate (inf if -H is not positive definite)
    hessian_positive_definite: bool
    min_eigenvalue: float           # of the observed information -H
    condition_number: float
    mode_iterations: int            # Newton iterations of the last conditional-mode search
    singular: bool                  # group SD estimated as (numerically) 0
    elapsed_s: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def coefficient_table(model: str, terms: Sequence[str], estimate, se, alpha: float = 0.05) -> pl.DataFrame:
    """The tidy coefficient table shared by all models of this package (columns :data:`TIDY_COLUMNS`)."""
    est = np.asarray(estimate, dtype=np.float64)
    se = np.asarray(se, dtype=np.float64)
    q = stats.norm.ppf(1 - alpha / 2)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        z = est / se
        p = 2.0 * stats.norm.sf(np.abs(z))
        lo, hi = est - q * se, est + q * se
        return pl.DataFrame({
            "model": [model] * len(terms), "term": list(terms), "estimate": est, "se": se, "z": z, "p": p,
            "ci_low": lo, "ci_high": hi, "or": np.exp(est), "or_low": np.exp(lo), "or_high": np.exp(hi),
        })


@dataclass(frozen=True)
class GLMMResult:
    """A fitted random-intercept logistic model.

    ``coefficients``: one row per fixed effect (columns :data:`TIDY_COLUMNS`, log-odds scale plus ORs).
    ``site_sd`` / ``site_variance``: the group SD sigma and variance sigma^2 (logit scale), ``site_sd_se`` the
    SE of sigma from the observed information. ``random_effects``: per group its size, events, conditional
    mode of the intercept (logit scale, lme4's ``ranef``) and conditional SD. ``sm_results``: the statsmodels
    results (``summary()``, ``conf_int()``, ``cov_params()`` ...).
    """

    outcome: str
    group: str
    method: str                     # "laplace" or "agq"
    nagq: int
    terms: tuple[str, ...]
    coefficients: pl.DataFrame
    site_sd: float
    site_sd_se: float
    site_variance: float
    loglik: float
    aic: float
    bic: float
    nobs: int
    n_groups: int
    events: int
    random_effects: pl.DataFrame
    diagnostics: ConvergenceDiagnostics
    checks: tuple[CheckOutcome, ...] = ()
    alpha: float = 0.05
    sm_results: GenericLikelihoodModelResults | None = field(default=None, repr=False, compare=False)

    @property
    def params(self) -> np.ndarray:
        """(beta, sigma) as fitted."""
        return np.r_[self.coefficients.get_column("estimate").to_numpy(), self.site_sd]

    def cov_params(self) -> np.ndarray:
        return np.asarray(self.sm_results.cov_params())

    def coefficient(self, term: str) -> dict:
        """One row of :attr:`coefficients` as a dict."""
        rows = self.coefficients.filter(pl.col("term") == term)
        if rows.height != 1:
            raise KeyError(f"no term {term!r}; terms: {list(self.terms)}")
        return rows.row(0, named=True)

    def odds_ratio(self, term: str) -> tuple[float, float, float]:
        """(OR, lower, upper) of a fixed effect."""
        r = self.coefficient(term)
        return r["or"], r["or_low"], r["or_high"]

    def summary(self):
        """The statsmodels summary table (coefficients on the log-odds scale, group SD last)."""
        return self.sm_results.summary(title=f"Random-intercept logistic regression ({self.describe()})")

    def describe(self) -> str:
        return "Laplace approximation" if self.nagq == 1 else f"adaptive Gauss-Hermite, {self.nagq} nodes"

    def to_dict(self) -> dict:
        """JSON-able summary (for asset metadata and reports)."""
        return {
            "outcome": self.outcome, "group": self.group, "method": self.method, "nagq": self.nagq,
            "coefficients": self.coefficients.to_dicts(), "site_sd": self.site_sd, "site_sd_se": self.site_sd_se,
            "site_variance": self.site_variance, "loglik": self.loglik, "aic": self.aic, "bic": self.bic,
            "nobs": self.nobs, "n_groups": self.n_groups, "events": self.events,
            "random_effects": self.random_effects.to_dicts(), "diagnostics": self.diagnostics.to_dict(),
            "checks": [c.to_dict() for c in self.checks],
        }


def _result(model: RandomInterceptLogit, res: GenericLikelihoodModelResults, design: Design, alpha: float,
            elapsed: float, checks: Sequence[CheckOutcome]) -> GLMMResult:
    opt = model.optimisation
    params = np.asarray(res.params, dtype=np.float64)
    H = model.hessian(params)
    info = -H
    lam = np.linalg.eigvalsh(0.5 * (info + info.T))
    pd_ = bool(np.all(np.isfinite(lam)) and lam.min() > 1e-10 * max(abs(lam.max()), 1e-300))
    k = params.size
    if pd_:
        cov = np.asarray(res.cov_params(), dtype=np.float64)
        se = np.sqrt(np.diag(cov))
    else:
        se = np.full(k, np.nan)
    ev = model._evaluate(params)
    lik = model.likelihood
    sigma = float(params[-1])
    diag = ConvergenceDiagnostics(
        converged=bool(opt.converged), message=opt.message, iterations=int(opt.iterations),
        n_evaluations=int(opt.n_evaluations), max_abs_gradient=float(np.abs(ev.grad).max()),
        newton_decrement=float(opt.decrement), hessian_positive_definite=pd_, min_eigenvalue=float(lam.min()),
        condition_number=float(lam.max() / lam.min()) if pd_ else math.inf, mode_iterations=int(ev.mode_iterations),
        singular=sigma < 1e-4, elapsed_s=elapsed)
    names = design.names
    coef = coefficient_table("glmm_laplace" if model.nagq == 1 else f"glmm_agq{model.nagq}", names,
                             params[:-1], se[:-1], alpha)
    re = pl.DataFrame({
        design.group: [design.group_levels[int(c)] for c in lik.group_codes],
        "n": lik.sizes.astype(np.int64), "events": lik.events.astype(np.int64),
        "mode": sigma * ev.u, "cond_sd": sigma * ev.scale,
    })
    ll = float(ev.loglik)
    n = design.nobs
    return GLMMResult(
        outcome=design.outcome, group=design.group, method="laplace" if model.nagq == 1 else "agq",
        nagq=model.nagq, terms=names, coefficients=coef, site_sd=sigma, site_sd_se=float(se[-1]),
        site_variance=sigma * sigma, loglik=ll, aic=-2 * ll + 2 * k, bic=-2 * ll + math.log(n) * k, nobs=n,
        n_groups=lik.G, events=int(lik.events.sum()), random_effects=re, diagnostics=diag,
        checks=tuple(checks), alpha=alpha, sm_results=res)


def fit_glmm(df, outcome: str, fixed: Sequence[str], group: str, *, nagq: int = DEFAULT_NAGQ,
             alpha: float = 0.05, check: bool = True, min_epv: float = 10.0, min_group_size: int = 2,
             max_iter: int = 100) -> GLMMResult:
    """Fit ``outcome ~ fixed + (1 | group)``, binomial with logit link, by ML on a Polars or pandas frame.

    ``nagq=1`` is the Laplace approximation (``glmer(..., nAGQ = 1)``), ``nagq > 1`` adaptive Gauss-Hermite
    quadrature (``nAGQ = nagq``). Boolean covariates enter as 0/1, string / enum columns as treatment dummies.

    With ``check=True`` (default) the data checks run first and any error-level failure raises
    :class:`~cbp_platform.stats.checks.ModelCheckError` before fitting; after the fit the fit checks run and
    their failures raise too (the exception carries the fitted result). With ``check=False`` nothing is
    raised: the fit checks are still attached to ``result.checks`` for the caller to report.
    """
    t0 = time.perf_counter()
    design = build_design(df, outcome, fixed, group)
    logistic = None
    pre: list[CheckOutcome] = []
    if check:
        logistic = logistic_mle(design.y, design.X) if design.complete else None
        pre = design_checks(design, min_epv=min_epv, min_group_size=min_group_size, logistic=logistic)
        raise_for_failures(pre)
    elif not design.complete:
        raise ValueError("missing values in the model columns; drop them first (or fit with check=True for "
                         "a named failure)")
    exog = pd.DataFrame(design.X, columns=list(design.names))
    endog = pd.Series(design.y, name=outcome)
    model = RandomInterceptLogit(endog, exog, design.groups, nagq=nagq, group_name=group)
    model.logistic = logistic
    with warnings.catch_warnings():
        # statsmodels' convergence / Hessian warnings are reported as named fit checks instead
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", HessianInversionWarning)
        res = model.fit(maxiter=max_iter)
    elapsed = time.perf_counter() - t0
    result = _result(model, res, design, alpha, elapsed, pre)
    post = fit_checks(result)
    result = dataclasses.replace(result, checks=tuple(pre) + tuple(post))
    if check:
        raise_for_failures(post, result)
    return result
