"""Plain logistic regression by maximum likelihood (Newton / IRLS with step halving).

The GLMM's starting values (:func:`cbp_platform.stats.glmm.start_values`) and the no-separation certificate of the
model checks (:mod:`cbp_platform.stats.checks`: a finite estimate with every fitted probability inside (0, 1) rules
separation out) both come from this one fit. An estimator, so it lives apart from the checks: the checks import
it, the GLMM imports both, and nothing imports back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import linalg

__all__ = ["LogisticFit", "logistic_mle"]



@dataclass(frozen=True)
class LogisticFit:
    """Plain logistic regression by Newton's method (IRLS) with step halving."""

    beta: np.ndarray
    converged: bool
    iterations: int
    loglik: float
    min_fitted_variance: float      # min mu (1 - mu): ~0 when fitted probabilities hit 0 or 1

    @property
    def certifies_no_separation(self) -> bool:
        return bool(self.converged and np.all(np.isfinite(self.beta)) and self.min_fitted_variance > 1e-8)


def logistic_mle(y: np.ndarray, X: np.ndarray, max_iter: int = 30, tol: float = 1e-10) -> LogisticFit:
    """Maximum-likelihood logistic regression of 0/1 ``y`` on ``X`` (intercept included by the caller).

    Converged when the Newton decrement g' I^-1 g falls below ``tol`` with the information well conditioned.
    Under separation the estimate diverges, so the iteration stops at ``max_iter`` or with fitted
    probabilities at 0 / 1, and :attr:`LogisticFit.certifies_no_separation` is False.
    """
    p = X.shape[1]
    ybar = min(max(float(y.mean()), 1e-6), 1 - 1e-6)
    beta = np.zeros(p)
    beta[0] = math.log(ybar / (1 - ybar)) if np.allclose(X[:, 0], 1.0) else 0.0

    def ll(b):
        eta = X @ b
        return float(np.sum(y * eta - np.logaddexp(0.0, eta)))

    cur = ll(beta)
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        eta = X @ beta
        mu = 0.5 * (1.0 + np.tanh(0.5 * eta))
        w = mu * (1.0 - mu)
        g = X.T @ (y - mu)
        info = (X * w[:, None]).T @ X
        try:
            c = linalg.cho_factor(info)
            step = linalg.cho_solve(c, g)
        except linalg.LinAlgError:
            break
        dec = float(g @ step)
        if dec < tol:
            converged = True
            break
        t, improved = 1.0, False
        while t > 1e-10:
            cand = beta + t * step
            new = ll(cand)
            if new >= cur:
                improved = True
                break
            t *= 0.5
        if not improved or not np.all(np.isfinite(cand)):
            break
        beta, cur = cand, new
    mu = 0.5 * (1.0 + np.tanh(0.5 * (X @ beta)))
    return LogisticFit(beta=beta, converged=converged, iterations=it, loglik=cur,
                       min_fitted_variance=float(np.min(mu * (1.0 - mu))))
