"""Multiple imputation by chained equations for the GLMM, pooled with Rubin's rules (the MI sensitivity analysis).

The primary analysis is complete case (docs/statistics.md, "Missing data"). The sensitivity analysis imputes the
missing covariate answers (physical activity, comorbidities) of the participants whose only reason for
exclusion is such a missing answer, fits the random-intercept GLMM on each completed data set and pools:

* :func:`impute`: ``m`` completed data sets (default 20) by chained equations with statsmodels'
  :class:`~statsmodels.imputation.mice.MICEData`. Every variable of the analysis model is in every imputation
  model, the outcome included (leaving it out biases the exposure ORs towards 0, Moons et al. 2006); the site
  enters as fixed dummies (5 large sites). Per variable with missing values:

  - a binary variable (0/1: the comorbidities) by a logistic GLM;
  - the ordered activity category (``ordered``: its treatment dummies ``pa_moderate``, ``pa_high``) as one
    ordinal score 0/1/2 by a linear model; in the other variables' models it enters as its two dummies, as in the
    analysis model, so the U-shaped activity-CBP relation is kept there;
  - any other numeric variable by a linear model.

  Each update draws the imputation model's parameters from the normal approximation of their posterior
  (``perturbation_method="gaussian"``) and imputes by predictive mean matching (PMM, ``k_pmm`` donors, default
  5 as R's mice): each missing value is the *observed* value of one of the ``k_pmm`` participants whose predicted
  mean is closest. PMM is what MICEData implements, and it is the right tool here: an imputed comorbidity is
  0 or 1 and an imputed activity score a valid category (no rounding of a linear prediction), and the draws
  keep the observed conditional distribution even where the imputation model's mean structure is approximate
  (the ordinal score). Each completed data set is the end of its own chain (``n_iter`` cycles, default 5 as
  mice's ``maxit``) seeded from ``SeedSequence(seed).spawn(m)``: deterministic in the seed.
* :func:`fit_glmm_mi`: :func:`~cbp_platform.stats.glmm.fit_glmm` on each completed data set and Rubin's rules
  (:func:`pool_rubin`). statsmodels' :class:`~statsmodels.imputation.mice.MICE` fits statsmodels formula models
  only, so the GLMM is fitted here and pooled by hand, exactly as ``mice::pool`` does (the Barnard-Rubin
  small-sample degrees of freedom with ``dfcom`` = lme4's ``df.residual``: observations minus parameters).
* :func:`missingness_table`: per variable and group (site) the missing count and percentage, with an
  "all sites" row: raw counts (internal); publish them through
  :func:`cbp_platform.analysis.cohort.imputation_missingness` with ``publishable=True`` (small-cell suppression).

``python -m cbp_platform.stats.imputation --write-reference`` writes the completed data sets of a simulated
design for ``tools/mice_reference.R`` (the R cross-check of the pooling, ``tests/fixtures/mice``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
from scipy import stats

from cbp_platform.stats._optimise import one_blas_thread
from cbp_platform.stats.design import AGE_CENTRE, INTERCEPT, PAPER_COVARIATES, _to_polars, standardise_2sd
from cbp_platform.stats.glmm import DEFAULT_NAGQ, TIDY_COLUMNS, GLMMResult, fit_glmm
from cbp_platform.study import IMAT, LMM

DEFAULT_M = 20
DEFAULT_ITERATIONS = 5          # cycles per chain (R mice's maxit default)
DEFAULT_K_PMM = 5               # PMM donors (R mice's default)
DEFAULT_SEED = 20140501
MODEL_NAME = "mi_glmm"
ALL_SITES = "all sites"
# the ordered activity category of the analysis model, by its treatment dummies in order (low is the reference)
PA_ORDERED: dict[str, tuple[str, ...]] = {"pa": ("pa_moderate", "pa_high")}


# ------------------------------------------------------------------------------------------------------------
# imputation


def _float_column(s: pl.Series) -> np.ndarray:
    return s.cast(pl.Float64).fill_nan(None).fill_null(float("nan")).to_numpy().astype(np.float64, copy=True)


def _is_binary(x: np.ndarray) -> bool:
    v = x[~np.isnan(x)]
    return v.size > 0 and bool(np.all((v == 0.0) | (v == 1.0)))


def _ordinal_level(frame: pl.DataFrame, dummies: Sequence[str]) -> np.ndarray:
    """0 (all dummies 0), k (the k-th dummy 1); NaN where any dummy is missing."""
    cols = np.column_stack([_float_column(frame.get_column(d)) for d in dummies])
    if np.any(np.nansum(cols, axis=1) > 1):
        raise ValueError(f"dummies {list(dummies)} of one ordered category are 1 together")
    level = (cols * np.arange(1, len(dummies) + 1)).sum(axis=1)
    level[np.isnan(cols).any(axis=1)] = np.nan
    return level


@dataclass(frozen=True)
class _Plan:
    """The MICE data (internal names v0, v1, ... for patsy) and how each imputed variable is modelled."""

    data: pd.DataFrame
    names: dict[str, str]                 # internal -> frame column (or ordered-category name)
    ordered: dict[str, tuple[str, ...]]   # internal name of an ordered level -> its dummies
    models: dict[str, str]                # internal name -> "logistic" / "linear" (variables with missing only)


def _plan(frame: pl.DataFrame, outcome: str, fixed: Sequence[str], group: str,
          ordered: Mapping[str, Sequence[str]]) -> _Plan:
    ordered = {k: tuple(v) for k, v in ordered.items() if set(v) <= set(fixed)}
    in_ordered = {d for v in ordered.values() for d in v}
    cols: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}
    order_int: dict[str, tuple[str, ...]] = {}

    def add(name: str, values: np.ndarray) -> str:
        key = f"v{len(cols)}"
        cols[key] = values
        names[key] = name
        return key

    y = _float_column(frame.get_column(outcome))
    if np.isnan(y).any():
        raise ValueError(f"{int(np.isnan(y).sum())} rows without the outcome {outcome!r}: they are not analysed "
                         "(von Hippel's MID); drop them before imputing")
    add(outcome, y)
    for c in fixed:
        if c in in_ordered:
            continue
        s = frame.get_column(c)
        if s.dtype in (pl.String, pl.Categorical, pl.Enum):
            raise TypeError(f"column {c!r}: give categorical covariates as 0/1 dummies (or as an ordered group)")
        add(c, _float_column(s))
    for name, dummies in ordered.items():
        order_int[add(name, _ordinal_level(frame, dummies))] = dummies
    g = frame.get_column(group).cast(pl.String)
    if g.null_count():
        raise ValueError(f"{g.null_count()} rows without a {group!r}")
    levels = sorted(set(g.to_list()))
    for lv in levels[1:]:
        add(f"{group}[{lv}]", (g == lv).cast(pl.Float64).to_numpy())
    data = pd.DataFrame(cols)
    models = {k: ("logistic" if k not in order_int and _is_binary(v) else "linear")
              for k, v in cols.items() if np.isnan(v).any()}
    return _Plan(data=data, names=names, ordered=order_int, models=models)


def _formula(plan: _Plan, target: str) -> str:
    terms = []
    for k in plan.data.columns:
        if k == target:
            continue
        if k in plan.ordered:
            terms += [f"I(({k} == {j}) * 1.0)" for j in range(1, len(plan.ordered[k]) + 1)]
        else:
            terms.append(k)
    return " + ".join(terms)


def _design(plan: _Plan, data: pd.DataFrame, target: str) -> np.ndarray:
    """The design matrix of :func:`_formula` (intercept, then its terms in order), built with numpy: what patsy
    builds from the formula, without re-parsing it on every update (patsy was 90 % of an imputation's time)."""
    values = data.to_numpy(dtype=np.float64)            # one conversion per call, not one per column
    cols = [np.ones(len(data))]
    for j, k in enumerate(plan.data.columns):
        if k == target:
            continue
        v = values[:, j]
        if k in plan.ordered:
            cols += [(v == j).astype(np.float64) for j in range(1, len(plan.ordered[k]) + 1)]
        else:
            cols.append(v)
    return np.column_stack(cols)


def _mice_data(plan: _Plan, **kw):
    """statsmodels' MICEData whose design matrices come from :func:`_design` (same columns as the formulas)."""
    from statsmodels.imputation.mice import MICEData

    class _MICEData(MICEData):
        def get_split_data(self, vname):
            endog = self.data[vname].to_numpy(dtype=np.float64)
            exog = _design(plan, self.data, vname)
            ixo, ixm = self.ix_obs[vname], self.ix_miss[vname]
            return endog[ixo].copy(), exog[ixo].copy(), exog[ixm].copy(), {}, {}

        def get_fitting_data(self, vname):
            ix = self.ix_obs[vname]
            endog = self.data[vname].to_numpy(dtype=np.float64)[ix].copy()
            exog = _design(plan, self.data, vname)[ix].copy()
            return endog, exog, self._process_kwds(self.init_kwds[vname], ix), \
                self._process_kwds(self.fit_kwds[vname], ix)

    return _MICEData(plan.data, **kw)


def _chain(plan: _Plan, seed_seq: np.random.SeedSequence, n_iter: int, k_pmm: int) -> pd.DataFrame:
    import statsmodels.api as sm

    md = _mice_data(plan, perturbation_method="gaussian", k_pmm=k_pmm, rng=np.random.default_rng(seed_seq))
    for k, kind in plan.models.items():
        if kind == "logistic":
            md.set_imputer(k, formula=_formula(plan, k), model_class=sm.GLM,
                           init_kwds={"family": sm.families.Binomial()})
        else:
            md.set_imputer(k, formula=_formula(plan, k), model_class=sm.OLS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # perfect-prediction / convergence chatter of the imputation GLMs
        md.update_all(n_iter)
    return md.data.copy()


def impute(frame, outcome: str, fixed: Sequence[str] = PAPER_COVARIATES, group: str = "site", *,
           m: int = DEFAULT_M, seed: int = DEFAULT_SEED, n_iter: int = DEFAULT_ITERATIONS,
           k_pmm: int = DEFAULT_K_PMM, ordered: Mapping[str, Sequence[str]] = PA_ORDERED) -> list[pl.DataFrame]:
    """``m`` completed copies of ``frame``'s model columns (``group``, ``outcome``, ``fixed``), rows as given.

    Every missing value of a ``fixed`` column is imputed (see the module docstring for the models); ``ordered``
    names groups of ``fixed`` dummies that code one ordered category (imputed as one ordinal score, returned as
    its dummies). The outcome and the group must be complete. Model columns come back as floats (0/1 for the
    binary ones), the group as text. Deterministic in ``seed``.
    """
    if m < 2:
        raise ValueError("m must be >= 2 for Rubin's rules")
    f = _to_polars(frame)
    plan = _plan(f, outcome, fixed, group, ordered)
    base = f.select(pl.col(group).cast(pl.String), pl.col(outcome).cast(pl.Float64),
                    *(pl.col(c).cast(pl.Float64) for c in fixed))
    if not plan.models:
        return [base.clone() for _ in range(m)]
    out = []
    for child in np.random.SeedSequence(seed).spawn(m):
        with one_blas_thread():    # thin least squares: a second BLAS thread only waits for a busy core
            done = _chain(plan, child, n_iter, k_pmm)
        repl = []
        for k in plan.models:
            v = done[k].to_numpy(dtype=np.float64)
            if k in plan.ordered:
                level = np.rint(v).astype(np.int64)
                repl += [pl.Series(d, (level == j).astype(np.float64))
                         for j, d in enumerate(plan.ordered[k], start=1)]
            else:
                repl.append(pl.Series(plan.names[k], v))
        out.append(base.with_columns(repl))
    return out


def stack_imputations(frames: Sequence[pl.DataFrame]) -> pl.DataFrame:
    """The completed data sets as one long frame with a leading ``.imp`` (1..m) and ``.id`` (row) column."""
    return pl.concat([fr.with_columns(pl.lit(i, pl.Int32).alias(".imp"),
                                      pl.int_range(0, fr.height, dtype=pl.Int32).alias(".id"))
                      .select(".imp", ".id", *fr.columns) for i, fr in enumerate(frames, start=1)])


def unstack_imputations(long: pl.DataFrame) -> list[pl.DataFrame]:
    """The inverse of :func:`stack_imputations`."""
    return [long.filter(pl.col(".imp") == i).sort(".id").drop(".imp", ".id")
            for i in sorted(long.get_column(".imp").unique().to_list())]


# ------------------------------------------------------------------------------------------------------------
# Rubin's rules


def barnard_rubin_df(m: int, b: np.ndarray, t: np.ndarray, dfcom: float = math.inf) -> np.ndarray:
    """Barnard & Rubin (1999) degrees of freedom, as ``mice:::barnard.rubin`` (lambda floored at 1e-4)."""
    lam = np.maximum((1.0 + 1.0 / m) * np.asarray(b, dtype=np.float64) / np.asarray(t, dtype=np.float64), 1e-4)
    dfold = (m - 1) / lam ** 2
    if math.isinf(dfcom):
        return dfold
    dfobs = (dfcom + 1.0) / (dfcom + 3.0) * dfcom * (1.0 - lam)
    return dfold * dfobs / (dfold + dfobs)


def pool_rubin(estimates, se, terms: Sequence[str] | None = None, dfcom: float = math.inf) -> pl.DataFrame:
    """Rubin's rules over ``m`` fits: ``estimates`` and ``se`` are m x p (one row per completed data set).

    Returns one row per term: m, qbar (pooled estimate), ubar (mean within variance), b (between variance,
    ddof 1), t = ubar + (1 + 1/m) b, dfcom, df (Barnard-Rubin), riv = (1 + 1/m) b / ubar, lambda = (1 + 1/m) b / t,
    fmi = (riv + 2 / (df + 3)) / (riv + 1): the columns and formulas of ``mice::pool`` (rule "rubin1987").
    """
    q = np.atleast_2d(np.asarray(estimates, dtype=np.float64))
    u = np.atleast_2d(np.asarray(se, dtype=np.float64)) ** 2
    if q.shape != u.shape:
        raise ValueError(f"estimates {q.shape} and se {u.shape} differ in shape")
    m, p = q.shape
    if m < 2:
        raise ValueError("Rubin's rules need m >= 2 fits")
    terms = list(terms) if terms is not None else [f"x{j}" for j in range(p)]
    qbar = q.mean(axis=0)
    ubar = u.mean(axis=0)
    b = q.var(axis=0, ddof=1)
    t = ubar + (1.0 + 1.0 / m) * b
    df = barnard_rubin_df(m, b, t, dfcom)
    riv = (1.0 + 1.0 / m) * b / ubar
    lam = (1.0 + 1.0 / m) * b / t
    fmi = (riv + 2.0 / (df + 3.0)) / (riv + 1.0)
    return pl.DataFrame({"term": terms, "m": [m] * p, "qbar": qbar, "ubar": ubar, "b": b, "t": t,
                         "dfcom": [float(dfcom)] * p, "df": df, "riv": riv, "lambda": lam, "fmi": fmi})


@dataclass(frozen=True)
class MIResult:
    """The GLMM pooled over ``m`` completed data sets, shaped like a statsmodels results object.

    ``params`` / ``bse`` / ``tvalues`` / ``pvalues`` / ``df`` / ``fmi``: pandas Series by term (log-odds scale;
    bse = sqrt of Rubin's total variance; p and intervals from Student's t with the Barnard-Rubin df, as
    ``summary(pool(...))`` in R). ``pooled``: :func:`pool_rubin`'s table; ``coefficients``: the tidy table
    (:data:`~cbp_platform.stats.glmm.TIDY_COLUMNS`, model ``mi_glmm``; its ``z`` column holds the t statistic).
    ``fits``: the m :class:`~cbp_platform.stats.glmm.GLMMResult`.
    """

    outcome: str
    group: str
    nagq: int
    m: int
    nobs: int
    events: tuple[int, ...]
    dfcom: float
    pooled: pl.DataFrame
    alpha: float = 0.05
    site_sd: float = math.nan            # mean of the m fits' site SDs (not a Rubin quantity)
    elapsed_s: float = math.nan
    fits: tuple[GLMMResult, ...] = field(default=(), repr=False, compare=False)

    @property
    def terms(self) -> list[str]:
        return self.pooled.get_column("term").to_list()

    def _series(self, col: str) -> pd.Series:
        return pd.Series(self.pooled.get_column(col).to_numpy(), index=self.terms, name=col)

    @property
    def params(self) -> pd.Series:
        return self._series("qbar").rename("params")

    @property
    def bse(self) -> pd.Series:
        return np.sqrt(self._series("t")).rename("bse")

    @property
    def df(self) -> pd.Series:
        return self._series("df")

    @property
    def fmi(self) -> pd.Series:
        return self._series("fmi")

    @property
    def tvalues(self) -> pd.Series:
        return (self.params / self.bse).rename("tvalues")

    @property
    def pvalues(self) -> pd.Series:
        return pd.Series(2.0 * stats.t.sf(np.abs(self.tvalues.to_numpy()), np.maximum(self.df.to_numpy(), 1e-3)),
                         index=self.terms, name="pvalues")

    def conf_int(self, alpha: float | None = None) -> pd.DataFrame:
        a = self.alpha if alpha is None else alpha
        q = stats.t.ppf(1.0 - a / 2.0, self.df.to_numpy())
        est, se = self.params.to_numpy(), self.bse.to_numpy()
        return pd.DataFrame({0: est - q * se, 1: est + q * se}, index=self.terms)

    @property
    def coefficients(self) -> pl.DataFrame:
        ci = self.conf_int()
        est, se = self.params.to_numpy(), self.bse.to_numpy()
        lo, hi = ci[0].to_numpy(), ci[1].to_numpy()
        out = pl.DataFrame({"model": [MODEL_NAME] * len(self.terms), "term": self.terms, "estimate": est, "se": se,
                            "z": self.tvalues.to_numpy(), "p": self.pvalues.to_numpy(), "ci_low": lo, "ci_high": hi,
                            "or": np.exp(est), "or_low": np.exp(lo), "or_high": np.exp(hi)})
        return out.select(TIDY_COLUMNS)

    def summary(self) -> str:
        ci = self.conf_int()
        lines = [f"Random-intercept logistic regression, multiple imputation (m = {self.m}, Rubin's rules)",
                 f"outcome {self.outcome}, group {self.group}, nAGQ {self.nagq}, {self.nobs} observations, "
                 f"dfcom {self.dfcom:g}",
                 f"{'term':<20}{'coef':>10}{'std err':>10}{'t':>9}{'df':>11}{'P>|t|':>9}{'[lo':>10}{'hi]':>10}"
                 f"{'fmi':>8}"]
        for term, est, se, tv, df, p, lo, hi, fmi in zip(self.terms, self.params, self.bse, self.tvalues, self.df,
                                                         self.pvalues, ci[0], ci[1], self.fmi):
            lines.append(f"{term:<20}{est:>10.4f}{se:>10.4f}{tv:>9.3f}{df:>11.1f}{p:>9.4f}{lo:>10.4f}{hi:>10.4f}"
                         f"{fmi:>8.3f}")
        return "\n".join(lines)


def fit_glmm_mi(frames: Sequence, outcome: str, fixed: Sequence[str], group: str, nagq: int = DEFAULT_NAGQ, *,
                alpha: float = 0.05, check: bool = True, **kw) -> MIResult:
    """Fit ``outcome ~ fixed + (1 | group)`` on each completed data set and pool the fixed effects (Rubin).

    ``dfcom`` (the complete-data df of the Barnard-Rubin correction) is observations minus parameters (fixed
    effects and the site SD), lme4's ``df.residual``, which ``mice::pool`` takes from ``glance``.
    """
    if len(frames) < 2:
        raise ValueError("need at least two completed data sets")
    t0 = time.perf_counter()
    fits = tuple(fit_glmm(f, outcome, fixed, group, nagq=nagq, alpha=alpha, check=check, **kw) for f in frames)
    terms = list(fits[0].terms)
    if any(list(f.terms) != terms for f in fits) or len({f.nobs for f in fits}) != 1:
        raise ValueError("the completed data sets give different designs (terms or rows)")
    est = np.vstack([f.coefficients.get_column("estimate").to_numpy() for f in fits])
    se = np.vstack([f.coefficients.get_column("se").to_numpy() for f in fits])
    dfcom = float(fits[0].nobs - len(terms) - 1)
    pooled = pool_rubin(est, se, terms, dfcom)
    return MIResult(outcome=outcome, group=group, nagq=nagq, m=len(fits), nobs=fits[0].nobs,
                    events=tuple(f.events for f in fits), dfcom=dfcom, pooled=pooled, alpha=alpha,
                    site_sd=float(np.mean([f.site_sd for f in fits])), elapsed_s=time.perf_counter() - t0,
                    fits=fits)


# ------------------------------------------------------------------------------------------------------------
# missingness


def missingness_table(frame, variables: Sequence[str], group: str = "site") -> pl.DataFrame:
    """Per variable and ``group`` level: participants_n, missing_n, missing_pct; then an ``all sites`` row.

    Raw counts (internal): a published copy must go through small-cell suppression
    (:func:`cbp_platform.analysis.cohort.imputation_missingness` with ``publishable=True``). A float NaN counts as
    missing, as a null does.
    """
    f = _to_polars(frame)
    g = f.get_column(group).cast(pl.String)
    levels = sorted(set(g.drop_nulls().to_list()))
    rows = []
    for v in variables:
        s = f.get_column(v)
        miss = (s.is_null() | s.is_nan().fill_null(False)) if s.dtype.is_float() else s.is_null()
        per = pl.DataFrame({"g": g, "m": miss})
        for lv in [*levels, None]:
            part = per if lv is None else per.filter(pl.col("g") == lv)
            n, k = part.height, int(part.get_column("m").sum())
            rows.append(dict(variable=v, site=ALL_SITES if lv is None else lv, participants_n=n, missing_n=k,
                             missing_pct=100.0 * k / n if n else math.nan))
    return pl.DataFrame(rows, schema={"variable": pl.String, "site": pl.String, "participants_n": pl.Int64,
                                      "missing_n": pl.Int64, "missing_pct": pl.Float64})


# ------------------------------------------------------------------------------------------------------------
# the simulated MI design and the R reference


def simulated_mi_design(n: int, seed: int, outcome: str = "cbp_true") -> pl.DataFrame:
    """The MI population of ``simulate_cohort(n, seed)``: every participant whose only exclusion causes are a missing
    activity or comorbidity answer (CBP answered, no fat-water swap), the paper's model columns
    (:func:`cbp_platform.stats.design.simulated_design`'s) with nulls where the answer is missing. Exposures per
    2 SD of this population.
    """
    from cbp_platform.synth.cohort import simulate_cohort

    df = simulate_cohort(n, seed)
    a = df.filter(~pl.col("missing_cbp") & (pl.col("fat_water_swap") == "none"))
    lz, _, _ = standardise_2sd(a.get_column("lmm_true").to_numpy())
    iz, _, _ = standardise_2sd(a.get_column("imat_true").to_numpy())
    miss_pa = a.get_column("missing_met").to_list()
    mc = a.get_column("missing_comorbidity").fill_null("")

    def b(c: str, missing: pl.Series) -> pl.Series:
        vals = a.get_column(c).cast(pl.Float64)
        return pl.Series(c, [None if mm else x for x, mm in zip(vals.to_list(), missing.to_list())], pl.Float64)

    pa = a.get_column("pa_category").to_list()

    return pl.DataFrame({
        "site": a.get_column("site"),
        "cbp": a.get_column(outcome).cast(pl.Int8),
        LMM.z_column: lz,
        IMAT.z_column: iz,
        "age_10y": (a.get_column("age").cast(pl.Float64) - AGE_CENTRE) / 10.0,
        "female": (a.get_column("sex") == "F").cast(pl.Float64),
        **{c: b(c, mc == c) for c in ("diabetes", "dyslipidemia", "osteoporosis", "osteoarthritis")},
        **{f"pa_{lv}": pl.Series(f"pa_{lv}", [None if mm else float(p == lv) for p, mm in zip(pa, miss_pa)],
                                 pl.Float64) for lv in ("moderate", "high")},
    })


def write_reference(n: int, seed: int, out: Path, m: int = DEFAULT_M, imp_seed: int = DEFAULT_SEED) -> dict:
    """Impute :func:`simulated_mi_design` and write ``<out>.csv`` (long, ``.imp``), ``<out>.imputations.parquet``
    (the same values, lossless) and ``<out>.meta.json`` for ``tools/mice_reference.R``."""
    design = simulated_mi_design(n, seed)
    t0 = time.perf_counter()
    frames = impute(design, "cbp", PAPER_COVARIATES, "site", m=m, seed=imp_seed)
    elapsed = time.perf_counter() - t0
    long = stack_imputations(frames)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv = out.with_suffix(".csv")
    long.write_csv(csv, float_precision=17)
    values = out.with_suffix(".imputations.parquet")
    long.write_parquet(values, compression="zstd", compression_level=19)
    miss = missingness_table(design, PAPER_COVARIATES)
    meta = {"n_simulated": n, "seed": seed, "imputation_seed": imp_seed, "m": m, "n_iter": DEFAULT_ITERATIONS,
            "k_pmm": DEFAULT_K_PMM, "outcome": "cbp", "group": "site", "fixed": list(PAPER_COVARIATES),
            "n_obs": design.height, "events": int(design.get_column("cbp").sum()),
            "missing": {r["variable"]: r["missing_n"] for r in miss.filter(pl.col("site") == ALL_SITES).to_dicts()},
            "complete_cases": int(design.drop_nulls().height), "imputation_seconds": elapsed,
            "csv": csv.name, "values": values.name}
    out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Multiple imputation utilities (the reference for tools/mice_reference.R)")
    ap.add_argument("--write-reference", action="store_true", help="impute a simulated design and write it")
    ap.add_argument("--n", type=int, default=2240, help="participants scanned (simulate_cohort n)")
    ap.add_argument("--seed", type=int, default=3, help="simulate_cohort seed")
    ap.add_argument("--m", type=int, default=DEFAULT_M)
    ap.add_argument("--imputation-seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--out", type=Path, required=True, help="path stem: <out>.csv, .imputations.parquet, .meta.json")
    a = ap.parse_args(argv)
    if not a.write_reference:
        ap.error("nothing to do: pass --write-reference")
    print(json.dumps(write_reference(a.n, a.seed, a.out, a.m, a.imputation_seed), indent=2))
    return 0


__all__ = ["DEFAULT_M", "INTERCEPT", "MIResult", "barnard_rubin_df", "fit_glmm_mi", "impute", "missingness_table",
           "pool_rubin", "simulated_mi_design", "stack_imputations", "unstack_imputations", "write_reference"]


if __name__ == "__main__":
    sys.exit(main())
