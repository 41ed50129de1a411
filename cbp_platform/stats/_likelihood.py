"""The marginal log-likelihood of the random-intercept logistic model, its exact gradient and exact Hessian.

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
log-likelihood, not of the integral it approximates. The Hessian (``hessian``, or ``evaluate(...,
hessian=True)`` in the same pass) is the exact second derivative of the same function, nodes moving with theta
included; it costs about one more evaluation instead of the 2 (p + 1) of central differences of the gradient
(``fd_hessian``, kept as the check). The derivation is in docs/statistics.md ("The Hessian").

Cost linear in the rows: rows are sorted by group once; per-row work is vectorised, and the n x K node arrays
of the quadrature are computed in row blocks of :data:`NODE_BLOCK` elements that stay in the CPU cache, with
per-group sums as matrix products (``np.add.reduceat`` along the rows of a 2-D array is strided, and its cost
per row grew eight-fold from 27k to 275k rows: the superlinear growth of the earlier version).

The function is even in sigma (u and -u have the same density): the optimiser may cross zero and the estimate
is reported as |sigma|; sigma = 0 (a singular fit) is a regular point where the model is plain logistic
regression.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit, log_expit

MAX_NAGQ = 99
# Elements (float64) of one row block of an n x K node array: 512 kB, so that the two blocks worked on at a
# time stay in a core's L2 cache (2 MB here) however many rows there are.
NODE_BLOCK = 1 << 16


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


_RULES: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _rule(nagq: int) -> tuple[np.ndarray, np.ndarray]:
    if nagq not in _RULES:
        _RULES[nagq] = gauss_hermite(nagq)
    return _RULES[nagq]


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
    hessian: np.ndarray | None = None    # exact Hessian, when asked for (evaluate(..., hessian=True))


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
        self._plans: dict[tuple[int, bool], list[tuple[int, int, int, np.ndarray | None]]] = {}
        self._T: np.ndarray | None = None          # n x K node means, reused between evaluations
        self._ones = np.ones(max(1, min(self.n, NODE_BLOCK)))

    # -- group sums -----------------------------------------------------------------------------------------
    def _gsum(self, a: np.ndarray) -> np.ndarray:
        """Per-group sums of a vector (1-D reduceat is a contiguous pass; never used on 2-D arrays)."""
        return np.add.reduceat(a, self.starts)

    def group_sums(self, a: np.ndarray) -> np.ndarray:
        """Per-group sums of a vector over the rows in this object's (group-sorted) order."""
        return self._gsum(np.asarray(a, dtype=np.float64))

    def _plan(self, rows: int, split: bool = True) -> list[tuple[int, int, int, np.ndarray | None]]:
        """Row blocks (a, b, first group, local group starts or None if the block lies in one group).

        Consecutive whole groups are packed into blocks of at most ``rows`` rows; a larger group is a block of
        its own, cut into near-equal pieces of at most ``rows`` rows if ``split``.
        """
        key = (max(16, int(rows)), split)
        if key not in self._plans:
            rows = key[0]
            out: list[tuple[int, int, int, np.ndarray | None]] = []
            j = 0
            while j < self.G:
                a, size = int(self.starts[j]), int(self.sizes[j])
                if size >= rows:
                    pieces = -(-size // rows) if split else 1
                    cuts = np.linspace(a, a + size, pieces + 1).round().astype(int)
                    out.extend((int(c0), int(c1), j, None) for c0, c1 in zip(cuts[:-1], cuts[1:]))
                    j += 1
                    continue
                k, total = j, 0
                while k < self.G and total + self.sizes[k] <= rows:
                    total += int(self.sizes[k])
                    k += 1
                out.append((a, a + total, j, None if k - j == 1 else self.starts[j:k] - a))
                j = k
            self._plans[key] = out
        return self._plans[key]

    def _gsum_x(self, W: np.ndarray) -> np.ndarray:
        """sum_{i in g} W_i x_i per group: (G, p) for a vector W, (G, q, p) for an n x q matrix W."""
        vec = W.ndim == 1
        Wm = W[:, None] if vec else W
        q, X, p = Wm.shape[1], self.X, self.p
        out = np.zeros((self.G, q, p))
        for a, b, j, loc in self._plan(NODE_BLOCK // (q * p), split=False):
            if loc is None:
                out[j] += Wm[a:b].T @ X[a:b]
            else:
                out[j:j + loc.size] += np.add.reduceat(Wm[a:b, :, None] * X[a:b, None, :], loc, axis=0)
        return out[:, 0, :] if vec else out

    def _xtwx(self, r: np.ndarray) -> np.ndarray:
        """X' diag(r) X, in row blocks (no n x p temporary)."""
        X = self.X
        out = np.zeros((self.p, self.p))
        for a in range(0, self.n, NODE_BLOCK // self.p):
            b = min(self.n, a + NODE_BLOCK // self.p)
            out += X[a:b].T @ (r[a:b, None] * X[a:b])
        return out

    def _block_sum(self, A: np.ndarray, loc: np.ndarray | None) -> np.ndarray:
        """Column sums of a row block per group in it (a matrix-vector product when it is one group)."""
        if loc is None:
            return (self._ones[:A.shape[0]] @ A)[None]
        return np.add.reduceat(A, loc, axis=0)

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
        eta = np.empty(self.n)
        mu = np.empty(self.n)
        for it in range(1, max_iter + 1):
            np.add(eta0, sigma * u[self.g], out=eta)
            expit(eta, out=mu)
            grad = sigma * (self.events - self._gsum(mu)) - u
            np.subtract(1.0, mu, out=eta)
            eta *= mu
            curv = 1.0 + sigma * sigma * self._gsum(eta)
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
                 remember: bool = True, hessian: bool = False) -> Evaluation:
        """Approximate log-likelihood and its exact gradient at theta = (beta, sigma); with ``hessian=True``
        also its exact Hessian (``Evaluation.hessian``)."""
        theta = np.asarray(theta, dtype=np.float64)
        beta, sigma = theta[:-1], float(theta[-1])
        z, w = _rule(int(nagq))
        X, y, g = self.X, self.y, self.g

        eta0 = X @ beta
        u, iters = self.modes(eta0, sigma, u0)
        if remember:
            self._u_last = u
        eta = eta0 + sigma * u[g]
        mu = expit(eta)
        wt = mu * (1.0 - mu)                 # d mu / d eta
        wt1 = wt * (1.0 - 2.0 * mu)          # d^2 mu / d eta^2
        S1, S2 = self._gsum(wt), self._gsum(wt1)
        r0 = self.events - self._gsum(mu)
        H = 1.0 + sigma * sigma * S1         # -h''(u) at the mode
        s = 1.0 / np.sqrt(H)

        # derivatives of the mode and of H (total, through the mode) with respect to beta and sigma
        SWX, SW1X = self._gsum_x(np.column_stack([wt, wt1])).transpose(1, 0, 2)   # G x p each
        du_b = -sigma * SWX / H[:, None]
        du_s = (r0 - sigma * u * S1) / H
        dH_b = sigma * sigma * (SW1X + sigma * S2[:, None] * du_b)
        dH_s = 2.0 * sigma * S1 + sigma * sigma * S2 * (u + sigma * du_s)
        ds_b = -0.5 * s[:, None] * dH_b / H[:, None]
        ds_s = -0.5 * s * dH_s / H

        if nagq == 1:
            # log(1 + exp(eta)) = -log expit(-eta)
            ll_g = self._gsum(y * eta + log_expit(-eta)) - 0.5 * u * u + np.log(s)
            resid = y - mu
            D = sigma * r0 - u                   # h'(u) at the computed mode: ~0
            E = np.zeros(self.G)
            B = u * r0
            nodes = None
        else:
            RG, LL = self._node_sums(eta, (sigma * s)[g], z)
            uk = u[:, None] + s[:, None] * z[None, :]
            LL += (self._gsum(y * eta)[:, None] + (self.events * sigma * s)[:, None] * z[None, :])
            A = LL - 0.5 * uk * uk + (np.log(w) + 0.5 * z * z)[None, :]
            amax = A.max(axis=1)
            ex = np.exp(A - amax[:, None])
            tot = ex.sum(axis=1)
            ll_g = np.log(s) + amax + np.log(tot)
            pi = ex / tot[:, None]                                        # posterior weights of the nodes
            mean_mu, moments = self._node_moments(pi, z, hessian)
            resid = y - mean_mu                                           # sum_k pi_gk (y_i - mu_ik)
            hprime = sigma * RG - uk                                      # h'(u_k)
            D = (pi * hprime).sum(axis=1)
            E = (pi * hprime * z[None, :]).sum(axis=1)
            B = (pi * uk * RG).sum(axis=1)
            nodes = (pi, RG, uk, moments)

        c = E + 1.0 / s
        grad_beta = X.T @ resid + (D[:, None] * du_b + c[:, None] * ds_b).sum(axis=0)
        grad_sigma = float((B + D * du_s + c * ds_s).sum())
        Hm = None
        if hessian:
            ut, st, Ht = np.c_[du_b, du_s], np.c_[ds_b, ds_s], np.c_[dH_b, dH_s]
            Hm = self._hessian(sigma, z, u, s, H, S1, S2, SWX, SW1X, ut, st, Ht, D, c, wt, wt1, r0, nodes)
        return Evaluation(theta=theta.copy(), loglik=float(ll_g.sum()), grad=np.r_[grad_beta, grad_sigma],
                          loglik_groups=ll_g, u=u, scale=s, mode_iterations=iters, hessian=Hm)

    def _node_sums(self, eta: np.ndarray, step: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First pass over the quadrature nodes, in row blocks that stay in the cache.

        eta_ik = eta_i + step_i z_k; keeps mu_ik = expit(eta_ik) in the n x K array ``self._T`` for the second
        pass and returns, per group and node (G x K), RG = sum_i (y_i - mu_ik) and -sum_i log(1 + exp(eta_ik)).
        """
        n, K = self.n, z.size
        if self._T is None or self._T.shape != (n, K):
            self._T = np.empty((n, K))
        T = self._T
        plan = self._plan(NODE_BLOCK // K)
        rows = max(b - a for a, b, _, _ in plan)
        Eb, Lb = np.empty((rows, K)), np.empty((rows, K))
        soft, mu_sum = np.zeros((self.G, K)), np.zeros((self.G, K))
        for a, b, j, loc in plan:
            Eta, Tc, L = Eb[:b - a], T[a:b], Lb[:b - a]
            np.multiply(step[a:b, None], z[None, :], out=Eta)
            Eta += eta[a:b, None]                                 # linear predictor at every node
            np.abs(Eta, out=Tc)
            np.negative(Tc, out=Tc)
            np.exp(Tc, out=Tc)                                    # t = exp(-|eta|)
            Tc += 1.0
            np.reciprocal(Tc, out=Tc)                             # 1 / (1 + t)
            np.log(Tc, out=L)
            Tc -= 0.5
            np.copysign(Tc, Eta, out=Tc)
            Tc += 0.5                                             # mu = expit(eta), branch-free
            np.maximum(Eta, 0.0, out=Eta)
            Eta -= L                                              # log(1 + exp(eta)) = max(eta, 0) - log(1/(1+t))
            m = 1 if loc is None else loc.size
            soft[j:j + m] += self._block_sum(Eta, loc)
            mu_sum[j:j + m] += self._block_sum(Tc, loc)
        return self.events[:, None] - mu_sum, -soft

    def _node_moments(self, pi: np.ndarray, z: np.ndarray, hessian: bool):
        """Second pass: sum_k pi_gk mu_ik per row; with ``hessian`` also, per row, omega^(j)_i =
        sum_k pi_gk z_k^j mu_ik (1 - mu_ik) for j = 0, 1, 2 (n x 3), and per group and node
        M_gk = sum_i mu_ik x_i (G x K x p)."""
        T, X, K, g = self._T, self.X, z.size, self.g
        mean_mu = np.empty(self.n)
        if not hessian:
            for a, b, j, loc in self._plan(NODE_BLOCK // K):
                if loc is None:
                    np.dot(T[a:b], pi[j], out=mean_mu[a:b])
                else:
                    mean_mu[a:b] = np.einsum("ik,ik->i", T[a:b], pi[g[a:b]])
            return mean_mu, None
        P3 = pi[:, :, None] * (z[None, :, None] ** np.arange(3)[None, None, :])      # G x K x 3
        omega = np.empty((self.n, 3))
        M = np.zeros((self.G, K, self.p))
        plan = self._plan(NODE_BLOCK // K)
        Wb = np.empty((max(b - a for a, b, _, _ in plan), K))
        for a, b, j, loc in plan:
            Tc, W = T[a:b], Wb[:b - a]
            np.subtract(1.0, Tc, out=W)
            W *= Tc                                               # mu (1 - mu) at the nodes
            if loc is None:
                np.dot(Tc, pi[j], out=mean_mu[a:b])
                np.dot(W, P3[j], out=omega[a:b])
                M[j] += Tc.T @ X[a:b]
            else:
                gi = g[a:b]
                mean_mu[a:b] = np.einsum("ik,ik->i", Tc, pi[gi])
                omega[a:b] = np.einsum("ik,ikj->ij", W, P3[gi])
                for jj, (c0, c1) in enumerate(zip(loc, np.r_[loc[1:], b - a])):
                    M[j + jj] += Tc[c0:c1].T @ X[a + c0:a + c1]
        return mean_mu, (omega, M)

    # -- the Hessian ----------------------------------------------------------------------------------------
    def _hessian(self, sigma, z, u, s, H, S1, S2, SWX, SW1X, ut, st, Ht, D, c, wt, wt1, r0, nodes) -> np.ndarray:
        """Exact Hessian of the approximate log-likelihood (docs/statistics.md, "The Hessian").

        Per group, with eta_ik(theta) = x_i' beta + sigma (u(theta) + s(theta) z_k) the node predictors,
        x~_i = d eta_i / d theta at the mode = [x_i; 0] + b_g and m_g = d(sigma s) / d theta:

            d^2 l_g = -s_t s_t' / s^2 + c s_tt + D u_tt + sum_k pi_k d^2 A_k + Cov_pi(d A_k)

        where A_k = h(v_k) + const (log of the k-th quadrature term), u_tt and s_tt the second derivatives of
        the mode and the scale (implicit function theorem, third and fourth derivatives of h at the mode).
        Every per-row second-order term is a row weight on x~ x~' (one X' diag(r) X for all groups), every
        other term an outer product of per-group vectors.
        """
        p, P, g = self.p, self.p + 1, self.g
        eP = np.zeros(P)
        eP[-1] = 1.0
        b = sigma * ut
        b[:, -1] += u                                  # x~_i = [x_i; 0] + b_g
        m = sigma * st
        m[:, -1] += s                                  # d (sigma s) / d theta
        lam = -0.5 * c * s / H                         # coefficient of H_tt (through s_tt)
        kap = D + lam * sigma ** 3 * S2                # coefficient of u_tt (directly and through H_tt)
        W2 = wt * (1.0 - 6.0 * wt)                     # d^3 mu / d eta^3
        if nodes is None:                              # Laplace: one node, at the mode
            omega, omz, omzz = wt, None, None
            ERG, EzRG, Ez, Ezz, cov = r0, np.zeros(self.G), np.zeros(self.G), np.zeros(self.G), None
        else:
            pi, RG, uk, (om, M) = nodes
            omega, omz, omzz = om[:, 0], om[:, 1], om[:, 2]
            ERG, EzRG = (pi * RG).sum(axis=1), (pi * RG * z).sum(axis=1)
            Ez, Ezz = pi @ z, pi @ (z * z)
            # d A_k / d theta, up to terms constant in k (which the covariance does not see)
            J = (RG[:, :, None] * (b[:, None, :] + z[None, :, None] * m[:, None, :])
                 - uk[:, :, None] * (ut[:, None, :] + z[None, :, None] * st[:, None, :]))
            J[:, :, :p] -= M
            Jc = J - np.einsum("gk,gkp->gp", pi, J)[:, None, :]
            cov = np.einsum("gk,gki,gkj->ij", pi, Jc, Jc)

        def outer(wg, a1, a2):                          # sum_g wg_g a1_g a2_g'
            return np.einsum("g,gi,gj->ij", wg, a1, a2)

        def pad(v):                                     # G x p -> G x P, 0 in the sigma slot
            return np.c_[v, np.zeros(v.shape[0])]

        # row weights on x~ x~': -E_pi[mu(1-mu)] (second derivative at the nodes), the u_tt and H_tt parts
        rw = -omega + (-kap * sigma / H)[g] * wt1 + (lam * sigma * sigma)[g] * W2
        out = np.zeros((P, P))
        out[:p, :p] = self._xtwx(rw)
        Srx, Sr = pad(self._gsum_x(rw)), self._gsum(rw)
        out += outer(np.ones(self.G), Srx, b) + outer(np.ones(self.G), b, Srx) + outer(Sr, b, b)
        # the terms v e_P' + e_P v' (sigma enters eta as sigma * v)
        SWXt = pad(SWX) + S1[:, None] * b
        SW1Xt = pad(SW1X) + S2[:, None] * b
        v = ((-kap / H * S1 * sigma + lam * S2 * sigma * sigma)[:, None] * ut
             - (kap / H)[:, None] * SWXt + (2.0 * sigma * lam)[:, None] * SW1Xt
             + ERG[:, None] * ut + EzRG[:, None] * st).sum(axis=0)
        out += np.outer(v, eP) + np.outer(eP, v)
        out[-1, -1] += float((2.0 * lam * S1).sum())
        # the scale: c s_tt (its H_t H_t' part) and the -s_t s_t' / s^2 of log s
        out += outer(0.75 * c * s / (H * H), Ht, Ht) - outer(1.0 / (s * s), st, st)
        # -v_k^2 / 2 of h at the nodes
        out -= outer(np.ones(self.G), ut, ut) + outer(Ezz, st, st) + outer(Ez, ut, st) + outer(Ez, st, ut)
        if omz is not None:
            Ozt = pad(self._gsum_x(omz)) + self._gsum(omz)[:, None] * b
            out -= outer(np.ones(self.G), Ozt, m) + outer(np.ones(self.G), m, Ozt) + outer(self._gsum(omzz), m, m)
            out += cov
        return 0.5 * (out + out.T)

    def hessian(self, theta: np.ndarray, nagq: int = 1, u0: np.ndarray | None = None) -> np.ndarray:
        """Exact Hessian of the approximate log-likelihood at theta (the function lme4 finite-differences).

        ``u0`` only starts the conditional-mode search (the result does not depend on it).
        """
        return self.evaluate(theta, nagq, u0=u0, remember=False, hessian=True).hessian

    def fd_hessian(self, theta: np.ndarray, nagq: int = 1, u0: np.ndarray | None = None,
                   step: float = 1e-4) -> np.ndarray:
        """Hessian by central differences of the exact gradient (2 (p + 1) evaluations): the check of
        :meth:`hessian`.

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
