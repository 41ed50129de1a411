"""The study's vocabulary: its exposures and its analyses, defined once.

Like :mod:`cbp_platform.classes` for the muscle classes, this module is the one place that spells the study's
exposures (``lmm``, ``imat`` ...) and the analyses that use them. Everything else -- the analysis cohort, the
models, the descriptive tables, the report, the model comparison, the accuracy against truth, the checks --
iterates over :data:`EXPOSURES` / :data:`ANALYSES` or asks :func:`exposure` / :func:`analysis`; a test
(``tests/analysis/test_study.py``) refuses a string constant equal to an exposure name or one of its derived
columns anywhere else in ``cbp_platform`` (the simulator aside), ``assets``, ``checks`` and ``resources``.

Two vocabularies, kept apart:

* **metric columns** (``lean_ml``, ``imat_pct``, ``mfi`` ...) are what the segmentation measures per muscle
  (``muscle_metrics``, :data:`cbp_platform.metrics.body_composition.METRIC_SCHEMA`); they are table columns and
  may be named wherever that table is read;
* **exposures** (``lmm``, ``imat`` ...) are what the analysis relates to back pain: each is computed from one
  metric of the ``back_total`` row (:meth:`Exposure.expr`), and standardised per k SD into a derived column
  (:attr:`Exposure.z_column`, e.g. ``lmm_z2``). Code names them only through this module.

An exposure's ``role`` is ``primary`` (the paper's: in its models, Table 1, the stratified comparisons and the
paper-vs-run table) or ``secondary`` (not in the paper: its own models and its own report section, never
compared with the paper's numbers). Every primary analysis gets one secondary analysis per secondary exposure:
the paper's model with that exposure added (:func:`secondary_analyses`), so the primary models stay exactly the
paper's. Adding an exposure is one entry in :data:`EXPOSURES` when its metric exists (see docs/analysis.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import polars as pl

Role = Literal["primary", "secondary"]
PRIMARY: Role = "primary"
SECONDARY: Role = "secondary"


# ------------------------------------------------------------------------------------------------------------
# body size: how the lean volume is normalised into the LMM index


@dataclass(frozen=True)
class Normaliser:
    """How a volume (cm3) is normalised to body size (the LMM index; ``analysis_cohort``'s ``lmm_normaliser``)."""

    name: str
    unit: str
    description: str
    denominator: Callable[[], pl.Expr]


NORMALISERS: dict[str, Normaliser] = {n.name: n for n in (
    Normaliser("weight_per_height", "cm3/(kg/m)", "lean volume / (weight kg / height m), the paper's unit",
               lambda: pl.col("weight_kg") / (pl.col("height_cm") / 100.0)),
    Normaliser("per_height2", "cm3/m2", "lean volume / height m squared (like a muscle-volume index)",
               lambda: (pl.col("height_cm") / 100.0) ** 2),
    Normaliser("per_weight", "cm3/kg", "lean volume / weight kg",
               lambda: pl.col("weight_kg")),
    Normaliser("none", "cm3", "lean volume, not normalised",
               lambda: pl.lit(1.0)),
)}
DEFAULT_NORMALISER = "weight_per_height"


# ------------------------------------------------------------------------------------------------------------
# exposures

# The paper's stratified comparisons (docs/study.md): within participants with the condition, CBP vs no CBP.
STRATA = ("osteoarthritis", "osteoporosis")


@dataclass(frozen=True)
class PaperStratum:
    """The paper's value of an exposure in one stratum: CBP, no CBP, p as printed (median or mean: not said)."""

    cbp: float
    no_cbp: float
    p: str


@dataclass(frozen=True)
class PaperOR:
    """The paper's odds ratio of an exposure per 2 SD: OR, 95 % CI, p as printed."""

    odds_ratio: float
    low: float
    high: float
    p: str

    def as_tuple(self) -> tuple[float, float, float, str]:
        return (self.odds_ratio, self.low, self.high, self.p)


@dataclass(frozen=True)
class Exposure:
    """One exposure: what it is, how it is computed and scaled, how it is shown.

    ``name``: the analysis cohort's column of the exposure on its own scale (e.g. ``lmm``);
    ``label``: short display name (``LMM``); ``measure``: its name as a measured quantity (``LMM index``);
    ``metric``: the ``muscle_metrics`` column (``back_total`` row) it is computed from; the value is
    ``scale * metric``, divided by the cohort's body-size normaliser when ``per_body_size`` (then the unit is the
    normaliser's, else ``unit``); ``sd_multiple``: k of the per-k-SD standardisation into :attr:`z_column`;
    ``decimals``: for display; ``bounds``: the plausible range (the analysis cohort's expectations; ``strict_min``:
    the lower bound itself is implausible); ``paper_stratified``: the paper's values per stratum (primary ones).
    """

    name: str
    label: str
    measure: str
    description: str
    role: Role
    metric: str
    scale: float = 1.0
    per_body_size: bool = False
    unit: str | None = None
    decimals: int = 2
    sd_multiple: int = 2
    bounds: tuple[float | None, float | None] = (None, None)
    strict_min: bool = False
    paper_stratified: Mapping[str, PaperStratum] = field(default_factory=dict)

    def __post_init__(self):
        if self.role not in (PRIMARY, SECONDARY):
            raise ValueError(f"exposure {self.name}: role must be {PRIMARY!r} or {SECONDARY!r}, not {self.role!r}")
        if self.per_body_size == (self.unit is not None):
            raise ValueError(f"exposure {self.name}: a unit comes from the normaliser exactly when per_body_size")

    @property
    def z_column(self) -> str:
        """The standardised column: ``(value - mean) / (k SD)``, e.g. ``lmm_z2``."""
        return f"{self.name}_z{self.sd_multiple}"

    @property
    def columns(self) -> tuple[str, str]:
        """Every column the analysis cohort derives for this exposure."""
        return (self.name, self.z_column)

    @property
    def scaling(self) -> str:
        return f"per {self.sd_multiple} SD"

    @property
    def term_label(self) -> str:
        """How a model term on :attr:`z_column` is shown: ``LMM, per 2 SD``."""
        return f"{self.label}, {self.scaling}"

    def unit_for(self, normaliser_unit: str) -> str:
        """The exposure's unit when the cohort's body-size normaliser has unit ``normaliser_unit``."""
        return normaliser_unit if self.per_body_size else (self.unit or "")

    def expr(self, normaliser: Normaliser) -> pl.Expr:
        """The exposure as a Polars expression over a frame with the ``metric`` column (and ``weight_kg`` /
        ``height_cm`` when per body size), on the analysis cohort's scale."""
        value = pl.col(self.metric) if self.scale == 1.0 else pl.col(self.metric) * self.scale
        return value / normaliser.denominator() if self.per_body_size else value


LMM = Exposure(
    name="lmm", label="LMM", measure="LMM index", role=PRIMARY, metric="lean_ml", per_body_size=True, decimals=1,
    description="lean muscle mass: lean (non-fatty) back-muscle volume normalised to body size",
    bounds=(0.0, None), strict_min=True,
    paper_stratified={"osteoarthritis": PaperStratum(22.9, 24.3, "p < 0.0001"),
                      "osteoporosis": PaperStratum(20.9, 21.3, "p = 0.16")})
IMAT = Exposure(
    name="imat", label="InterMAT", measure="InterMAT", role=PRIMARY, metric="imat_pct", unit="%", decimals=2,
    description="intermuscular adipose tissue: the fatty share of the back-muscle compartment",
    bounds=(0.0, 100.0),
    paper_stratified={"osteoarthritis": PaperStratum(7.53, 6.96, "p < 0.0001"),
                      "osteoporosis": PaperStratum(8.43, 7.9, "p = 0.0019")})

# Secondary: not in the paper. The mean signal fat fraction of the lean back-muscle voxels (UK Biobank's AMRA "muscle
# fat infiltration"), in %: how fatty the muscle itself is, where InterMAT counts the voxels that are mostly fat.
FAT_FRACTION = Exposure(
    name="ff", label="Fat fraction", measure="Muscle fat fraction", role=SECONDARY, metric="mfi", scale=100.0,
    unit="%", decimals=2, bounds=(0.0, 100.0),
    description="muscle fat fraction, the mean signal fat fraction F/(W+F) of the lean back-muscle voxels (the "
                "muscle fat infiltration of UK Biobank's AMRA), in %")

EXPOSURES: tuple[Exposure, ...] = (LMM, IMAT, FAT_FRACTION)


# ------------------------------------------------------------------------------------------------------------
# analyses

# The adjustment set of the paper's model (docs/study.md), as the analysis cohort names the columns.
ADJUSTMENT = ("age_10y", "female", "diabetes", "dyslipidemia", "osteoporosis", "osteoarthritis", "pa_moderate",
              "pa_high")
SITE = "site"                      # the random intercept


@dataclass(frozen=True)
class Analysis:
    """One mixed logistic regression: ``outcome ~ exposures (per k SD) + covariates + (1 | site)``.

    ``name``: the model asset's name for a primary analysis, and the ``analysis`` key of ``model_results`` /
    ``model_fits``; ``key``: the short name of the report's tables and files; ``population``: who is fitted
    (participants with the outcome answered and every exposure of the model measured, see :meth:`data`);
    ``extends``: for a secondary analysis, the primary analysis it adds an exposure to (it is fitted by the same
    asset); ``paper_or``: the paper's OR per exposure name (primary analyses).
    """

    name: str
    key: str
    label: str
    outcome: str
    population: str
    exposures: tuple[str, ...]
    covariates: tuple[str, ...] = ADJUSTMENT
    role: Role = PRIMARY
    extends: str | None = None
    paper_or: Mapping[str, PaperOR] = field(default_factory=dict)

    @property
    def exposure_defs(self) -> tuple[Exposure, ...]:
        return tuple(exposure(e) for e in self.exposures)

    @property
    def exposure_terms(self) -> tuple[str, ...]:
        """The model terms of the exposures (their standardised columns)."""
        return tuple(e.z_column for e in self.exposure_defs)

    @property
    def fixed(self) -> tuple[str, ...]:
        """The fixed effects, in model order: exposures then the adjustment covariates."""
        return (*self.exposure_terms, *self.covariates)

    @property
    def model_asset(self) -> str:
        """The asset that fits this analysis (a secondary analysis is fitted beside the primary it extends)."""
        return self.extends or self.name

    def data(self, frame: pl.DataFrame) -> pl.DataFrame:
        """The rows this analysis fits: outcome answered and every exposure of the model measured. For the
        paper's analyses on the analysis cohort this only drops unanswered outcomes (NRS); a secondary exposure's
        missing measurements are dropped here, explicitly, and the fit reports its own n."""
        keep = pl.col(self.outcome).is_not_null()
        for t in self.exposure_terms:
            keep = keep & pl.col(t).is_not_null()
        return frame.filter(keep)


PRIMARY_ANALYSES: tuple[Analysis, ...] = (
    Analysis(name="cbp_association_model", key="cbp", label="CBP", outcome="cbp",
             population="all analysed participants", exposures=(LMM.name, IMAT.name),
             paper_or={LMM.name: PaperOR(0.87, 0.79, 0.95, "p = 0.003"),
                       IMAT.name: PaperOR(1.22, 1.13, 1.30, "p < 0.0001")}),
    Analysis(name="pain_intensity_model", key="nrs_high", label="Pain intensity NRS >= 4", outcome="nrs_high",
             population="analysed participants with an NRS answer", exposures=(LMM.name, IMAT.name),
             paper_or={LMM.name: PaperOR(0.63, 0.57, 0.70, "p < 0.0001"),
                       IMAT.name: PaperOR(1.22, 1.13, 1.30, "p < 0.0001")}),
)


def secondary_analyses(primaries: tuple[Analysis, ...], exposures: tuple[Exposure, ...]) -> tuple[Analysis, ...]:
    """Per primary analysis and secondary exposure: the primary model with that exposure added (the paper's
    exposures and adjustment unchanged, so the primary model's terms keep their meaning and the secondary
    exposure's OR is adjusted for them)."""
    return tuple(
        Analysis(name=f"{a.name}_{e.name}", key=f"{a.key}_{e.name}", label=f"{a.label}, adding {e.label.lower()}",
                 outcome=a.outcome, population=f"{a.population} with {e.label.lower()} measured",
                 exposures=(*a.exposures, e.name), covariates=a.covariates, role=SECONDARY, extends=a.name)
        for a in primaries for e in exposures if e.role == SECONDARY)


# ------------------------------------------------------------------------------------------------------------
# lookups

PRIMARY_EXPOSURES: tuple[Exposure, ...] = tuple(e for e in EXPOSURES if e.role == PRIMARY)
SECONDARY_EXPOSURES: tuple[Exposure, ...] = tuple(e for e in EXPOSURES if e.role == SECONDARY)
SECONDARY_ANALYSES: tuple[Analysis, ...] = secondary_analyses(PRIMARY_ANALYSES, EXPOSURES)
ANALYSES: tuple[Analysis, ...] = (*PRIMARY_ANALYSES, *SECONDARY_ANALYSES)

_BY_NAME = {e.name: e for e in EXPOSURES}
_BY_COLUMN = {c: e for e in EXPOSURES for c in e.columns}
_ANALYSIS = {**{a.key: a for a in ANALYSES}, **{a.name: a for a in ANALYSES}}
assert len(_BY_NAME) == len(EXPOSURES) and len(_BY_COLUMN) == 2 * len(EXPOSURES), "exposure names must be unique"
assert len({a.name for a in ANALYSES} | {a.key for a in ANALYSES}) == 2 * len(ANALYSES), "analysis names collide"


def exposure(name: str) -> Exposure:
    """The exposure called ``name`` (e.g. ``LMM.name``); KeyError naming the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown exposure {name!r}; known: {', '.join(_BY_NAME)}") from None


def exposure_of(column: str) -> Exposure | None:
    """The exposure a cohort column or model term belongs to (its value or its standardised column), else None.
    Exact match only: ``lmm_z2`` is LMM's term, ``lmm_z2_old`` nobody's."""
    return _BY_COLUMN.get(column)


def analysis(name: str) -> Analysis:
    """The analysis with this name or key (``cbp_association_model`` or ``cbp``); KeyError naming the known ones."""
    try:
        return _ANALYSIS[name]
    except KeyError:
        raise KeyError(f"unknown analysis {name!r}; known: {', '.join(a.name for a in ANALYSES)}") from None


def find_analysis(name: str) -> Analysis | None:
    """:func:`analysis`, or None for a name the registry does not know."""
    return _ANALYSIS.get(name)


def analyses_fitted_by(model_asset: str) -> tuple[Analysis, ...]:
    """The analyses one model asset fits: its primary analysis first, then the secondary ones extending it."""
    return tuple(a for a in ANALYSES if a.model_asset == model_asset)


def exposure_columns(exposures: tuple[Exposure, ...] = EXPOSURES) -> tuple[str, ...]:
    """Every derived column of ``exposures`` (values, then standardised columns)."""
    return (*(e.name for e in exposures), *(e.z_column for e in exposures))


def metric_columns(exposures: tuple[Exposure, ...] = EXPOSURES) -> tuple[str, ...]:
    """The ``muscle_metrics`` columns the exposures are computed from (each once, in registry order)."""
    return tuple(dict.fromkeys(e.metric for e in exposures))
