"""Checks of the cohort-level analysis: the analysis cohort's content (Great Expectations) and the fitted models
(converged, finite CIs, no separation, enough events per variable: the named outcomes that
:mod:`cbp_platform.stats.checks` attached to the fit)."""

import json

import dagster as dg

from assets.analysis import analysis_cohort, cbp_association_model, pain_intensity_model
from cbp_platform import study
from checks.gx import outcomes_metadata, run_suite
from resources import Warehouse

# The paper's models' columns (cbp_platform.study): never null in the analysed cohort. A secondary exposure may be
# unmeasured for some participants; its models drop them explicitly (Analysis.data) and report their n.
# The CBP outcome is never null (an exclusion rule); NRS may be (its model drops the unanswered).
CBP_ANALYSIS = study.PRIMARY_ANALYSES[0]
MODEL_COLUMNS = tuple(dict.fromkeys((study.SITE, CBP_ANALYSIS.outcome,
                                     *(c for a in study.PRIMARY_ANALYSES for c in a.fixed))))


def _exposure_expectations(e: study.Exposure) -> list:
    lo, hi = e.bounds
    out = []
    if lo is not None or hi is not None:
        bounds = {"min_value": lo, "max_value": hi} if hi is not None else {"min_value": lo}
        out.append(("ExpectColumnValuesToBeBetween", {"column": e.name, **bounds,
                                                      **({"strict_min": True} if e.strict_min else {})}))
    # standardised per k SD: mean 0 and SD 1/k over the participants who have it
    out.append(("ExpectColumnMeanToBeBetween", {"column": e.z_column, "min_value": -1e-6, "max_value": 1e-6}))
    out.append(("ExpectColumnStdevToBeBetween", {"column": e.z_column, "min_value": 1 / e.sd_multiple - 1e-6,
                                                  "max_value": 1 / e.sd_multiple + 1e-6}))
    return out


def cohort_expectations() -> list:
    from cbp_platform.landing import SITES

    exp = [("ExpectColumnValuesToNotBeNull", {"column": c}) for c in MODEL_COLUMNS]
    exp.append(("ExpectColumnValuesToBeUnique", {"column": "pseudonym"}))
    exp.append(("ExpectColumnValuesToBeInSet", {"column": "site", "value_set": list(SITES)}))
    exp.append(("ExpectColumnValuesToBeBetween", {"column": "age", "min_value": 19, "max_value": 74}))
    for e in study.EXPOSURES:
        exp += _exposure_expectations(e)
    return exp


@dg.asset_check(asset=analysis_cohort, blocking=True,
                description="Model columns complete, one row per participant, sites known, age 19-74, every "
                            "exposure in its plausible range (InterMAT 0-100 %, LMM > 0 ...) and standardised to "
                            "mean 0 and SD 1/2 (per 2 SD).")
def analysis_cohort_expectations(warehouse: Warehouse) -> dg.AssetCheckResult:
    df = warehouse.table("analysis_cohort", order_by=["pseudonym"])
    outcomes = run_suite("analysis_cohort", df, cohort_expectations())
    md = outcomes_metadata(outcomes)
    md["results"] = dg.MetadataValue.md(md["results"])
    return dg.AssetCheckResult(passed=md["failed_expectations"] == 0 and df.height > 0, metadata=md)


def _model_check(warehouse: Warehouse, model_asset: str) -> dg.AssetCheckResult:
    """The named model checks of every analysis the model asset fits (cbp_platform.study.analyses_fitted_by).
    Blocking: an error-level failure of its primary (the paper's) analysis. A secondary analysis' failures are
    reported (``secondary_failed``) without blocking the paper's results; the report says it was not fitted."""
    analyses = study.analyses_fitted_by(model_asset)
    fits = warehouse.table("model_fits", where={"analysis": [a.name for a in analyses]}, missing_ok=True)
    have = {r["analysis"]: r for r in fits.iter_rows(named=True)} if fits is not None else {}
    primary = analyses[0]
    if primary.name not in have:
        return dg.AssetCheckResult(passed=False, metadata={"error": f"no fit of {primary.name} in model_fits"})
    table = ["| analysis | check | status | severity | message |", "|---|---|---|---|---|"]
    blocking, warnings, secondary_failed = [], [], []
    for a in analyses:
        if a.name not in have:
            secondary_failed.append(f"{a.name}: not fitted")
            continue
        for o in json.loads(have[a.name]["checks"] or "[]"):
            table.append(f"| {a.name} | {o['name']} | {o['status']} | {o['severity']} | {o['message']} |")
            if o["status"] != "fail":
                continue
            if a.role != study.PRIMARY:
                secondary_failed.append(f"{a.name}: {o['name']}")
            elif o["severity"] == "error":
                blocking.append(o["name"])
            else:
                warnings.append(o["name"])
    return dg.AssetCheckResult(
        passed=not blocking,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"checks": dg.MetadataValue.md("\n".join(table)), "failed": blocking, "warnings": warnings,
                  "secondary_failed": secondary_failed, "cohort_hash": have[primary.name]["cohort_hash"]})


@dg.asset_check(asset=cbp_association_model, blocking=True,
                description="Converged (Newton decrement, gradient), positive-definite information, finite CIs, "
                            "no separation, events per variable >= 10, every site with >= 2 participants; for the "
                            "paper's model, and reported for its secondary-exposure models.")
def cbp_model_checks(warehouse: Warehouse) -> dg.AssetCheckResult:
    return _model_check(warehouse, cbp_association_model.key.to_user_string())


@dg.asset_check(asset=pain_intensity_model, blocking=True,
                description="The same model checks for the NRS >= 4 model (and its secondary-exposure models).")
def pain_model_checks(warehouse: Warehouse) -> dg.AssetCheckResult:
    return _model_check(warehouse, pain_intensity_model.key.to_user_string())
