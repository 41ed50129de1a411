"""The optimiser of the random-intercept logistic GLMM: maximum of the Laplace or AGQ log-likelihood.

1. starting values: plain logistic regression (IRLS) for beta, the best sigma of a short grid;
2. Laplace stage: quasi-Newton (BFGS updates of an initial Hessian, backtracking line search) to a Newton
   decrement g' (-H)^-1 g below 1e-10;
3. AGQ stage (``nagq > 1``): the same iteration on the AGQ objective, started from the Laplace optimum and its
   curvature, which are already very close (the sites are large);
4. the observed information -H at the estimate; if the decrement computed with it is not below tolerance,
   Newton steps with fresh Hessians finish the job.

Framework-free; :mod:`cbp_platform.stats.glmm` wraps it in a statsmodels model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cbp_platform.stats._likelihood import Evaluation, GroupedLogitLikelihood
from cbp_platform.stats.logistic import LogisticFit, logistic_mle

DECREMENT_TOL = 1e-10          # Newton decrement g' (-H)^-1 g at which the optimiser stops
SIGMA_GRID = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
MAX_STEP = 2.0                 # largest change of any parameter in one step (log-odds / SD units)


@dataclass
class Optimisation:
    """Where the optimiser ended and how it got there."""

    x: np.ndarray
    evaluation: Evaluation
    hessian: np.ndarray
    converged: bool
    message: str
    iterations: int
    n_evaluations: int
    decrement: float


def _ascent_direction(B: np.ndarray, g: np.ndarray) -> np.ndarray:
    """B^-1 g with B (an approximation of -H) made positive definite by taking |eigenvalues|."""
    lam, V = np.linalg.eigh(0.5 * (B + B.T))
    top = np.abs(lam).max() if lam.size else 1.0
    lam = np.maximum(np.abs(lam), max(1e-10 * top, 1e-12))
    return V @ ((V.T @ g) / lam)


def _decrement(info: np.ndarray, g: np.ndarray) -> float:
    """g' info^-1 g if info is positive definite, else inf."""
    try:
        c = np.linalg.cholesky(info)
    except np.linalg.LinAlgError:
        return math.inf
    v = np.linalg.solve(c, g)
    return float(v @ v)


class _Counter:
    def __init__(self, lik: GroupedLogitLikelihood):
        self.lik, self.n = lik, 0

    def evaluate(self, x, nagq, **kw) -> Evaluation:
        self.n += 1
        return self.lik.evaluate(x, nagq, **kw)

    def hessian(self, x, nagq, u0) -> np.ndarray:
        self.n += 2 * x.size
        return self.lik.hessian(x, nagq, u0=u0)


def _quasi_newton(cnt: _Counter, x: np.ndarray, nagq: int, B: np.ndarray, max_iter: int,
                  tol: float) -> tuple[np.ndarray, Evaluation, np.ndarray, int]:
    """Maximise from x with BFGS updates of B (~ -Hessian) and a backtracking (Armijo) line search.

    Stops when the decrement g' B^-1 g falls below ``tol`` or after ``max_iter`` iterations; the caller
    judges convergence with the exact Hessian.
    """
    ev = cnt.evaluate(x, nagq)
    for it in range(1, max_iter + 1):
        d = _ascent_direction(B, ev.grad)
        dec = float(ev.grad @ d)
        if dec < tol:
            return x, ev, B, it - 1
        t = min(1.0, MAX_STEP / np.abs(d).max())
        slack = 1e-12 * abs(ev.loglik) + 1e-12       # rounding noise of the log-likelihood itself
        while True:
            cand = x + t * d
            new = cnt.evaluate(cand, nagq, u0=ev.u)
            if new.loglik >= ev.loglik + 1e-4 * t * dec - slack or t < 1e-8:
                break
            t *= 0.5
        s, yv = cand - x, ev.grad - new.grad
        sy = float(s @ yv)
        if sy > 1e-12 * np.linalg.norm(s) * np.linalg.norm(yv):
            Bs = B @ s
            B = B + np.outer(yv, yv) / sy - np.outer(Bs, Bs) / float(s @ Bs)
        x, ev = cand, new
    return x, ev, B, max_iter


def start_values(lik: GroupedLogitLikelihood, logistic: LogisticFit | None = None) -> np.ndarray:
    """beta from plain logistic regression, sigma the best Laplace log-likelihood on :data:`SIGMA_GRID`."""
    fit = logistic or logistic_mle(lik.y, lik.X)
    beta = fit.beta if np.all(np.isfinite(fit.beta)) else np.zeros(lik.p)
    lls = [lik.evaluate(np.r_[beta, s], 1, remember=False).loglik for s in SIGMA_GRID]
    return np.r_[beta, SIGMA_GRID[int(np.argmax(lls))]]


def maximise(lik: GroupedLogitLikelihood, start: np.ndarray, nagq: int, max_iter: int = 100,
             tol: float = DECREMENT_TOL) -> Optimisation:
    """Maximum of the Laplace (nagq = 1) or AGQ log-likelihood from ``start`` (see the module docstring)."""
    cnt = _Counter(lik)
    x = np.asarray(start, dtype=np.float64).copy()
    ev0 = cnt.evaluate(x, 1)
    B = -cnt.hessian(x, 1, ev0.u)
    x, ev, B, it1 = _quasi_newton(cnt, x, 1, B, max_iter, tol)
    iterations, stage = it1, "Laplace"
    if nagq > 1:
        x, ev, B, it2 = _quasi_newton(cnt, x, nagq, B, max_iter, tol)
        iterations += it2
        stage = f"Laplace ({it1} it.) then AGQ-{nagq} ({it2} it.)"
    H = cnt.hessian(x, nagq, ev.u)
    dec = _decrement(-H, ev.grad)
    polish = 0
    while dec >= tol and math.isfinite(dec) and polish < min(20, max_iter):
        # Newton steps with the exact curvature (rarely needed: the quasi-Newton stage ends close)
        step = _ascent_direction(-H, ev.grad)
        x = x + step * min(1.0, MAX_STEP / np.abs(step).max())
        ev = cnt.evaluate(x, nagq, u0=ev.u)
        H = cnt.hessian(x, nagq, ev.u)
        dec = _decrement(-H, ev.grad)
        polish += 1
    if x[-1] < 0:   # the likelihood is even in sigma: report sigma >= 0 (modes and cross terms flip sign)
        x = x.copy()
        x[-1] = -x[-1]
        ev = cnt.evaluate(x, nagq, u0=-ev.u)
        J = np.r_[np.ones(x.size - 1), -1.0]
        H = H * np.outer(J, J)
        dec = _decrement(-H, ev.grad)
    converged = bool(dec < tol)
    what = "converged" if converged else "did not converge"
    message = (f"{what}: {stage}, {iterations + polish} iterations"
               + (f" (+{polish} Newton)" if polish else "") + f", decrement {dec:.1e}")
    return Optimisation(x=x, evaluation=ev, hessian=H, converged=converged, message=message,
                        iterations=iterations + polish, n_evaluations=cnt.n, decrement=dec)
