"""The cohort model of the simulated NAKO-like study.

Everything a participant *is* (demographics, anthropometry, physical activity, comorbidities, the true
back-muscle composition and the two pain outcomes) is drawn here, as one table, before any image exists.
The phantom renderer (:mod:`cbp_platform.synth.phantom`) then builds images whose compartment volumes and
intermuscular fat match the drawn truth.

Calibration targets are docs/study.md's (Ziegelmayer et al. 2025): 21.8 % CBP prevalence, 44.3 % women, CBP group
half women, median age 53 with CBP and 48 without, physical-activity shares 39.6/46.6/13.8 % with CBP
prevalence 24.6/19.4/22.0 %, and the adjusted ORs per 2 SD of LMM (0.87) and InterMAT (1.22) for CBP and
(0.63, 1.22) for pain intensity NRS >= 4. Five of the outcome-model coefficients (intercept, age, sex, the
two activity contrasts) are not in the paper; :func:`calibrate` solves for them so that the marginal targets
are met, and the solved values are the defaults of :class:`CohortParameters` (re-derive them with
``python -m cbp_platform.synth.calibrate``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import optimize, special, stats

from cbp_platform.landing import SITES

PA_LEVELS = ("low", "moderate", "high")  # < 500, 500-5000, > 5000 MET-min/week


@dataclass(frozen=True)
class CohortParameters:
    """All generating parameters; written to the truth folder with every simulated cohort."""

    # --- population structure -------------------------------------------------------------------------
    site_shares: tuple[float, ...] = (0.19, 0.22, 0.20, 0.20, 0.19)
    site_sd: float = 0.20                 # SD of the site random intercept (logit scale), CBP and NRS models
    p_female: float = 0.443
    age_mean: float = 50.0                # truncated normal on [19, 74]: quartiles ~41/49/57
    age_sd: float = 11.6
    age_min: int = 19
    age_max: int = 74
    pa_shares: tuple[float, float, float] = (0.396, 0.466, 0.138)
    exam_start: str = "2014-05-01"
    exam_end: str = "2019-09-30"

    # --- anthropometry ----------------------------------------------------------------------------------
    height_mean: tuple[float, float] = (165.5, 178.5)   # (women, men), cm
    height_sd: tuple[float, float] = (6.5, 7.0)
    bmi_median: tuple[float, float] = (25.6, 27.0)
    bmi_logsd: tuple[float, float] = (0.17, 0.13)
    bmi_age_slope: float = 0.05                         # kg/m2 per year

    # --- comorbidities: logit = a0 + a_age (age-50)/10 + a_bmi (BMI-26) + a_female female ---------------
    diabetes: tuple[float, float, float, float] = (-3.1, 0.65, 0.10, -0.35)
    dyslipidemia: tuple[float, float, float, float] = (-1.35, 0.50, 0.06, -0.30)
    osteoporosis: tuple[float, float, float, float] = (-4.3, 0.90, -0.05, 1.30)
    osteoarthritis: tuple[float, float, float, float] = (-1.55, 0.70, 0.06, 0.40)

    # --- true back-muscle composition -------------------------------------------------------------------
    # LMM index = lean back-muscle volume (cm3) / (weight kg / height m)
    lmm_base: tuple[float, float] = (20.6, 25.0)         # (women, men) at age 50, BMI 26.5, low activity
    lmm_age: float = -0.05                               # per year
    lmm_bmi: float = -0.30                               # per kg/m2 (the normaliser grows with weight)
    lmm_pa: tuple[float, float] = (0.5, 0.9)             # moderate, high vs low
    lmm_osteoporosis: float = -0.6
    lmm_sd: float = 2.0
    # InterMAT % = fat voxels / compartment voxels, log-normal around imat_median
    imat_median: float = 7.2
    imat_age: float = 0.012                              # log-scale per year
    imat_bmi: float = 0.022                              # log-scale per kg/m2
    imat_female: float = 0.10
    imat_pa: tuple[float, float] = (-0.04, -0.07)
    imat_logsd: float = 0.22
    imat_bounds: tuple[float, float] = (1.5, 30.0)
    # MFI: mean fat fraction of lean muscle voxels
    mfi_mean: float = 0.035
    mfi_age: float = 0.0004
    mfi_sd: float = 0.008
    psoas_share: float = 0.24                            # psoas share of the lean back-muscle volume
    psoas_share_sd: float = 0.025
    lr_asymmetry_sd: float = 0.03                        # log-ratio SD, left vs right

    # --- outcome models (logit scale) -------------------------------------------------------------------
    # Generating ORs per 2 SD of the *population* SD of the true exposures (docs/study.md).
    or_lmm_2sd: float = 0.87
    or_imat_2sd: float = 1.22
    or_lmm_2sd_nrs: float = 0.63
    or_imat_2sd_nrs: float = 1.22
    # Reference mean/SD used to standardise the true exposures in the generating models: computed once
    # from a 400,000-participant draw of this model (see calibrate.py), fixed so they do not vary by seed.
    lmm_ref: tuple[float, float] = (23.392, 3.175)
    imat_ref: tuple[float, float] = (7.552, 2.159)
    # comorbidity ORs for CBP (plausible values; the paper adjusts for them but does not report them)
    or_diabetes: float = 1.15
    or_dyslipidemia: float = 1.10
    or_osteoporosis: float = 1.45
    or_osteoarthritis: float = 1.90
    # Solved by calibrate(): intercept, age per 10 y (centred 50), female, moderate PA, high PA.
    cbp_intercept: float = -1.4488
    cbp_age10: float = 0.2218
    cbp_female: float = 0.1523
    cbp_pa_moderate: float = -0.2996
    cbp_pa_high: float = -0.1107
    # NRS >= 4 model: same covariate effects as CBP, its own exposure ORs and intercept (target 20 %)
    nrs_high_prevalence: float = 0.20
    nrs_intercept: float = -1.5956
    nrs_cbp_latent_corr: float = 0.70                    # Gaussian-copula correlation of the two outcomes

    # --- missing answers (exclusion causes; missing at random given observed covariates) -------------------
    # Each answer is missing with probability expit(a + b' z) (:func:`missing_answer_probabilities`):
    #   CBP answer:           z = (age per 10 y centred at 50, female)                   + site offset
    #   MET-min/week:         z = (age per 10 y, female, CBP status)                     + site offset
    #   a comorbidity answer: z = (age per 10 y, female, CBP status)                     + site offset
    # Every z is observed in the data (site, age and sex always; CBP wherever the participant answered it), so
    # among the participants with a CBP answer the missing activity and comorbidity answers are MAR, not MCAR:
    # older participants, men, CBP cases and some sites leave answers out more often. The intercept a is solved
    # per cohort so that the mean probability over the cohort's participants is exactly p_missing_* (the
    # expected rate stays today's; the realised one varies by binomial noise). Union of all exclusion causes
    # ~10.7 %: 30,868 scanned -> ~27,560 analysable.
    p_missing_cbp: float = 0.045
    p_missing_met: float = 0.030
    p_missing_comorbidity: float = 0.020
    missing_cbp_logit: tuple[float, float] = (0.30, -0.20)                # age per 10 y, female
    missing_met_logit: tuple[float, float, float] = (0.40, -0.20, 0.35)   # age per 10 y, female, CBP
    missing_comorbidity_logit: tuple[float, float, float] = (0.45, 0.0, 0.30)
    missing_site_logit: tuple[float, ...] = (0.0, 0.45, -0.35, 0.20, -0.30)   # per site (landing.SITES order)
    # --- image problems ------------------------------------------------------------------------------------
    p_fat_water_swap: float = 0.018
    p_swap_partial: float = 0.30                         # share of swaps limited to one station (slab)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> "CohortParameters":
        """The parameters a cohort's truth file records (JSON: tuples read back as lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()})

    def with_(self, **kw) -> "CohortParameters":
        return dataclasses.replace(self, **kw)


def _logistic(x):
    return special.expit(x)


def beta_2sd(or_2sd: float) -> float:
    """Coefficient per 1 SD from an OR per 2 SD."""
    return math.log(or_2sd) / 2.0


def _truncnorm(rng: np.random.Generator, n: int, mean: float, sd: float, lo: float, hi: float) -> np.ndarray:
    a, b = (lo - mean) / sd, (hi + 0.999 - mean) / sd
    u = rng.random(n)
    return stats.truncnorm.ppf(u, a, b, loc=mean, scale=sd)


def site_effects(seed: int, params: CohortParameters) -> np.ndarray:
    """The five site random intercepts for a seed (shared by the CBP and NRS models)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    u = rng.normal(0.0, params.site_sd, len(SITES))
    # centred, so that the realised sites do not shift the cohort's prevalence away from the calibration
    return u - u.mean()


def draw_population(n: int, rng: np.random.Generator, params: CohortParameters) -> dict[str, np.ndarray]:
    """Demographics, anthropometry, activity, comorbidities and the true exposures (no outcomes)."""
    p = params
    female = rng.random(n) < p.p_female
    fi = female.astype(int)  # 1 = female -> index 0 in (women, men) tuples
    sx = 1 - fi
    age_cont = _truncnorm(rng, n, p.age_mean, p.age_sd, p.age_min, p.age_max)
    age = np.clip(np.floor(age_cont), p.age_min, p.age_max).astype(np.int64)
    hm = np.array(p.height_mean)[sx]
    hs = np.array(p.height_sd)[sx]
    height = rng.normal(hm, hs) - 0.05 * (age - 50)
    height = np.clip(height, 140.0, 210.0)
    bmi = np.array(p.bmi_median)[sx] * np.exp(rng.normal(0, 1, n) * np.array(p.bmi_logsd)[sx])
    bmi = np.clip(bmi + p.bmi_age_slope * (age - 50), 16.0, 55.0)
    weight = bmi * (height / 100.0) ** 2
    bmi = weight / (height / 100.0) ** 2

    pa = rng.choice(3, size=n, p=np.array(p.pa_shares) / sum(p.pa_shares))
    u = rng.random(n)
    met = np.where(
        pa == 0, np.floor(499.0 * u ** 1.4),
        np.where(pa == 1, np.exp(np.log(500) + u * (np.log(5000) - np.log(500))),
                 5000.0 + rng.exponential(2500.0, n)))
    met = np.round(met).astype(np.int64)
    met = np.where(pa == 1, np.clip(met, 500, 5000), met)
    met = np.where(pa == 2, np.maximum(met, 5001), met)

    a10 = (age - 50) / 10.0

    def comorb(coef):
        a0, aa, ab, af = coef
        return rng.random(n) < _logistic(a0 + aa * a10 + ab * (bmi - 26) + af * fi)

    diabetes = comorb(p.diabetes)
    dyslip = comorb(p.dyslipidemia)
    osteop = comorb(p.osteoporosis)
    osteoa = comorb(p.osteoarthritis)

    pa_mod = (pa == 1).astype(float)
    pa_high = (pa == 2).astype(float)
    lmm = (np.array(p.lmm_base)[sx] + p.lmm_age * (age - 50) + p.lmm_bmi * (bmi - 26.5)
           + p.lmm_pa[0] * pa_mod + p.lmm_pa[1] * pa_high + p.lmm_osteoporosis * osteop
           + rng.normal(0, p.lmm_sd, n))
    lmm = np.clip(lmm, 8.0, 45.0)
    imat = p.imat_median * np.exp(p.imat_age * (age - 50) + p.imat_bmi * (bmi - 26.5) + p.imat_female * fi
                                  + p.imat_pa[0] * pa_mod + p.imat_pa[1] * pa_high
                                  + rng.normal(0, p.imat_logsd, n))
    imat = np.clip(imat, *p.imat_bounds)
    mfi = np.clip(p.mfi_mean + p.mfi_age * (age - 50) + rng.normal(0, p.mfi_sd, n), 0.01, 0.12)
    return dict(female=female, age=age, age_cont=age_cont, height=height, weight=weight, bmi=bmi, pa=pa,
                met=met, diabetes=diabetes, dyslipidemia=dyslip, osteoporosis=osteop, osteoarthritis=osteoa,
                lmm=lmm, imat=imat, mfi=mfi)


def linear_predictors(pop: dict[str, np.ndarray], site_u: np.ndarray,
                      params: CohortParameters) -> tuple[np.ndarray, np.ndarray]:
    """Logit-scale linear predictors of CBP and of NRS >= 4 given the population and site effects."""
    p = params
    lz = (pop["lmm"] - p.lmm_ref[0]) / p.lmm_ref[1]
    iz = (pop["imat"] - p.imat_ref[0]) / p.imat_ref[1]
    common = (p.cbp_age10 * (pop["age"] - 50) / 10.0 + p.cbp_female * pop["female"]
              + p.cbp_pa_moderate * (pop["pa"] == 1) + p.cbp_pa_high * (pop["pa"] == 2)
              + math.log(p.or_diabetes) * pop["diabetes"] + math.log(p.or_dyslipidemia) * pop["dyslipidemia"]
              + math.log(p.or_osteoporosis) * pop["osteoporosis"]
              + math.log(p.or_osteoarthritis) * pop["osteoarthritis"] + site_u)
    eta_cbp = p.cbp_intercept + common + beta_2sd(p.or_lmm_2sd) * lz + beta_2sd(p.or_imat_2sd) * iz
    eta_nrs = p.nrs_intercept + common + beta_2sd(p.or_lmm_2sd_nrs) * lz + beta_2sd(p.or_imat_2sd_nrs) * iz
    return eta_cbp, eta_nrs


def draw_outcomes(eta_cbp: np.ndarray, eta_nrs: np.ndarray, rng: np.random.Generator,
                  params: CohortParameters) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CBP and NRS drawn jointly: each margin is exactly logistic in its own predictor (Gaussian copula)."""
    n = eta_cbp.shape[0]
    rho = params.nrs_cbp_latent_corr
    z1 = rng.standard_normal(n)
    z2 = rho * z1 + math.sqrt(1 - rho * rho) * rng.standard_normal(n)
    # logistic errors from correlated normals: eps = logit(Phi(z))
    e1 = special.logit(special.ndtr(z1))
    e2 = special.logit(special.ndtr(z2))
    cbp = eta_cbp + e1 > 0
    nrs_high = eta_nrs + e2 > 0
    # NRS value given (high, cbp)
    u = rng.random(n)
    hi_cbp = np.cumsum(np.exp(-0.20 * np.arange(7)))
    hi_cbp /= hi_cbp[-1]
    hi_no = np.cumsum(np.exp(-0.45 * np.arange(7)))
    hi_no /= hi_no[-1]
    lo_cbp = np.cumsum([0.10, 0.20, 0.30, 0.40])
    lo_no = np.cumsum([0.55, 0.20, 0.15, 0.10])
    nrs = np.where(
        nrs_high,
        4 + np.where(cbp, np.searchsorted(hi_cbp, u), np.searchsorted(hi_no, u)),
        np.where(cbp, np.searchsorted(lo_cbp, u), np.searchsorted(lo_no, u)))
    nrs = np.clip(nrs, 0, 10)
    p_cbp = _logistic(eta_cbp)
    return cbp, nrs.astype(np.int64), p_cbp


def _calibrated_probability(lp: np.ndarray, rate: float) -> np.ndarray:
    """expit(a + lp) with the intercept a solved so that the mean probability equals ``rate``."""
    if rate <= 0.0 or lp.size == 0:
        return np.zeros_like(lp, dtype=np.float64)
    if rate >= 1.0:
        return np.ones_like(lp, dtype=np.float64)
    lo, hi = special.logit(rate) - lp.max() - 1.0, special.logit(rate) - lp.min() + 1.0
    a = optimize.brentq(lambda x: float(np.mean(_logistic(x + lp))) - rate, lo, hi, xtol=1e-12, rtol=1e-14)
    return _logistic(a + lp)


def missing_answer_probabilities(pop: dict[str, np.ndarray], site: np.ndarray, cbp: np.ndarray,
                                 params: CohortParameters) -> dict[str, np.ndarray]:
    """Per participant the probability that the CBP, the activity and a comorbidity answer are missing (MAR).

    logit P(missing) = a + b_age (age - 50) / 10 + b_female female [+ b_cbp CBP] + site offset, with the
    coefficients of :class:`CohortParameters` (``missing_*_logit``, ``missing_site_logit``) and each intercept a
    solved on this cohort so that the mean probability is the answer's ``p_missing_*``. ``site``: site codes
    into :data:`cbp_platform.landing.SITES`; ``cbp``: the CBP status the participant would answer.
    """
    p = params
    a10 = (pop["age"] - 50) / 10.0
    fem = pop["female"].astype(np.float64)
    y = np.asarray(cbp, dtype=np.float64)
    offset = np.asarray(p.missing_site_logit, dtype=np.float64)[site]
    b = p.missing_cbp_logit
    lp_cbp = b[0] * a10 + b[1] * fem + offset
    b = p.missing_met_logit
    lp_met = b[0] * a10 + b[1] * fem + b[2] * y + offset
    b = p.missing_comorbidity_logit
    lp_com = b[0] * a10 + b[1] * fem + b[2] * y + offset
    return {"cbp": _calibrated_probability(lp_cbp, p.p_missing_cbp),
            "met": _calibrated_probability(lp_met, p.p_missing_met),
            "comorbidity": _calibrated_probability(lp_com, p.p_missing_comorbidity)}


def _exam_dates(rng: np.random.Generator, n: int, params: CohortParameters) -> np.ndarray:
    start = np.datetime64(params.exam_start)
    span = int((np.datetime64(params.exam_end) - start) / np.timedelta64(1, "D"))
    return start + rng.integers(0, span + 1, n).astype("timedelta64[D]")


def simulate_cohort(n: int, seed: int, params: CohortParameters | None = None) -> pl.DataFrame:
    """The full truth table of ``n`` scanned participants (no pseudonyms, no images), deterministic in seed.

    Columns: participant index, site, exam date, demographics, activity, comorbidities, the true exposures
    (``lmm_true``, ``imat_true`` %, ``mfi_true``), outcomes (``cbp_true``, ``nrs_true``), their generating
    probability, the missing-answer flags (missing at random given age, sex, site and, for the activity and
    comorbidity answers, CBP: :func:`missing_answer_probabilities`) and the fat-water swap flag.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    p = params or CohortParameters()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    site_u = site_effects(seed, p)
    site = rng.choice(len(SITES), size=n, p=np.array(p.site_shares) / sum(p.site_shares))
    pop = draw_population(n, rng, p)
    eta_cbp, eta_nrs = linear_predictors(pop, site_u[site], p)
    cbp, nrs, p_cbp = draw_outcomes(eta_cbp, eta_nrs, rng, p)
    pm = missing_answer_probabilities(pop, site, cbp, p)
    # the same uniform draws, in the same order, as when the answers were missing completely at random
    miss_cbp = rng.random(n) < pm["cbp"]
    miss_met = rng.random(n) < pm["met"]
    miss_com = rng.random(n) < pm["comorbidity"]
    miss_com_which = rng.integers(0, 4, n)
    swap = rng.random(n) < p.p_fat_water_swap
    swap_partial = swap & (rng.random(n) < p.p_swap_partial)
    psoas_share = np.clip(rng.normal(p.psoas_share, p.psoas_share_sd, n), 0.12, 0.40)
    lr_auto = np.exp(rng.normal(0, p.lr_asymmetry_sd, n))
    lr_psoas = np.exp(rng.normal(0, p.lr_asymmetry_sd, n))
    exam = _exam_dates(rng, n, p)
    lean_total = pop["lmm"] * pop["weight"] / (pop["height"] / 100.0)

    return pl.DataFrame({
        "participant_index": np.arange(n, dtype=np.int64),
        "site": np.array(SITES)[site],
        "site_effect": site_u[site],
        "exam_date": exam,
        "age": pop["age"],
        "sex": np.where(pop["female"], "F", "M"),
        "height_cm": np.round(pop["height"], 1),
        "weight_kg": np.round(pop["weight"], 1),
        "bmi": pop["bmi"],
        "pa_category": np.array(PA_LEVELS)[pop["pa"]],
        "met_min_week": pop["met"],
        "diabetes": pop["diabetes"],
        "dyslipidemia": pop["dyslipidemia"],
        "osteoporosis": pop["osteoporosis"],
        "osteoarthritis": pop["osteoarthritis"],
        "lmm_true": pop["lmm"],
        "imat_true": pop["imat"],
        "mfi_true": pop["mfi"],
        "lean_volume_target_cm3": lean_total,
        "psoas_share": psoas_share,
        "lr_ratio_autochthonous": lr_auto,
        "lr_ratio_psoas": lr_psoas,
        "cbp_probability": p_cbp,
        "cbp_true": cbp,
        "nrs_true": nrs,
        "nrs_high_true": nrs >= 4,
        "missing_cbp": miss_cbp,
        "missing_met": miss_met,
        "missing_comorbidity": pl.Series([
            str(c) if m else None for m, c in zip(miss_com, np.array(
                ["diabetes", "dyslipidemia", "osteoporosis", "osteoarthritis"])[miss_com_which])], dtype=pl.String),
        "fat_water_swap": np.where(swap, np.where(swap_partial, "slab", "full"), "none"),
    })


def exclusion_cause(df: pl.DataFrame) -> pl.Series:
    """The first exclusion cause the analysis will meet for each participant (None = analysable)."""
    return df.select(
        pl.when(pl.col("missing_cbp")).then(pl.lit("missing_cbp_answer"))
        .when(pl.col("missing_met")).then(pl.lit("missing_physical_activity"))
        .when(pl.col("missing_comorbidity").is_not_null()).then(pl.lit("missing_comorbidity"))
        .when(pl.col("fat_water_swap") != "none").then(pl.lit("image_qc_fat_water_swap"))
        .otherwise(None).alias("exclusion_cause")
    ).to_series()
