"""Likelihood inference for the random-intercept GLMM: profile CIs, likelihood-ratio tests, the site effect.

* :func:`profile_intervals`: profile-likelihood CIs, as ``confint(glmer_fit, method = "profile")``. For a
  parameter psi (a fixed effect or the site SD) the profile log-likelihood l_p(psi) = max over the other
  parameters of l(psi, .) is computed by constrained Newton maximisation with the exact Hessian, started from the
  linear prediction of the other parameters by the fit's covariance;
  the bounds are where the signed root zeta(psi) = sign(psi - psi_hat) sqrt(2 (l_hat - l_p(psi))) equals
  -+ z_{1-alpha/2}, found by safeguarded Newton steps (the slope of zeta is -l_p'(psi) / zeta, and l_p' is the
  constrained optimum's gradient component, by the envelope theorem). The SD is profiled over sigma >= 0: when even sigma = 0
  is inside the interval, the lower bound is 0 (as lme4's). lme4 interpolates zeta with a spline through a grid;
  here each bound is solved to 1e-9, so the two agree to lme4's interpolation error (tests: 1e-3).
* :func:`lr_test`: likelihood-ratio test of nested models (``anova(m0, m1)``).
* :func:`variance_test`: the site variance against 0 at its boundary: the LRT of the GLMM against plain
  logistic regression, referred to the 50:50 mixture of chi-square(0) and chi-square(1) (Self & Liang 1987), i.e.
  half the naive chi-square(1) p-value.
* :func:`icc_latent` and :func:`median_odds_ratio`: the site variance as epidemiologists read it. The
  latent-scale ICC sigma^2 / (sigma^2 + pi^2 / 3) (the residual of the logistic latent variable has variance
  pi^2 / 3; ``performance::icc``'s adjusted ICC for a logit model) and the MOR exp(sqrt(2 sigma^2)
  Phi^-1(0.75)) (Merlo et al. 2006): the median OR between two participants with the same covariates in two
  randomly chosen sites, higher vs lower. Both are monotone in sigma, so their CIs are the SD's profile CI mapped.
* :class:`GLMMSummary`: the summary a reviewer reads (fixed effects with ORs, the site effect, fit statistics,
  the singular-fit note).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import stats

from cbp_platform.stats.logistic import logistic_mle

LATENT_VARIANCE = math.pi ** 2 / 3.0      # variance of the standard logistic distribution
PROFILE_TOL = 1e-10                        # Newton decrement of the constrained maximisation
ROOT_XTOL = 1e-9


def icc_latent(sigma: float) -> float:
    """sigma^2 / (sigma^2 + pi^2 / 3)."""
    v = float(sigma) ** 2
    return v / (v + LATENT_VARIANCE)


def median_odds_ratio(sigma: float) -> float:
    """exp(sqrt(2 sigma^2) Phi^-1(0.75)) = exp(0.9539 sigma)."""
    return math.exp(math.sqrt(2.0) * abs(float(sigma)) * stats.norm.ppf(0.75))


# ------------------------------------------------------------------------------------------------------------
# the profile likelihood


class _Profiler:
    """Constrained maxima of the fit's approximate log-likelihood with one parameter held fixed."""

    def __init__(self, result):
        model = result.sm_results.model
        self.lik, self.nagq = model.likelihood, result.nagq
        self.theta = np.asarray(result.params, dtype=np.float64)
        self.k = self.theta.size
        self.H = model.hessian(self.theta)
        ev = self.lik.evaluate(self.theta, self.nagq, remember=False)
        self.loglik, self.u = ev.loglik, ev.u
        try:
            self.cov = np.linalg.inv(-self.H)
            if not np.all(np.isfinite(self.cov)) or np.any(np.diag(self.cov) <= 0):
                self.cov = None
        except np.linalg.LinAlgError:
            self.cov = None
        self.evaluations = 0

    def se(self, j: int) -> float:
        return math.sqrt(self.cov[j, j]) if self.cov is not None else math.nan

    def _start(self, j: int, value: float) -> np.ndarray:
        x = self.theta.copy()
        if self.cov is not None:
            x += self.cov[:, j] / self.cov[j, j] * (value - self.theta[j])
        x[j] = value
        return x

    def maximum(self, j: int, value: float) -> tuple[float, float]:
        """max over the other parameters of l(theta) with theta_j = value, and dl/dtheta_j there (by the envelope
        theorem the slope of the profile log-likelihood): Newton's method with the exact Hessian of the free
        block (made positive definite where it is not) and a backtracking line search."""
        free = np.arange(self.k) != j
        x = self._start(j, value)
        ev = self.lik.evaluate(x, self.nagq, u0=self.u, remember=False, hessian=True)
        self.evaluations += 1
        for _ in range(100):
            g = ev.grad[free]
            B = -ev.hessian[np.ix_(free, free)]
            lam, V = np.linalg.eigh(0.5 * (B + B.T))
            lam = np.maximum(np.abs(lam), 1e-10 * max(np.abs(lam).max(), 1e-300))
            d = V @ ((V.T @ g) / lam)
            dec = float(g @ d)
            if not dec > PROFILE_TOL:
                break
            t = min(1.0, 2.0 / max(np.abs(d).max(), 1e-300))
            while True:
                cand = x.copy()
                cand[free] += t * d
                new = self.lik.evaluate(cand, self.nagq, u0=ev.u, remember=False, hessian=True)
                self.evaluations += 1
                if new.loglik >= ev.loglik + 1e-4 * t * dec - 1e-12 * abs(ev.loglik) or t < 1e-10:
                    break
                t *= 0.5
            x, ev = cand, new
        return ev.loglik, float(ev.grad[j])

    def zeta(self, j: int, value: float) -> tuple[float, float]:
        """Signed root zeta of the profile deviance difference at theta_j = value, and its slope -l_p' / zeta."""
        ll, slope = self.maximum(j, value)
        dev = max(0.0, 2.0 * (self.loglik - ll))
        z = math.copysign(math.sqrt(dev), value - self.theta[j])
        return z, (-slope / z if z != 0.0 else math.nan)

    def bound(self, j: int, side: int, q: float, is_sd: bool) -> float:
        """The value where zeta = side * q on the given side (+1 upper, -1 lower).

        zeta is increasing and nearly linear in theta_j, so Newton's method on zeta - side * q, with the slope from
        the profile's gradient, takes about three profile maxima per bound; a bracket [lo, hi] (zeta - target
        negative at lo, positive at hi) safeguards it, with bisection when a step leaves it and doubling outwards
        while the far end is not yet bracketed.
        """
        est = self.theta[j]
        target = side * q
        se = self.se(j)
        step = q * se if math.isfinite(se) and se > 0 else max(0.25, abs(est))
        lo, hi = (est, math.inf) if side > 0 else (-math.inf, est)
        if is_sd and side < 0:
            if est < 1e-4 or self.zeta(j, 0.0)[0] >= target:
                return 0.0
            lo = 0.0
            v = est - step if est - step > 0.0 else 0.5 * est
        else:
            v = est + side * step
        for _ in range(100):
            z, slope = self.zeta(j, v)
            f = z - target
            if abs(f) < 1e-10:
                return float(v)
            if f < 0:
                lo = v
            else:
                hi = v
            new = v - f / slope if math.isfinite(slope) and slope > 0 else math.nan
            if math.isfinite(lo) and math.isfinite(hi):
                if hi - lo <= ROOT_XTOL * max(1.0, abs(v)):
                    return float(0.5 * (lo + hi))
                if not lo < new < hi:
                    new = 0.5 * (lo + hi)
            elif not math.isfinite(new) or not lo < new < hi:
                new = est + 2.0 * (v - est)          # not bracketed yet: go further out
            if abs(new - v) <= ROOT_XTOL * max(1.0, abs(v)):
                return float(new)
            v = new
        return math.inf * side if not (math.isfinite(lo) and math.isfinite(hi)) else float(0.5 * (lo + hi))


def profile_intervals(result, terms: Sequence[str] | None = None, alpha: float = 0.05) -> dict[str, tuple]:
    """Profile-likelihood CIs {parameter: (lower, upper)} for ``terms`` (default: every fixed effect and the SD).

    Log-odds scale for fixed effects; the SD (``result.sd_name``) on its own scale, lower bound 0 when sigma = 0
    is inside. The intervals of the approximation the model was fitted with (Laplace or AGQ).
    """
    names = result.param_names
    terms = list(terms) if terms is not None else names
    prof = _Profiler(result)
    q = float(stats.norm.ppf(1.0 - alpha / 2.0))
    out = {}
    for t in terms:
        j = names.index(t)
        is_sd = j == len(names) - 1
        out[t] = (prof.bound(j, -1, q, is_sd), prof.bound(j, +1, q, is_sd))
    return out


# ------------------------------------------------------------------------------------------------------------
# tests


@dataclass(frozen=True)
class LRTest:
    """A likelihood-ratio test: statistic 2 (l1 - l0), degrees of freedom, p-value; ``table`` as lme4's anova."""

    statistic: float
    df: float
    pvalue: float
    table: pl.DataFrame
    description: str

    def to_dict(self) -> dict:
        return {"statistic": self.statistic, "df": self.df, "pvalue": self.pvalue, "description": self.description,
                "table": self.table.to_dicts()}


def _anova_row(name: str, npar: int, loglik: float, nobs: int) -> dict:
    return {"model": name, "npar": npar, "AIC": -2 * loglik + 2 * npar, "BIC": -2 * loglik + math.log(nobs) * npar,
            "logLik": loglik, "deviance": -2 * loglik}


def lr_test(restricted, full) -> LRTest:
    """LRT of ``restricted`` nested in ``full`` (same data, outcome, group and approximation)."""
    if (restricted.nobs, restricted.outcome, restricted.group, restricted.nagq) != \
            (full.nobs, full.outcome, full.group, full.nagq):
        raise ValueError("the models must be fitted to the same rows, outcome, group and approximation (nAGQ)")
    extra = set(restricted.terms) - set(full.terms)
    if extra or len(restricted.terms) >= len(full.terms):
        raise ValueError(f"{restricted.formula!r} is not nested in {full.formula!r}"
                         + (f": terms {sorted(extra)} only in the first" if extra else ""))
    stat = max(0.0, 2.0 * (full.loglik - restricted.loglik))
    df = full.df_modelwc - restricted.df_modelwc
    p = float(stats.chi2.sf(stat, df))
    rows = [_anova_row("restricted", restricted.df_modelwc, restricted.loglik, restricted.nobs),
            _anova_row("full", full.df_modelwc, full.loglik, full.nobs)]
    table = pl.DataFrame(rows).with_columns(pl.Series("Chisq", [None, stat]), pl.Series("Df", [None, df]),
                                            pl.Series("p", [None, p]))
    added = [t for t in full.terms if t not in restricted.terms]
    return LRTest(statistic=stat, df=float(df), pvalue=p, table=table,
                  description=f"adding {', '.join(added)}: chi-square({df}) = {stat:.3f}, p = {p:.3g}")


@dataclass(frozen=True)
class VarianceTest:
    """LRT of sigma^2 = 0: ``pvalue`` from the 50:50 chi-square(0) / chi-square(1) mixture, ``pvalue_naive``
    from chi-square(1) (twice as large, conservative)."""

    statistic: float
    pvalue: float
    pvalue_naive: float
    loglik: float
    loglik_null: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def describe(self) -> str:
        return (f"LRT of the site variance against 0: chi-square = {self.statistic:.3f}, p = {self.pvalue:.3g} "
                "(50:50 mixture of chi-square(0) and chi-square(1))")


def variance_test(result) -> VarianceTest:
    """The site variance tested against 0 at its boundary (the GLMM against logistic regression without sites)."""
    d = result.design
    null = logistic_mle(d.y, d.X)
    if not null.converged:
        raise ValueError("the logistic regression without the site effect did not converge")
    stat = max(0.0, 2.0 * (result.loglik - null.loglik))
    naive = float(stats.chi2.sf(stat, 1))
    p = 0.5 * naive if stat > 0 else 1.0
    return VarianceTest(statistic=stat, pvalue=p, pvalue_naive=naive, loglik=result.loglik,
                        loglik_null=float(null.loglik))


# ------------------------------------------------------------------------------------------------------------
# the summary


def _num(v: float, d: int = 3) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.{d}f}"


def _p(p: float) -> str:
    return "" if p is None or not math.isfinite(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


@dataclass(frozen=True)
class GLMMSummary:
    """What ``summary()`` shows: ``fixed`` (per term: estimate, SE, z, p, CI, OR and its CI), ``site`` (SD,
    variance, ICC, MOR with profile CIs), ``fit`` (n, events, sites, logLik, AIC, BIC, convergence), ``notes``."""

    title: str
    fixed: pl.DataFrame
    site: pl.DataFrame
    fit: dict
    notes: tuple[str, ...]
    ci: str

    @classmethod
    def of(cls, result, ci: str = "wald") -> GLMMSummary:
        names = list(result.terms)
        cis = result.conf_int(method=ci, terms=names)
        est, se = result.fe_params, result.bse
        fixed = pl.DataFrame({
            "term": names, "estimate": est.to_numpy(), "se": se.iloc[:-1].to_numpy(),
            "z": result.tvalues.to_numpy(), "p": result.pvalues.to_numpy(),
            "ci_low": cis["lower"].to_numpy(), "ci_high": cis["upper"].to_numpy(),
            "or": np.exp(est.to_numpy()), "or_low": np.exp(cis["lower"].to_numpy()),
            "or_high": np.exp(cis["upper"].to_numpy())})
        sd_ci = result.conf_int(method="profile", terms=[result.sd_name]).iloc[0]
        icc, mor = result.icc(), result.mor()
        vt = variance_test(result)
        site = pl.DataFrame({
            "measure": ["SD (logit scale)", "variance", "ICC (latent scale)", "MOR"],
            "estimate": [result.site_sd, result.site_variance, icc["estimate"], mor["estimate"]],
            "lower": [sd_ci["lower"], sd_ci["lower"] ** 2, icc["lower"], mor["lower"]],
            "upper": [sd_ci["upper"], sd_ci["upper"] ** 2, icc["upper"], mor["upper"]]})
        fit = {"formula": result.formula, "method": result.describe(), "nobs": result.nobs,
               "events": result.events, "groups": result.n_groups, "loglik": result.loglik, "aic": result.aic,
               "bic": result.bic, "converged": result.diagnostics.converged,
               "variance_test": vt.describe()}
        notes = []
        if result.singular:
            notes.append(f"singular fit: the {result.group} SD is estimated as 0 (boundary); no Wald CI is given "
                         "for it, its profile CI starts at 0, and the fixed effects equal a logistic regression's")
        return cls(title=f"Random-intercept logistic regression ({result.describe()})", fixed=fixed, site=site,
                   fit=fit, notes=tuple(notes), ci=ci)

    def as_text(self) -> str:
        f = self.fit
        lines = [self.title, f"Formula: {f['formula']}",
                 f"n = {f['nobs']}, events = {f['events']}, groups = {f['groups']}; logLik {f['loglik']:.4f}, "
                 f"AIC {f['aic']:.2f}, BIC {f['bic']:.2f}; {'converged' if f['converged'] else 'NOT converged'}",
                 "", f"Fixed effects (95% CI: {self.ci}):",
                 f"{'term':<28}{'estimate':>10}{'SE':>9}{'z':>8}{'p':>8}{'CI low':>9}{'CI high':>9}"
                 f"{'OR':>8}{'OR low':>8}{'OR high':>8}"]
        for r in self.fixed.iter_rows(named=True):
            lines.append(f"{r['term'][:27]:<28}{_num(r['estimate']):>10}{_num(r['se']):>9}{_num(r['z'], 2):>8}"
                         f"{_p(r['p']):>8}{_num(r['ci_low']):>9}{_num(r['ci_high']):>9}{_num(r['or']):>8}"
                         f"{_num(r['or_low']):>8}{_num(r['or_high']):>8}")
        lines += ["", "Site effect (95% profile CI):"]
        for r in self.site.iter_rows(named=True):
            lines.append(f"  {r['measure']:<22}{_num(r['estimate'], 4):>10}  ({_num(r['lower'], 4)}, "
                         f"{_num(r['upper'], 4)})")
        lines.append(f"  {f['variance_test']}")
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.as_text()

    def to_dict(self) -> dict:
        return {"title": self.title, "ci": self.ci, "fixed": self.fixed.to_dicts(), "site": self.site.to_dicts(),
                "fit": self.fit, "notes": list(self.notes)}
