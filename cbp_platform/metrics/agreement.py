"""Agreement between measured and true values: ICC, mean bias and Bland-Altman limits of agreement."""

import numpy as np


def icc_a1(x: np.ndarray, y: np.ndarray) -> float:
    """ICC(A,1): two-way, absolute agreement, single measurement (McGraw & Wong 1996), for two raters."""
    data = np.column_stack([np.asarray(x, float), np.asarray(y, float)])
    n, k = data.shape
    if n < 2:
        return float("nan")
    grand = data.mean()
    ss_rows = k * ((data.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((data.mean(axis=0) - grand) ** 2).sum()
    ss_tot = ((data - grand) ** 2).sum()
    ss_err = ss_tot - ss_rows - ss_cols
    msr = ss_rows / (n - 1)
    msc = ss_cols / (k - 1)
    mse = ss_err / ((n - 1) * (k - 1))
    return float((msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n))


def bland_altman(measured: np.ndarray, true: np.ndarray, relative: bool = True) -> dict:
    """Mean bias and 95 % limits of agreement; relative=True expresses differences in % of the true value."""
    m, t = np.asarray(measured, float), np.asarray(true, float)
    d = 100.0 * (m - t) / t if relative else m - t
    bias, sd = float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else float("nan")
    return {"bias": bias, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd, "n": int(len(d))}


def proportional_bias(measured: np.ndarray, true: np.ndarray) -> dict:
    """Bland-Altman regression of the difference on the true value: measured - true = intercept + slope x true.

    A slope away from 0 means the bias depends on the level (a mean bias near 0 can hide opposite errors at the
    two ends of the range); ``slope_se`` is the ordinary least-squares standard error."""
    m, t = np.asarray(measured, float), np.asarray(true, float)
    if len(t) < 3 or np.ptp(t) == 0:
        return {"intercept": float("nan"), "slope": float("nan"), "slope_se": float("nan")}
    X = np.column_stack([np.ones_like(t), t])
    coef, *_ = np.linalg.lstsq(X, m - t, rcond=None)
    resid = (m - t) - X @ coef
    s2 = float(resid @ resid) / (len(t) - 2)
    se = float(np.sqrt(s2 * np.linalg.inv(X.T @ X)[1, 1]))
    return {"intercept": float(coef[0]), "slope": float(coef[1]), "slope_se": se}
