"""The study vocabulary (cbp_platform.study): lookups, the paper's analyses as specified, the guard that nothing
else spells an exposure, and the secondary exposure (muscle fat fraction) through cohort, models and report."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cbp_platform import study
from cbp_platform.analysis.cohort import FRAME_COLUMNS, HASH_COLUMNS, build_analysis_cohort, cohort_hash
from cbp_platform.metrics.body_composition import METRIC_SCHEMA

ROOT = Path(__file__).resolve().parents[2]
FAT_FRACTION = study.exposure("ff")


# --------------------------------------------------------------------------------------------------------
# lookups and the paper's specification


def test_lookups():
    assert [e.name for e in study.PRIMARY_EXPOSURES] == ["lmm", "imat"]
    assert study.exposure("lmm") is study.LMM and study.exposure("imat") is study.IMAT
    with pytest.raises(KeyError, match="known: lmm, imat"):
        study.exposure("lean")
    assert study.exposure_of("imat_z2") is study.IMAT and study.exposure_of("lmm") is study.LMM
    assert study.exposure_of("lmm_z2_old") is None and study.exposure_of("imat_pct") is None   # exact, not substring
    assert study.LMM.z_column == "lmm_z2" and study.LMM.term_label == "LMM, per 2 SD"
    assert study.IMAT.unit_for("cm3/(kg/m)") == "%" and study.LMM.unit_for("cm3/m2") == "cm3/m2"
    cbp = study.analysis("cbp")
    assert study.analysis("cbp_association_model") is cbp and study.find_analysis("cbp_model") is None
    with pytest.raises(KeyError):
        study.analysis("intensity")
    assert [a.name for a in study.analyses_fitted_by("pain_intensity_model")] == [
        "pain_intensity_model", "pain_intensity_model_ff"]


def test_the_paper_analyses_are_the_papers_models():
    """docs/study.md: CBP ~ LMM_z + InterMAT_z + age + sex + diabetes + dyslipidemia + osteoporosis +
    osteoarthritis + physical activity, site random; the same for NRS >= 4. The fixed effects, in the order of the
    lme4 fixtures, and the paper's ORs the report prints beside them."""
    from cbp_platform.stats import PAPER_COVARIATES

    paper = ("lmm_z2", "imat_z2", "age_10y", "female", "diabetes", "dyslipidemia", "osteoporosis", "osteoarthritis",
             "pa_moderate", "pa_high")
    cbp, nrs = study.PRIMARY_ANALYSES
    assert (cbp.name, cbp.outcome, nrs.name, nrs.outcome) == ("cbp_association_model", "cbp",
                                                            "pain_intensity_model", "nrs_high")
    assert cbp.fixed == nrs.fixed == PAPER_COVARIATES == paper
    assert cbp.paper_or["imat"].as_tuple() == (1.22, 1.13, 1.30, "p < 0.0001")
    assert nrs.paper_or["lmm"].as_tuple() == (0.63, 0.57, 0.70, "p < 0.0001")
    for a in study.SECONDARY_ANALYSES:           # each extends a primary analysis by exactly one exposure
        base = study.analysis(a.extends)
        assert a.role == study.SECONDARY and not a.paper_or and a.outcome == base.outcome
        assert a.fixed[:len(base.exposures)] == base.exposure_terms and a.covariates == base.covariates
        assert len(a.exposures) == len(base.exposures) + 1


def test_every_exposure_is_computed_from_a_measured_metric_and_lands_in_the_cohort():
    for e in study.EXPOSURES:
        assert e.metric in METRIC_SCHEMA, e
        assert set(e.columns) <= set(FRAME_COLUMNS), e
        if e.role == study.SECONDARY:            # not hashed, but fully determined by a hashed metric
            assert not set(e.columns) & set(HASH_COLUMNS) and e.metric in HASH_COLUMNS
        else:
            assert set(e.columns) <= set(HASH_COLUMNS)
    with pytest.raises(ValueError, match="role"):
        study.Exposure(name="x", label="X", measure="X", description="", role="tertiary", metric="mfi", unit="%")


# --------------------------------------------------------------------------------------------------------
# the guard: nothing outside the registry spells an exposure


SCANNED = ("cbp_platform", "assets", "checks", "resources", "orchestration")
EXEMPT = (ROOT / "cbp_platform" / "synth", ROOT / "cbp_platform" / "study.py")


def exposure_spellings(path: Path, forbidden: set[str]) -> list[str]:
    """``path:line 'name'`` for every string constant (f-string parts included) equal to a forbidden name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{node.lineno} {node.value!r}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in forbidden]


def test_no_exposure_is_spelt_outside_the_registry():
    """Outside cbp_platform/study.py (and the simulator, which generates the truth), code names an exposure only
    through the registry: ``LMM.name``, ``e.z_column``, a loop over ``EXPOSURES``. Metric columns (``imat_pct``,
    ``mfi``) are the measurement vocabulary and may be spelt."""
    forbidden = {c for e in study.EXPOSURES for c in e.columns}
    assert {"lmm", "imat", "lmm_z2", "imat_z2"} <= forbidden
    files = [p for d in SCANNED if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*.py")
             if not any(p == x or x in p.parents for x in EXEMPT)]
    assert len(files) > 50
    offenders = [hit for p in files for hit in exposure_spellings(p, forbidden)]
    assert offenders == []


def test_the_guard_finds_a_spelt_exposure(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('import polars as pl\nx = pl.col("imat_z2")\nd = {"lmm": 1}\ny = f"{d[\'lmm\']} imat"\n'
                   'ok = pl.col("imat_pct")\n')
    hits = exposure_spellings(bad, {c for e in study.EXPOSURES for c in e.columns})
    assert [h.split(" ", 1)[1] for h in hits] == ["'imat_z2'", "'lmm'", "'lmm'"]


# --------------------------------------------------------------------------------------------------------
# the secondary exposure: muscle fat fraction


def test_fat_fraction_is_a_secondary_exposure():
    e = FAT_FRACTION
    assert e.role == study.SECONDARY and e.metric == "mfi" and e.unit == "%" and e.z_column == "ff_z2"
    assert e in study.SECONDARY_EXPOSURES and e not in study.PRIMARY_EXPOSURES
    assert [a.key for a in study.SECONDARY_ANALYSES] == ["cbp_ff", "nrs_high_ff"]


def test_cohort_derives_and_standardises_fat_fraction(cohort, tables):
    f = cohort.frame
    assert (f["ff"] - 100.0 * f["mfi"]).abs().max() < 1e-12
    std = cohort.standardisation["ff"]
    x = f["ff"].to_numpy()
    assert std["mean"] == pytest.approx(x.mean(), rel=1e-12) and std["sd"] == pytest.approx(x.std(ddof=1), rel=1e-12)
    assert f["ff_z2"].mean() == pytest.approx(0.0, abs=1e-12) and f["ff_z2"].std() == pytest.approx(0.5, rel=1e-12)
    # the simulated truth: measured fat fraction equals the generating one
    truth = tables["truth"].select("pseudonym", "mfi_true")
    j = f.select("pseudonym", "ff").join(truth, on="pseudonym")
    assert j.height == f.height and (j["ff"] - 100 * j["mfi_true"]).abs().max() < 1e-12


def test_an_unmeasured_fat_fraction_excludes_nobody_and_leaves_the_papers_results(tables, cohort):
    """A participant without a fat fraction stays in the cohort (the paper's exposures are measured) with a null
    ff; the hash, the paper's columns and their standardisation do not move; the secondary model drops them."""
    from cbp_platform.analysis.models import fit_analysis

    some = cohort.frame["pseudonym"].head(40).to_list()
    m = tables["metrics"].with_columns(pl.when(pl.col("pseudonym").is_in(some)).then(float("nan"))
                                       .otherwise(pl.col("mfi")).alias("mfi"))
    c = build_analysis_cohort(tables["covariates"], tables["scans"], m, tables["quarantine"])
    assert c.n == cohort.n and c.frame["ff"].null_count() == 40 == c.frame["ff_z2"].null_count()
    assert c.frame.select(HASH_COLUMNS).drop("mfi").equals(cohort.frame.select(HASH_COLUMNS).drop("mfi"))
    for e in study.PRIMARY_EXPOSURES:
        assert c.standardisation[e.name] == cohort.standardisation[e.name]
    assert c.cohort_hash != cohort.cohort_hash           # mfi is hashed: the fat fraction is pinned through it
    other_ff = cohort.frame.with_columns(pl.lit(0.0).alias("ff"), pl.lit(0.0).alias("ff_z2"))
    assert cohort_hash(other_ff, normaliser=cohort.lmm_normaliser) == cohort.cohort_hash
    primary, secondary = study.analyses_fitted_by("cbp_association_model")
    sec = fit_analysis(c.frame, secondary, cohort_hash=c.cohort_hash, nagq=1)
    prim = fit_analysis(c.frame, primary, cohort_hash=c.cohort_hash, nagq=1)
    assert sec.fit["nobs"] == c.n - 40 and prim.fit["nobs"] == c.n
    assert set(sec.table["term"]) >= {"lmm_z2", "imat_z2", "ff_z2"} and "ff_z2" not in set(prim.table["term"])
    assert set(sec.table["analysis"]) == {"cbp_association_model_ff"}
    assert {sec.fit["primary_model"], "glmm_laplace", "site_fixed", "gee"} <= set(sec.table["model"])
    corr = sec.fit["exposure_correlations"]
    assert "ff_z2~lmm_z2" not in corr and '"lmm_z2~ff_z2"' in corr


def test_secondary_model_recovers_no_effect_of_fat_fraction(cohort):
    """The simulator draws the fat fraction from age alone (no effect on CBP, nearly independent of LMM and
    InterMAT): adjusted for age its OR per 2 SD covers 1, and adding it leaves the paper's exposures' ORs
    within 0.01 of the paper's model's (the same participants here)."""
    from cbp_platform.analysis.models import fit_analysis

    fits = {k: fit_analysis(cohort.frame, study.analysis(k), cohort_hash=cohort.cohort_hash, nagq=1)
            for k in ("cbp", "cbp_ff")}
    sec, prim = fits["cbp_ff"].result, fits["cbp"].result
    assert sec.nobs == prim.nobs == cohort.n
    lo, hi = sec.odds_ratio("ff_z2")[1:]
    assert lo < 1.0 < hi
    for t in ("lmm_z2", "imat_z2"):
        assert abs(sec.odds_ratio(t)[0] - prim.odds_ratio(t)[0]) < 0.01, t
    assert math.isfinite(sec.loglik) and sec.loglik >= prim.loglik - 1e-6     # nested: one more parameter


def test_secondary_model_failure_is_recorded_not_raised(cohort):
    from cbp_platform.analysis.models import failed_fit, fit_analysis
    from cbp_platform.stats import ModelCheckError

    tiny = cohort.frame.head(60)
    with pytest.raises(ModelCheckError) as exc:
        fit_analysis(tiny, study.analysis("cbp_ff"), cohort_hash="h", nagq=1)
    f = failed_fit(tiny, study.analysis("cbp_ff"), exc.value, cohort_hash="h")
    assert f.result is None and f.table.height == 0 and f.fit["converged"] is False
    assert "events_per_variable" in f.fit["error"] and f.fit["nobs"] == 60


def test_stratified_and_table_one_rows_of_fat_fraction_are_secondary(cohort):
    from cbp_platform.analysis.tables import stratified_comparisons, table_one

    t1 = table_one(cohort.frame, lmm_unit=cohort.lmm_unit)
    ff = t1.filter(pl.col("key") == "ff")
    assert ff.height == 1 and ff["role"][0] == study.SECONDARY and ff["variable"][0] == "Muscle fat fraction, %"
    assert set(t1.filter(pl.col("key") != "ff")["role"]) == {study.PRIMARY}
    assert t1.filter(pl.col("role") == study.PRIMARY)["key"].to_list()[-1] == "nrs_high"   # the paper's Table 1 ends so
    st = stratified_comparisons(cohort.frame)
    assert st.filter(pl.col("exposure") == "ff")["role"].unique().to_list() == [study.SECONDARY]
    x = cohort.frame.filter(pl.col("osteoarthritis") & pl.col("cbp"))["ff"].to_numpy()
    row = st.filter((pl.col("exposure") == "ff") & (pl.col("stratum") == "osteoarthritis"))
    assert row["cbp_median"][0] == pytest.approx(float(np.median(x)))
