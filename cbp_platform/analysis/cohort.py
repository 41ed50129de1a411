"""The analysis cohort: all batches joined, the inclusion rules applied in a fixed order, derived variables.

:func:`build_analysis_cohort` takes the warehouse tables of any number of batches (concatenated, in any row or
batch order) and returns an :class:`AnalysisCohort`: one row per analysed participant, the exclusion flow
(start -> one row per rule -> analysed, like the paper's 30,868 -> 27,518) and a content hash of the analysed
frame that the published results carry as their lineage anchor.

The rules, in the order they are applied (a participant is counted once, at the first rule they fail):

======================================  ===================================================================
``scan_not_ingested``                   no validly ingested MRI scan (quarantined at ``raw_mri_scans``:
                                        corrupt/truncated file, checksum mismatch, missing channel ...)
``covariates_invalid``                  no valid covariate row (quarantined at ``participant_covariates``:
                                        malformed, out of range, missing row)
``duplicate_records``                   more than one valid scan, covariate or metrics record (ambiguous;
                                        ingestion normally prevents this)
``age_outside_19_74``                   age outside the analysed range 19-74 years
``cbp_not_answered``                    chronic back pain question not answered
``physical_activity_missing``           MET-min/week not answered
``comorbidity_missing``                 any of diabetes, dyslipidemia, osteoporosis, osteoarthritis missing
``fat_water_swap_suspected``            image QC: fat-water swap suspected (not segmented)
``qc_rejected``                         a reviewer rejected the participant's current segmentation (the decision
                                        in force, :mod:`cbp_platform.qc.reviews`; outdated reviews never count)
``no_muscle_metrics``                   no usable back-muscle metrics (segmentation or metrics failed, or a
                                        non-finite / non-positive lean volume)
======================================  ===================================================================

The questionnaire rules come in the order of the simulator's :func:`cbp_platform.synth.cohort.exclusion_cause`,
so a simulated cohort's truth predicts the flow. A pseudonym quarantined as ``duplicate_pseudonym`` in a later
delivery is the same participant as in the earlier one: it is counted once, from its valid records.

Pseudonyms stay in :attr:`AnalysisCohort.frame` and :attr:`AnalysisCohort.exclusions` (internal tables of the
secure environment); the flow table never contains them.

The analysis is complete case: the primary, documented one. The multiple-imputation sensitivity analysis
(:mod:`cbp_platform.stats.imputation`) fits :attr:`AnalysisCohort.imputation_frame`: the analysed participants
plus those whose *only* failed rules are the missing covariate answers (:data:`IMPUTABLE_RULES`:
``physical_activity_missing``, ``comorbidity_missing``), with nulls where an answer is missing. A participant
without the CBP answer is in neither the imputation nor the analysis (von Hippel's multiple imputation, then
deletion, MID, drops them from the analysis: an imputed outcome adds nothing but noise; here they are not used to
impute covariates either, and their answer is missing at random given age, sex and site). The flow table is the
complete-case one; the MI population adds the ``imputable`` participants beside it (:func:`imputation_missingness`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import polars as pl

from cbp_platform import study
from cbp_platform.classes import BACK_TOTAL
from cbp_platform.reasons import MUSCLE_SEGMENTATIONS, R
from cbp_platform.study import NORMALISERS, Normaliser  # noqa: F401  (re-exported: the LMM normalisers)

COHORT_HASH_VERSION = "cbp-analysis-cohort/1"
AGE_RANGE = (19, 74)
COMORBIDITIES = ("diabetes", "dyslipidemia", "osteoporosis", "osteoarthritis")
NRS_HIGH_THRESHOLD = 4                        # pain intensity NRS >= 4 is "high"
AGE_CENTRE = 50                               # age_10y = (age - 50) / 10, as the cohort model
MET_CATEGORIES = ("<500", "500-5000", ">5000")
MET_CATEGORY = pl.Enum(list(MET_CATEGORIES))
TOTAL_MUSCLE = BACK_TOTAL

# (code, description) in the order the rules are applied.
EXCLUSION_RULES: tuple[tuple[str, str], ...] = (
    ("consent_withdrawn", "Consent withdrawn (withdrawal register)"),
    ("delivery_retired", "Delivery retired from use (cbp delivery retire)"),
    ("scan_not_ingested", "MRI scan failed ingestion checks"),
    ("covariates_invalid", "Covariate record missing or invalid"),
    ("duplicate_records", "More than one valid record (ambiguous)"),
    ("age_outside_19_74", "Age outside 19-74 years"),
    ("cbp_not_answered", "Chronic back pain question not answered"),
    ("physical_activity_missing", "Physical activity (MET-min/week) not answered"),
    ("comorbidity_missing", "A comorbidity question not answered"),
    ("fat_water_swap_suspected", "Image QC: fat-water swap suspected"),
    ("qc_rejected", "Segmentation rejected at visual review"),
    ("no_muscle_metrics", "Back-muscle segmentation or metrics unavailable"),
)
EXCLUSION_CODES = tuple(code for code, _ in EXCLUSION_RULES)
# The rules a participant of the multiple-imputation population may fail (and no other): missing covariate answers.
IMPUTABLE_RULES = ("physical_activity_missing", "comorbidity_missing")
# The covariate answers the multiple imputation fills in (analysis-frame columns, as answered).
IMPUTED_VARIABLES = ("met_min_week", *COMORBIDITIES)
START_LABEL = "Participants with an MRI delivery"
ANALYSED_LABEL = "Analysed"


# The muscle_metrics columns read from the back_total row (the metrics vocabulary; the exposures are computed
# from these, see cbp_platform.study).
METRIC_COLUMNS = ("compartment_ml", "lean_ml", "fat_ml", "imat_pct", "mfi")
assert set(study.metric_columns()) <= set(METRIC_COLUMNS), "an exposure's metric is not read from muscle_metrics"

# Columns of the analysed frame, in this order: the paper's exposures where they always were, secondary
# exposures at the end.
FRAME_COLUMNS = (
    "pseudonym", "delivery_id", "batch_key", "site", "exam_date", "age", "sex", "female", "height_cm",
    "weight_kg", "bmi", "cbp", "nrs_pain", "nrs_high", "met_min_week", "met_category", *COMORBIDITIES,
    *METRIC_COLUMNS, *study.exposure_columns(study.PRIMARY_EXPOSURES),
    "age_10y", "pa_moderate", "pa_high", *study.exposure_columns(study.SECONDARY_EXPOSURES),
)
# Left out of the hash: bookkeeping columns (re-batching the same data must not change it) and the secondary
# exposures' columns. Those are functions of hashed metric columns (asserted below) and of the registry's code,
# so the hash still pins them, and adding a secondary exposure leaves the anchor of the paper's results as it was.
HASH_COLUMNS = tuple(c for c in FRAME_COLUMNS if c not in ("delivery_id", "batch_key",
                                                           *study.exposure_columns(study.SECONDARY_EXPOSURES)))
assert set(study.metric_columns(study.SECONDARY_EXPOSURES)) <= set(HASH_COLUMNS)


@dataclass(frozen=True)
class AnalysisCohort:
    """The analysed participants and how they were selected.

    ``frame``: one row per analysed participant, columns :data:`FRAME_COLUMNS`, sorted by pseudonym.
    ``flow``: step, criterion, description, excluded, remaining (no pseudonyms; publishable).
    ``cohort_hash``: sha256 of the canonical serialisation of ``frame`` (see :func:`cohort_hash`).
    ``standardisation``: per exposure name (:data:`cbp_platform.study.EXPOSURES`) the ``mean`` and ``sd`` its
    standardised column (:attr:`~cbp_platform.study.Exposure.z_column`) was computed with.
    ``exclusions``: pseudonym, reason of every excluded participant (internal, never published).
    ``imputation_frame``: the population of the multiple-imputation sensitivity analysis (columns
    :data:`FRAME_COLUMNS`, sorted by pseudonym): the analysed participants and those excluded only by
    :data:`IMPUTABLE_RULES`, every derived column computed where its inputs exist and null where they are missing
    (``met_category``, ``pa_moderate``, ``pa_high`` with ``met_min_week``), exposures standardised with
    ``standardisation`` (the complete-case mean and SD: the per-2-SD unit is the primary analysis's).
    """

    frame: pl.DataFrame
    flow: pl.DataFrame
    cohort_hash: str
    standardisation: dict[str, dict[str, float]]
    lmm_normaliser: str
    lmm_unit: str
    exclusions: pl.DataFrame = field(repr=False)
    imputation_frame: pl.DataFrame | None = field(default=None, repr=False, compare=False)

    @property
    def n_imputable(self) -> int:
        """Participants of the MI population that the complete-case analysis excludes."""
        return 0 if self.imputation_frame is None else self.imputation_frame.height - self.frame.height

    @property
    def n(self) -> int:
        return self.frame.height


# --------------------------------------------------------------------------------------------------------
# input normalisation


def _pseudonyms(df: pl.DataFrame | None) -> pl.Series:
    if df is None or df.height == 0 or "pseudonym" not in df.columns:
        return pl.Series("pseudonym", [], dtype=pl.String)
    return df.get_column("pseudonym").cast(pl.String).drop_nulls()


def _covariates(df: pl.DataFrame) -> pl.DataFrame:
    need = ("pseudonym", "site", "exam_date", "age", "sex", "height_cm", "weight_kg", "cbp", "nrs_pain",
            "met_min_week", *COMORBIDITIES)
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"participant_covariates lacks columns {missing}")
    extra = [c for c in ("delivery_id", "batch_key") if c in df.columns]
    out = df.select(*extra, *need).with_columns(
        pl.col("pseudonym", "site", "sex").cast(pl.String),
        pl.col("exam_date").cast(pl.Date),
        pl.col("age", "nrs_pain", "met_min_week").cast(pl.Int64),
        pl.col("height_cm", "weight_kg").cast(pl.Float64),
        pl.col("cbp", *COMORBIDITIES).cast(pl.Boolean),
    )
    for c in ("delivery_id", "batch_key"):
        if c not in out.columns:
            out = out.with_columns(pl.lit(None, pl.String).alias(c))
    return out.with_columns(pl.col("delivery_id", "batch_key").cast(pl.String)).filter(
        pl.col("pseudonym").is_not_null())


def _scans(df: pl.DataFrame) -> pl.DataFrame:
    if df.height == 0 and "pseudonym" not in df.columns:
        return pl.DataFrame(schema={"pseudonym": pl.String, "swap_suspected": pl.Boolean})
    swap = pl.col("swap_suspected").cast(pl.Boolean) if "swap_suspected" in df.columns else pl.lit(False)
    delivery = pl.col("delivery_id").cast(pl.String) if "delivery_id" in df.columns else pl.lit(None, pl.String)
    return df.select(pl.col("pseudonym").cast(pl.String), swap.fill_null(False).alias("swap_suspected"),
                     delivery.alias("delivery_id")).filter(pl.col("pseudonym").is_not_null())


def _metrics(df: pl.DataFrame) -> pl.DataFrame:
    cols = {c: pl.Float64 for c in METRIC_COLUMNS}
    if df.height == 0 and "pseudonym" not in df.columns:
        return pl.DataFrame(schema={"pseudonym": pl.String, **cols})
    missing = [c for c in ("pseudonym", "muscle", "lean_ml", "imat_pct") if c not in df.columns]
    if missing:
        raise ValueError(f"muscle_metrics lacks columns {missing}")
    sel = [pl.col(c).cast(t) if c in df.columns else pl.lit(None, t).alias(c) for c, t in cols.items()]
    return (df.filter(pl.col("muscle").cast(pl.String) == TOTAL_MUSCLE)
            .select(pl.col("pseudonym").cast(pl.String), *sel)
            .filter(pl.col("pseudonym").is_not_null()))


def _quarantine(df: pl.DataFrame | None) -> pl.DataFrame:
    schema = {"pseudonym": pl.String, "stage": pl.String, "reason": pl.String, "delivery_id": pl.String}
    if df is None or df.height == 0:
        return pl.DataFrame(schema=schema)
    return df.select(pl.col(c).cast(pl.String) if c in df.columns else pl.lit(None, pl.String).alias(c)
                     for c in schema).filter(pl.col("pseudonym").is_not_null())


# --------------------------------------------------------------------------------------------------------
# the rules


def classify_participants(covariates: pl.DataFrame, scans: pl.DataFrame, metrics: pl.DataFrame,
                          quarantine: pl.DataFrame | None = None,
                          rejected: pl.DataFrame | None = None, retired: pl.DataFrame | None = None,
                          withdrawn: pl.DataFrame | None = None) -> pl.DataFrame:
    """Every participant with an MRI delivery and the first exclusion rule they fail (``reason`` null = analysed);
    ``imputable``: excluded, and only by :data:`IMPUTABLE_RULES` (the multiple-imputation population's extra members).
    ``rejected``: the participants (column ``pseudonym``) whose segmentation a reviewer rejected; ``retired``: the
    participants with data in force from a retired delivery; ``withdrawn``: the participants who withdrew consent
    (the release records both).

    Returns pseudonym, reason and, for the analysed, their single covariate and metrics record joined.
    Internal (contains pseudonyms).
    """
    cov = _covariates(covariates)
    sc = _scans(scans)
    met = _metrics(metrics)
    q = _quarantine(quarantine)
    everyone = (pl.concat([_pseudonyms(cov), _pseudonyms(sc), _pseudonyms(met), _pseudonyms(q)])
                .unique().sort().to_frame("pseudonym"))

    scan_agg = sc.group_by("pseudonym").agg(pl.len().alias("n_scan"), pl.col("swap_suspected").any().alias("swap"))
    cov_n = cov.group_by("pseudonym").agg(pl.len().alias("n_cov"))
    met_n = met.group_by("pseudonym").agg(pl.len().alias("n_met"))
    swap_quarantined = ((pl.col("stage") == MUSCLE_SEGMENTATIONS)
                        & (pl.col("reason") == R.fat_water_swap_suspected.code))
    # a swap found in a scan that a correction has since replaced (a re-scan in force) no longer excludes
    current = sc.select("pseudonym", pl.col("delivery_id").alias("scan_delivery")).unique("pseudonym")
    q_swap = (q.filter(swap_quarantined).join(current, on="pseudonym", how="left")
              .filter(pl.col("scan_delivery").is_null() | pl.col("delivery_id").is_null()
                      | (pl.col("delivery_id") == pl.col("scan_delivery")))
              .select("pseudonym").unique().with_columns(pl.lit(True).alias("q_swap")))

    rej = (_pseudonyms(rejected).unique().to_frame("pseudonym").with_columns(pl.lit(True).alias("rejected"))
           if rejected is not None else pl.DataFrame(schema={"pseudonym": pl.String, "rejected": pl.Boolean}))
    ret = (_pseudonyms(retired).unique().to_frame("pseudonym").with_columns(pl.lit(True).alias("retired"))
           if retired is not None else pl.DataFrame(schema={"pseudonym": pl.String, "retired": pl.Boolean}))
    wdr = (_pseudonyms(withdrawn).unique().to_frame("pseudonym").with_columns(pl.lit(True).alias("withdrawn"))
           if withdrawn is not None else pl.DataFrame(schema={"pseudonym": pl.String, "withdrawn": pl.Boolean}))
    p = (everyone.join(scan_agg, on="pseudonym", how="left")
         .join(cov_n, on="pseudonym", how="left")
         .join(met_n, on="pseudonym", how="left")
         .join(q_swap, on="pseudonym", how="left")
         .join(rej, on="pseudonym", how="left")
         .join(ret, on="pseudonym", how="left")
         .join(wdr, on="pseudonym", how="left")
         .with_columns(pl.col("n_scan", "n_cov", "n_met").fill_null(0), pl.col("rejected").fill_null(False),
                       pl.col("retired").fill_null(False), pl.col("withdrawn").fill_null(False),
                       (pl.col("swap").fill_null(False) | pl.col("q_swap").fill_null(False)).alias("swap")))
    # Single records only: an ambiguous participant is excluded before any value is read.
    single_cov = cov.join(cov_n.filter(pl.col("n_cov") == 1), on="pseudonym", how="semi")
    single_met = met.join(met_n.filter(pl.col("n_met") == 1), on="pseudonym", how="semi")
    p = p.join(single_cov, on="pseudonym", how="left").join(single_met, on="pseudonym", how="left")

    lo, hi = AGE_RANGE
    finite_metrics = (pl.col("lean_ml").is_not_null() & pl.col("lean_ml").is_finite() & (pl.col("lean_ml") > 0)
                      & pl.col("imat_pct").is_not_null() & pl.col("imat_pct").is_finite()
                      & pl.col("imat_pct").is_between(0.0, 100.0))
    conditions = {
        "consent_withdrawn": pl.col("withdrawn"),
        "delivery_retired": pl.col("retired"),
        "scan_not_ingested": pl.col("n_scan") == 0,
        "covariates_invalid": pl.col("n_cov") == 0,
        "duplicate_records": (pl.col("n_scan") > 1) | (pl.col("n_cov") > 1) | (pl.col("n_met") > 1),
        "age_outside_19_74": pl.col("age").is_null() | ~pl.col("age").is_between(lo, hi),
        "cbp_not_answered": pl.col("cbp").is_null(),
        "physical_activity_missing": pl.col("met_min_week").is_null(),
        "comorbidity_missing": pl.any_horizontal([pl.col(c).is_null() for c in COMORBIDITIES]),
        "fat_water_swap_suspected": pl.col("swap"),
        "qc_rejected": pl.col("rejected"),
        "no_muscle_metrics": (pl.col("n_met") == 0) | ~finite_metrics.fill_null(False),
    }
    assert tuple(conditions) == EXCLUSION_CODES
    # A condition that cannot be evaluated (null) counts as failed.
    chain = None
    for code, cond in conditions.items():
        failed = cond.fill_null(True)
        chain = (pl.when(failed) if chain is None else chain.when(failed)).then(pl.lit(code))
    other = pl.any_horizontal([c.fill_null(True) for k, c in conditions.items() if k not in IMPUTABLE_RULES])
    answers = pl.any_horizontal([conditions[k].fill_null(True) for k in IMPUTABLE_RULES])
    return p.with_columns(chain.otherwise(pl.lit(None, pl.String)).alias("reason"),
                          (~other & answers).alias("imputable"))


def flow_table(classified: pl.DataFrame) -> pl.DataFrame:
    """Start -> one row per rule (excluded at that step, remaining after it) -> analysed. No pseudonyms."""
    counts = dict(classified.group_by("reason").len().iter_rows())
    start = classified.height
    rows = [dict(step=0, criterion="start", description=START_LABEL, excluded=None, remaining=start)]
    remaining = start
    for i, (code, text) in enumerate(EXCLUSION_RULES, start=1):
        k = int(counts.get(code, 0))
        remaining -= k
        rows.append(dict(step=i, criterion=code, description=text, excluded=k, remaining=remaining))
    analysed = int(counts.get(None, 0))
    assert remaining == analysed, "exclusion flow does not reconcile"
    rows.append(dict(step=len(EXCLUSION_RULES) + 1, criterion="analysed", description=ANALYSED_LABEL,
                     excluded=None, remaining=analysed))
    return pl.DataFrame(rows, schema={"step": pl.Int64, "criterion": pl.String, "description": pl.String,
                                      "excluded": pl.Int64, "remaining": pl.Int64})


# --------------------------------------------------------------------------------------------------------
# derivations


def met_category(met: pl.Expr) -> pl.Expr:
    """'<500' (low, < 500), '500-5000' (moderate, 500 to 5000 inclusive), '>5000' (high) MET-min/week."""
    return (pl.when(met < 500).then(pl.lit("<500"))
            .when(met <= 5000).then(pl.lit("500-5000"))
            .when(met > 5000).then(pl.lit(">5000"))
            .otherwise(pl.lit(None, pl.String))).cast(MET_CATEGORY)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample SD of the finite values, computed with exactly rounded sums (independent of row order)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _standardised(col: str, mean: float, sd: float, k: float = 2.0) -> pl.Expr:
    """(x - mean) / (k SD): a regression coefficient on it is the effect of a k-SD difference."""
    if not (math.isfinite(sd) and sd > 0):
        return pl.lit(None, pl.Float64)
    return (pl.col(col) - mean) / (k * sd)


def _finite(e: pl.Expr) -> pl.Expr:
    return pl.when(e.is_finite()).then(e).otherwise(pl.lit(None, pl.Float64))


def derive(analysed: pl.DataFrame, normaliser: Normaliser, standardisation: dict[str, dict[str, float]] | None = None
           ) -> tuple[pl.DataFrame, dict[str, dict[str, float]]]:
    """The analysed frame's derived variables (columns :data:`FRAME_COLUMNS`) and the standardisation used.

    Every exposure of :data:`cbp_platform.study.EXPOSURES` is computed from its metric (a non-finite value is
    null: unmeasured) and standardised per k SD over the participants who have it, or with the given
    ``standardisation`` (exposure name -> mean, sd). A derived value whose input is missing is null.
    """
    df = analysed.sort("pseudonym").with_columns(
        (pl.col("sex") == "F").alias("female"),
        (pl.col("weight_kg") / (pl.col("height_cm") / 100.0) ** 2).alias("bmi"),
        pl.when(pl.col("nrs_pain").is_null()).then(pl.lit(None, pl.Boolean))
        .otherwise(pl.col("nrs_pain") >= NRS_HIGH_THRESHOLD).alias("nrs_high"),
        met_category(pl.col("met_min_week")).alias("met_category"),
        *(_finite(e.expr(normaliser)).alias(e.name) for e in study.EXPOSURES),
    )
    std = {}
    for e in study.EXPOSURES:
        if standardisation is not None:
            std[e.name] = dict(standardisation[e.name])
            continue
        mean, sd = _mean_sd(df.get_column(e.name).to_list())
        std[e.name] = {"mean": mean, "sd": sd}
    df = df.with_columns(
        *(_standardised(e.name, **std[e.name], k=e.sd_multiple).alias(e.z_column) for e in study.EXPOSURES),
        ((pl.col("age") - AGE_CENTRE) / 10.0).alias("age_10y"),
        (pl.col("met_category") == "500-5000").alias("pa_moderate"),
        (pl.col("met_category") == ">5000").alias("pa_high"),
    )
    return df.select(FRAME_COLUMNS), std


# --------------------------------------------------------------------------------------------------------
# the hash


def _canon(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return format(v, ".10g")
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)


def cohort_hash(frame: pl.DataFrame, *, normaliser: str = "") -> str:
    """sha256 of ``frame``'s analysis columns (:data:`HASH_COLUMNS`) in a canonical text form.

    Rows sorted by pseudonym, columns in fixed order, floats to 10 significant digits, booleans 1/0, dates ISO,
    nulls empty; the version tag and the LMM normaliser come first. Independent of row and batch order.
    """
    h = hashlib.sha256()
    h.update(f"{COHORT_HASH_VERSION}\tlmm_normaliser={normaliser}\n".encode())
    h.update(("\t".join(HASH_COLUMNS) + "\n").encode())
    canon = frame.select(HASH_COLUMNS).sort("pseudonym")
    for row in canon.iter_rows():
        h.update(("\t".join(_canon(v) for v in row) + "\n").encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------
# the entry points


def build_analysis_cohort(covariates: pl.DataFrame, scans: pl.DataFrame, metrics: pl.DataFrame,
                          quarantine: pl.DataFrame | None = None, *,
                          lmm_normaliser: str = "weight_per_height",
                          rejected: pl.DataFrame | None = None, retired: pl.DataFrame | None = None,
                          withdrawn: pl.DataFrame | None = None) -> AnalysisCohort:
    """Join the batches' tables, apply :data:`EXCLUSION_RULES` in order, derive the analysis variables.

    ``covariates``: participant_covariates rows (valid rows only, as the warehouse holds them);
    ``scans``: raw_mri_scans rows (validly ingested scans, with ``swap_suspected``);
    ``metrics``: muscle_metrics rows (long; the ``back_total`` row is used);
    ``quarantine``: quarantine rows of the same batches (they add participants whose records all failed).
    ``lmm_normaliser``: a key of :data:`NORMALISERS`;
    ``rejected``: participants whose current segmentation a reviewer rejected (:func:`cbp_platform.qc.reviews.
    rejected`); ``retired``: participants taken out by a retired delivery, ``withdrawn``: participants who withdrew
    consent (both recorded by the release, :mod:`cbp_platform.releases`).
    """
    if lmm_normaliser not in NORMALISERS:
        raise ValueError(f"unknown lmm_normaliser {lmm_normaliser!r}; choose one of {sorted(NORMALISERS)}")
    norm = NORMALISERS[lmm_normaliser]
    classified = classify_participants(covariates, scans, metrics, quarantine, rejected, retired, withdrawn)
    flow = flow_table(classified)
    analysed = classified.filter(pl.col("reason").is_null())
    frame, std = derive(analysed, norm)
    mi, _ = derive(classified.filter(pl.col("reason").is_null() | pl.col("imputable")), norm, std)
    exclusions = classified.filter(pl.col("reason").is_not_null()).select("pseudonym", "reason").sort("pseudonym")
    return AnalysisCohort(frame=frame, flow=flow, cohort_hash=cohort_hash(frame, normaliser=norm.name),
                          standardisation=std, lmm_normaliser=norm.name, lmm_unit=norm.unit, exclusions=exclusions,
                          imputation_frame=mi)


def imputation_missingness(cohort: AnalysisCohort, variables: tuple[str, ...] = IMPUTED_VARIABLES, *,
                           publishable: bool = False) -> pl.DataFrame:
    """Missing answers of the MI population per variable and site, with an ``all sites`` row per variable.

    Columns: variable, site, participants_n, missing_n, missing_pct (:func:`cbp_platform.stats.imputation.
    missingness_table`). Raw counts by default (internal); ``publishable=True`` applies small-cell suppression
    (:func:`cbp_platform.analysis.disclosure.suppress_small_cells`: a count under 5 and its percentage hidden, and
    a second site of the same variable hidden where the all-sites row would give the first one away).
    """
    frame = cohort.imputation_frame if cohort.imputation_frame is not None else cohort.frame
    table = missingness_counts(frame, variables)
    return publishable_missingness(table, variables) if publishable else table


def missingness_counts(frame: pl.DataFrame, variables: tuple[str, ...] = IMPUTED_VARIABLES) -> pl.DataFrame:
    """Missing answers per variable and site of an imputation frame (raw counts; see :func:`imputation_missingness`)."""
    from cbp_platform.stats.imputation import missingness_table

    return missingness_table(frame, variables, "site")


def publishable_missingness(table: pl.DataFrame, variables: tuple[str, ...] = IMPUTED_VARIABLES, *,
                            min_count: int | None = None) -> pl.DataFrame:
    """:func:`missingness_counts` with small-cell suppression under ``min_count`` (default: the platform's limit;
    see :func:`imputation_missingness`)."""
    from cbp_platform.analysis.disclosure import MIN_COUNT, suppress_small_cells
    from cbp_platform.stats.imputation import ALL_SITES

    groups = []
    for v in variables:
        idx = [i for i, (var, site) in enumerate(zip(table["variable"], table["site"]))
               if var == v and site != ALL_SITES]
        groups.append(idx)
    return suppress_small_cells(table, MIN_COUNT if min_count is None else min_count,
                                count_columns=["participants_n", "missing_n"], row_groups=groups)


@dataclass(frozen=True)
class ParticipantTrace:
    """What happened to one participant: a line per stage, and the analysis decision (internal use only)."""

    pseudonym: str
    stages: list[dict]            # stage, status (ok / quarantined / absent / excluded / included), detail
    exclusion_reason: str | None  # first rule failed, None if analysed, "not_delivered" if unknown
    included: bool

    def to_text(self) -> str:
        lines = [f"participant {self.pseudonym}"]
        for s in self.stages:
            where = f" [{s['delivery_id']}/{s['batch_key']}]" if s.get("batch_key") else ""
            detail = f": {s['detail']}" if s.get("detail") else ""
            lines.append(f"  {s['stage']:<22} {s['status']}{where}{detail}")
        return "\n".join(lines)


_STAGES = ("raw_mri_scans", "participant_covariates", "muscle_segmentations", "muscle_metrics")


def _stage(stage: str, status: str, detail: str = "", row: dict | None = None) -> dict:
    row = row or {}
    return dict(stage=stage, status=status, detail=detail, delivery_id=row.get("delivery_id"),
                batch_key=row.get("batch_key"))


def _metrics_detail(r: dict) -> str:
    lean, imat = r.get("lean_ml"), r.get("imat_pct")
    if isinstance(lean, float) and isinstance(imat, float):
        return f"lean {lean:.1f} cm3, InterMAT {imat:.2f} %"
    return f"lean {lean}, InterMAT {imat}"


def participant_trace(pseudonym: str, covariates: pl.DataFrame, scans: pl.DataFrame, metrics: pl.DataFrame,
                      quarantine: pl.DataFrame | None = None,
                      review: dict | None = None, retired_by: str | None = None,
                      withdrawn: str | None = None) -> ParticipantTrace:
    """The stages one participant went through and the exclusion rule that removed them, if any.

    One entry per record and stage (a valid row: ``ok``; a quarantine row: ``quarantined`` with its reason;
    nothing: ``absent``), then ``analysis_cohort`` (``included`` / ``excluded`` with the rule). The decision
    comes from :func:`classify_participants` on the participant's own rows, i.e. the very rules of
    :func:`build_analysis_cohort`. ``review``: the participant's row of :func:`cbp_platform.qc.reviews.
    effective_reviews` (a ``qc_review`` line: the decision in force, or the outdated one); ``retired_by``: the
    retired delivery the participant's data in force came from (a ``delivery`` line). For an operator command
    inside the secure environment: it names the pseudonym.
    """
    def mine(df: pl.DataFrame | None) -> pl.DataFrame | None:
        if df is None or "pseudonym" not in df.columns:      # a table not written yet (nothing segmented, ...)
            return None
        return df.filter(pl.col("pseudonym").cast(pl.String) == pseudonym)

    cov, sc, met, q = mine(covariates), mine(scans), mine(metrics), mine(quarantine)
    q_rows = list(q.iter_rows(named=True)) if q is not None else []
    totals = (list(met.filter(pl.col("muscle").cast(pl.String) == TOTAL_MUSCLE).iter_rows(named=True))
              if met is not None else [])
    valid = {
        "raw_mri_scans": [("swap suspected" if r.get("swap_suspected") else "", r)
                          for r in (sc.iter_rows(named=True) if sc is not None else ())],
        "participant_covariates": [("", r) for r in (cov.iter_rows(named=True) if cov is not None else ())],
        # the segmentation table is not an input: metrics imply a label map
        "muscle_segmentations": [("label map (metrics present)", r) for r in totals],
        "muscle_metrics": [(_metrics_detail(r), r) for r in totals],
    }
    stages: list[dict] = []
    for stage in _STAGES:
        entries = [_stage(stage, "ok", detail, r) for detail, r in valid[stage]]
        for r in q_rows:
            if r.get("stage") == stage:
                message = f": {r['message']}" if r.get("message") else ""
                entries.append(_stage(stage, "quarantined", f"{r.get('reason')}{message}", r))
        stages.extend(entries or [_stage(stage, "absent")])
    rejected = None
    if review:
        if review.get("decision"):
            note = f" ({review['note']})" if review.get("note") else ""
            why = f" {review['reason']}{note}" if review["decision"] == "reject" else ""
            stages.append(_stage("qc_review", f"{review['decision']}ed" if review["decision"] == "reject"
                                 else "accepted", f"by {review['reviewer']} at {review['reviewed_at']}:{why} "
                                 f"(label map {str(review['label_sha256'])[:12]}, {review['n_reviews']} "
                                 f"review(s) in the history)", review))
            if review["decision"] == "reject":
                rejected = pl.DataFrame({"pseudonym": [pseudonym]})
        if review.get("outdated"):
            stages.append(_stage("qc_review", "outdated", f"{review['n_outdated']} review(s) of an earlier label "
                                 "map: not applied to the current one (review it again)", review))
    gone = None
    if withdrawn:
        stages.append(_stage("consent", "withdrawn", f"scope {withdrawn} (withdrawal register)"))
        gone = pl.DataFrame({"pseudonym": [pseudonym]})
    retired = None
    if retired_by:
        stages.append(_stage("delivery", "retired", f"data in force from retired delivery {retired_by}"))
        retired = pl.DataFrame({"pseudonym": [pseudonym]})
    if cov is None:                  # no covariates table yet: an empty one of the right columns
        cov = pl.DataFrame(schema={c: pl.String for c in ("pseudonym", "site", "exam_date", "age", "sex", "height_cm",
                                                          "weight_kg", "cbp", "nrs_pain", "met_min_week",
                                                          *COMORBIDITIES)})
    classified = classify_participants(cov, sc if sc is not None else pl.DataFrame(),
                                       met if met is not None else pl.DataFrame(), q, rejected, retired, gone)
    if classified.height == 0:
        reason, included = "not_delivered", False
        stages.append(_stage("analysis_cohort", "absent", "no record in these batches"))
    else:
        reason = classified.get_column("reason")[0]
        included = reason is None
        stages.append(_stage("analysis_cohort", "included" if included else "excluded",
                             "" if included else f"{reason}: {dict(EXCLUSION_RULES)[reason]}"))
    return ParticipantTrace(pseudonym=pseudonym, stages=stages, exclusion_reason=reason, included=included)
