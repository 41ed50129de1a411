"""The parts of the GLMM's speed (issue 29, item 7): the exact Hessian, the row blocks, the evaluation count.

* The analytic Hessian of the Laplace and AGQ log-likelihoods equals central differences of the exact
  gradient (the function lme4 finite-differences: the approximation, its nodes moving with theta) on the small
  design (5 large sites) and the clustered one (150 small clusters, where Laplace and AGQ differ).
* The n x K node arrays are processed in row blocks: tiny blocks (groups packed into one block, groups cut
  into several) give the same value, gradient and Hessian as the default.
* A fit uses a number of likelihood evaluations that does not grow with the rows (3k, 30k, 300k).

No timings here: those belong to ``make bench`` (benchmarks/bench_stats.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cbp_platform.stats import PAPER_COVARIATES, simulated_design
from cbp_platform.stats import _likelihood
from cbp_platform.stats._likelihood import GroupedLogitLikelihood
from cbp_platform.stats._optimise import maximise, start_values
from cbp_platform.stats.design import build_design, multisite_design

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "lme4"


def _likelihood_of(name: str) -> GroupedLogitLikelihood:
    if name == "small":
        D = build_design(simulated_design(2240, 3).frame, "cbp", list(PAPER_COVARIATES), "site")
    else:
        meta = json.loads((FIXTURES / "clustered.json").read_text())["design"]
        frame = pl.read_csv(FIXTURES / meta["csv"], schema_overrides={"cbp": pl.Int8})
        D = build_design(frame, "cbp", meta["fixed"], "site")
    return GroupedLogitLikelihood(D.y, D.X, D.groups)


@pytest.fixture(scope="module")
def liks():
    return {name: _likelihood_of(name) for name in ("small", "clustered")}


def _thetas(lik: GroupedLogitLikelihood):
    """A generic point, a large site SD, and a negative one (the function is even in sigma)."""
    b = np.linspace(-1.2, 0.4, lik.p) * 0.3
    return [np.r_[b, 0.35], np.r_[b, 1.3], np.r_[b, -0.6]]


@pytest.mark.parametrize("name", ["small", "clustered"])
@pytest.mark.parametrize("nagq", [1, 3, 25])
def test_analytic_hessian_equals_differences_of_the_gradient(liks, name, nagq):
    lik = liks[name]
    for theta in _thetas(lik):
        H = lik.hessian(theta, nagq)
        fd = lik.fd_hessian(theta, nagq, step=1e-5)
        assert np.all(np.isfinite(H)) and np.allclose(H, H.T, rtol=0, atol=1e-12 * np.abs(H).max())
        assert np.abs(H - fd).max() < 1e-6 * np.abs(fd).max(), (theta[-1], np.abs(H - fd).max())


@pytest.mark.parametrize("name", ["small", "clustered"])
def test_analytic_hessian_at_the_optimum_and_at_sigma_zero(liks, name):
    """At the estimate (where the SEs come from) and at sigma = 0 (a singular fit) too."""
    lik = liks[name]
    for nagq in (1, 25):
        opt = maximise(lik, start_values(lik), nagq)
        assert opt.converged
        fd = lik.fd_hessian(opt.x, nagq, step=1e-5)
        assert np.abs(opt.hessian - fd).max() < 1e-6 * np.abs(fd).max()
        se, se_fd = (np.sqrt(np.diag(np.linalg.inv(-h))) for h in (opt.hessian, fd))
        assert np.abs(se / se_fd - 1).max() < 1e-6
        zero = np.r_[opt.x[:-1], 0.0]
        fd0 = lik.fd_hessian(zero, nagq, step=1e-5)
        assert np.abs(lik.hessian(zero, nagq) - fd0).max() < 1e-6 * np.abs(fd0).max()


def test_hessian_keeps_the_evaluate_semantics(liks):
    """``hessian(theta, nagq, u0=...)`` is evaluate(..., hessian=True).hessian and, like evaluate(...,
    remember=False), does not move the remembered modes; the modes' start does not change the result."""
    lik = liks["small"]
    theta = _thetas(lik)[0]
    ev = lik.evaluate(theta, 25)
    remembered = lik._u_last.copy()
    H1 = lik.hessian(theta, 25, u0=ev.u)
    H2 = lik.hessian(theta, 25, u0=np.zeros(lik.G))
    assert np.array_equal(lik._u_last, remembered)
    assert np.abs(H1 - H2).max() < 1e-8 * np.abs(H1).max()
    full = lik.evaluate(theta, 25, u0=ev.u, remember=False, hessian=True)
    assert np.array_equal(full.hessian, H1)
    assert abs(full.loglik - ev.loglik) < 1e-10 * abs(ev.loglik)                  # modes from another start
    assert np.abs(full.grad - ev.grad).max() < 1e-8 * np.abs(ev.grad).max()
    assert lik.evaluate(theta, 25, remember=False).hessian is None


@pytest.mark.parametrize("name", ["small", "clustered"])
def test_row_blocks_do_not_change_the_result(liks, monkeypatch, name):
    """Blocks of a few dozen rows: several groups packed into one block (clustered) and each site cut into
    many blocks (small) give the default's value, gradient and Hessian."""
    lik = liks[name]
    theta = _thetas(lik)[1]
    ref = {k: lik.evaluate(theta, k, remember=False, hessian=True) for k in (1, 25)}
    monkeypatch.setattr(_likelihood, "NODE_BLOCK", 25 * 40)
    tiny = GroupedLogitLikelihood(lik.y, lik.X, lik.g)
    plan = tiny._plan(_likelihood.NODE_BLOCK // 25)
    assert len(plan) > lik.G if name == "small" else any(loc is not None for *_, loc in plan)
    for k, ev in ref.items():
        new = tiny.evaluate(theta, k, remember=False, hessian=True)
        assert abs(new.loglik - ev.loglik) < 1e-9 * abs(ev.loglik)
        assert np.abs(new.grad - ev.grad).max() < 1e-9 * np.abs(ev.grad).max()
        assert np.abs(new.hessian - ev.hessian).max() < 1e-9 * np.abs(ev.hessian).max()


@pytest.mark.parametrize("design", ["paper5", "nako18"])
def test_evaluations_do_not_grow_with_the_rows(design):
    """3k, 30k and 300k rows: a bounded number of likelihood evaluations (the finite-difference Hessians of the
    earlier optimiser alone cost 2 x 24), and no more at 300k rows than at 3k plus two."""
    fixed = list(PAPER_COVARIATES)
    if design == "paper5":
        frames = [simulated_design(n, 1).frame for n in (3087, 30868, 308680)]
    else:
        frames = [multisite_design(n) for n in (2752, 27518, 275180)]
    counts = {}
    for frame in frames:
        D = build_design(frame, "cbp", fixed, "site")
        lik = GroupedLogitLikelihood(D.y, D.X, D.groups)
        start = start_values(lik)
        for nagq in (1, 25):
            opt = maximise(lik, start, nagq)
            assert opt.converged, opt.message
            counts[frame.height, nagq] = opt.n_evaluations
    rows = [f.height for f in frames]
    for nagq in (1, 25):
        c = [counts[n, nagq] for n in rows]
        assert max(c) <= 10 and c[2] <= c[0] + 2, (nagq, dict(zip(rows, c)))
