"""Model checks: named, reportable outcomes instead of tracebacks or silently wrong odds ratios.

Every check returns a :class:`CheckOutcome` with a stable ``name`` (what an asset check reports), a status
(``pass``, ``fail`` or ``skip`` when an earlier failure makes it meaningless), a severity (``error`` stops the
analysis, ``warning`` is reported only) and a plain-language message. :func:`model_checks` runs the data checks
on a frame before any fit; :func:`fit_checks` runs the checks on a fitted model. :func:`raise_for_failures`
turns the failed error-level outcomes into one :class:`ModelCheckError`, which carries them for reporting.

Data checks (before fitting)

==========================  ==========================================================================
``binary_outcome``          the outcome is 0/1 and both values occur
``no_missing_values``       no missing outcome, covariate or group (rows are never dropped silently)
``min_groups``              at least ``min_groups`` (2) groups, so a group variance can be estimated
``min_group_size``          every group has at least ``min_group_size`` (2) participants
``no_constant_covariate``   no fixed-effect column is constant (it would be aliased with the intercept)
``full_rank_design``        the fixed-effect design has full column rank (no collinear columns)
``events_per_variable``     min(events, non-events) / number of covariates >= ``min_epv`` (10)
``no_separation``           no complete or quasi-complete separation of the outcome by the covariates
==========================  ==========================================================================

Fit checks (after fitting)

===============================  =====================================================================
``converged``                    the optimiser met its criterion and the Newton decrement at the
                                 estimate is below tolerance
``hessian_positive_definite``    the observed information is positive definite (a proper maximum)
``finite_confidence_intervals``  every SE and Wald CI bound is finite
``no_divergent_estimates``       no |log-OR| above ``max_abs_estimate`` (10): the signature of separation
``site_variance_not_singular``   (warning) the group SD is not estimated as 0 (a singular fit, where the
                                 GLMM reduces to ordinary logistic regression)
===============================  =====================================================================

Separation is decided exactly. A finite maximum-likelihood estimate of plain logistic regression is a
certificate that there is none (its score equations give strictly positive multipliers, which by Gordan's
theorem rule out any separating direction), so the usual case costs one IRLS fit that the GLMM needs for its
starting values anyway. Only when that fit does not converge to a finite estimate with all fitted
probabilities inside (0, 1) does the check solve the linear program of Konis (2007): maximise
sum_i s_i x_i' b subject to s_i x_i' b >= 0 and -1 <= b <= 1 (s_i = 2 y_i - 1); a positive optimum is a
separating direction, and the covariates with non-zero weight in it are named in the message.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import polars as pl
from scipy import linalg, optimize

from cbp_platform.stats.design import INTERCEPT, Design, build_design
from cbp_platform.stats.logistic import LogisticFit, logistic_mle

Status = Literal["pass", "fail", "skip"]
Severity = Literal["error", "warning"]

BINARY_OUTCOME = "binary_outcome"
NO_MISSING_VALUES = "no_missing_values"
MIN_GROUPS = "min_groups"
MIN_GROUP_SIZE = "min_group_size"
NO_CONSTANT_COVARIATE = "no_constant_covariate"
FULL_RANK_DESIGN = "full_rank_design"
EVENTS_PER_VARIABLE = "events_per_variable"
NO_SEPARATION = "no_separation"
CONVERGED = "converged"
HESSIAN_POSITIVE_DEFINITE = "hessian_positive_definite"
FINITE_CONFIDENCE_INTERVALS = "finite_confidence_intervals"
NO_DIVERGENT_ESTIMATES = "no_divergent_estimates"
SITE_VARIANCE_NOT_SINGULAR = "site_variance_not_singular"

DATA_CHECKS = (BINARY_OUTCOME, NO_MISSING_VALUES, MIN_GROUPS, MIN_GROUP_SIZE, NO_CONSTANT_COVARIATE,
               FULL_RANK_DESIGN, EVENTS_PER_VARIABLE, NO_SEPARATION)
FIT_CHECKS = (CONVERGED, HESSIAN_POSITIVE_DEFINITE, FINITE_CONFIDENCE_INTERVALS, NO_DIVERGENT_ESTIMATES,
              SITE_VARIANCE_NOT_SINGULAR)


class FitDiagnostics(Protocol):
    """What the fit checks read of an optimiser's report (:class:`cbp_platform.stats.glmm.ConvergenceDiagnostics`)."""

    converged: bool
    message: str
    iterations: int
    max_abs_gradient: float
    newton_decrement: float
    hessian_positive_definite: bool
    min_eigenvalue: float
    condition_number: float


class FittedModel(Protocol):
    """What the fit checks read of a fitted random-intercept model (:class:`cbp_platform.stats.glmm.GLMMResult`
    has it). A protocol, so this module of diagnostics needs nothing from the estimator's module."""

    @property
    def diagnostics(self) -> FitDiagnostics: ...

    @property
    def coefficients(self) -> pl.DataFrame: ...

    @property
    def site_sd(self) -> float: ...

    @property
    def group(self) -> str: ...


@dataclass(frozen=True)
class CheckOutcome:
    """One named check: status, severity, message and the value compared with the threshold."""

    name: str
    status: Status
    message: str
    severity: Severity = "error"
    value: float | None = None
    threshold: float | None = None
    details: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    @property
    def blocking(self) -> bool:
        """A failure that invalidates the analysis (severity ``error``)."""
        return self.failed and self.severity == "error"

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "severity": self.severity, "message": self.message,
                "value": self.value, "threshold": self.threshold, "details": dict(self.details)}


class ModelCheckError(ValueError):
    """One or more error-level model checks failed; ``failures`` holds them (``names`` their names).

    ``result`` is the fitted model when the failure came from a fit check (for inspection), else None.
    """

    def __init__(self, failures: Sequence[CheckOutcome], result: FittedModel | None = None):
        self.failures = tuple(failures)
        self.result = result
        lines = "; ".join(f"[{f.name}] {f.message}" for f in self.failures)
        super().__init__(f"model check failed: {lines}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.failures)


def raise_for_failures(outcomes: Iterable[CheckOutcome], result: FittedModel | None = None) -> None:
    """Raise :class:`ModelCheckError` if any outcome is a blocking failure."""
    failures = [o for o in outcomes if o.blocking]
    if failures:
        raise ModelCheckError(failures, result)


def _pass(name: str, message: str, **kw) -> CheckOutcome:
    return CheckOutcome(name, "pass", message, **kw)


def _fail(name: str, message: str, **kw) -> CheckOutcome:
    return CheckOutcome(name, "fail", message, **kw)


def _skip(name: str, why: str) -> CheckOutcome:
    return CheckOutcome(name, "skip", f"not evaluated: {why}")


# ------------------------------------------------------------------------------------------------------------
# separation: the linear programs (the certificate is a finite plain logistic regression, :mod:`.logistic`)


def separating_direction(y: np.ndarray, X: np.ndarray) -> np.ndarray | None:
    """A direction b with s_i x_i' b >= 0 for all i and > 0 for some (s = 2y - 1), or None if there is none.

    Konis's (2007) linear program on the column-scaled design, solved with HiGHS; the LP's answer is
    verified on the exact margins before it is believed.
    """
    s = 2.0 * y - 1.0
    scale = np.abs(X).max(axis=0)
    scale[scale == 0] = 1.0
    A = s[:, None] * (X / scale)
    res = optimize.linprog(-A.sum(axis=0), A_ub=-A, b_ub=np.zeros(A.shape[0]),
                           bounds=[(-1.0, 1.0)] * A.shape[1], method="highs")
    if res.status != 0 or res.x is None:
        return None
    b = res.x
    m = A @ b
    top = np.abs(m).max()
    if top <= 1e-9:
        return None
    m = m / top
    if m.min() >= -1e-7 and (m > 1e-6).any():
        return b / scale
    return None


def completely_separated(y: np.ndarray, X: np.ndarray) -> bool:
    """Whether some direction b gives every participant a strictly positive margin s_i x_i' b (complete
    separation), by the LP max t subject to s_i x_i' b >= t, -1 <= b <= 1, t <= 1."""
    s = 2.0 * y - 1.0
    scale = np.abs(X).max(axis=0)
    scale[scale == 0] = 1.0
    A = s[:, None] * (X / scale)
    k = A.shape[1]
    c = np.r_[np.zeros(k), -1.0]
    res = optimize.linprog(c, A_ub=np.c_[-A, np.ones(A.shape[0])], b_ub=np.zeros(A.shape[0]),
                           bounds=[(-1.0, 1.0)] * k + [(None, 1.0)], method="highs")
    if res.status != 0 or res.x is None:
        return False
    b = res.x[:k]
    return bool((A @ b).min() > 1e-9 * max(np.abs(A @ b).max(), 1e-300))


# ------------------------------------------------------------------------------------------------------------
# data checks


def design_checks(design: Design, *, min_epv: float = 10.0, min_group_size: int = 2, min_groups: int = 2,
                  separation: bool = True, logistic: LogisticFit | None = None) -> list[CheckOutcome]:
    """The data checks on a built design (see the module docstring); returns one outcome per check."""
    out: list[CheckOutcome] = []
    y, X, names = design.y, design.X, design.names
    covariates = [nm for nm in names if nm != INTERCEPT]

    # outcome
    yv = y[~np.isnan(y)]
    values = set(np.unique(yv).tolist())
    if not values <= {0.0, 1.0}:
        out.append(_fail(BINARY_OUTCOME, f"outcome {design.outcome!r} must be 0/1, found values "
                         f"{sorted(values)[:5]}"))
    elif len(values) < 2:
        out.append(_fail(BINARY_OUTCOME, f"outcome {design.outcome!r} takes a single value "
                         f"({sorted(values)}): nothing to model", value=float(len(values))))
    else:
        out.append(_pass(BINARY_OUTCOME, f"outcome {design.outcome!r} is 0/1 with both values present"))
    outcome_ok = out[-1].passed

    # missing values
    miss = {k: v for k, v in design.missing.items() if v}
    if miss:
        out.append(_fail(NO_MISSING_VALUES, "missing values in " + ", ".join(f"{k} ({v})" for k, v in miss.items())
                         + ": drop or impute them explicitly before fitting", value=float(sum(miss.values())),
                         details={"missing": miss}))
    else:
        out.append(_pass(NO_MISSING_VALUES, "no missing outcome, covariate or group values"))
    complete = out[-1].passed
    if not complete:
        for name in (MIN_GROUPS, MIN_GROUP_SIZE, NO_CONSTANT_COVARIATE, FULL_RANK_DESIGN, EVENTS_PER_VARIABLE,
                     NO_SEPARATION):
            out.append(_skip(name, "missing values"))
        return out

    # groups
    levels = design.group_levels
    counts = np.bincount(design.groups, minlength=len(levels))
    if len(levels) < min_groups:
        out.append(_fail(MIN_GROUPS, f"{len(levels)} group(s) of {design.group!r}; a random intercept needs at "
                         f"least {min_groups}", value=float(len(levels)), threshold=float(min_groups)))
    else:
        out.append(_pass(MIN_GROUPS, f"{len(levels)} groups of {design.group!r}", value=float(len(levels)),
                         threshold=float(min_groups)))
    small = {lv: int(c) for lv, c in zip(levels, counts) if c < min_group_size}
    if small:
        out.append(_fail(MIN_GROUP_SIZE, f"group(s) of {design.group!r} with fewer than {min_group_size} "
                         "participants: " + ", ".join(f"{k} (n={v})" for k, v in small.items()),
                         value=float(counts.min()), threshold=float(min_group_size), details={"groups": small}))
    else:
        out.append(_pass(MIN_GROUP_SIZE, f"smallest group has {int(counts.min())} participants",
                         value=float(counts.min()), threshold=float(min_group_size)))

    # constant covariates and rank
    cov_idx = [j for j, nm in enumerate(names) if nm != INTERCEPT]
    constant = [names[j] for j in cov_idx if np.ptp(X[:, j]) == 0.0]
    if constant:
        out.append(_fail(NO_CONSTANT_COVARIATE, "constant covariate(s): " + ", ".join(constant)
                         + " (no variation, so no effect can be estimated)", details={"covariates": constant}))
    else:
        out.append(_pass(NO_CONSTANT_COVARIATE, "every covariate varies"))
    _, R, piv = linalg.qr(X, mode="economic", pivoting=True)
    diag = np.abs(np.diag(R))
    rank = int((diag > diag[0] * 1e-10 * max(X.shape)).sum()) if diag.size else 0
    if rank < X.shape[1]:
        aliased = [names[j] for j in piv[rank:]]
        out.append(_fail(FULL_RANK_DESIGN, f"design rank {rank} < {X.shape[1]} columns; aliased: "
                         + ", ".join(aliased), value=float(rank), threshold=float(X.shape[1]),
                         details={"aliased": aliased}))
    else:
        out.append(_pass(FULL_RANK_DESIGN, f"design has full column rank {rank}", value=float(rank)))
    full_rank = out[-1].passed

    # events per variable
    if outcome_ok:
        events = float(yv.sum())
        minority = min(events, yv.size - events)
        k = max(len(covariates), 1)
        epv = minority / k
        msg = (f"{int(minority)} {'events' if minority == events else 'non-events'} for {len(covariates)} "
               f"covariate(s): {epv:.1f} per variable")
        if epv < min_epv:
            out.append(_fail(EVENTS_PER_VARIABLE, msg + f", below {min_epv:g}", value=epv, threshold=min_epv))
        else:
            out.append(_pass(EVENTS_PER_VARIABLE, msg, value=epv, threshold=min_epv))
    else:
        out.append(_skip(EVENTS_PER_VARIABLE, "outcome not binary"))

    # separation
    if not separation:
        out.append(_skip(NO_SEPARATION, "disabled"))
    elif not (outcome_ok and full_rank):
        out.append(_skip(NO_SEPARATION, "outcome not binary" if not outcome_ok else "design not of full rank"))
    else:
        fit = logistic if logistic is not None else logistic_mle(y, X)
        if fit.certifies_no_separation:
            out.append(_pass(NO_SEPARATION, "plain logistic regression has a finite maximum-likelihood estimate "
                             "(no separation)"))
        else:
            b = separating_direction(y, X)
            if b is None:
                out.append(_pass(NO_SEPARATION, "no separating direction (linear program)"))
            else:
                w = np.abs(b) / np.abs(b).max()
                involved = [names[j] for j in np.argsort(-w) if w[j] > 1e-6]
                m = (2.0 * y - 1.0) * (X @ b)
                n_sep = int((m > 1e-9 * np.abs(m).max()).sum())
                kind = "complete" if completely_separated(y, X) else "quasi-complete"
                out.append(_fail(NO_SEPARATION, f"{kind} separation: the outcome of {n_sep} participant(s) is "
                                 "perfectly predicted along a direction of " + ", ".join(involved)
                                 + "; their log-ORs diverge (no finite ML estimate)",
                                 value=float(n_sep), details={"kind": kind, "covariates": involved}))
    return out


def model_checks(df, outcome: str, fixed: Sequence[str], group: str, *, min_epv: float = 10.0,
                 min_group_size: int = 2, min_groups: int = 2, separation: bool = True) -> list[CheckOutcome]:
    """Data checks of ``outcome ~ fixed + (1 | group)`` on a Polars or pandas frame (nothing is fitted).

    Returns one :class:`CheckOutcome` per data check, in the order of :data:`DATA_CHECKS`.
    """
    design = build_design(df, outcome, fixed, group)
    return design_checks(design, min_epv=min_epv, min_group_size=min_group_size, min_groups=min_groups,
                         separation=separation)


# ------------------------------------------------------------------------------------------------------------
# fit checks


def fit_checks(result: FittedModel, *, max_abs_estimate: float = 10.0, decrement_tol: float = 1e-6,
               singular_tol: float = 1e-4) -> list[CheckOutcome]:
    """Checks on a fitted GLMM (see the module docstring); one outcome per check of :data:`FIT_CHECKS`."""
    d = result.diagnostics
    out: list[CheckOutcome] = []
    ok = d.converged and math.isfinite(d.newton_decrement) and d.newton_decrement < decrement_tol
    msg = (f"{d.message}; Newton decrement {d.newton_decrement:.2e}, max |gradient| {d.max_abs_gradient:.2e}, "
           f"{d.iterations} iterations")
    out.append((_pass if ok else _fail)(CONVERGED, msg, value=d.newton_decrement, threshold=decrement_tol))

    if d.hessian_positive_definite:
        out.append(_pass(HESSIAN_POSITIVE_DEFINITE, f"observed information positive definite (condition number "
                         f"{d.condition_number:.3g})", value=d.min_eigenvalue))
    else:
        out.append(_fail(HESSIAN_POSITIVE_DEFINITE, "observed information not (numerically) positive definite "
                         f"(smallest eigenvalue {d.min_eigenvalue:.3g}, condition number {d.condition_number:.3g}): "
                         "not a proper maximum, SEs are invalid",
                         value=d.min_eigenvalue))

    coef = result.coefficients
    cols = ("se", "ci_low", "ci_high", "or_low", "or_high")
    bad = [t for t, *v in zip(coef.get_column("term"), *(coef.get_column(c) for c in cols))
           if not all(x is not None and math.isfinite(x) for x in v)]
    if bad:
        out.append(_fail(FINITE_CONFIDENCE_INTERVALS, "non-finite SE or confidence interval for: " + ", ".join(bad),
                         details={"terms": bad}))
    else:
        out.append(_pass(FINITE_CONFIDENCE_INTERVALS, "every SE and 95 % CI is finite"))

    est = dict(zip(coef.get_column("term"), coef.get_column("estimate")))
    big = {t: v for t, v in est.items() if t != INTERCEPT and not (v is not None and abs(v) <= max_abs_estimate)}
    if big:
        out.append(_fail(NO_DIVERGENT_ESTIMATES, "diverging log-OR(s) (|estimate| > "
                         f"{max_abs_estimate:g}): " + ", ".join(f"{k}={v:.3g}" for k, v in big.items())
                         + " (separation or a sparse cell)", threshold=max_abs_estimate, details={"terms": big}))
    else:
        out.append(_pass(NO_DIVERGENT_ESTIMATES, f"every |log-OR| <= {max_abs_estimate:g}",
                         threshold=max_abs_estimate))

    if result.site_sd < singular_tol:
        out.append(_fail(SITE_VARIANCE_NOT_SINGULAR, f"{result.group} SD estimated as {result.site_sd:.2g}: "
                         "singular fit, equivalent to logistic regression ignoring the groups",
                         severity="warning", value=result.site_sd, threshold=singular_tol))
    else:
        out.append(_pass(SITE_VARIANCE_NOT_SINGULAR, f"{result.group} SD {result.site_sd:.4f}",
                         severity="warning", value=result.site_sd, threshold=singular_tol))
    return out
