"""Comparing two segmentation models on the same participants: label maps, metrics and the study's odds ratios.

* Dice between the two models' label maps, per platform class (mean and worst participant);
* ICC(A,1) and Bland-Altman of every exposure of :data:`cbp_platform.study.EXPOSURES` (LMM index, InterMAT %,
  and the secondary ones) between the models (the other model minus the primary, in % of the primary), with the
  proportional part;
* the paper's analyses' (CBP and NRS >= 4) odds ratios of LMM and InterMAT from each model's metrics, through the
  same analysis cohort rules and the same mixed model as the published analysis (so the only difference is the
  model);
* each model's agreement with the simulated truth where a truth exists (:mod:`cbp_platform.segmentation.accuracy`).

Framework-free; the ``model_comparison`` asset reads the warehouse and calls :func:`compare`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import nibabel as nib
import numpy as np
import polars as pl

from cbp_platform import study
from cbp_platform.classes import BACK_TOTAL, NAMES
from cbp_platform.metrics.agreement import bland_altman, icc_a1, proportional_bias
from cbp_platform.metrics.body_composition import dice_per_class

ANALYSES = study.PRIMARY_ANALYSES          # the paper's analyses: their ORs are compared between models


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


def _exposures(metrics: pl.DataFrame, body: pl.DataFrame, normaliser: study.Normaliser) -> pl.DataFrame:
    """pseudonym and every exposure's value (null where not finite) from long muscle_metrics rows and body size."""
    tot = metrics.filter(pl.col("muscle") == BACK_TOTAL).join(body, on="pseudonym")
    values = [e.expr(normaliser) for e in study.EXPOSURES]
    return tot.select("pseudonym", *(pl.when(v.is_finite()).then(v).alias(e.name)
                                     for e, v in zip(study.EXPOSURES, values)))


def metric_agreement(primary: pl.DataFrame, other: pl.DataFrame, body: pl.DataFrame, *,
                     lmm_normaliser: str = study.DEFAULT_NORMALISER) -> dict:
    """Every exposure (:data:`cbp_platform.study.EXPOSURES`, keyed by name) of the other model against the
    primary: ICC(A,1), Bland-Altman in % of the primary, proportional bias, means and ``n`` (participants with a
    finite value from both). ``primary`` / ``other``: long muscle_metrics rows; ``body``: pseudonym, weight_kg,
    height_cm. The top-level ``n``: participants both measured with every primary exposure finite."""
    norm = study.NORMALISERS[lmm_normaliser]
    j = _exposures(primary, body, norm).join(_exposures(other, body, norm), on="pseudonym", suffix="_other")
    both = lambda e: pl.col(e.name).is_not_null() & pl.col(f"{e.name}_other").is_not_null()  # noqa: E731
    n = j.filter(pl.all_horizontal([both(e) for e in study.PRIMARY_EXPOSURES])).height
    if n < 3:
        return {"n": n}
    out = {"n": n}
    for e in study.EXPOSURES:
        k = j.filter(both(e))
        if k.height < 3:
            continue
        a, b = k[e.name].to_numpy(), k[f"{e.name}_other"].to_numpy()
        out[e.name] = {"icc": icc_a1(b, a), **bland_altman(b, a), "proportional": proportional_bias(b, a),
                       "mean_primary": float(np.mean(a)), "mean_other": float(np.mean(b)), "n": k.height}
    return out


def odds_ratios(cov: pl.DataFrame, scans: pl.DataFrame, metrics: pl.DataFrame, quarantine: pl.DataFrame, *,
                lmm_normaliser: str = "weight_per_height", nagq: int = 25) -> dict:
    """The paper's analyses' exposure ORs (per 2 SD) from one model's metrics, and the cohort they ran on."""
    from cbp_platform.analysis.cohort import build_analysis_cohort
    from cbp_platform.stats import ModelCheckError, fit_glmm

    cohort = build_analysis_cohort(cov, scans, metrics, quarantine, lmm_normaliser=lmm_normaliser)
    out = {"analysed": cohort.n, "cohort_hash": cohort.cohort_hash, "analyses": {}}
    for a in ANALYSES:
        frame = a.data(cohort.frame)
        try:
            res = fit_glmm(frame, a.outcome, list(a.fixed), study.SITE, nagq=nagq)
        except (ModelCheckError, ValueError, np.linalg.LinAlgError) as exc:
            out["analyses"][a.name] = {"error": str(exc), "nobs": frame.height}
            continue
        terms = {r["term"]: {"or": r["or"], "or_low": r["or_low"], "or_high": r["or_high"], "p": r["p"]}
                 for r in res.coefficients.iter_rows(named=True) if r["term"] in a.exposure_terms}
        out["analyses"][a.name] = {"nobs": res.nobs, "events": res.events, "terms": terms}
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
