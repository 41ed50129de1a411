"""The descriptive tables of the study, computed from the analysed frame (:mod:`cbp_platform.analysis.cohort`).

Each table function returns a *numeric* Polars frame with exact values: counts as integers in columns ending in
``_n``, and the statistics computed from a count's cell in columns sharing its prefix (``cbp_n`` ->
``cbp_pct``, ``cbp_median`` ...). These frames stay inside the secure environment (tests, the paper-vs-run
comparison, the warehouse). What leaves it goes through :func:`publishable`, which applies small-cell
suppression (:func:`suppress_small_cells`, with each table's secondary-suppression sets) and formats every
cell as text.

Tests: Mann-Whitney U (two-sided) for continuous variables, Pearson's chi-square without continuity
correction for categorical ones; Wilson score intervals for prevalences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import polars as pl
from scipy import stats

from cbp_platform import study
from cbp_platform.analysis.cohort import COMORBIDITIES, MET_CATEGORIES, NORMALISERS
from cbp_platform.analysis.disclosure import MIN_COUNT, masked_cells, suppress_small_cells, suppressed_marker

__all__ = ["table_one", "stratified_comparisons", "physical_activity_prevalence", "chi_square_test",
           "wilson_interval", "suppress_small_cells", "suppression_cells", "publishable", "format_p",
           "p_phrase", "GROUPS"]

GROUPS = ("cbp", "no_cbp", "all")
GROUP_LABELS = {"cbp": "CBP", "no_cbp": "No CBP", "all": "All"}
Z95 = 1.959963984540054
MWU = "Mann-Whitney U"
CHI2 = "chi-square"


def _groups(frame: pl.DataFrame) -> dict[str, pl.DataFrame]:
    if frame.get_column("cbp").null_count():
        raise ValueError("the analysed frame must have CBP answered for every participant")
    return {"cbp": frame.filter(pl.col("cbp")), "no_cbp": frame.filter(~pl.col("cbp")), "all": frame}


def _values(df: pl.DataFrame, col: str) -> np.ndarray:
    return df.get_column(col).drop_nulls().cast(pl.Float64).to_numpy()


def _quartiles(x: np.ndarray) -> tuple[float | None, float | None, float | None]:
    if x.size == 0:
        return None, None, None
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    return float(med), float(q1), float(q3)


def mann_whitney(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float | None]:
    """Two-sided Mann-Whitney U (statistic of ``a``, p); None when a group is empty."""
    if a.size == 0 or b.size == 0:
        return None, None
    res = stats.mannwhitneyu(a, b, alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def chi_square_test(table: Sequence[Sequence[int]] | np.ndarray) -> tuple[float | None, int | None, float | None]:
    """Pearson's chi-square of a contingency table (no continuity correction): (statistic, dof, p).

    Rows or columns that are all zero are dropped first; None when fewer than 2 remain either way.
    """
    t = np.asarray(table, dtype=float)
    t = t[t.sum(axis=1) > 0][:, t.sum(axis=0) > 0]
    if t.ndim != 2 or t.shape[0] < 2 or t.shape[1] < 2:
        return None, None, None
    chi2, p, dof, _ = stats.chi2_contingency(t, correction=False)
    return float(chi2), int(dof), float(p)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion k/n, in % (None when n = 0)."""
    if n <= 0:
        return None, None
    p = k / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return 100.0 * max(centre - half, 0.0), 100.0 * min(centre + half, 1.0)


def _empty_group_cells() -> dict:
    return {f"{g}_{s}": None for g in GROUPS for s in ("n", "pct", "median", "q1", "q3")}


# --------------------------------------------------------------------------------------------------------
# Table 1

# key, label, decimals for the display (continuous rows); the paper's exposures follow these
CONTINUOUS = (("age", "Age, years", 0), ("height_cm", "Height, cm", 1), ("weight_kg", "Weight, kg", 1),
              ("bmi", "BMI, kg/m2", 1))
BINARY = (("female", "Women"), *((c, c.capitalize()) for c in COMORBIDITIES),
          ("nrs_high", "Pain intensity NRS >= 4"))
DECIMALS = {**{k: d for k, _, d in CONTINUOUS}, **{e.name: e.decimals for e in study.EXPOSURES}}


def _exposure_label(e: study.Exposure, lmm_unit: str) -> str:
    """Table 1's row label of an exposure: its measure and unit (``LMM index, cm3/(kg/m)``, ``InterMAT, %``)."""
    return f"{e.measure}, {e.unit_for(lmm_unit)}"


def table_one(frame: pl.DataFrame, *, lmm_unit: str = NORMALISERS[study.DEFAULT_NORMALISER].unit) -> pl.DataFrame:
    """Characteristics by CBP group (CBP / no CBP / all) with a test of the CBP difference.

    Columns: key, variable, level, statistic ('n', 'n (%)', 'median (IQR)'), then per group g in
    :data:`GROUPS` ``g_n`` (participants with the level, or with a value), ``g_pct`` (of the group's
    answered), ``g_median``, ``g_q1``, ``g_q3``; then p_value, test and ``role``. Rows: participants, women, age,
    height, weight, BMI, the primary exposures (LMM, InterMAT), MET categories, the four comorbidities, NRS >= 4
    (``role`` primary: the paper's Table 1); then one row per secondary exposure the frame carries (the analysis
    cohort carries every one; ``role`` secondary: published in the report's own section, never in Table 1).
    """
    g = _groups(frame)
    rows: list[dict] = []

    def add(key, variable, level, statistic, cells, p=None, test=None, role=study.PRIMARY):
        rows.append(dict(key=key, variable=variable, level=level, statistic=statistic,
                         **{**_empty_group_cells(), **cells}, p_value=p, test=test, role=role))

    add("participants", "Participants", None, "n", {f"{k}_n": v.height for k, v in g.items()})

    def binary(col: str, label: str):
        cells = {}
        table = []
        for k, df in g.items():
            s = df.get_column(col).drop_nulls()
            yes, answered = int(s.sum()), s.len()
            cells[f"{k}_n"] = yes
            cells[f"{k}_pct"] = 100.0 * yes / answered if answered else None
            if k != "all":
                table.append([yes, answered - yes])
        _, _, p = chi_square_test(table)
        add(col, label, "yes" if col != "female" else "women", "n (%)", cells, p, CHI2)

    def continuous(col: str, label: str, role=study.PRIMARY):
        cells = {}
        for k, df in g.items():
            x = _values(df, col)
            med, q1, q3 = _quartiles(x)
            cells.update({f"{k}_n": int(x.size), f"{k}_median": med, f"{k}_q1": q1, f"{k}_q3": q3})
        _, p = mann_whitney(_values(g["cbp"], col), _values(g["no_cbp"], col))
        add(col, label, None, "median (IQR)", cells, p, MWU, role)

    binary("female", "Women")
    for col, label, _ in CONTINUOUS:
        continuous(col, label)
    for e in study.PRIMARY_EXPOSURES:
        continuous(e.name, _exposure_label(e, lmm_unit))
    counts = {k: [int((df.get_column("met_category").cast(pl.String) == c).sum()) for c in MET_CATEGORIES]
              for k, df in g.items()}
    answered = {k: df.get_column("met_category").drop_nulls().len() for k, df in g.items()}
    _, _, p = chi_square_test(np.array([counts["cbp"], counts["no_cbp"]]).T)
    for i, c in enumerate(MET_CATEGORIES):
        cells = {}
        for k in GROUPS:
            cells[f"{k}_n"] = counts[k][i]
            cells[f"{k}_pct"] = 100.0 * counts[k][i] / answered[k] if answered[k] else None
        add("met_category", "Physical activity, MET-min/week", c, "n (%)", cells, p if i == 0 else None,
            CHI2 if i == 0 else None)
    for col, label in BINARY[1:]:
        binary(col, label)
    for e in study.SECONDARY_EXPOSURES:
        if e.name in frame.columns:
            continuous(e.name, _exposure_label(e, lmm_unit), study.SECONDARY)
    schema = {"key": pl.String, "variable": pl.String, "level": pl.String, "statistic": pl.String,
              **{f"{k}_{s}": (pl.Int64 if s == "n" else pl.Float64)
                 for k in GROUPS for s in ("n", "pct", "median", "q1", "q3")},
              "p_value": pl.Float64, "test": pl.String, "role": pl.String}
    return pl.DataFrame(rows, schema=schema)


# --------------------------------------------------------------------------------------------------------
# stratified comparisons

def _stratified_label(e: study.Exposure) -> str:
    """The stratified table's measure label: ``LMM`` (its unit depends on the normaliser), ``InterMAT, %``."""
    return e.label if e.per_body_size else f"{e.label}, {e.unit}"


# (column, label) of the exposures compared within strata: the paper's first, then the secondary ones
EXPOSURES = tuple((e.name, _stratified_label(e)) for e in (*study.PRIMARY_EXPOSURES, *study.SECONDARY_EXPOSURES))


def _default_exposures(frame: pl.DataFrame) -> tuple[tuple[str, str], ...]:
    """The paper's exposures, then the secondary ones the frame carries (the analysis cohort carries every one)."""
    return tuple((c, label) for c, label in EXPOSURES
                 if study.exposure(c).role == study.PRIMARY or c in frame.columns)


def stratified_comparisons(frame: pl.DataFrame, strata: Sequence[str] = study.STRATA,
                           exposures: Sequence[tuple[str, str]] | None = None) -> pl.DataFrame:
    """Within each stratum (participants with the comorbidity), the exposures in CBP vs no CBP.

    ``exposures``: (column, label) pairs; default the paper's exposures and the secondary ones the frame carries.

    Columns: stratum, exposure, label, then for g in (cbp, no_cbp) ``g_n``, ``g_median``, ``g_q1``, ``g_q3``,
    ``g_mean``; u_statistic, p_value (two-sided Mann-Whitney U), test, ``role`` (the exposure's: the report
    shows primary rows as the paper's table, secondary rows in their own section). Paper (docs/study.md,
    :attr:`cbp_platform.study.Exposure.paper_stratified`): osteoarthritis LMM 22.9 vs 24.3, InterMAT 7.53 % vs
    6.96 %; osteoporosis LMM 20.9 vs 21.3, InterMAT 8.43 % vs 7.9 %.
    """
    exposures = _default_exposures(frame) if exposures is None else exposures
    rows = []
    for stratum in strata:
        sub = frame.filter(pl.col(stratum).fill_null(False))
        g = {"cbp": sub.filter(pl.col("cbp")), "no_cbp": sub.filter(~pl.col("cbp"))}
        for col, label in exposures:
            e = study.exposure_of(col)
            row = dict(stratum=stratum, exposure=col, label=label, role=e.role if e else study.PRIMARY)
            xs = {}
            for k, df in g.items():
                x = _values(df, col)
                xs[k] = x
                med, q1, q3 = _quartiles(x)
                row.update({f"{k}_n": int(x.size), f"{k}_median": med, f"{k}_q1": q1, f"{k}_q3": q3,
                            f"{k}_mean": float(x.mean()) if x.size else None})
            u, p = mann_whitney(xs["cbp"], xs["no_cbp"])
            rows.append({**row, "u_statistic": u, "p_value": p, "test": MWU})
    schema = {"stratum": pl.String, "exposure": pl.String, "label": pl.String,
              **{f"{k}_{s}": (pl.Int64 if s == "n" else pl.Float64)
                 for k in ("cbp", "no_cbp") for s in ("n", "median", "q1", "q3", "mean")},
              "u_statistic": pl.Float64, "p_value": pl.Float64, "test": pl.String, "role": pl.String}
    return pl.DataFrame(rows, schema=schema)


# --------------------------------------------------------------------------------------------------------
# physical activity


def physical_activity_prevalence(frame: pl.DataFrame) -> pl.DataFrame:
    """CBP prevalence per MET category, with Wilson 95 % CIs, and the chi-square test of the 3x2 table.

    Rows: the three categories, then 'all'. Columns: category, all_n, cbp_n, no_cbp_n, cbp_pct,
    cbp_pct_low, cbp_pct_high, and on the 'all' row chi2, dof, p_value (null on the category rows).
    """
    cat = frame.get_column("met_category").cast(pl.String)
    cbp = frame.get_column("cbp")
    rows = []
    table = []
    for c in (*MET_CATEGORIES, "all"):
        sel = cbp.filter(cat == c) if c != "all" else cbp.filter(cat.is_not_null())
        n, k = sel.len(), int(sel.sum())
        lo, hi = wilson_interval(k, n)
        rows.append(dict(category=c, all_n=n, cbp_n=k, no_cbp_n=n - k, cbp_pct=100.0 * k / n if n else None,
                         cbp_pct_low=lo, cbp_pct_high=hi, chi2=None, dof=None, p_value=None))
        if c != "all":
            table.append([k, n - k])
    chi2, dof, p = chi_square_test(table)
    rows[-1].update(chi2=chi2, dof=dof, p_value=p)
    schema = {"category": pl.String, "all_n": pl.Int64, "cbp_n": pl.Int64, "no_cbp_n": pl.Int64,
              "cbp_pct": pl.Float64, "cbp_pct_low": pl.Float64, "cbp_pct_high": pl.Float64,
              "chi2": pl.Float64, "dof": pl.Int64, "p_value": pl.Float64}
    return pl.DataFrame(rows, schema=schema)


# --------------------------------------------------------------------------------------------------------
# publishing: suppression + display formatting


def format_p(p: float | None) -> str:
    """p < 0.0001 as '<0.0001', below 0.01 to 4 decimals, otherwise 3."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return ""
    if p < 1e-4:
        return "<0.0001"
    return f"{p:.4f}" if p < 0.01 else f"{p:.3f}"


def p_phrase(p: float | None) -> str:
    """'p < 0.0001' or 'p = 0.003'."""
    f = format_p(p)
    if not f:
        return ""
    return f"p {f[0]} {f[1:]}" if f.startswith("<") else f"p = {f}"


def _n(v) -> str:
    return "" if v is None else f"{int(v):,}"


def _num(v, d: int) -> str:
    return "" if v is None else f"{v:.{d}f}"


def _table_one_spec(df: pl.DataFrame):
    counts = [f"{g}_n" for g in GROUPS]
    derived = {f"{g}_n": [f"{g}_{s}" for s in ("pct", "median", "q1", "q3")] for g in GROUPS}
    keys = df.get_column("key").to_list()
    groups = [[i for i, k in enumerate(keys) if k == key] for key in dict.fromkeys(keys)]
    return counts, derived, [("cbp_n", "no_cbp_n")], [g for g in groups if len(g) > 1]


def _stratified_spec(df: pl.DataFrame):
    derived = {f"{g}_n": [f"{g}_{s}" for s in ("median", "q1", "q3", "mean")] + ["u_statistic", "p_value"]
               for g in ("cbp", "no_cbp")}
    return ["cbp_n", "no_cbp_n"], derived, [("cbp_n", "no_cbp_n")], []


def _pa_spec(df: pl.DataFrame):
    cats = df.get_column("category").to_list()
    pct = ["cbp_pct", "cbp_pct_low", "cbp_pct_high"]
    return (["all_n", "cbp_n", "no_cbp_n"], {"all_n": [], "cbp_n": pct, "no_cbp_n": pct},
            [("cbp_n", "no_cbp_n")], [[i for i, c in enumerate(cats) if c != "all"]])


_SPECS = {"table_one": _table_one_spec, "stratified": _stratified_spec, "pa_prevalence": _pa_spec}


def suppression_cells(df: pl.DataFrame, kind: str, *, min_count: int = MIN_COUNT) -> dict[str, list[bool]]:
    """Per column of a numeric table of ``kind``, which cells its published form hides (primary + secondary)."""
    counts, derived, links, groups = _SPECS[kind](df)
    return masked_cells(df, min_count, counts, derived, links, groups)


def _publish_table_one(df: pl.DataFrame, min_count: int) -> pl.DataFrame:
    mask = suppression_cells(df, "table_one", min_count=min_count)
    hidden = suppressed_marker(min_count)
    out = []
    for i, r in enumerate(df.iter_rows(named=True)):
        name = r["variable"] + (f": {r['level']}" if r["key"] == "met_category" else "")
        row = {"Characteristic": name, "Statistic": r["statistic"]}
        for g in GROUPS:
            if mask[f"{g}_n"][i]:
                cell = hidden
            elif r["statistic"] == "median (IQR)":
                d = DECIMALS.get(r["key"], 1)
                cell = (f"{_num(r[f'{g}_median'], d)} ({_num(r[f'{g}_q1'], d)}-{_num(r[f'{g}_q3'], d)})"
                        if r[f"{g}_median"] is not None else "")
            elif r["statistic"] == "n (%)":
                pct = r[f"{g}_pct"]
                cell = f"{_n(r[f'{g}_n'])} ({pct:.1f} %)" if pct is not None else _n(r[f"{g}_n"])
            else:
                cell = _n(r[f"{g}_n"])
            row[GROUP_LABELS[g]] = cell
        row["p"] = format_p(r["p_value"])
        row["Test"] = (r["test"] or "") if r["p_value"] is not None else ""
        out.append(row)
    return pl.DataFrame(out, schema={c: pl.String for c in
                                     ("Characteristic", "Statistic", "CBP", "No CBP", "All", "p", "Test")})


def _publish_stratified(df: pl.DataFrame, min_count: int) -> pl.DataFrame:
    mask = suppression_cells(df, "stratified", min_count=min_count)
    hidden = suppressed_marker(min_count)
    out = []
    for i, r in enumerate(df.iter_rows(named=True)):
        d = DECIMALS.get(r["exposure"], 1)
        row = {"Stratum": r["stratum"].capitalize(), "Measure": r["label"]}
        for g, lab in (("cbp", "CBP"), ("no_cbp", "No CBP")):
            if mask[f"{g}_n"][i]:
                row[f"{lab} n"] = row[f"{lab} median (IQR)"] = row[f"{lab} mean"] = hidden
            else:
                row[f"{lab} n"] = _n(r[f"{g}_n"])
                row[f"{lab} median (IQR)"] = (f"{_num(r[f'{g}_median'], d)} ({_num(r[f'{g}_q1'], d)}-"
                                              f"{_num(r[f'{g}_q3'], d)})" if r[f"{g}_median"] is not None else "")
                row[f"{lab} mean"] = _num(r[f"{g}_mean"], d)
        row["p (Mann-Whitney U)"] = hidden if mask["p_value"][i] else format_p(r["p_value"])
        out.append(row)
    cols = ("Stratum", "Measure", "CBP n", "CBP median (IQR)", "CBP mean", "No CBP n", "No CBP median (IQR)",
            "No CBP mean", "p (Mann-Whitney U)")
    return pl.DataFrame(out, schema={c: pl.String for c in cols})


def _publish_pa(df: pl.DataFrame, min_count: int) -> pl.DataFrame:
    mask = suppression_cells(df, "pa_prevalence", min_count=min_count)
    hidden = suppressed_marker(min_count)
    out = []
    for i, r in enumerate(df.iter_rows(named=True)):
        hide = mask["cbp_pct"][i]
        prev = (f"{r['cbp_pct']:.1f} ({r['cbp_pct_low']:.1f}-{r['cbp_pct_high']:.1f})"
                if r["cbp_pct"] is not None else "")
        test = (f"chi2 = {r['chi2']:.1f}, df = {r['dof']}, {p_phrase(r['p_value'])}"
                if r["chi2"] is not None else "")
        out.append({"MET-min/week": r["category"],
                    "n": hidden if mask["all_n"][i] else _n(r["all_n"]),
                    "CBP n": hidden if mask["cbp_n"][i] else _n(r["cbp_n"]),
                    "No CBP n": hidden if mask["no_cbp_n"][i] else _n(r["no_cbp_n"]),
                    "CBP prevalence, % (95 % CI)": hidden if hide else prev,
                    "Chi-square test": test})
    return pl.DataFrame(out, schema={c: pl.String for c in ("MET-min/week", "n", "CBP n", "No CBP n",
                                                            "CBP prevalence, % (95 % CI)", "Chi-square test")})


def _publish_flow(df: pl.DataFrame, min_count: int) -> pl.DataFrame:
    # Not suppressed: the flow counts are processing counts (missing answers, failed QC), not a participant
    # characteristic, and the flow must reconcile (start - excluded = analysed). See docs/analysis.md.
    return pl.DataFrame([{"Step": str(r["step"]), "Criterion": r["description"], "Excluded": _n(r["excluded"]),
                          "Remaining": _n(r["remaining"])} for r in df.iter_rows(named=True)],
                        schema={c: pl.String for c in ("Step", "Criterion", "Excluded", "Remaining")})


_COUNTS = {"table_one": ("cbp_n", "no_cbp_n", "all_n"), "stratified": ("cbp_n", "no_cbp_n"),
           "pa_prevalence": ("all_n", "cbp_n", "no_cbp_n"), "flow": ("excluded", "remaining")}
_PUBLISHERS = {"table_one": _publish_table_one, "stratified": _publish_stratified,
               "pa_prevalence": _publish_pa, "flow": _publish_flow}


def publishable(df: pl.DataFrame, kind: str, *, min_count: int = MIN_COUNT) -> pl.DataFrame:
    """The display form of a numeric table (all cells text), small cells suppressed.

    ``kind``: 'table_one', 'stratified', 'pa_prevalence' or 'flow' (the output of :func:`table_one`,
    :func:`stratified_comparisons`, :func:`physical_activity_prevalence`, ``AnalysisCohort.flow``).
    """
    if kind not in _PUBLISHERS:
        raise ValueError(f"unknown table kind {kind!r}; choose one of {sorted(_PUBLISHERS)}")
    if "pseudonym" in df.columns:
        raise ValueError("a table with a pseudonym column is never published")
    wrong = [c for c in _COUNTS[kind] if c not in df.columns or not df.schema[c].is_integer()]
    if wrong:
        raise ValueError(f"{kind}: count columns {wrong} missing or not integer; pass the numeric table")
    return _PUBLISHERS[kind](df, min_count)
