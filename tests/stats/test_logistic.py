"""The plain logistic-regression estimator in its own module, and the checks module free of the GLMM's."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import statsmodels.api as sm

from cbp_platform.stats.logistic import logistic_mle

STATS = Path(__file__).resolve().parents[2] / "cbp_platform" / "stats"


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports, wherever the import sits (``if TYPE_CHECKING:`` blocks included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module if node.level == 0 else f"cbp_platform.stats.{node.module}")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_logistic_mle_equals_statsmodels_and_flags_separation():
    rng = np.random.default_rng(4)
    X = np.column_stack([np.ones(500), rng.normal(size=500), rng.random(500) < 0.3])
    y = (rng.random(500) < 1 / (1 + np.exp(-(-0.5 + 0.8 * X[:, 1] - 0.4 * X[:, 2])))).astype(float)
    fit = logistic_mle(y, X)
    ref = sm.Logit(y, X).fit(disp=0, tol=1e-12)
    assert fit.converged and fit.certifies_no_separation
    assert np.abs(fit.beta - ref.params).max() < 1e-8 and fit.loglik == pytest.approx(ref.llf, rel=1e-12)
    sep = (X[:, 1] > 0).astype(float)                       # the outcome is a function of one covariate
    assert not logistic_mle(sep, X).certifies_no_separation


def test_the_checks_hold_diagnostics_only_and_import_nothing_back():
    """glmm -> checks -> logistic, glmm -> logistic; checks never imports glmm, not even for type hints."""
    checks, glmm, logistic = (_imported(STATS / f) for f in ("checks.py", "glmm.py", "logistic.py"))
    assert "cbp_platform.stats.glmm" not in checks and "cbp_platform.stats.logistic" in checks
    assert {"cbp_platform.stats.checks", "cbp_platform.stats.logistic"} <= glmm
    assert not {m for m in logistic if m.startswith("cbp_platform")}
    tree = ast.parse((STATS / "checks.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert "logistic_mle" not in defined and "LogisticFit" not in defined
