"""Descriptive tables: Table 1, physical activity prevalence, stratified comparisons, small-cell suppression."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from cbp_platform.analysis.cohort import MET_CATEGORY
from cbp_platform.analysis.disclosure import suppress_small_cells, suppression_mask
from cbp_platform.analysis.tables import (
    chi_square_test,
    physical_activity_prevalence,
    publishable,
    stratified_comparisons,
    table_one,
    wilson_interval,
)


def _frame(rows: list[dict]) -> pl.DataFrame:
    """A minimal analysed frame: cbp, met_category, comorbidities, lmm, imat, and Table 1's other columns."""
    base = dict(age=50, height_cm=170.0, weight_kg=70.0, bmi=24.2, female=False, diabetes=False,
                dyslipidemia=False, osteoporosis=False, osteoarthritis=False, nrs_high=False, lmm=23.0, imat=7.0,
                met_category="500-5000")
    df = pl.DataFrame([{**base, **r} for r in rows])
    return df.with_columns(pl.col("met_category").cast(MET_CATEGORY))


def test_table_one_counts_reconcile(cohort):
    t1 = table_one(cohort.frame, lmm_unit=cohort.lmm_unit)
    part = t1.filter(pl.col("key") == "participants").row(0, named=True)
    assert part["all_n"] == cohort.n
    assert part["cbp_n"] == cohort.frame["cbp"].sum()
    cat = t1.filter(pl.col("statistic") == "n (%)")
    assert (cat["cbp_n"] + cat["no_cbp_n"] == cat["all_n"]).all()
    cont = t1.filter(pl.col("statistic") == "median (IQR)")
    assert (cont["cbp_n"] + cont["no_cbp_n"] == cont["all_n"]).all()
    met = t1.filter(pl.col("key") == "met_category")
    assert met["all_n"].sum() == cohort.n and met["all_pct"].sum() == pytest.approx(100.0)
    women = t1.filter(pl.col("key") == "female").row(0, named=True)
    assert women["all_n"] == cohort.frame["female"].sum()
    assert women["all_pct"] == pytest.approx(100 * cohort.frame["female"].mean())
    age = t1.filter(pl.col("key") == "age").row(0, named=True)
    q1, med, q3 = np.percentile(cohort.frame["age"].to_numpy(), [25, 50, 75])
    assert (age["all_q1"], age["all_median"], age["all_q3"]) == (q1, med, q3)
    assert "cm3/(kg/m)" in t1.filter(pl.col("key") == "lmm")["variable"][0]
    p = t1.filter(pl.col("role") == "primary")["p_value"].drop_nulls()     # the paper's Table 1
    assert p.len() == 13 and ((t1["p_value"].drop_nulls() >= 0) & (t1["p_value"].drop_nulls() <= 1)).all()


def test_table_one_tests_match_scipy(cohort):
    t1 = table_one(cohort.frame)
    f = cohort.frame
    lmm = t1.filter(pl.col("key") == "lmm")["p_value"][0]
    want = stats.mannwhitneyu(f.filter(pl.col("cbp"))["lmm"].to_numpy(), f.filter(~pl.col("cbp"))["lmm"].to_numpy(),
                              alternative="two-sided").pvalue
    assert lmm == pytest.approx(want, rel=1e-12)
    diab = t1.filter(pl.col("key") == "diabetes")["p_value"][0]
    ct = f.group_by("cbp", "diabetes").len().sort("cbp", "diabetes")["len"].to_numpy().reshape(2, 2)
    assert diab == pytest.approx(stats.chi2_contingency(ct, correction=False).pvalue, rel=1e-12)


def test_pa_chi_square_and_wilson_match_references():
    counts = {"<500": (30, 70), "500-5000": (20, 80), ">5000": (25, 75)}
    rows = [dict(cbp=True, met_category=c) for c, (k, _) in counts.items() for _ in range(k)]
    rows += [dict(cbp=False, met_category=c) for c, (_, m) in counts.items() for _ in range(m)]
    pa = physical_activity_prevalence(_frame(rows))
    assert pa["category"].to_list() == ["<500", "500-5000", ">5000", "all"]
    assert pa["cbp_n"].to_list() == [30, 20, 25, 75] and pa["all_n"].to_list() == [100, 100, 100, 300]
    chi2, p, dof, _ = stats.chi2_contingency([[30, 70], [20, 80], [25, 75]], correction=False)
    tot = pa.row(3, named=True)
    assert tot["chi2"] == pytest.approx(chi2) and tot["dof"] == dof == 2 and tot["p_value"] == pytest.approx(p)
    assert pa["chi2"][:3].null_count() == 3
    for r in pa.iter_rows(named=True):
        lo, hi = proportion_confint(r["cbp_n"], r["all_n"], alpha=0.05, method="wilson")
        assert (r["cbp_pct_low"], r["cbp_pct_high"]) == pytest.approx((100 * lo, 100 * hi), rel=1e-9)
        assert r["cbp_pct"] == pytest.approx(100 * r["cbp_n"] / r["all_n"])


def test_chi_square_and_wilson_edge_cases():
    assert chi_square_test([[5, 0], [7, 0]]) == (None, None, None)        # one column empty
    assert wilson_interval(0, 0) == (None, None)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0 < hi < 20


def test_stratified_comparisons_pick_the_right_strata():
    rows = ([dict(cbp=True, osteoarthritis=True, lmm=10.0 + i, imat=5.0) for i in range(7)]
            + [dict(cbp=False, osteoarthritis=True, lmm=20.0 + i, imat=6.0) for i in range(9)]
            + [dict(cbp=True, osteoporosis=True, lmm=30.0, imat=7.0 + i) for i in range(6)]
            + [dict(cbp=False, osteoporosis=True, osteoarthritis=True, lmm=40.0, imat=8.0) for _ in range(5)]
            + [dict(cbp=c, lmm=100.0, imat=50.0) for c in (True, False) for _ in range(20)])
    st = stratified_comparisons(_frame(rows))
    r = {(x["stratum"], x["exposure"]): x for x in st.iter_rows(named=True)}
    oa = r[("osteoarthritis", "lmm")]
    assert (oa["cbp_n"], oa["no_cbp_n"]) == (7, 9 + 5)
    assert oa["cbp_median"] == 13.0 and oa["cbp_mean"] == 13.0
    assert oa["no_cbp_median"] == np.median([20.0 + i for i in range(9)] + [40.0] * 5)
    op = r[("osteoporosis", "imat")]
    assert (op["cbp_n"], op["no_cbp_n"]) == (6, 5)
    assert op["cbp_median"] == 9.5 and op["no_cbp_median"] == 8.0
    want = stats.mannwhitneyu([7.0 + i for i in range(6)], [8.0] * 5, alternative="two-sided")
    assert op["p_value"] == pytest.approx(want.pvalue) and op["u_statistic"] == pytest.approx(want.statistic)
    assert st.height == 4


def test_suppress_small_cells_primary_and_derived():
    df = pl.DataFrame({"label": ["a", "b", "c"], "cbp_n": [3, 12, 0], "cbp_pct": [1.5, 6.0, 0.0],
                       "other": [1.0, 2.0, 3.0]})
    out = suppress_small_cells(df, min_count=5, count_columns=["cbp_n"])
    assert out["cbp_n"].to_list() == ["<5", "12", "<5"]
    assert out["cbp_pct"].to_list() == ["<5", "6.0", "<5"]
    assert out["other"].to_list() == [1.0, 2.0, 3.0] and out["label"].to_list() == ["a", "b", "c"]
    # the threshold is a parameter; at 3 the count 3 stays, 0 is hidden, and the marker states the limit applied
    assert suppress_small_cells(df, min_count=3, count_columns=["cbp_n"])["cbp_n"].to_list() == ["3", "12", "<3"]
    assert suppress_small_cells(df, min_count=10, count_columns=["cbp_n"])["cbp_n"].to_list() == ["<10", "12", "<10"]
    with pytest.raises(ValueError):
        suppress_small_cells(df, count_columns=["nope_n"])


def test_secondary_suppression():
    df = pl.DataFrame({"cbp_n": [3, 40, 50], "no_cbp_n": [30, 2, 60], "all_n": [33, 42, 110]})
    m = suppression_mask(df, 5, ["cbp_n", "no_cbp_n", "all_n"], row_links=[("cbp_n", "no_cbp_n")])
    assert m["cbp_n"] == [True, True, False] and m["no_cbp_n"] == [True, True, False]
    assert m["all_n"] == [False, False, False]
    # down a column: rows 0-2 add up to a published total; one hidden cell takes the smallest other with it
    m = suppression_mask(df, 5, ["cbp_n"], row_groups=[[0, 1, 2]])
    assert m["cbp_n"] == [True, True, False]


def test_publishable_hides_small_strata():
    rows = ([dict(cbp=True, osteoporosis=True, lmm=30.0) for _ in range(2)]
            + [dict(cbp=False, osteoporosis=True, lmm=40.0) for _ in range(12)]
            + [dict(cbp=c, osteoarthritis=True, lmm=20.0) for c in (True, False) for _ in range(8)]
            + [dict(cbp=c, met_category=m) for c in (True, False) for m in ("<500", ">5000") for _ in range(9)]
            + [dict(cbp=True, met_category=">5000")])
    f = _frame(rows)
    st = publishable(stratified_comparisons(f), "stratified")
    op = st.filter(pl.col("Stratum") == "Osteoporosis")
    assert set(op["CBP n"]) == {"<5"} and set(op["No CBP n"]) == {"<5"}          # the partner too
    assert set(op["CBP median (IQR)"]) == {"<5"} and set(op["p (Mann-Whitney U)"]) == {"<5"}
    oa = st.filter(pl.col("Stratum") == "Osteoarthritis")
    assert set(oa["CBP n"]) == {"8"}
    t1 = publishable(table_one(f), "table_one")
    osteo = t1.filter(pl.col("Characteristic") == "Osteoporosis").row(0, named=True)
    assert osteo["CBP"] == "<5" and osteo["No CBP"] == "<5" and osteo["All"].startswith("14 (")
    # MET categories: <500 has 3 CBP. Its no-CBP partner goes (row), and so does the smallest other CBP
    # cell of the column (>5000), whose no-CBP partner follows; the 'all' row stays.
    counts = {"<500": (3, 40), "500-5000": (30, 50), ">5000": (20, 25)}
    rows = [dict(cbp=c, met_category=m) for m, (k, j) in counts.items() for c, x in ((True, k), (False, j))
            for _ in range(x)]
    pub = publishable(physical_activity_prevalence(_frame(rows)), "pa_prevalence")
    assert pub["CBP n"].to_list() == ["<5", "30", "<5", "53"]
    assert pub["No CBP n"].to_list() == ["<5", "50", "<5", "115"]
    assert pub["n"].to_list() == ["43", "80", "45", "168"]
    assert pub["CBP prevalence, % (95 % CI)"].to_list()[0] == "<5"
    assert pub["CBP prevalence, % (95 % CI)"].to_list()[1].startswith("37.5 (")
    assert pub["Chi-square test"][3].startswith("chi2 = ")
    with pytest.raises(ValueError, match="pseudonym"):
        publishable(pl.DataFrame({"pseudonym": ["X"]}), "flow")
    with pytest.raises(ValueError, match="numeric table"):
        publishable(pub, "pa_prevalence")                  # already published: refused, not re-formatted
    with pytest.raises(ValueError, match="unknown table kind"):
        publishable(pub, "nope")


def test_publishable_table_one_has_no_small_counts(cohort):
    pub = publishable(table_one(cohort.frame).filter(pl.col("role") == "primary"), "table_one")   # the paper's
    assert pub.columns == ["Characteristic", "Statistic", "CBP", "No CBP", "All", "p", "Test"]
    assert pub.height == 16 and "<5" not in pub["CBP"].to_list()
    assert all(dt == pl.String for dt in pub.dtypes)
