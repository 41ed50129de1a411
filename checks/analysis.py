"""Checks of the cohort-level analysis: the analysis cohort's content (Great Expectations) and the fitted models
(converged, finite CIs, no separation, enough events per variable: the named outcomes that
:mod:`cbp_platform.stats.checks` attached to the fit)."""

import json

import dagster as dg

from assets.analysis import analysis_cohort, cbp_association_model, pain_intensity_model
from checks.gx import outcomes_metadata, run_suite
from resources import Warehouse

MODEL_COLUMNS = ("site", "cbp", "lmm_z2", "imat_z2", "age_10y", "female", "diabetes", "dyslipidemia",
                 "osteoporosis", "osteoarthritis", "pa_moderate", "pa_high")


def cohort_expectations() -> list:
    from cbp_platform.landing import SITES

    exp = [("ExpectColumnValuesToNotBeNull", {"column": c}) for c in MODEL_COLUMNS]
    exp.append(("ExpectColumnValuesToBeUnique", {"column": "pseudonym"}))
    exp.append(("ExpectColumnValuesToBeInSet", {"column": "site", "value_set": list(SITES)}))
    exp.append(("ExpectColumnValuesToBeBetween", {"column": "age", "min_value": 19, "max_value": 74}))
    exp.append(("ExpectColumnValuesToBeBetween", {"column": "imat", "min_value": 0.0, "max_value": 100.0}))
    exp.append(("ExpectColumnValuesToBeBetween", {"column": "lmm", "min_value": 0.0, "strict_min": True}))
    exp.append(("ExpectColumnMeanToBeBetween", {"column": "lmm_z2", "min_value": -1e-6, "max_value": 1e-6}))
    exp.append(("ExpectColumnStdevToBeBetween", {"column": "lmm_z2", "min_value": 0.5 - 1e-6,
                                                  "max_value": 0.5 + 1e-6}))
    return exp


@dg.asset_check(asset=analysis_cohort, blocking=True,
                description="Model columns complete, one row per participant, sites known, age 19-74, InterMAT "
                            "0-100 %, LMM > 0, exposures standardised to mean 0 and SD 1/2 (per 2 SD).")
def analysis_cohort_expectations(warehouse: Warehouse) -> dg.AssetCheckResult:
    df = warehouse.table("analysis_cohort", order_by=["pseudonym"])
    outcomes = run_suite("analysis_cohort", df, cohort_expectations())
    md = outcomes_metadata(outcomes)
    md["results"] = dg.MetadataValue.md(md["results"])
    return dg.AssetCheckResult(passed=md["failed_expectations"] == 0 and df.height > 0, metadata=md)


def _model_check(warehouse: Warehouse, analysis: str) -> dg.AssetCheckResult:
    fits = warehouse.table("model_fits", columns=["checks", "cohort_hash"], where={"analysis": analysis},
                           missing_ok=True)
    if fits is None or fits.height == 0:
        return dg.AssetCheckResult(passed=False, metadata={"error": f"no fit of {analysis} in model_fits"})
    outcomes = json.loads(fits["checks"][0])
    blocking = [o for o in outcomes if o["status"] == "fail" and o["severity"] == "error"]
    warnings = [o for o in outcomes if o["status"] == "fail" and o["severity"] != "error"]
    table = ["| check | status | severity | message |", "|---|---|---|---|"]
    table += [f"| {o['name']} | {o['status']} | {o['severity']} | {o['message']} |" for o in outcomes]
    return dg.AssetCheckResult(
        passed=not blocking,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"checks": dg.MetadataValue.md("\n".join(table)),
                  "failed": [o["name"] for o in blocking], "warnings": [o["name"] for o in warnings],
                  "cohort_hash": fits["cohort_hash"][0]})


@dg.asset_check(asset=cbp_association_model, blocking=True,
                description="Converged (Newton decrement, gradient), positive-definite information, finite CIs, "
                            "no separation, events per variable >= 10, every site with >= 2 participants.")
def cbp_model_checks(warehouse: Warehouse) -> dg.AssetCheckResult:
    return _model_check(warehouse, "cbp_association_model")


@dg.asset_check(asset=pain_intensity_model, blocking=True,
                description="The same model checks for the NRS >= 4 model.")
def pain_model_checks(warehouse: Warehouse) -> dg.AssetCheckResult:
    return _model_check(warehouse, "pain_intensity_model")
