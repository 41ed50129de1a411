"""The optimiser of the random-intercept logistic GLMM: maximum of the Laplace or AGQ log-likelihood.

1. starting values: plain logistic regression (IRLS) for beta, sigma by the method of moments from its
   per-group residuals;
2. Laplace stage: Newton's method with the exact Hessian (``GroupedLogitLikelihood.evaluate(...,
   hessian=True)``: value, gradient and Hessian in one pass) and a backtracking line search, to a Newton
   decrement g' (-H)^-1 g below 1e-10;
3. AGQ stage (``nagq > 1``): the same iteration on the AGQ objective, started from the Laplace optimum and its
   modes, which are already very close (the sites are large): 0-2 iterations;
4. the observed information -H at the estimate is the exact Hessian of the last iteration, the one the
   convergence test used; nothing is recomputed.

A fit needs about 10 likelihood passes whatever the number of rows (the finite-difference Hessians of the
earlier version cost 2 (p + 1) passes each, 48 of its ~58).

Framework-free; :mod:`cbp_platform.stats.glmm` wraps it in a statsmodels model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from cbp_platform.stats._likelihood import Evaluation, GroupedLogitLikelihood
from cbp_platform.stats.logistic import LogisticFit, logistic_mle

DECREMENT_TOL = 1e-10          # Newton decrement g' (-H)^-1 g at which the optimiser stops
SIGMA_START = (0.05, 3.0)      # bounds of the starting sigma (never 0: sigma = 0 is a stationary point)
MAX_STEP = 2.0                 # largest change of any parameter in one step (log-odds / SD units)

_BLAS = None


def one_blas_thread():
    """Context manager: BLAS on one thread. The products here are thin (n x (p + 1), p ~ 10) and memory-bound,
    so a second thread gains nothing, and on a shared machine a two-thread BLAS call waits for a busy core
    (matrix_rank of the 27.5k x 11 design took 2 to 80 ms with two threads under load, 1.5-6 ms with one)."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


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
    """Counts likelihood passes: value + gradient, or value + gradient + exact Hessian (one pass each)."""

    def __init__(self, lik: GroupedLogitLikelihood):
        self.lik, self.n, self.n_hessian = lik, 0, 0

    def evaluate(self, x, nagq, hessian=False, **kw) -> Evaluation:
        self.n += 1
        self.n_hessian += bool(hessian)
        return self.lik.evaluate(x, nagq, hessian=hessian, **kw)


def _newton(cnt: _Counter, x: np.ndarray, nagq: int, max_iter: int, tol: float,
            u0: np.ndarray | None = None) -> tuple[np.ndarray, Evaluation, float, int]:
    """Maximise from x by Newton's method with the exact Hessian and a backtracking (Armijo) line search.

    The direction uses -H with its eigenvalues made positive (far from the optimum -H may be indefinite);
    steps are capped at :data:`MAX_STEP`. Stops when the Newton decrement g' (-H)^-1 g with the exact Hessian
    at the current point falls below ``tol`` (so the returned Hessian is the one at the returned point), or
    after ``max_iter`` steps.
    """
    ev = cnt.evaluate(x, nagq, u0=u0, hessian=True)
    for it in range(max_iter + 1):
        if ev.hessian is None:             # accepted after backtracking: the Hessian there is still needed
            ev = cnt.evaluate(x, nagq, u0=ev.u, hessian=True)
        dec = _decrement(-ev.hessian, ev.grad)
        if dec < tol or it == max_iter:
            return x, ev, dec, it
        d = _ascent_direction(-ev.hessian, ev.grad)
        slope = float(ev.grad @ d)
        t = min(1.0, MAX_STEP / np.abs(d).max())
        slack = 1e-12 * abs(ev.loglik) + 1e-12       # rounding noise of the log-likelihood itself
        first = True
        while True:
            cand = x + t * d
            # the full step is nearly always accepted: compute the Hessian in the same pass
            new = cnt.evaluate(cand, nagq, u0=ev.u, hessian=first)
            if new.loglik >= ev.loglik + 1e-4 * t * slope - slack or t < 1e-8:
                break
            t *= 0.5
            first = False
        x, ev = cand, new
    raise AssertionError("unreachable")


def start_values(lik: GroupedLogitLikelihood, logistic: LogisticFit | None = None) -> np.ndarray:
    """beta from plain logistic regression, sigma from its per-group residuals by the method of moments.

    With mu the logistic fit, the one-step estimate of a group's intercept is b_g = sum (y - mu) / sum mu (1 - mu),
    with sampling variance ~ 1 / sum mu (1 - mu); sigma^2 ~ mean(b_g^2 - 1 / sum mu (1 - mu)), kept within
    :data:`SIGMA_START`. One pass over the rows (a grid of Laplace evaluations cost six).
    """
    with one_blas_thread():
        fit = logistic or logistic_mle(lik.y, lik.X)
        beta = fit.beta if np.all(np.isfinite(fit.beta)) else np.zeros(lik.p)
        mu = expit(lik.X @ beta)
        info = np.maximum(lik.group_sums(mu * (1.0 - mu)), 1e-12)
        b = (lik.events - lik.group_sums(mu)) / info
        var = float(np.mean(b * b - 1.0 / info))
    return np.r_[beta, float(np.clip(math.sqrt(max(var, 0.0)), *SIGMA_START))]


def maximise(lik: GroupedLogitLikelihood, start: np.ndarray, nagq: int, max_iter: int = 100,
             tol: float = DECREMENT_TOL) -> Optimisation:
    """Maximum of the Laplace (nagq = 1) or AGQ log-likelihood from ``start`` (see the module docstring)."""
    cnt = _Counter(lik)
    x = np.asarray(start, dtype=np.float64).copy()
    with one_blas_thread():
        x, ev, dec, it1 = _newton(cnt, x, 1, max_iter, tol)
        iterations, stage = it1, "Laplace"
        if nagq > 1:
            x, ev, dec, it2 = _newton(cnt, x, nagq, max_iter, tol, u0=ev.u)
            iterations += it2
            stage = f"Laplace ({it1} it.) then AGQ-{nagq} ({it2} it.)"
    H = ev.hessian
    if x[-1] < 0:   # the likelihood is even in sigma: report sigma >= 0 (modes and cross terms flip sign)
        x = x.copy()
        x[-1] = -x[-1]
        J = np.r_[np.ones(x.size - 1), -1.0]
        H = H * np.outer(J, J)
        ev = dataclasses.replace(ev, theta=x.copy(), grad=ev.grad * J, u=-ev.u, hessian=H)
    converged = bool(dec < tol)
    what = "converged" if converged else "did not converge"
    message = (f"{what}: {stage}, {iterations} Newton iterations, {cnt.n} likelihood evaluations "
               f"({cnt.n_hessian} with the exact Hessian), decrement {dec:.1e}")
    return Optimisation(x=x, evaluation=ev, hessian=H, converged=converged, message=message,
                        iterations=iterations, n_evaluations=cnt.n, decrement=dec)
