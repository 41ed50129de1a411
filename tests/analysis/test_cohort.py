"""The analysis cohort: exclusion flow, each rule, derived variables, the cohort hash, the participant trace."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import numpy as np
import polars as pl
import pytest

from cbp_platform.analysis.cohort import EXCLUSION_CODES, build_analysis_cohort, met_category, participant_trace
from cbp_platform.analysis.disclosure import find_pseudonyms
from cbp_platform.qc.reviews import effective_reviews
from cbp_platform.synth.cohort import exclusion_cause

from tests.support.synthetic import quarantine_rows, warehouse_tables

SIM_CAUSE = {"missing_cbp_answer": "cbp_not_answered", "missing_physical_activity": "physical_activity_missing",
             "missing_comorbidity": "comorbidity_missing", "image_qc_fat_water_swap": "fat_water_swap_suspected"}


def _build(t: dict, **kw):
    return build_analysis_cohort(t["covariates"], t["scans"], t["metrics"], t["quarantine"],
                                 rejected=t.get("rejected"), retired=t.get("retired"), withdrawn=t.get("withdrawn"),
                                 **kw)


def test_flow_reconciles(cohort):
    flow = cohort.flow
    # the documented order (docs/analysis.md); the simulator's exclusion_cause follows the same order
    assert flow["criterion"].to_list() == [
        "start", "consent_withdrawn", "delivery_retired", "scan_not_ingested", "covariates_invalid", "duplicate_records", "age_outside_19_74",
        "cbp_not_answered", "physical_activity_missing", "comorbidity_missing", "fat_water_swap_suspected",
        "qc_rejected", "no_muscle_metrics", "analysed"]
    start = flow.filter(pl.col("criterion") == "start")["remaining"].item()
    analysed = flow.filter(pl.col("criterion") == "analysed")["remaining"].item()
    excluded = flow["excluded"].drop_nulls().sum()
    assert start == 3000
    assert start - excluded == analysed == cohort.frame.height == cohort.n
    # each step's remaining is the previous remaining minus its excluded
    rem = flow["remaining"].to_list()
    exc = flow["excluded"].to_list()
    for i in range(1, len(rem) - 1):
        assert rem[i] == rem[i - 1] - exc[i]
    assert cohort.exclusions.height == excluded
    assert set(cohort.exclusions["pseudonym"]).isdisjoint(cohort.frame["pseudonym"])


def test_flow_matches_the_simulated_truth(tables, cohort):
    """The rule order follows the simulator's exclusion_cause: the counts per reason agree exactly."""
    truth = tables["truth"].with_columns(exclusion_cause(tables["truth"]).alias("cause"))
    expected = {SIM_CAUSE[k]: v for k, v in truth.group_by("cause").len().iter_rows() if k is not None}
    got = {r["criterion"]: r["excluded"] for r in cohort.flow.iter_rows(named=True) if r["excluded"]}
    assert got == expected
    want = truth.filter(pl.col("cause").is_null())["pseudonym"].sort().to_list()
    assert cohort.frame["pseudonym"].to_list() == want


def test_flow_and_frame_shapes_hold_no_pseudonym_in_flow(cohort):
    text = cohort.flow.write_csv()
    assert find_pseudonyms(text, cohort.frame["pseudonym"].to_list() + cohort.exclusions["pseudonym"].to_list()) == []
    assert cohort.frame["pseudonym"].is_unique().all()
    assert cohort.frame["pseudonym"].to_list() == sorted(cohort.frame["pseudonym"].to_list())


def _fail(t: dict, code: str, p: str) -> dict:
    """``t`` changed so that participant ``p`` fails exclusion rule ``code`` (as ingestion would record it)."""
    t = dict(t)
    me = pl.col("pseudonym") == p
    q = []

    def cov_null(col):
        return t["covariates"].with_columns(pl.when(me).then(None).otherwise(pl.col(col)).alias(col))

    if code == "scan_not_ingested":
        t["scans"] = t["scans"].filter(~me)
        q.append(dict(pseudonym=p, stage="raw_mri_scans", reason="corrupt_gzip"))
    elif code == "covariates_invalid":
        t["covariates"] = t["covariates"].filter(~me)
        q.append(dict(pseudonym=p, stage="participant_covariates", reason="out_of_range"))
    elif code == "duplicate_records":          # two valid covariate rows in different batches
        t["covariates"] = pl.concat([t["covariates"], t["covariates"].filter(me).with_columns(
            pl.lit("sim-d02-b000").alias("batch_key"), pl.lit("sim-d02").alias("delivery_id"))])
    elif code == "age_outside_19_74":
        t["covariates"] = t["covariates"].with_columns(
            pl.when(me).then(80).otherwise(pl.col("age")).cast(pl.Int16).alias("age"))
    elif code == "cbp_not_answered":
        t["covariates"] = cov_null("cbp")
    elif code == "physical_activity_missing":
        t["covariates"] = cov_null("met_min_week")
    elif code == "comorbidity_missing":
        t["covariates"] = cov_null("osteoporosis")
    elif code == "fat_water_swap_suspected":   # flagged at ingestion QC, hence not segmented
        t["scans"] = t["scans"].with_columns((pl.col("swap_suspected") | me).alias("swap_suspected"))
        t["metrics"] = t["metrics"].filter(~me)
        q.append(dict(pseudonym=p, stage="muscle_segmentations", reason="fat_water_swap_suspected"))
    elif code == "qc_rejected":               # a reviewer rejected the current label map (metrics present)
        prev = t.get("rejected")
        t["rejected"] = pl.concat([prev, pl.DataFrame({"pseudonym": [p]})]) if prev is not None else \
            pl.DataFrame({"pseudonym": [p]})
    elif code == "consent_withdrawn":         # in the withdrawal register when the release was cut
        prev = t.get("withdrawn")
        t["withdrawn"] = pl.concat([prev, pl.DataFrame({"pseudonym": [p]})]) if prev is not None else \
            pl.DataFrame({"pseudonym": [p]})
    elif code == "delivery_retired":          # data in force from a retired delivery (the release records it)
        prev = t.get("retired")
        t["retired"] = pl.concat([prev, pl.DataFrame({"pseudonym": [p]})]) if prev is not None else \
            pl.DataFrame({"pseudonym": [p]})
    elif code == "no_muscle_metrics":
        t["metrics"] = t["metrics"].filter(~me)
        q.append(dict(pseudonym=p, stage="muscle_segmentations", reason="unreadable_scan"))
    else:
        raise AssertionError(code)
    if q:
        t["quarantine"] = pl.concat([t["quarantine"], quarantine_rows(q)])
    return t


@pytest.fixture()
def crafted():
    """80 participants; among the analysable ones: one per rule, one per pair of consecutive rules, edge cases."""
    t = warehouse_tables(80, seed=21, batches=2)
    t.pop("truth")
    base = _build(t)
    ok = iter(base.frame["pseudonym"].to_list())
    roles: dict[str, str] = {}
    expected: dict[str, str] = {}
    for code in EXCLUSION_CODES:                           # each rule alone
        p = roles[code] = next(ok)
        t = _fail(t, code, p)
        expected[p] = code
    for first, second in zip(EXCLUSION_CODES, EXCLUSION_CODES[1:]):   # counted at the first rule only
        p = roles[f"{first}+{second}"] = next(ok)
        t = _fail(_fail(t, second, p), first, p)
        expected[p] = first
    # a non-finite lean volume
    p = roles["nan"] = next(ok)
    t["metrics"] = t["metrics"].with_columns(
        pl.when((pl.col("pseudonym") == p) & (pl.col("muscle") == "back_total")).then(float("nan"))
        .otherwise(pl.col("lean_ml")).alias("lean_ml"))
    expected[p] = "no_muscle_metrics"
    # the same pseudonym re-delivered later: quarantined there as a duplicate, still analysed from the first
    p = roles["dup_ok"] = next(ok)
    t["quarantine"] = pl.concat([t["quarantine"], quarantine_rows(
        [dict(pseudonym=p, stage="raw_mri_scans", reason="duplicate_pseudonym"),
         dict(pseudonym=p, stage="participant_covariates", reason="duplicate_pseudonym")])])
    # a participant known only from the quarantine (every record failed)
    t["quarantine"] = pl.concat([t["quarantine"], quarantine_rows(
        [dict(pseudonym="ZZZZZZZZZ2", stage="raw_mri_scans", reason="missing_fat"),
         dict(pseudonym="ZZZZZZZZZ2", stage="participant_covariates", reason="malformed_row")])])
    expected["ZZZZZZZZZ2"] = "scan_not_ingested"
    return base, _build(t), roles, expected, t


def test_each_exclusion_reason_fires_first_rule_wins(crafted):
    base, cohort, roles, expected, _ = crafted
    reason = dict(cohort.exclusions.iter_rows())
    for p, code in expected.items():
        assert reason.get(p) == code, (code, [k for k, v in roles.items() if v == p])
    assert roles["dup_ok"] in cohort.frame["pseudonym"].to_list()
    # flow: one more participant at the start (quarantine only); each rule +1 alone, +1 as first of a pair
    b = {r["criterion"]: r["excluded"] for r in base.flow.iter_rows(named=True)}
    c = {r["criterion"]: r["excluded"] for r in cohort.flow.iter_rows(named=True)}
    for code in EXCLUSION_CODES:
        extra = 1 + (code != EXCLUSION_CODES[-1]) + (code == "scan_not_ingested") + (code == "no_muscle_metrics")
        assert c[code] - b[code] == extra, code
    assert cohort.flow["remaining"][0] == base.flow["remaining"][0] + 1
    assert cohort.n == base.n - (len(expected) - 1)


def test_participant_trace_agrees_with_the_cohort(crafted):
    _, cohort, roles, _, t = crafted
    reasons = dict(cohort.exclusions.iter_rows())
    rejected = set(t["rejected"]["pseudonym"].to_list())

    maps = pl.DataFrame({"pseudonym": sorted(rejected), "label_sha256": ["ab" * 32] * len(rejected)})
    history = pl.DataFrame({"review_id": [f"r{i}" for i in range(len(rejected))], "pseudonym": sorted(rejected),
                            "decision": ["reject"] * len(rejected), "reason": ["misregistered"] * len(rejected),
                            "reviewer": ["dr-a"] * len(rejected), "label_sha256": ["ab" * 32] * len(rejected),
                            "reviewed_at": [datetime(2026, 12, 3, 10, tzinfo=timezone.utc)] * len(rejected)})
    in_force = {r["pseudonym"]: r for r in effective_reviews(history, maps).iter_rows(named=True)}

    def review(p: str) -> dict | None:        # the participant's row of effective_reviews, as cbp lineage reads it
        return in_force.get(p)

    retired = set(t["retired"]["pseudonym"].to_list())
    withdrawn = set(t["withdrawn"]["pseudonym"].to_list())
    for role, p in roles.items():
        tr = participant_trace(p, t["covariates"], t["scans"], t["metrics"], t["quarantine"], review(p),
                               retired_by="sim-d01" if p in retired else None,
                               withdrawn="all" if p in withdrawn else None)
        assert tr.exclusion_reason == reasons.get(p), role
        assert tr.included == (p not in reasons)
        assert tr.stages[-1]["stage"] == "analysis_cohort"
    swap = participant_trace(roles["fat_water_swap_suspected"], t["covariates"], t["scans"], t["metrics"],
                             t["quarantine"])
    by_stage = {s["stage"]: s for s in swap.stages}
    assert by_stage["raw_mri_scans"]["detail"] == "swap suspected"
    assert by_stage["muscle_segmentations"]["status"] == "quarantined"
    assert by_stage["muscle_metrics"]["status"] == "absent"
    assert "fat_water_swap_suspected" in swap.to_text()
    qc = participant_trace(roles["qc_rejected"], t["covariates"], t["scans"], t["metrics"], t["quarantine"],
                           review(roles["qc_rejected"]))
    assert "qc_review              rejected: by dr-a at 2026-12-03 10:00:00+00:00: misregistered" in qc.to_text()
    assert qc.exclusion_reason == "qc_rejected"
    # an outdated review is shown and not applied: the participant is analysed
    replaced = maps.with_columns(pl.lit("cd" * 32).alias("label_sha256"))     # the map was made again
    stale = effective_reviews(history, replaced).filter(pl.col("pseudonym") == roles["qc_rejected"]).row(
        0, named=True)
    assert stale["decision"] is None and stale["outdated"]
    again = participant_trace(roles["qc_rejected"], t["covariates"], t["scans"], t["metrics"], t["quarantine"],
                              stale)
    assert again.included and "outdated" in again.to_text()
    ok = participant_trace(roles["dup_ok"], t["covariates"], t["scans"], t["metrics"], t["quarantine"])
    assert ok.included and ok.exclusion_reason is None
    assert [s["status"] for s in ok.stages if s["stage"] == "raw_mri_scans"] == ["ok", "quarantined"]
    gone = participant_trace("ZZZZZZZZZ3", t["covariates"], t["scans"], t["metrics"], t["quarantine"])
    assert gone.exclusion_reason == "not_delivered" and not gone.included


def _shuffle(df: pl.DataFrame, seed: int) -> pl.DataFrame:
    return df.sample(fraction=1.0, shuffle=True, seed=seed)


def test_cohort_hash_is_stable_under_row_and_batch_order(tables, cohort):
    def batches_reversed(df):
        keys = sorted(df["batch_key"].unique().to_list(), reverse=True)
        return pl.concat([df.filter(pl.col("batch_key") == k) for k in keys])

    t2 = {k: _shuffle(batches_reversed(v), seed=i) for i, (k, v) in enumerate(tables.items()) if k != "truth"}
    again = _build(t2)
    assert again.cohort_hash == cohort.cohort_hash
    assert again.frame.equals(cohort.frame)
    assert again.flow.equals(cohort.flow)
    assert again.standardisation == cohort.standardisation
    # re-batching the same data (other batch keys) does not change it either
    t3 = {k: (v.with_columns(pl.lit("other-b000").alias("batch_key")) if "batch_key" in v.columns else v)
          for k, v in tables.items() if k != "truth"}
    assert _build(t3).cohort_hash == cohort.cohort_hash


def test_cohort_hash_changes_with_content(tables, cohort):
    p = cohort.frame["pseudonym"][17]
    cov = tables["covariates"].with_columns(
        pl.when(pl.col("pseudonym") == p).then(pl.col("weight_kg") + 0.1).otherwise(pl.col("weight_kg"))
        .alias("weight_kg"))
    changed = build_analysis_cohort(cov, tables["scans"], tables["metrics"], tables["quarantine"])
    assert changed.cohort_hash != cohort.cohort_hash
    # a value of an excluded participant does not reach the analysed frame
    x = cohort.exclusions.filter(pl.col("reason") == "cbp_not_answered")["pseudonym"][0]
    cov = tables["covariates"].with_columns(
        pl.when(pl.col("pseudonym") == x).then(pl.col("weight_kg") + 5).otherwise(pl.col("weight_kg"))
        .alias("weight_kg"))
    assert build_analysis_cohort(cov, tables["scans"], tables["metrics"],
                                 tables["quarantine"]).cohort_hash == cohort.cohort_hash
    assert _build(tables, lmm_normaliser="per_height2").cohort_hash != cohort.cohort_hash


def test_derived_variables(tables, cohort):
    f = cohort.frame.join(tables["truth"].select("pseudonym", "lmm_true", "imat_true", "bmi"), on="pseudonym",
                          suffix="_truth")
    np.testing.assert_allclose(f["lmm"].to_numpy(), f["lmm_true"].to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(f["imat"].to_numpy(), f["imat_true"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(f["bmi"].to_numpy(), f["bmi_truth"].to_numpy(), rtol=2e-3)
    assert cohort.lmm_normaliser == "weight_per_height" and cohort.lmm_unit == "cm3/(kg/m)"
    for var in ("lmm", "imat"):
        s = cohort.standardisation[var]
        x = f[var].to_numpy()
        assert s["mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert s["sd"] == pytest.approx(x.std(ddof=1), rel=1e-12)
        z = cohort.frame[f"{var}_z2"].to_numpy()
        assert z.mean() == pytest.approx(0.0, abs=1e-12)
        assert z.std(ddof=1) == pytest.approx(0.5, rel=1e-12)    # per 2 SD
    fr = cohort.frame
    assert (fr["age_10y"] == (fr["age"] - 50) / 10).all()
    assert (fr["pa_moderate"] == (fr["met_category"] == "500-5000")).all()
    assert (fr["pa_high"] == (fr["met_min_week"] > 5000)).all()
    nrs = cohort.frame.select("nrs_pain", "nrs_high").drop_nulls()
    assert (nrs["nrs_high"] == (nrs["nrs_pain"] >= 4)).all()
    h2 = _build(tables, lmm_normaliser="per_height2")
    exp = h2.frame["lean_ml"] / (h2.frame["height_cm"] / 100) ** 2
    np.testing.assert_allclose(h2.frame["lmm"].to_numpy(), exp.to_numpy(), rtol=1e-12)
    assert h2.lmm_unit == "cm3/m2"
    with pytest.raises(ValueError, match="unknown lmm_normaliser"):
        _build(tables, lmm_normaliser="per_shoe_size")


def test_met_category_boundaries_and_nrs_null():
    df = pl.DataFrame({"met": [0, 499, 500, 5000, 5001, None]})
    got = df.select(met_category(pl.col("met")).cast(pl.String).alias("c"))["c"].to_list()
    assert got == ["<500", "<500", "500-5000", "500-5000", ">5000", None]


def test_nrs_missing_gives_null_nrs_high(tables):
    t = dict(tables)
    p = t["covariates"].filter(pl.col("cbp").is_not_null() & pl.col("met_min_week").is_not_null())["pseudonym"][0]
    t["covariates"] = t["covariates"].with_columns(
        pl.when(pl.col("pseudonym") == p).then(None).otherwise(pl.col("nrs_pain")).alias("nrs_pain"))
    c = _build(t)
    row = c.frame.filter(pl.col("pseudonym") == p)
    if row.height:                      # p may be excluded for a later reason (comorbidity, swap)
        assert row["nrs_high"][0] is None
    assert c.frame["nrs_high"].null_count() == (1 if row.height else 0)


def test_empty_input_gives_an_empty_cohort():
    from tests.support.synthetic import COMORB
    cov = pl.DataFrame(schema={"pseudonym": pl.String, "site": pl.String, "exam_date": pl.Date, "age": pl.Int16,
                               "sex": pl.String, "height_cm": pl.Float64, "weight_kg": pl.Float64, "cbp": pl.Boolean,
                               "nrs_pain": pl.Int8, "met_min_week": pl.Int32, **{c: pl.Boolean for c in COMORB}})
    c = build_analysis_cohort(cov, pl.DataFrame(schema={"pseudonym": pl.String, "swap_suspected": pl.Boolean}),
                              pl.DataFrame(schema={"pseudonym": pl.String, "muscle": pl.String,
                                                   "lean_ml": pl.Float64, "imat_pct": pl.Float64}), None)
    assert c.n == 0 and c.flow["remaining"].to_list() == [0] * len(c.flow)
    assert math.isnan(c.standardisation["lmm"]["mean"])


def test_imputation_frame_is_the_mi_population(tables, cohort):
    """Analysed + excluded only for missing activity / comorbidity answers; nulls exactly where answers are missing."""
    truth = tables["truth"]
    only_answers = (~pl.col("missing_cbp") & (pl.col("fat_water_swap") == "none")
                    & (pl.col("missing_met") | pl.col("missing_comorbidity").is_not_null()))
    extra = truth.filter(only_answers)["pseudonym"].to_list()
    mi = cohort.imputation_frame
    assert extra and cohort.n_imputable == len(extra)
    assert mi["pseudonym"].to_list() == sorted(cohort.frame["pseudonym"].to_list() + extra)
    assert mi.columns == cohort.frame.columns
    # the complete cases are the analysed frame, row for row (same standardisation: per 2 SD of the primary)
    assert mi.filter(pl.col("pseudonym").is_in(cohort.frame["pseudonym"].implode())).equals(cohort.frame)
    f = mi.join(truth.select("pseudonym", "missing_met", "missing_comorbidity", "met_min_week", "lmm_true"),
                on="pseudonym", suffix="_truth")
    for c in ("met_min_week", "met_category", "pa_moderate", "pa_high"):
        assert (f[c].is_null() == f["missing_met"]).all(), c
    for c in ("diabetes", "dyslipidemia", "osteoporosis", "osteoarthritis"):
        assert (f[c].is_null() == (f["missing_comorbidity"].fill_null("") == c)).all(), c
    for c in ("cbp", "age_10y", "female", "lmm_z2", "imat_z2", "site"):
        assert f[c].null_count() == 0, c
    known = f.filter(~pl.col("missing_met"))
    assert (known["met_min_week"] == known["met_min_week_truth"]).all()
    assert (known["pa_high"] == (known["met_min_week"] > 5000)).all()
    s = cohort.standardisation["lmm"]
    np.testing.assert_allclose(f["lmm_z2"].to_numpy(), (f["lmm"].to_numpy() - s["mean"]) / (2 * s["sd"]), rtol=1e-12)
    # the flow is the complete-case one: the imputable participants are still counted at their first rule
    reasons = dict(cohort.exclusions.iter_rows())
    assert {reasons[p] for p in extra} <= {"physical_activity_missing", "comorbidity_missing"}


def test_imputable_only_when_no_other_rule_fails(crafted):
    _, cohort, roles, _, _ = crafted
    mi = set(cohort.imputation_frame["pseudonym"].to_list())
    assert roles["physical_activity_missing"] in mi and roles["comorbidity_missing"] in mi
    assert roles["physical_activity_missing+comorbidity_missing"] in mi
    for role in ("cbp_not_answered+physical_activity_missing", "comorbidity_missing+fat_water_swap_suspected",
                 "cbp_not_answered", "fat_water_swap_suspected", "age_outside_19_74+cbp_not_answered"):
        assert roles[role] not in mi, role
    assert mi >= set(cohort.frame["pseudonym"].to_list())


def test_imputation_missingness_counts_and_suppression(cohort):
    from cbp_platform.analysis.cohort import IMPUTED_VARIABLES, imputation_missingness
    from cbp_platform.analysis.disclosure import SUPPRESSED

    raw = imputation_missingness(cohort)
    mi = cohort.imputation_frame
    for r in raw.iter_rows(named=True):
        part = mi if r["site"] == "all sites" else mi.filter(pl.col("site") == r["site"])
        assert (r["participants_n"], r["missing_n"]) == (part.height, part[r["variable"]].null_count())
    assert set(raw["variable"]) == set(IMPUTED_VARIABLES)
    pub = imputation_missingness(cohort, publishable=True)
    assert pub.height == raw.height
    for r, p in zip(raw.iter_rows(named=True), pub.iter_rows(named=True)):
        if r["missing_n"] < 5:
            assert p["missing_n"] == SUPPRESSED and p["missing_pct"] == SUPPRESSED
        elif p["missing_n"] != SUPPRESSED:
            assert p["missing_n"] == str(r["missing_n"])
    # never exactly one hidden site cell per variable (the all-sites row would give it away)
    for v in IMPUTED_VARIABLES:
        hidden = pub.filter((pl.col("variable") == v) & (pl.col("site") != "all sites")
                            & (pl.col("missing_n") == SUPPRESSED)).height
        assert hidden != 1, v
    assert find_pseudonyms(pub.write_csv(), mi["pseudonym"].to_list()) == []
