"""Comparing two segmentation models on the same participants: label maps, metrics and the study's odds ratios.

* Dice between the two models' label maps, per platform class (mean and worst participant);
* ICC(A,1) and Bland-Altman of the LMM index and InterMAT % between the models (the other model minus the
  primary, in % of the primary), with the proportional part;
* the CBP and NRS >= 4 odds ratios of LMM and InterMAT from each model's metrics, through the same analysis cohort
  rules and the same mixed model as the published analysis (so the only difference is the model);
* each model's agreement with the simulated truth where a truth exists (:mod:`cbp_platform.segmentation.accuracy`).

Framework-free; the ``model_comparison`` asset reads the warehouse and calls :func:`compare`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import nibabel as nib
import numpy as np
import polars as pl

from cbp_platform.classes import BACK_TOTAL, NAMES
from cbp_platform.metrics.agreement import bland_altman, icc_a1, proportional_bias
from cbp_platform.metrics.body_composition import dice_per_class

ANALYSES = {"cbp_association_model": ("cbp", ""), "pain_intensity_model": ("nrs_high", "nrs_high")}
EXPOSURE_TERMS = ("lmm_z2", "imat_z2")


def label_dice(pairs: pl.DataFrame, progress: Callable[[int], None] | None = None) -> dict:
    """``pairs``: pseudonym, label_path (primary), label_path_other. Per class: mean, worst and n of the Dice."""
    per = {c: [] for c in NAMES}
    for k, r in enumerate(pairs.iter_rows(named=True), start=1):
        a = np.asarray(nib.load(r["label_path"]).dataobj)
        b = np.asarray(nib.load(r["label_path_other"]).dataobj)
        if a.shape != b.shape:
            raise ValueError(f"{r['label_path_other']}: shape {b.shape} differs from the primary's {a.shape}")
        for c, d in dice_per_class(a, b).items():
            if math.isfinite(d):
                per[c].append(d)
        if progress is not None:
            progress(k)
    return {NAMES[c]: {"mean": float(np.mean(v)) if v else float("nan"),
                       "min": float(np.min(v)) if v else float("nan"), "n": len(v)} for c, v in per.items()}


def metric_agreement(primary: pl.DataFrame, other: pl.DataFrame, body: pl.DataFrame) -> dict:
    """LMM index and InterMAT % of the other model against the primary (long muscle_metrics rows of each;
    ``body``: pseudonym, weight_kg, height_cm)."""
    tot = lambda df: df.filter(pl.col("muscle") == BACK_TOTAL).select("pseudonym", "lean_ml", "imat_pct")  # noqa: E731
    j = tot(primary).join(tot(other), on="pseudonym", suffix="_other").join(body, on="pseudonym")
    j = j.filter(pl.col("imat_pct").is_finite() & pl.col("imat_pct_other").is_finite())
    if j.height < 3:
        return {"n": j.height}
    per = (j["weight_kg"] / (j["height_cm"] / 100.0)).to_numpy()
    out = {"n": j.height}
    for name, a, b in (("lmm", j["lean_ml"].to_numpy() / per, j["lean_ml_other"].to_numpy() / per),
                       ("imat", j["imat_pct"].to_numpy(), j["imat_pct_other"].to_numpy())):
        out[name] = {"icc": icc_a1(b, a), **bland_altman(b, a), "proportional": proportional_bias(b, a),
                     "mean_primary": float(np.mean(a)), "mean_other": float(np.mean(b))}
    return out


def odds_ratios(cov: pl.DataFrame, scans: pl.DataFrame, metrics: pl.DataFrame, quarantine: pl.DataFrame, *,
                lmm_normaliser: str = "weight_per_height", nagq: int = 25) -> dict:
    """The two published analyses' exposure ORs (per 2 SD) from one model's metrics, and the cohort they ran on."""
    from cbp_platform.analysis.cohort import build_analysis_cohort
    from cbp_platform.stats import PAPER_COVARIATES, ModelCheckError, fit_glmm

    cohort = build_analysis_cohort(cov, scans, metrics, quarantine, lmm_normaliser=lmm_normaliser)
    out = {"analysed": cohort.n, "cohort_hash": cohort.cohort_hash, "analyses": {}}
    for name, (outcome, not_null) in ANALYSES.items():
        frame = cohort.frame.filter(pl.col(not_null).is_not_null()) if not_null else cohort.frame
        try:
            res = fit_glmm(frame, outcome, list(PAPER_COVARIATES), "site", nagq=nagq)
        except (ModelCheckError, ValueError, np.linalg.LinAlgError) as exc:
            out["analyses"][name] = {"error": str(exc), "nobs": frame.height}
            continue
        terms = {r["term"]: {"or": r["or"], "or_low": r["or_low"], "or_high": r["or_high"], "p": r["p"]}
                 for r in res.coefficients.iter_rows(named=True) if r["term"] in EXPOSURE_TERMS}
        out["analyses"][name] = {"nobs": res.nobs, "events": res.events, "terms": terms}
    return out


def forest_rows(ors_by_model: dict[str, dict]) -> pl.DataFrame:
    """One row per (analysis, term, model) with the OR and its CI: the forest plot's and the report's table."""
    rows = []
    for model, res in ors_by_model.items():
        for analysis, a in res["analyses"].items():
            for term, t in a.get("terms", {}).items():
                rows.append({"analysis": analysis, "term": term, "model": model, **t})
    return pl.DataFrame(rows, schema={"analysis": pl.String, "term": pl.String, "model": pl.String,
                                      "or": pl.Float64, "or_low": pl.Float64, "or_high": pl.Float64,
                                      "p": pl.Float64})
