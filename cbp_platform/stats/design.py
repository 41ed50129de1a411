"""Design matrices for the association models, the per-2-SD scale and the simulated reference design.

:func:`build_design` turns a Polars or pandas frame into the arrays every model of this package fits: a 0/1
outcome, an intercept plus the fixed-effect columns, and integer group codes. Boolean columns become 0/1,
numeric columns are used as they are, and string / categorical / enum columns become treatment dummies
against their first level (the first level of a Polars enum or pandas categorical, else the first in sorted
order), named ``column[level]``. Missing values are never dropped silently: :func:`build_design` reports them and the model
checks turn them into the named failure ``no_missing_values``.

:func:`simulated_design` builds the paper's adjusted model from a simulated truth table
(:func:`cbp_platform.synth.cohort.simulate_cohort`): it is the data of the lme4 reference fixtures
(``tests/fixtures/lme4``) and of the benchmarks. Its columns follow the analysis cohort
(:mod:`cbp_platform.analysis.cohort`): ``lmm_z2`` / ``imat_z2`` (exposures per 2 SD), ``female``, the four
comorbidities, and the physical-activity contrasts. ``python -m cbp_platform.stats.reference`` writes it as the
CSV that ``tools/lme4_reference.R`` reads.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import stats

from cbp_platform.study import IMAT, LMM, PRIMARY_ANALYSES

INTERCEPT = "(Intercept)"

# Fixed effects of the paper's adjusted model (cbp_platform.study), in the order of the reference fixtures:
# lmm_z2, imat_z2, age_10y, female, diabetes, dyslipidemia, osteoporosis, osteoarthritis, pa_moderate, pa_high.
PAPER_COVARIATES = PRIMARY_ANALYSES[0].fixed
AGE_CENTRE = 50.0   # age_10y = (age - 50) / 10: per 10 years, intercept at age 50 (as the cohort model)


@dataclass(frozen=True)
class Design:
    """The arrays of one model: outcome, fixed-effect design (intercept first) and group codes.

    ``y``: float 0/1 (NaN where the outcome is missing); ``X``: n x p float, column 0 the intercept;
    ``groups``: int codes into ``group_levels`` (-1 where the group is missing); ``columns``: the frame
    columns each design column came from (the intercept maps to itself); ``missing``: rows with a missing
    outcome, covariate or group, per source column.
    """

    y: np.ndarray
    X: np.ndarray
    groups: np.ndarray
    names: tuple[str, ...]
    columns: tuple[str, ...]
    group_levels: tuple[str, ...]
    outcome: str
    group: str
    missing: dict[str, int]

    @property
    def nobs(self) -> int:
        return int(self.y.shape[0])

    @property
    def complete(self) -> bool:
        return not any(self.missing.values())


def _to_polars(df) -> pl.DataFrame:
    if isinstance(df, pl.DataFrame):
        return df
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a statsmodels dependency
        pd = None
    if pd is not None and isinstance(df, pd.DataFrame):
        out = pl.from_pandas(df)
        # keep pandas' category order (the first category is the reference level)
        cats = {c: [str(v) for v in df[c].cat.categories] for c in df.columns
                if isinstance(df[c].dtype, pd.CategoricalDtype)}
        if cats:
            out = out.with_columns(pl.col(c).cast(pl.String).cast(pl.Enum(v)) for c, v in cats.items())
        return out
    raise TypeError(f"expected a polars or pandas DataFrame, got {type(df).__name__}")


def _levels(s: pl.Series) -> list[str]:
    if s.dtype == pl.Enum:
        present = set(s.drop_nulls().cast(pl.String).to_list())
        return [lv for lv in s.dtype.categories.to_list() if lv in present]
    return sorted(set(s.drop_nulls().cast(pl.String).to_list()))


def _numeric(s: pl.Series) -> np.ndarray:
    return s.cast(pl.Float64).fill_null(float("nan")).to_numpy().astype(np.float64, copy=True)


def build_design(df, outcome: str, fixed: Sequence[str], group: str) -> Design:
    """The outcome, intercept + ``fixed`` design and group codes of a Polars or pandas frame."""
    frame = _to_polars(df)
    absent = [c for c in (outcome, *fixed, group) if c not in frame.columns]
    if absent:
        raise KeyError(f"columns not in the frame: {absent}")
    if len(set(fixed)) != len(fixed) or outcome in fixed or group in fixed:
        raise ValueError("fixed effects must be distinct and differ from the outcome and the group")
    n = frame.height
    missing: dict[str, int] = {}

    ys = frame.get_column(outcome)
    if ys.dtype in (pl.String, pl.Categorical, pl.Enum):
        raise TypeError(f"outcome {outcome!r} must be boolean or numeric 0/1, not {ys.dtype}")
    y = _numeric(ys)
    missing[outcome] = int(np.isnan(y).sum())

    cols: list[np.ndarray] = [np.ones(n)]
    names: list[str] = [INTERCEPT]
    sources: list[str] = [INTERCEPT]
    for c in fixed:
        s = frame.get_column(c)
        missing[c] = int(s.null_count()) + (int(s.is_nan().sum()) if s.dtype.is_float() else 0)
        if s.dtype in (pl.String, pl.Categorical, pl.Enum):
            levels = _levels(s)
            text = s.cast(pl.String)
            for lv in levels[1:]:
                d = (text == lv).cast(pl.Float64).fill_null(float("nan")).to_numpy()
                cols.append(d)
                names.append(f"{c}[{lv}]")
                sources.append(c)
            if len(levels) <= 1:   # a constant categorical: keep one (constant) column so the check sees it
                cols.append(text.is_not_null().cast(pl.Float64).to_numpy())
                names.append(f"{c}[{levels[0] if levels else ''}]")
                sources.append(c)
        else:
            cols.append(_numeric(s))
            names.append(c)
            sources.append(c)

    gs = frame.get_column(group)
    missing[group] = int(gs.null_count())
    gtext = gs.cast(pl.String)
    levels = _levels(gs)
    lookup = {lv: i for i, lv in enumerate(levels)}
    codes = np.array([lookup[v] if v is not None else -1 for v in gtext.to_list()], dtype=np.int64)
    X = np.ascontiguousarray(np.column_stack(cols)) if cols else np.empty((n, 0))
    return Design(y=y, X=X, groups=codes, names=tuple(names), columns=tuple(sources),
                  group_levels=tuple(levels), outcome=outcome, group=group, missing=missing)


# ------------------------------------------------------------------------------------------------------------
# the per-2-SD scale


def standardise_2sd(x) -> tuple[np.ndarray, float, float]:
    """(x - mean) / (2 SD) with the sample SD (ddof 1): a coefficient on it is the log-OR per 2 SD.

    Returns the standardised values, the mean and the SD. Gelman (2008): dividing by two SDs puts a
    continuous exposure on the scale of a binary one.
    """
    v = np.asarray(x, dtype=np.float64)
    mean = math.fsum(v.tolist()) / v.size
    sd = math.sqrt(math.fsum(((v - mean) ** 2).tolist()) / (v.size - 1))
    return (v - mean) / (2.0 * sd), mean, sd


def per_sd_odds_ratio(estimate: float, se: float, sd: float, k: float = 2.0,
                      alpha: float = 0.05) -> tuple[float, float, float]:
    """OR and Wald CI for a ``k``-SD difference from a coefficient per *unit* of an exposure with SD ``sd``.

    For a coefficient fitted on ``standardise_2sd`` values use ``sd=0.5`` (one unit there is 2 SD), or
    simply exponentiate it.
    """
    z = stats.norm.ppf(1 - alpha / 2)
    scale = k * sd
    return (math.exp(estimate * scale), math.exp((estimate - z * se) * scale),
            math.exp((estimate + z * se) * scale))


# ------------------------------------------------------------------------------------------------------------
# the simulated reference design


@dataclass(frozen=True)
class SimulatedDesign:
    """The paper's adjusted model on a simulated cohort: analysable rows, outcome ``cbp``, group ``site``.

    ``frame`` columns: ``site``, ``cbp`` (0/1) and :data:`PAPER_COVARIATES` (floats).
    ``scale``: mean and SD (ddof 1) of the raw exposures behind ``lmm_z2`` / ``imat_z2``.
    """

    n: int
    seed: int
    outcome: str
    frame: pl.DataFrame
    scale: dict[str, tuple[float, float]]

    def sha256(self) -> str:
        return design_sha256(self.frame)

    def true_coefficients(self, params=None) -> dict[str, float]:
        """The generating coefficients of the cohort model on this design's scale (CBP outcome).

        The exposures' generating log-ORs are per 2 SD of the *reference* SDs of the cohort model; on this
        design they are rescaled to 2 SD of the sample. ``female`` and age are the cohort model's
        coefficients; the intercept absorbs the centring of the exposures (the site effects are centred).
        """
        from cbp_platform.synth.cohort import CohortParameters, beta_2sd

        p = params or CohortParameters()
        if self.outcome != "cbp_true":
            raise ValueError("true coefficients are tabulated for the CBP outcome only")
        b_l, b_i = beta_2sd(p.or_lmm_2sd), beta_2sd(p.or_imat_2sd)          # per reference SD
        (ml, sl), (mi, si) = self.scale[LMM.name], self.scale[IMAT.name]
        return {
            INTERCEPT: p.cbp_intercept + b_l * (ml - p.lmm_ref[0]) / p.lmm_ref[1]
            + b_i * (mi - p.imat_ref[0]) / p.imat_ref[1],
            LMM.z_column: b_l * 2.0 * sl / p.lmm_ref[1],
            IMAT.z_column: b_i * 2.0 * si / p.imat_ref[1],
            "age_10y": p.cbp_age10,
            "female": p.cbp_female,
            "diabetes": math.log(p.or_diabetes),
            "dyslipidemia": math.log(p.or_dyslipidemia),
            "osteoporosis": math.log(p.or_osteoporosis),
            "osteoarthritis": math.log(p.or_osteoarthritis),
            "pa_moderate": p.cbp_pa_moderate,
            "pa_high": p.cbp_pa_high,
        }


def simulated_design(n: int, seed: int, outcome: str = "cbp_true") -> SimulatedDesign:
    """The adjusted-model design of ``simulate_cohort(n, seed)`` restricted to the analysable participants."""
    from cbp_platform.synth.cohort import exclusion_cause, simulate_cohort

    df = simulate_cohort(n, seed)
    a = df.filter(exclusion_cause(df).is_null())
    lz, lm, ls = standardise_2sd(a.get_column("lmm_true").to_numpy())
    iz, im, is_ = standardise_2sd(a.get_column("imat_true").to_numpy())
    b = lambda c: a.get_column(c).cast(pl.Float64).to_numpy()
    frame = pl.DataFrame({
        "site": a.get_column("site"),
        "cbp": a.get_column(outcome).cast(pl.Int8),
        LMM.z_column: lz,
        IMAT.z_column: iz,
        "age_10y": (b("age") - AGE_CENTRE) / 10.0,
        "female": (a.get_column("sex") == "F").cast(pl.Float64),
        "diabetes": b("diabetes"),
        "dyslipidemia": b("dyslipidemia"),
        "osteoporosis": b("osteoporosis"),
        "osteoarthritis": b("osteoarthritis"),
        "pa_moderate": (a.get_column("pa_category") == "moderate").cast(pl.Float64),
        "pa_high": (a.get_column("pa_category") == "high").cast(pl.Float64),
    })
    return SimulatedDesign(n=n, seed=seed, outcome=outcome, frame=frame,
                           scale={LMM.name: (lm, ls), IMAT.name: (im, is_)})


def clustered_design(seed: int = 20250101) -> pl.DataFrame:
    """A design with many small clusters for the lme4 fixture ``clustered``: 150 sites of 2-12 participants,
    site SD 1.2, ``cbp ~ x1 + x2`` (x1 standard normal rounded to 6 decimals, x2 binary). There the Laplace
    approximation and AGQ differ clearly, unlike with five large sites. The fixture's CSV is committed; this
    records how it was made.
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 13, 150)
    site = np.repeat([f"g{j:03d}" for j in range(sizes.size)], sizes)
    u = rng.normal(0.0, 1.2, sizes.size)
    x1 = rng.normal(size=site.size)
    x2 = (rng.random(site.size) < 0.4).astype(np.float64)
    eta = -0.6 + 0.8 * x1 - 0.5 * x2 + np.repeat(u, sizes)
    y = (rng.random(site.size) < 1.0 / (1.0 + np.exp(-eta))).astype(np.int8)
    return pl.DataFrame({"site": site, "cbp": y, "x1": np.round(x1, 6), "x2": x2})


# The NAKO's 18 study centres (ASCII spellings): the speed benchmark's many-site design.
NAKO_CENTRES = ("Augsburg", "Berlin-Mitte", "Berlin-Nord", "Berlin-Sued", "Bremen", "Duesseldorf", "Essen",
                "Freiburg", "Halle", "Hamburg", "Hannover", "Kiel", "Leipzig", "Mannheim", "Muenster",
                "Neubrandenburg", "Regensburg", "Saarbruecken")


def multisite_design(rows: int = 27518, seed: int = 18, sites: Sequence[str] = NAKO_CENTRES,
                     site_sd: float = 0.2) -> pl.DataFrame:
    """The paper's adjusted model with the NAKO's 18 study centres instead of the 5 MRI sites (speed benchmark).

    Covariates: the first ``rows`` rows of :func:`simulated_design` (a cohort simulated just large enough, seed
    ``seed``), so the same columns, scales and correlations. Each row is assigned to a centre with seeded
    unequal shares (Dirichlet(4)); the centres get intercepts N(0, ``site_sd``^2) and the outcome ``cbp`` is
    drawn from the cohort model's generating coefficients (:meth:`SimulatedDesign.true_coefficients`) plus the
    centre intercept. Columns as ``simulated_design(...).frame``.
    """
    n = math.ceil(rows / 0.85) + 64          # ~89 % of a simulated cohort is analysable
    while True:
        d = simulated_design(n, seed)
        if d.frame.height >= rows:
            break
        n = math.ceil(n * 1.1)
    frame = d.frame.head(rows)
    truth = d.true_coefficients()
    rng = np.random.default_rng([seed, len(sites), rows])
    shares = rng.dirichlet(np.full(len(sites), 4.0))
    centre = rng.choice(len(sites), size=rows, p=shares)
    u = rng.normal(0.0, site_sd, len(sites))
    eta = np.full(rows, truth[INTERCEPT]) + u[centre]
    for term, beta in truth.items():
        if term != INTERCEPT:
            eta += beta * frame.get_column(term).to_numpy()
    y = (rng.random(rows) < 1.0 / (1.0 + np.exp(-eta))).astype(np.int8)
    return frame.with_columns(pl.Series("site", np.asarray(sites)[centre]), pl.Series("cbp", y, dtype=pl.Int8))


# Columns of :func:`simulated_design` whose values pass through a transcendental function (``np.exp`` draws BMI
# and InterMAT in the cohort model): numpy's float64 ``exp`` has its own AVX-512 kernel (dispatch target X86_V4)
# beside the AVX2 / scalar libm one, and the two differ in the last bit of some results. These columns hold across
# machines only within :data:`DESIGN_ATOL`. Every other column is an integer, a 0/1 flag, a site label or a
# correctly rounded IEEE-754 operation on integers (``age_10y``), which are bitwise on any machine.
INEXACT_DESIGN_COLUMNS = (LMM.z_column, IMAT.z_column)
# A one-ulp difference in exp (2.2e-16 relative) reaches a per-2-SD exposure (|z| < 6, raw values < 60 over 2 SD
# > 4) as < 1e-14 absolute, through the mean and SD too (math.fsum); 1e-12 leaves a 100-fold margin and is eight
# orders below the lme4 comparisons' tolerances, so no estimate can feel it.
DESIGN_ATOL = 1e-12


def design_differences(frame: pl.DataFrame, reference: pl.DataFrame, inexact: Sequence[str] = INEXACT_DESIGN_COLUMNS,
                       atol: float = DESIGN_ATOL) -> list[str]:
    """What differs between a regenerated design and its reference values (empty: the same design).

    Columns, row count and every column not in ``inexact`` must be equal exactly; ``inexact`` columns within
    ``atol`` (absolute), the tolerance the cross-machine numerics justify (see :data:`DESIGN_ATOL`).
    """
    if frame.columns != reference.columns:
        return [f"columns {frame.columns} differ from the reference's {reference.columns}"]
    if frame.height != reference.height:
        return [f"{frame.height} rows, the reference has {reference.height}"]
    out = []
    for name in frame.columns:
        a, b = frame.get_column(name), reference.get_column(name)
        if name in inexact:
            x, y = a.cast(pl.Float64).to_numpy(), b.cast(pl.Float64).to_numpy()
            if not np.allclose(x, y, rtol=0.0, atol=atol, equal_nan=True):
                out.append(f"{name}: max |difference| {float(np.nanmax(np.abs(x - y))):.3g} > {atol:g}")
        elif a.dtype in (pl.String, pl.Categorical, pl.Enum) or b.dtype in (pl.String, pl.Categorical, pl.Enum):
            n = int((a.cast(pl.String) != b.cast(pl.String)).sum())
            if n:
                out.append(f"{name}: {n} rows differ")
        else:
            x, y = a.cast(pl.Float64).to_numpy(), b.cast(pl.Float64).to_numpy()
            n = int((~((x == y) | (np.isnan(x) & np.isnan(y)))).sum())
            if n:
                out.append(f"{name}: {n} rows differ (an exact column)")
    return out


def design_sha256(frame: pl.DataFrame, columns: Sequence[str] | None = None) -> str:
    """sha256 of a design frame's values (column names, then each column's raw little-endian bytes).

    Hashes the numbers, not a text rendering, so it does not depend on how a CSV writer formats floats. Over all
    columns it identifies a design on one machine only (see :data:`INEXACT_DESIGN_COLUMNS`); over the exact
    columns (``columns=``, e.g. :func:`exact_columns`) it holds on any machine.
    """
    h = hashlib.sha256()
    for name in (frame.columns if columns is None else columns):
        s = frame.get_column(name)
        h.update(name.encode() + b"\0")
        if s.dtype in (pl.String, pl.Categorical, pl.Enum):
            h.update("\x1f".join(s.cast(pl.String).fill_null("").to_list()).encode())
        else:
            h.update(np.ascontiguousarray(s.cast(pl.Float64).to_numpy(), dtype="<f8").tobytes())
        h.update(b"\0")
    return h.hexdigest()


def exact_columns(frame: pl.DataFrame, inexact: Sequence[str] = INEXACT_DESIGN_COLUMNS) -> list[str]:
    """The columns of a design that are bitwise on any machine (all but ``inexact``)."""
    return [c for c in frame.columns if c not in inexact]
