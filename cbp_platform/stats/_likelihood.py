"""The marginal log-likelihood of the random-intercept logistic model and its exact gradient.

Model: y_i ~ Bernoulli(expit(eta_i)), eta_i = x_i' beta + sigma * u_g(i), u_g ~ N(0, 1) independent per group.
The parameters are theta = (beta, sigma); sigma is lme4's relative covariance factor (binomial scale is 1),
so the site variance is sigma^2. The likelihood factorises over groups; each factor is a 1-D integral

    p(y_g) = int exp(h_g(u)) du / sqrt(2 pi),   h_g(u) = sum_{i in g} log p(y_i | x_i' beta + sigma u) - u^2 / 2

approximated, exactly as ``lme4::glmer`` does for one scalar random intercept, by adaptive Gauss-Hermite
quadrature around the conditional mode u_g = argmax h_g with scale s_g = (-h_g''(u_g))^(-1/2):

    log p(y_g) ~ log s_g + log sum_k w_k exp(h_g(u_g + s_g z_k) + z_k^2 / 2)

(z_k, w_k: the K-point rule for the standard normal density, weights summing to 1). K = 1 is the Laplace
approximation, log p(y_g) ~ h_g(u_g) - log(1 + sigma^2 sum_i mu_i (1 - mu_i)) / 2. In lme4's terms,
-2 log p(y_g) is the deviance component ``devc0 + log L_g^2 - 2 log mult`` of ``glmerAGQ`` (and of
``glmerLaplace`` for K = 1), so the maximisers are the same.

The gradient differentiates through the conditional mode and the scale (implicit function theorem:
du_g/dtheta = (d^2 h_g / du dtheta) / (-h_g'')), so it is the exact derivative of the approximate
log-likelihood, not of the integral it approximates. Everything is vectorised over observations x nodes; rows
are sorted by group once so that group sums are ``np.add.reduceat`` calls.

The function is even in sigma (u and -u have the same density): the optimiser may cross zero and the estimate
is reported as |sigma|; sigma = 0 (a singular fit) is a regular point where the model is plain logistic
regression.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_NAGQ = 99


def gauss_hermite(nagq: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the ``nagq``-point Gauss-Hermite rule for the N(0, 1) density (weights sum to 1).

    The same rule as ``lme4::GHrule`` (probabilists' Hermite polynomials); the middle node of an odd rule is
    exactly 0.
    """
    if not 1 <= int(nagq) <= MAX_NAGQ:
        raise ValueError(f"nagq must be between 1 and {MAX_NAGQ}, got {nagq}")
    if nagq == 1:
        return np.zeros(1), np.ones(1)
    z, w = np.polynomial.hermite_e.hermegauss(int(nagq))
    z[np.abs(z) < 1e-13] = 0.0
    return z, w / w.sum()


def _softplus_and_mean(eta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log(1 + exp(eta)) and expit(eta), overflow-free, sharing one exp."""
    e = np.exp(-np.abs(eta))
    inv = 1.0 / (1.0 + e)
    softplus = np.maximum(eta, 0.0) + np.log1p(e)
    mu = np.where(eta >= 0.0, inv, e * inv)
    return softplus, mu


@dataclass
class Evaluation:
    """The approximate log-likelihood at theta, its gradient and the per-group quantities behind them."""

    theta: np.ndarray
    loglik: float
    grad: np.ndarray
    loglik_groups: np.ndarray     # per group
    u: np.ndarray                 # conditional modes (standard-normal scale)
    scale: np.ndarray             # s_g = 1 / sqrt(-h_g''(u_g))
    mode_iterations: int


class GroupedLogitLikelihood:
    """The approximate marginal log-likelihood of one data set (rows sorted by group once, at construction)."""

    def __init__(self, y: np.ndarray, X: np.ndarray, groups: np.ndarray):
        y = np.asarray(y, dtype=np.float64)
        X = np.asarray(X, dtype=np.float64)
        groups = np.asarray(groups)
        if X.ndim != 2 or X.shape[0] != y.shape[0] or groups.shape[0] != y.shape[0]:
            raise ValueError("y, X and groups must have the same number of rows")
        codes, inverse = np.unique(groups, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        self.order = order
        self.y = y[order]
        self.X = np.ascontiguousarray(X[order])
        self.g = inverse[order].astype(np.intp)
        self.group_codes = codes
        self.starts = np.flatnonzero(np.r_[True, np.diff(self.g) != 0])
        self.n, self.p = self.X.shape
        self.G = self.starts.size
        self.sizes = np.diff(np.r_[self.starts, self.n])
        self.events = np.add.reduceat(self.y, self.starts)
        self._u_last = np.zeros(self.G)
        self._buf: tuple[np.ndarray, np.ndarray] | None = None

    # -- group sums -----------------------------------------------------------------------------------------
    def _gsum(self, a: np.ndarray) -> np.ndarray:
        return np.add.reduceat(a, self.starts, axis=0)

    # -- conditional modes ----------------------------------------------------------------------------------
    def modes(self, eta0: np.ndarray, sigma: float, u0: np.ndarray | None = None,
              tol: float = 1e-11, max_iter: int = 200) -> tuple[np.ndarray, int]:
        """argmax_u h_g(u) for every group: Newton's method, safeguarded by bisection on a bracket.

        h_g is strictly concave (h'' <= -1) and its mode lies in sigma * (-(n_g - events_g), events_g), so the
        bracketed Newton iteration converges from any start.
        """
        if sigma == 0.0:
            return np.zeros(self.G), 0
        a, b = -sigma * (self.sizes - self.events), sigma * self.events
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        u = np.clip(self._u_last if u0 is None else u0, lo, hi)
        for it in range(1, max_iter + 1):
            _, mu = _softplus_and_mean(eta0 + sigma * u[self.g])
            grad = sigma * self._gsum(self.y - mu) - u
            curv = 1.0 + sigma * sigma * self._gsum(mu * (1.0 - mu))
            lo = np.where(grad > 0, np.maximum(lo, u), lo)
            hi = np.where(grad < 0, np.minimum(hi, u), hi)
            new = u + grad / curv
            outside = (new < lo) | (new > hi)
            new = np.where(outside, 0.5 * (lo + hi), new)
            step = np.abs(new - u).max()
            u = new
            if step <= tol * (1.0 + np.abs(u).max()):
                return u, it
        return u, max_iter

    # -- the objective --------------------------------------------------------------------------------------
    def evaluate(self, theta: np.ndarray, nagq: int = 1, u0: np.ndarray | None = None,
                 remember: bool = True) -> Evaluation:
        """Approximate log-likelihood and its exact gradient at theta = (beta, sigma)."""
        theta = np.asarray(theta, dtype=np.float64)
        beta, sigma = theta[:-1], float(theta[-1])
        z, w = gauss_hermite(nagq)
        X, y, g = self.X, self.y, self.g

        eta0 = X @ beta
        u, iters = self.modes(eta0, sigma, u0)
        if remember:
            self._u_last = u
        eta = eta0 + sigma * u[g]
        softplus, mu = _softplus_and_mean(eta)
        wt = mu * (1.0 - mu)                 # d mu / d eta
        wt1 = wt * (1.0 - 2.0 * mu)          # d^2 mu / d eta^2
        S1, S2 = self._gsum(wt), self._gsum(wt1)
        r0 = self._gsum(y - mu)
        H = 1.0 + sigma * sigma * S1         # -h''(u) at the mode
        s = 1.0 / np.sqrt(H)

        # derivatives of the mode and of H (total, through the mode) with respect to beta and sigma
        SWX = self._gsum(wt[:, None] * X)                       # G x p
        SW1X = self._gsum(wt1[:, None] * X)
        du_b = -sigma * SWX / H[:, None]
        du_s = (r0 - sigma * u * S1) / H
        dH_b = sigma * sigma * (SW1X + sigma * S2[:, None] * du_b)
        dH_s = 2.0 * sigma * S1 + sigma * sigma * S2 * (u + sigma * du_s)
        ds_b = -0.5 * s[:, None] * dH_b / H[:, None]
        ds_s = -0.5 * s * dH_s / H

        if nagq == 1:
            ll_g = self._gsum(y * eta - softplus) - 0.5 * u * u + np.log(s)
            resid = y - mu
            D = sigma * r0 - u                   # h'(u) at the computed mode: ~0
            E = np.zeros(self.G)
            B = u * r0
        else:
            RG, uk, LL, Mpi = self._nodes(eta, u, s, sigma, z)
            A = LL - 0.5 * uk * uk + (np.log(w) + 0.5 * z * z)[None, :]
            amax = A.max(axis=1)
            ex = np.exp(A - amax[:, None])
            tot = ex.sum(axis=1)
            ll_g = np.log(s) + amax + np.log(tot)
            pi = ex / tot[:, None]                                        # posterior weights of the nodes
            resid = y - Mpi(pi)                                           # sum_k pi_gk (y_i - mu_ik)
            hprime = sigma * RG - uk                                      # h'(u_k)
            D = (pi * hprime).sum(axis=1)
            E = (pi * hprime * z[None, :]).sum(axis=1)
            B = (pi * uk * RG).sum(axis=1)

        c = E + 1.0 / s
        grad_beta = X.T @ resid + (D[:, None] * du_b + c[:, None] * ds_b).sum(axis=0)
        grad_sigma = float((B + D * du_s + c * ds_s).sum())
        return Evaluation(theta=theta.copy(), loglik=float(ll_g.sum()), grad=np.r_[grad_beta, grad_sigma],
                          loglik_groups=ll_g, u=u, scale=s, mode_iterations=iters)

    def _nodes(self, eta, u, s, sigma, z):
        """Log-likelihood sums, residual sums and node means at the K quadrature nodes of every group.

        Works in two preallocated n x K buffers (the quadrature is the hot loop of an AGQ fit). Returns
        RG = sum_i (y_i - mu_ik) and LL = sum_i log p(y_i | node k) per group and node (G x K), the nodes
        u_k = u + s z_k, and a function mapping node weights pi (G x K) to sum_k pi_gk mu_ik (length n).
        """
        n, K = self.n, z.size
        if self._buf is None or self._buf[0].shape != (n, K):
            self._buf = (np.empty((n, K)), np.empty((n, K)))
        Eta, T = self._buf
        step = (sigma * s)[self.g]
        np.multiply(step[:, None], z[None, :], out=Eta)
        Eta += eta[:, None]                                   # linear predictor at every node
        np.abs(Eta, out=T)
        np.negative(T, out=T)
        np.exp(T, out=T)                                      # t = exp(-|eta|)
        np.add(T, 1.0, out=T)
        np.reciprocal(T, out=T)                               # 1 / (1 + t)
        # log(1 + exp(eta)) = max(eta, 0) - log(1 / (1 + t)); summed per group
        soft = self._gsum(np.maximum(Eta, 0.0)) - self._gsum(np.log(T))
        T -= 0.5
        np.copysign(T, Eta, out=T)
        T += 0.5                                              # mu = expit(eta), branch-free
        mu_sum = self._gsum(T)
        ev, uk = self.events, u[:, None] + s[:, None] * z[None, :]
        # sum_i y_i eta_ik = sum_i y_i eta_i + events * sigma * s * z_k
        LL = self._gsum(self.y * eta)[:, None] + (ev * sigma * s)[:, None] * z[None, :] - soft
        RG = ev[:, None] - mu_sum
        starts, ends = self.starts, np.r_[self.starts[1:], n]

        def weighted_mean(pi: np.ndarray) -> np.ndarray:
            if self.G > 64:       # many small groups: one vectorised pass
                return np.einsum("ik,ik->i", T, pi[self.g])
            out = np.empty(n)     # few large groups (the sites): one matrix-vector product each
            for j, (a, b) in enumerate(zip(starts, ends)):
                out[a:b] = T[a:b] @ pi[j]
            return out

        return RG, uk, LL, weighted_mean

    def hessian(self, theta: np.ndarray, nagq: int = 1, u0: np.ndarray | None = None,
                step: float = 1e-4) -> np.ndarray:
        """Hessian of the approximate log-likelihood: central differences of the exact gradient.

        Steps of ``step * max(1, |theta_j|)`` (lme4's ``deriv12`` uses 1e-4 too); every evaluation starts the
        mode search from the modes at theta, so the result does not depend on evaluation history.
        """
        theta = np.asarray(theta, dtype=np.float64)
        if u0 is None:
            u0 = self.evaluate(theta, nagq, remember=False).u
        k = theta.size
        Hm = np.empty((k, k))
        for j in range(k):
            h = step * max(1.0, abs(theta[j]))
            tp, tm = theta.copy(), theta.copy()
            tp[j] += h
            tm[j] -= h
            gp = self.evaluate(tp, nagq, u0=u0, remember=False).grad
            gm = self.evaluate(tm, nagq, u0=u0, remember=False).grad
            Hm[:, j] = (gp - gm) / (2.0 * h)
        return 0.5 * (Hm + Hm.T)
