"""The report's STROBE tables (cross-sectional studies, items 12-17) from ``model_results`` / ``model_fits``.

Per primary analysis (:mod:`cbp_platform.study`), in display form (text cells), each published as a CSV:

* :func:`main_results_table` (item 16a): per exposure the unadjusted OR (the exposure and the site alone) and the
  adjusted OR with its profile-likelihood CI and its Wald CI, per 2 SD;
* :func:`site_effect_table` (item 16 / 12b): the site SD and variance, the latent-scale ICC and the MOR with
  profile CIs, and the boundary test of the site variance;
* :func:`sensitivity_table` (items 12e, 17): the exposures' ORs under every estimator in one table: the primary
  AGQ fit (Wald and profile CIs), Laplace, site as a fixed effect, GEE (population-averaged) and, where it was
  run, the multiple-imputation analysis;
* :func:`prediction_table`, :func:`marginal_effects_table`, :func:`calibration_bins` (appendix): discrimination
  (AUC), calibration slope and calibration-in-the-large, the average marginal effect of each exposure per 2 SD,
  and the binned calibration table behind the calibration plot, whose cells under the disclosure limit (events or
  non-events of a bin) are suppressed.

Framework-free; the report (:mod:`cbp_platform.analysis.report`) renders them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import polars as pl

from cbp_platform import study
from cbp_platform.analysis.disclosure import MIN_COUNT, suppressed_marker
from cbp_platform.analysis.models import LAPLACE_MODEL, PROFILE_SUFFIX, UNADJUSTED_MODEL

MI_MODEL = "mi_glmm"
MODEL_LABELS = {
    "": "GLMM, AGQ (primary), Wald CI",
    PROFILE_SUFFIX: "GLMM, AGQ (primary), profile CI",
    LAPLACE_MODEL: "GLMM, Laplace approximation",
    "site_fixed": "Logistic regression, site as fixed effect",
    "gee": "GEE, exchangeable within site (population-averaged)",
    MI_MODEL: "GLMM, multiple imputation (Rubin's rules)",
    UNADJUSTED_MODEL: "GLMM, unadjusted (exposure + site)",
}


def _or(r: Mapping | None) -> str:
    if not r or r.get("or") is None or not all(math.isfinite(r[k]) for k in ("or", "or_low", "or_high")):
        return "n/a"
    return f"{r['or']:.2f} ({r['or_low']:.2f}-{r['or_high']:.2f})"


def _p(p) -> str:
    if p is None or not math.isfinite(p):
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _rows(results: pl.DataFrame, analysis: str, model: str) -> dict[str, dict]:
    r = results.filter((pl.col("analysis") == analysis) & (pl.col("model") == model))
    return {row["term"]: row for row in r.iter_rows(named=True)}


def assessment(fit: Mapping) -> dict | None:
    """The ``assessment`` JSON of a ``model_fits`` row (None for a secondary or failed analysis)."""
    raw = fit.get("assessment")
    return json.loads(raw) if raw else None


def main_results_table(results: pl.DataFrame, fit: Mapping) -> pl.DataFrame:
    """Unadjusted and adjusted ORs per 2 SD side by side, per exposure of the analysis."""
    a = study.find_analysis(fit["analysis"])
    primary = fit["primary_model"]
    adj, prof = _rows(results, fit["analysis"], primary), _rows(results, fit["analysis"], primary + PROFILE_SUFFIX)
    crude = _rows(results, fit["analysis"], UNADJUSTED_MODEL)
    rows = []
    for e in a.exposure_defs:
        t = e.z_column
        rows.append({"Exposure (per 2 SD)": e.label, "Unadjusted OR (95 % CI)": _or(crude.get(t)),
                     "Adjusted OR (95 % profile CI)": _or(prof.get(t)), "Adjusted OR (95 % Wald CI)": _or(adj.get(t)),
                     "p (adjusted, Wald)": _p(adj.get(t, {}).get("p"))})
    return pl.DataFrame(rows)


def site_effect_table(assess: Mapping) -> pl.DataFrame:
    """The site SD, variance, ICC and MOR with profile CIs, and the boundary test of the variance."""
    s = assess["site_effect"]
    f = lambda v, d=3: "n/a" if v is None or not math.isfinite(v) else f"{v:.{d}f}"  # noqa: E731
    vt = s["variance_test"]
    rows = [
        ("Site SD (logit scale)", f(s["sd"]), f"{f(s['sd_low'])}-{f(s['sd_high'])}"),
        ("Site variance", f(s["variance"], 4), f"{f(s['sd_low'] ** 2, 4)}-{f(s['sd_high'] ** 2, 4)}"),
        ("ICC (latent scale)", f(s["icc"]["estimate"], 4), f"{f(s['icc']['lower'], 4)}-{f(s['icc']['upper'], 4)}"),
        ("Median odds ratio", f(s["mor"]["estimate"]), f"{f(s['mor']['lower'])}-{f(s['mor']['upper'])}"),
        ("LRT of the site variance = 0 (chi-square, p)", f(vt["statistic"], 2),
         f"p = {_p(vt['pvalue'])} (50:50 mixture of chi-square(0) and (1))"),
    ]
    out = pl.DataFrame(rows, schema=["Measure", "Estimate", "95 % profile CI / test"], orient="row")
    if s.get("singular"):
        out = pl.concat([out, pl.DataFrame([("Singular fit", "site SD estimated as 0", "no Wald CI for the SD")],
                                           schema=out.columns, orient="row")])
    return out


def sensitivity_table(results: pl.DataFrame, fit: Mapping) -> pl.DataFrame:
    """The exposures' ORs (95 % CI) by estimator, one row per estimator (primary first)."""
    a = study.find_analysis(fit["analysis"])
    primary = fit["primary_model"]
    present = set(results.filter(pl.col("analysis") == fit["analysis"])["model"].to_list())
    order = [("", primary), (PROFILE_SUFFIX, primary + PROFILE_SUFFIX), (LAPLACE_MODEL, LAPLACE_MODEL),
             ("site_fixed", "site_fixed"), ("gee", "gee"), (MI_MODEL, MI_MODEL)]
    rows = []
    for label_key, model in order:
        if model not in present:
            continue
        got = _rows(results, fit["analysis"], model)
        row = {"Estimator": MODEL_LABELS[label_key]}
        for e in a.exposure_defs:
            row[f"{e.label} OR per 2 SD (95 % CI)"] = _or(got.get(e.z_column))
        rows.append(row)
    return pl.DataFrame(rows)


def prediction_table(assess: Mapping) -> pl.DataFrame:
    d, c = assess["discrimination"], assess["calibration"]
    return pl.DataFrame([
        ("AUC (c statistic), DeLong CI", f"{d['auc']:.3f}", f"{d['lower']:.3f}-{d['upper']:.3f}"),
        ("Calibration slope", f"{c['slope']:.3f}", f"{c['slope_lower']:.3f}-{c['slope_upper']:.3f}"),
        ("Calibration-in-the-large (intercept)", f"{c['intercept']:.3f}",
         f"{c['intercept_lower']:.3f}-{c['intercept_upper']:.3f}"),
    ], schema=["Measure", "Estimate", "95 % CI"], orient="row")


def marginal_effects_table(assess: Mapping) -> pl.DataFrame:
    rows = []
    for m in assess["marginal_effects"]:
        e = study.exposure_of(m["term"])
        rows.append({"Exposure": e.label if e is not None else m["term"],
                     "AME per 2 SD, percentage points (95 % CI)":
                         f"{100 * m['ame']:.2f} ({100 * m['lower']:.2f} to {100 * m['upper']:.2f})"})
    return pl.DataFrame(rows)


def calibration_bins(assess: Mapping, min_count: int = MIN_COUNT) -> pl.DataFrame:
    """The binned calibration table, published form: a bin whose events or non-events are under ``min_count``
    shows neither its counts nor its observed proportion."""
    marker = suppressed_marker(min_count)
    rows = []
    for b in assess["calibration"]["bins"]:
        small = b["events"] < min_count or b["n"] - b["events"] < min_count
        rows.append({"Bin": str(b["bin"]), "n": marker if b["n"] < min_count else str(b["n"]),
                     "Mean predicted": f"{b['mean_predicted']:.3f}",
                     "Events": marker if small else str(b["events"]),
                     "Observed (95 % CI)": marker if small else
                     f"{b['observed']:.3f} ({b['observed_low']:.3f}-{b['observed_high']:.3f})"})
    return pl.DataFrame(rows)


def analysis_tables(results: pl.DataFrame, fits: pl.DataFrame, min_count: int = MIN_COUNT) -> dict[str, dict]:
    """analysis key -> its STROBE tables (display form) and the numeric calibration bins (for the plot), for every
    fitted primary analysis with an assessment."""
    out = {}
    for fit in fits.iter_rows(named=True):
        a = study.find_analysis(fit["analysis"])
        assess = assessment(fit) if not fit.get("error") else None
        if a is None or assess is None:
            continue
        out[a.key] = {
            "main": main_results_table(results, fit), "site": site_effect_table(assess),
            "sensitivity": sensitivity_table(results, fit), "prediction": prediction_table(assess),
            "ame": marginal_effects_table(assess), "calibration": calibration_bins(assess, min_count),
            "bins": [b for b in assess["calibration"]["bins"]
                     if b["events"] >= min_count and b["n"] - b["events"] >= min_count],
            "label": a.label if hasattr(a, "label") else a.key, "mi": assess.get("multiple_imputation"),
        }
    return out
