"""Mixed logistic regression with a random intercept per site, fitted by maximum likelihood like lme4::glmer.

Model (docs/statistics.md)::

    logit P(y_i = 1 | b) = x_i' beta + b_site(i),    b_site ~ N(0, sigma^2) independently

The marginal likelihood integrates each site's intercept out. :mod:`cbp_platform.stats._likelihood` evaluates
it exactly as ``lme4::glmer`` does for one scalar random intercept: the Laplace approximation (``nagq=1``) or
adaptive Gauss-Hermite quadrature with ``nagq`` nodes around each site's conditional mode (``nagq > 1``), with
an exact analytic gradient and Hessian. The estimator (:mod:`cbp_platform.stats._optimise`) maximises that
function over theta = (beta, sigma): starting values from plain logistic regression (IRLS) and a method-of-moments
sigma, Newton's method with the exact Hessian on the Laplace objective, then (``nagq > 1``) on the AGQ objective
from the Laplace optimum, to a Newton decrement below 1e-10; the observed information -H at the estimate is the
exact Hessian of the last iteration.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import polars as pl
from scipy import special, stats
from statsmodels.base.model import GenericLikelihoodModel, GenericLikelihoodModelResults
from statsmodels.tools.sm_exceptions import ConvergenceWarning, HessianInversionWarning

from cbp_platform.stats._likelihood import Evaluation, GroupedLogitLikelihood, gauss_hermite
from cbp_platform.stats._optimise import Optimisation, maximise, one_blas_thread, start_values
from cbp_platform.stats.checks import CheckOutcome, design_checks, fit_checks, raise_for_failures
from cbp_platform.stats.design import Design, _to_polars, build_design
from cbp_platform.stats.logistic import LogisticFit, logistic_mle

DEFAULT_NAGQ = 25
SINGULAR_TOL = 1e-4       # site SD below which a fit is singular (lme4's isSingular tolerance on theta)

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
    n_evaluations: int              # likelihood passes (value, gradient and, where asked, exact Hessian)
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
    """A fitted random-intercept logistic model, shaped like a statsmodels results object.

    statsmodels shape: :attr:`params`, :attr:`bse`, :attr:`tvalues`, :attr:`pvalues` (pandas Series indexed by
    lme4's term names, ``(Intercept)``, ``lmm_z2``, ``sexM`` ..., then the site SD as ``<group>_sd``, lme4's
    ``.sig01``), :meth:`cov_params`, :meth:`conf_int` (``method="wald"`` or ``"profile"``), :meth:`summary`,
    :meth:`predict`, :attr:`fittedvalues`, :attr:`resid_pearson`, :attr:`llf`, :attr:`aic`, :attr:`bic`,
    :attr:`nobs`. :attr:`fe_params` holds the fixed effects alone (lme4's ``fixef``).

    Tidy shape: ``coefficients``, one row per fixed effect (columns :data:`TIDY_COLUMNS`, log-odds scale plus
    Wald ORs). ``site_sd`` / ``site_variance``: the group SD sigma and variance sigma^2 (logit scale),
    ``site_sd_se`` the SE of sigma from the observed information. ``random_effects``: per group its size, events,
    conditional mode of the intercept (logit scale, lme4's ``ranef``) and conditional SD. ``sm_results``: the
    statsmodels ``GenericLikelihoodModelResults`` of the same fit.

    Site effect as epidemiologists read it: :meth:`icc` (latent-scale ICC) and :meth:`mor` (median odds ratio),
    with profile CIs; :meth:`variance_test` (the site variance against 0, at its boundary); :meth:`lr_test`
    against a nested model. A singular fit (:attr:`singular`, SD < 1e-4 as lme4's ``isSingular``) gets no Wald
    CI for its SD.
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
    formula: str = ""
    design: Design | None = field(default=None, repr=False, compare=False)
    exog_builder: Callable | None = field(default=None, repr=False, compare=False)
    data: pl.DataFrame | None = field(default=None, repr=False, compare=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -- statsmodels shape --------------------------------------------------------------------------------
    @property
    def sd_name(self) -> str:
        """The name of the site SD among the parameters (``site_sd``; lme4's ``.sig01``)."""
        return f"{self.group}_sd"

    @property
    def param_names(self) -> list[str]:
        return [*self.terms, self.sd_name]

    @property
    def params(self) -> pd.Series:
        """Fixed effects (log-odds) then the site SD, indexed by lme4's term names."""
        return pd.Series(np.r_[self.coefficients.get_column("estimate").to_numpy(), self.site_sd],
                         index=self.param_names, name="params")

    @property
    def fe_params(self) -> pd.Series:
        """The fixed effects alone (lme4's ``fixef``)."""
        return self.params.iloc[:-1]

    @property
    def singular(self) -> bool:
        """The site SD is estimated as 0 (numerically: < 1e-4, lme4's ``isSingular`` tolerance)."""
        return bool(self.diagnostics.singular)

    @property
    def bse(self) -> pd.Series:
        """Standard errors from the observed information; the SD's is NaN for a singular fit (no Wald SE at a
        boundary)."""
        se = np.r_[self.coefficients.get_column("se").to_numpy(), np.nan if self.singular else self.site_sd_se]
        return pd.Series(se, index=self.param_names, name="bse")

    @property
    def tvalues(self) -> pd.Series:
        """z statistics of the fixed effects (the SD has none: see :meth:`variance_test`)."""
        return pd.Series(self.coefficients.get_column("z").to_numpy(), index=list(self.terms), name="z")

    @property
    def pvalues(self) -> pd.Series:
        """Two-sided Wald p-values of the fixed effects."""
        return pd.Series(self.coefficients.get_column("p").to_numpy(), index=list(self.terms), name="p")

    @property
    def llf(self) -> float:
        return self.loglik

    @property
    def df_modelwc(self) -> int:
        """Number of estimated parameters (fixed effects + the SD)."""
        return len(self.terms) + 1

    def cov_params(self) -> pd.DataFrame:
        """(-H)^-1 over the fixed effects and the SD (lme4's ``vcov`` is its fixed-effect block)."""
        names = self.param_names
        return pd.DataFrame(np.asarray(self.sm_results.cov_params()), index=names, columns=names)

    def conf_int(self, alpha: float | None = None, method: str = "wald", terms: Sequence[str] | None = None
                 ) -> pd.DataFrame:
        """Confidence intervals (columns ``lower``, ``upper``) on the log-odds scale, the SD on its own.

        ``method="wald"``: estimate +- z SE (the SD's row is NaN for a singular fit); ``"profile"``: where the
        profile likelihood ratio crosses its chi-square(1) quantile, as ``confint(fit, method = "profile")``
        (:func:`cbp_platform.stats.inference.profile_intervals`; cached per alpha and term).
        ``terms`` restricts the rows (default: every parameter).
        """
        a = self.alpha if alpha is None else alpha
        names = list(terms) if terms is not None else self.param_names
        unknown = [t for t in names if t not in self.param_names]
        if unknown:
            raise KeyError(f"no parameter(s) {unknown}; parameters: {self.param_names}")
        if method == "wald":
            q = stats.norm.ppf(1 - a / 2)
            est, se = self.params, self.bse
            rows = [(est[t] - q * se[t], est[t] + q * se[t]) for t in names]
        elif method == "profile":
            from cbp_platform.stats.inference import profile_intervals

            todo = [t for t in names if ("profile", a, t) not in self._cache]
            if todo:
                for t, bounds in profile_intervals(self, todo, alpha=a).items():
                    self._cache[("profile", a, t)] = bounds
            rows = [self._cache[("profile", a, t)] for t in names]
        else:
            raise ValueError(f"method must be 'wald' or 'profile', got {method!r}")
        return pd.DataFrame(rows, index=names, columns=["lower", "upper"], dtype=np.float64)

    # -- the site effect ----------------------------------------------------------------------------------
    def icc(self, method: str = "profile", alpha: float | None = None) -> dict:
        """Latent-scale ICC sigma^2 / (sigma^2 + pi^2 / 3) with the CI mapped from the SD's CI."""
        from cbp_platform.stats.inference import icc_latent

        return self._site_measure(icc_latent, "icc", method, alpha)

    def mor(self, method: str = "profile", alpha: float | None = None) -> dict:
        """Median odds ratio exp(sqrt(2 sigma^2) Phi^-1(0.75)) with the CI mapped from the SD's CI."""
        from cbp_platform.stats.inference import median_odds_ratio

        return self._site_measure(median_odds_ratio, "mor", method, alpha)

    def _site_measure(self, f, name: str, method: str, alpha: float | None) -> dict:
        lo, hi = self.conf_int(alpha, method=method, terms=[self.sd_name]).iloc[0]
        return {"measure": name, "estimate": f(self.site_sd), "lower": f(lo) if np.isfinite(lo) else math.nan,
                "upper": f(hi) if np.isfinite(hi) else math.nan, "method": method,
                "alpha": self.alpha if alpha is None else alpha}

    def variance_test(self):
        """Likelihood-ratio test of sigma^2 = 0 at its boundary (50:50 mixture of chi-square 0 and 1)."""
        from cbp_platform.stats.inference import variance_test

        return variance_test(self)

    def lr_test(self, restricted: GLMMResult):
        """Likelihood-ratio test of the nested model ``restricted`` against this one."""
        from cbp_platform.stats.inference import lr_test

        return lr_test(restricted, self)

    # -- predictions --------------------------------------------------------------------------------------
    def _exog(self, data) -> tuple[np.ndarray, np.ndarray]:
        """Fixed-effect design and the site offsets b (conditional modes; 0 for a site not in the fit)."""
        modes = dict(zip(self.random_effects.get_column(self.group).cast(pl.String).to_list(),
                         self.random_effects.get_column("mode").to_list()))
        if data is None:
            d = self.design
            levels = np.array([modes[lv] for lv in d.group_levels])
            return d.X, levels[d.groups]
        if self.exog_builder is None:
            raise ValueError("this result was built without its design; refit with fit_glmm to predict")
        X = self.exog_builder(data)
        frame = _to_polars(data)
        if self.group in frame.columns:
            g = frame.get_column(self.group).cast(pl.String).to_list()
            b = np.array([modes.get(v, 0.0) if v is not None else 0.0 for v in g])
        else:
            b = np.zeros(X.shape[0])
        return X, b

    def predict(self, data=None, *, which: str = "conditional", scale: str = "response") -> np.ndarray:
        """Predicted probabilities (``scale="response"``) or log-odds (``"link"``), in the rows' order.

        ``which``: ``"conditional"`` on the site (x'beta + the site's conditional mode; a site absent from the
        fit gets 0), lme4's ``predict(fit, newdata, allow.new.levels = TRUE)``; ``"population"``: x'beta, the
        typical site (``re.form = NA``); ``"marginal"``: population-averaged, the probability integrated over
        the site distribution, int expit(x'beta + sigma z) phi(z) dz (Gauss-Hermite, 51 nodes).
        """
        X, b = self._exog(data)
        eta = X @ self.fe_params.to_numpy()
        if which == "conditional":
            eta = eta + b
        elif which == "marginal":
            p = marginal_probability(eta, self.site_sd)
            return p if scale == "response" else np.log(p) - np.log1p(-p)
        elif which != "population":
            raise ValueError(f"which must be 'conditional', 'population' or 'marginal', got {which!r}")
        if scale == "link":
            return eta
        if scale != "response":
            raise ValueError(f"scale must be 'response' or 'link', got {scale!r}")
        return special.expit(eta)

    @property
    def fittedvalues(self) -> np.ndarray:
        """Conditional fitted probabilities of the fitted rows (lme4's ``fitted``)."""
        return self.predict()

    @property
    def resid_response(self) -> np.ndarray:
        return self.design.y - self.fittedvalues

    @property
    def resid_pearson(self) -> np.ndarray:
        """(y - mu) / sqrt(mu (1 - mu)) (lme4's ``residuals(fit, type = "pearson")``)."""
        mu = self.fittedvalues
        return (self.design.y - mu) / np.sqrt(mu * (1.0 - mu))

    # -- tidy access --------------------------------------------------------------------------------------
    def coefficient(self, term: str) -> dict:
        """One row of :attr:`coefficients` as a dict."""
        rows = self.coefficients.filter(pl.col("term") == term)
        if rows.height != 1:
            raise KeyError(f"no term {term!r}; terms: {list(self.terms)}")
        return rows.row(0, named=True)

    def odds_ratio(self, term: str) -> tuple[float, float, float]:
        """(OR, lower, upper) of a fixed effect (Wald)."""
        r = self.coefficient(term)
        return r["or"], r["or_low"], r["or_high"]

    def summary(self, ci: str = "wald"):
        """The model summary (:class:`cbp_platform.stats.inference.GLMMSummary`): fixed effects with ``ci``
        (``"wald"`` or ``"profile"``) CIs and ORs, the site SD, ICC and MOR with profile CIs, the variance test,
        the fit statistics and a note on a singular fit. ``str()`` gives the text; :meth:`sm_summary` the
        statsmodels one."""
        from cbp_platform.stats.inference import GLMMSummary

        return GLMMSummary.of(self, ci=ci)

    def sm_summary(self):
        """statsmodels' summary table (coefficients on the log-odds scale, group SD last)."""
        return self.sm_results.summary(title=f"Random-intercept logistic regression ({self.describe()})")

    def describe(self) -> str:
        return "Laplace approximation" if self.nagq == 1 else f"adaptive Gauss-Hermite, {self.nagq} nodes"

    def to_dict(self) -> dict:
        """JSON-able summary (for asset metadata and reports)."""
        from cbp_platform.stats.inference import icc_latent, median_odds_ratio

        return {
            "formula": self.formula, "outcome": self.outcome, "group": self.group, "method": self.method,
            "nagq": self.nagq, "coefficients": self.coefficients.to_dicts(), "site_sd": self.site_sd,
            "site_sd_se": self.site_sd_se, "site_variance": self.site_variance,
            "icc": icc_latent(self.site_sd), "mor": median_odds_ratio(self.site_sd), "singular": self.singular,
            "loglik": self.loglik, "aic": self.aic, "bic": self.bic, "nobs": self.nobs, "n_groups": self.n_groups,
            "events": self.events, "random_effects": self.random_effects.to_dicts(),
            "diagnostics": self.diagnostics.to_dict(), "checks": [c.to_dict() for c in self.checks],
        }


GH_MARGINAL = 51


def marginal_probability(eta: np.ndarray, sigma: float, nodes: int = GH_MARGINAL) -> np.ndarray:
    """int expit(eta + sigma z) phi(z) dz for each eta: the population-averaged probability."""
    eta = np.asarray(eta, dtype=np.float64)
    if sigma == 0.0:
        return special.expit(eta)
    z, w = gauss_hermite(nodes)
    return special.expit(eta[:, None] + sigma * z[None, :]) @ w


def _result(model: RandomInterceptLogit, res: GenericLikelihoodModelResults, design: Design, alpha: float,
            elapsed: float, checks: Sequence[CheckOutcome], formula: str,
            exog_builder: Callable | None, data: pl.DataFrame | None) -> GLMMResult:
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
        singular=sigma < SINGULAR_TOL, elapsed_s=elapsed)
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
        checks=tuple(checks), alpha=alpha, sm_results=res, formula=formula, design=design,
        exog_builder=exog_builder, data=data)


def _list_exog_builder(design: Design, fixed: Sequence[str]) -> Callable:
    """New data -> the fixed-effect design of the list form, with the fit's factor levels."""
    levels: dict[str, list[str]] = {}
    for name, col in zip(design.names, design.columns):
        if "[" in name and name.startswith(f"{col}["):
            levels.setdefault(col, []).append(name[len(col) + 1:-1])

    def build(data) -> np.ndarray:
        f = _to_polars(data)
        cols = [np.ones(f.height)]
        for c in fixed:
            s = f.get_column(c)
            if c in levels:
                text = s.cast(pl.String)
                cols.extend((text == lv).cast(pl.Float64).fill_null(float("nan")).to_numpy() for lv in levels[c])
            elif s.dtype in (pl.String, pl.Categorical, pl.Enum):
                raise ValueError(f"column {c!r} was numeric in the fit, not {s.dtype}")
            else:
                cols.append(s.cast(pl.Float64).fill_null(float("nan")).to_numpy())
        return np.column_stack(cols)

    return build


def fit_glmm(formula_or_data, data=None, fixed: Sequence[str] | None = None, group: str | None = None, *,
             nagq: int = DEFAULT_NAGQ, alpha: float = 0.05, check: bool = True, min_epv: float = 10.0,
             min_group_size: int = 2, max_iter: int = 100) -> GLMMResult:
    """Fit a random-intercept logistic model, binomial with logit link, by ML.

    Two forms:

    * ``fit_glmm("cbp ~ lmm_z2 + imat_z2 + age_10y + sex + ... + (1 | site)", frame)``: an lme4 formula
      (:mod:`cbp_platform.stats.formula`: factors, interactions, ``center()`` ...; terms named as lme4 does);
    * ``fit_glmm(frame, "cbp", ["lmm_z2", ...], "site")``: outcome, fixed-effect columns and group (boolean
      covariates as 0/1, string / enum columns as treatment dummies named ``column[level]``).

    ``nagq=1`` is the Laplace approximation (``glmer(..., nAGQ = 1)``), ``nagq > 1`` adaptive Gauss-Hermite
    quadrature (``nAGQ = nagq``). A Polars or pandas frame.

    With ``check=True`` (default) the data checks run first and any error-level failure raises
    :class:`~cbp_platform.stats.checks.ModelCheckError` before fitting; after the fit the fit checks run and
    their failures raise too (the exception carries the fitted result). With ``check=False`` nothing is
    raised: the fit checks are still attached to ``result.checks`` for the caller to report.
    """
    with one_blas_thread():     # thin products: a second BLAS thread gains nothing and waits for a busy core
        return _fit_glmm(formula_or_data, data, fixed, group, nagq=nagq, alpha=alpha, check=check, min_epv=min_epv,
                         min_group_size=min_group_size, max_iter=max_iter)


def _fit_glmm(formula_or_data, data, fixed, group, *, nagq, alpha, check, min_epv, min_group_size,
              max_iter) -> GLMMResult:
    t0 = time.perf_counter()
    if isinstance(formula_or_data, str):
        from cbp_platform.stats.formula import formula_design

        frame = data
        fd = formula_design(formula_or_data, data)
        design, formula, exog_builder = fd.design, formula_or_data, fd.exog
    else:
        from cbp_platform.stats.formula import formula_of

        if not isinstance(data, str) or fixed is None or group is None:
            raise TypeError("fit_glmm(formula, data) or fit_glmm(data, outcome, fixed, group)")
        frame = formula_or_data
        design = build_design(formula_or_data, data, fixed, group)
        formula = formula_of(data, fixed, group)
        exog_builder = _list_exog_builder(design, fixed)
    logistic = None
    pre: list[CheckOutcome] = []
    if check:
        logistic = logistic_mle(design.y, design.X) if design.complete else None
        pre = design_checks(design, min_epv=min_epv, min_group_size=min_group_size, logistic=logistic)
        raise_for_failures(pre)
    elif not design.complete:
        raise ValueError("missing values in the model columns; drop them first (or fit with check=True for "
                         "a named failure)")
    outcome, group = design.outcome, design.group
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
    result = _result(model, res, design, alpha, elapsed, pre, formula, exog_builder, _to_polars(frame))
    post = fit_checks(result)
    result = dataclasses.replace(result, checks=tuple(pre) + tuple(post))
    if check:
        raise_for_failures(post, result)
    return result
