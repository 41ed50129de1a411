"""Model checks by prediction: discrimination, calibration and average marginal effects of a fitted GLMM.

* :func:`discrimination`: the AUC (c statistic) of the conditional fitted probabilities, with DeLong's CI
  (DeLong et al. 1988, by midranks as Sun & Xu 2014).
* :func:`calibration`: the calibration slope (logistic regression of the outcome on the linear predictor:
  1 = well calibrated, < 1 = predictions too extreme), calibration-in-the-large (the intercept with the linear
  predictor as offset: 0 = right on average), and a binned table (groups of equal size by predicted risk:
  mean predicted, observed proportion with its Wilson CI) for the calibration plot.
* :func:`average_marginal_effect`: the average change in the probability of the outcome when an exposure is
  ``delta`` units higher (exposures per 2 SD: ``delta=1`` is 2 SD), centred on each participant's value,
  population-averaged over the site distribution (``int expit(eta + sigma z) phi(z) dz``), averaged over the
  fitted participants; the CI by the delta method over (beta, sigma) with the model's covariance.

In-sample figures: they describe how well the model fits the cohort it was fitted on, not how it would predict
in another one (no optimism correction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import statsmodels.api as sm
from scipy import special, stats

from cbp_platform.stats.glmm import GLMMResult, marginal_probability

DEFAULT_BINS = 10


def _midrank(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x, method="average")


@dataclass(frozen=True)
class Discrimination:
    auc: float
    se: float
    lower: float
    upper: float
    n_events: int
    n_nonevents: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def auc_delong(y: np.ndarray, p: np.ndarray, alpha: float = 0.05) -> Discrimination:
    """AUC of scores ``p`` for 0/1 ``y`` with DeLong's standard error and a Wald CI (clipped to [0, 1])."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    pos, neg = p[y], p[~y]
    m, n = pos.size, neg.size
    if m == 0 or n == 0:
        raise ValueError("the AUC needs events and non-events")
    tz = _midrank(np.r_[pos, neg])
    tx, ty = _midrank(pos), _midrank(neg)
    v10 = (tz[:m] - tx) / n                  # per event: share of non-events scored lower
    v01 = 1.0 - (tz[m:] - ty) / m            # per non-event: share of events scored higher
    auc = float(v10.mean())
    var = (v10.var(ddof=1) / m if m > 1 else 0.0) + (v01.var(ddof=1) / n if n > 1 else 0.0)
    se = math.sqrt(var)
    q = stats.norm.ppf(1 - alpha / 2)
    return Discrimination(auc=auc, se=se, lower=max(0.0, auc - q * se), upper=min(1.0, auc + q * se),
                          n_events=int(m), n_nonevents=int(n))


def discrimination(result: GLMMResult, which: str = "conditional", alpha: float = 0.05) -> Discrimination:
    """AUC of the fitted probabilities (``which`` as :meth:`GLMMResult.predict`)."""
    return auc_delong(result.design.y, result.predict(which=which), alpha)


@dataclass(frozen=True)
class Calibration:
    slope: float
    slope_lower: float
    slope_upper: float
    intercept: float              # calibration-in-the-large (offset model)
    intercept_lower: float
    intercept_upper: float
    bins: pl.DataFrame            # bin, n, mean_predicted, events, observed, observed_low, observed_high

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "bins"}
        d["bins"] = self.bins.to_dicts()
        return d


def _wilson(k: int, n: int, z: float) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    ph = k / n
    den = 1 + z * z / n
    c = (ph + z * z / (2 * n)) / den
    h = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / den
    return max(0.0, c - h), min(1.0, c + h)


def calibration_of(y: np.ndarray, p: np.ndarray, bins: int = DEFAULT_BINS, alpha: float = 0.05) -> Calibration:
    """Calibration slope, calibration-in-the-large and a binned table of predicted risks ``p`` for 0/1 ``y``."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    lp = special.logit(p)
    q = stats.norm.ppf(1 - alpha / 2)
    slope_fit = sm.GLM(y, sm.add_constant(lp), family=sm.families.Binomial()).fit()
    b, se_b = float(slope_fit.params[1]), float(slope_fit.bse[1])
    citl = sm.GLM(y, np.ones((y.size, 1)), family=sm.families.Binomial(), offset=lp).fit()
    a, se_a = float(citl.params[0]), float(citl.bse[0])
    order = np.argsort(p, kind="stable")
    rows = []
    for k, idx in enumerate(np.array_split(order, min(bins, y.size))):
        n, ev = int(idx.size), int(y[idx].sum())
        lo, hi = _wilson(ev, n, q)
        rows.append({"bin": k + 1, "n": n, "mean_predicted": float(p[idx].mean()), "events": ev,
                     "observed": ev / n if n else math.nan, "observed_low": lo, "observed_high": hi})
    return Calibration(slope=b, slope_lower=b - q * se_b, slope_upper=b + q * se_b, intercept=a,
                       intercept_lower=a - q * se_a, intercept_upper=a + q * se_a, bins=pl.DataFrame(rows))


def calibration(result: GLMMResult, which: str = "conditional", bins: int = DEFAULT_BINS,
                alpha: float = 0.05) -> Calibration:
    """Calibration of the fitted probabilities (``which`` as :meth:`GLMMResult.predict`)."""
    return calibration_of(result.design.y, result.predict(which=which), bins, alpha)


@dataclass(frozen=True)
class MarginalEffect:
    term: str
    delta: float
    ame: float                  # probability difference (0-1 scale)
    se: float
    lower: float
    upper: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def average_marginal_effect(result: GLMMResult, column: str, delta: float = 1.0,
                            alpha: float = 0.05, step: float = 1e-6) -> MarginalEffect:
    """Population-averaged AME of ``column`` for a ``delta``-unit difference, with a delta-method CI.

    The design is rebuilt with the column moved by -+ delta / 2 (so centring, interactions and transforms of the
    column follow); the effect is mean_i [m(x_i+ beta) - m(x_i- beta)], m(eta) = E_b expit(eta + b).
    """
    frame = result.data
    if frame is None or column not in frame.columns:
        raise KeyError(f"column {column!r} is not in the fitted data")
    lo = result.exog_builder(frame.with_columns(pl.col(column) - delta / 2.0))
    hi = result.exog_builder(frame.with_columns(pl.col(column) + delta / 2.0))
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError(f"non-finite design values after moving {column!r}")

    def ame(theta: np.ndarray) -> float:
        beta, sigma = theta[:-1], abs(theta[-1])
        return float(np.mean(marginal_probability(hi @ beta, sigma) - marginal_probability(lo @ beta, sigma)))

    theta = result.params.to_numpy()
    est = ame(theta)
    grad = np.empty(theta.size)
    for j in range(theta.size):
        h = step * max(1.0, abs(theta[j]))
        tp, tm = theta.copy(), theta.copy()
        tp[j] += h
        tm[j] -= h
        grad[j] = (ame(tp) - ame(tm)) / (2 * h)
    cov = result.cov_params().to_numpy()
    se = math.sqrt(max(0.0, float(grad @ cov @ grad)))
    q = stats.norm.ppf(1 - alpha / 2)
    return MarginalEffect(term=column, delta=delta, ame=est, se=se, lower=est - q * se, upper=est + q * se)
