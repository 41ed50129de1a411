"""The published report: ``report.md``, ``report.html`` (self-contained), PNG figures and the published tables.

:func:`render_report` takes the numeric tables (:mod:`cbp_platform.analysis.tables`), the model OR tables and
summaries, the paper-vs-run table (:func:`paper_vs_run_table`) and the lineage, and writes

* ``report.md`` and ``report.html``: exclusion flow, Table 1, physical activity, models (OR tables, forest
  plot, summaries), stratified comparisons, paper vs this run, secondary exposures (when the registry has any),
  lineage, disclosure note, segmentation model comparisons (when supplied); one function per section
  (``_section_*``), each adding its text, tables and figures to the report being built;
* ``figures/flow.png``, ``figures/pa_prevalence.png``, ``figures/forest.png`` (``forest_secondary.png``);
* ``tables/*.csv``: the published (suppressed, formatted) tables.

Exposures and analyses come from :mod:`cbp_platform.study`: the paper's (primary) ones fill the paper's sections
and the paper-vs-run table; secondary ones only their own section, never a row beside a paper value.

Every table goes through :func:`cbp_platform.analysis.tables.publishable` (small-cell suppression) and every
text is checked by :func:`cbp_platform.analysis.disclosure.assert_no_pseudonyms` *before* anything is written.
Output is deterministic: no timestamps unless the lineage carries them, PNGs without the Software tag, files
written atomically (temp file + rename).
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import polars as pl
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from cbp_platform import study
from cbp_platform.analysis.cohort import MET_CATEGORIES
from cbp_platform.analysis.disclosure import MIN_COUNT, assert_no_pseudonyms, suppressed_marker
from cbp_platform.analysis.tables import format_p, p_phrase, publishable, suppression_cells
from cbp_platform.imaging.nifti import atomic_write_bytes

# The paper's numbers, transcribed from the study's abstract (Ziegelmayer et al., Lancet Reg Health Eur 54:101323,
# 2025). Men overall: the abstract's 14,605 does not add up; 15,325 does.
PAPER: dict = {
    "start_n": 30868,
    "analysed_n": 27518,
    "excluded_n": 3350,
    "cbp_n": 6003,
    "cbp_pct": 21.8,
    "women_n": 12193,
    "women_pct": 44.3,
    "women_cbp_n": 2999,
    "women_no_cbp_n": 9194,
    "age": {"all": (49, 41, 57), "cbp": (53, 46, 60), "no_cbp": (48, 39, 56)},      # median (IQR)
    "pa": {"<500": (10892, 24.6), "500-5000": (12826, 19.4), ">5000": (3800, 22.0)},  # n, CBP prevalence %
    "pa_p": "< 0.0001",
    # The exposures' values live with the exposures and analyses (cbp_platform.study); collected here:
    # (analysis key, exposure name) -> OR per 2 SD, 95 % CI, p as printed
    "or": {(a.key, e): v.as_tuple() for a in study.PRIMARY_ANALYSES for e, v in a.paper_or.items()},
    # (stratum, exposure name) -> CBP, no CBP, p as printed (the abstract does not say median or mean)
    "stratified": {(s, e.name): (e.paper_stratified[s].cbp, e.paper_stratified[s].no_cbp, e.paper_stratified[s].p)
                   for s in study.STRATA for e in study.PRIMARY_EXPOSURES if s in e.paper_stratified},
}
# Display names of the adjustment terms as the analysis frame names them; other terms are shown as they are.
TERM_LABELS = {"age_10y": "Age, per 10 years", "female": "Female sex", "diabetes": "Diabetes",
               "dyslipidemia": "Dyslipidemia", "osteoporosis": "Osteoporosis", "osteoarthritis": "Osteoarthritis",
               "pa_moderate": "Activity 500-5000 vs < 500", "pa_high": "Activity > 5000 vs < 500"}
OR_COLUMNS = ("term", "or", "or_low", "or_high", "p")
INTERCEPT_TERMS = {"intercept", "(intercept)", "const"}

PNG_DPI = 110
OR_TICKS = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0)
_PNG_META = {"Software": None}


# --------------------------------------------------------------------------------------------------------
# naming


def term_label(term: str) -> str:
    """A model term's display name: an exposure's standardised term by the registry (``LMM, per 2 SD``), an
    adjustment term by :data:`TERM_LABELS`, anything else as it is."""
    e = study.exposure_of(term)
    if e is not None:
        return e.term_label if term == e.z_column else e.label
    return TERM_LABELS.get(term, term)


def model_label(name: str) -> str:
    """An analysis' display name, by its name or key in the registry (``cbp`` -> ``CBP``); others as they are."""
    a = study.find_analysis(name)
    return a.label if a else name


def _is_secondary(name: str) -> bool:
    a = study.find_analysis(name)
    return a is not None and a.role == study.SECONDARY


def _role_rows(df: pl.DataFrame, role: str) -> pl.DataFrame:
    """The rows of a descriptive table that belong to ``role`` (a table without the column is all primary)."""
    if "role" not in df.columns:
        return df if role == study.PRIMARY else df.clear()
    return df.filter(pl.col("role") == role)


def _fmt_or(o, lo, hi) -> str:
    if o is None or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (o, lo, hi)):
        return ""
    return f"{o:.2f} ({lo:.2f}-{hi:.2f})"


def _check_or_table(name: str, df: pl.DataFrame) -> None:
    missing = [c for c in OR_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"model results {name!r} lack columns {missing} (need {list(OR_COLUMNS)})")


# --------------------------------------------------------------------------------------------------------
# paper vs this run


def _row_of(df: pl.DataFrame, **where) -> tuple[int, dict] | tuple[None, None]:
    for i, r in enumerate(df.iter_rows(named=True)):
        if all(r.get(k) == v for k, v in where.items()):
            return i, r
    return None, None


def paper_vs_run_table(*, flow: pl.DataFrame, table_one: pl.DataFrame, pa_prevalence: pl.DataFrame,
                       stratified: pl.DataFrame, model_results: Mapping[str, pl.DataFrame],
                       min_count: int = MIN_COUNT) -> pl.DataFrame:
    """The paper's numbers (:data:`PAPER`) beside this run's, computed from the numeric tables.

    Columns: section, quantity, paper, this_run (display text), paper_value, run_value (numbers for checks;
    null where not a single number). Cells the published tables suppress are suppressed here too. Only the
    paper's analyses and exposures (:mod:`cbp_platform.study`, role primary) are compared; ``model_results`` keys
    are analysis names or keys, a secondary analysis is never matched to a paper value.
    """
    rows: list[dict] = []
    hidden_marker = suppressed_marker(min_count)
    table_one = _role_rows(table_one, study.PRIMARY)
    stratified = _role_rows(stratified, study.PRIMARY)

    def add(section, quantity, paper, run, pv=None, rv=None):
        rows.append(dict(section=section, quantity=quantity, paper=paper, this_run=run,
                         paper_value=None if pv is None else float(pv), run_value=None if rv is None else float(rv)))

    fl = {r["criterion"]: r for r in flow.iter_rows(named=True)}
    start, analysed = fl["start"]["remaining"], fl["analysed"]["remaining"]
    add("Cohort", "Participants with MRI (start of flow)", f"{PAPER['start_n']:,}", f"{start:,}",
        PAPER["start_n"], start)
    add("Cohort", "Excluded", f"{PAPER['excluded_n']:,}", f"{start - analysed:,}", PAPER["excluded_n"],
        start - analysed)
    add("Cohort", "Analysed", f"{PAPER['analysed_n']:,}", f"{analysed:,}", PAPER["analysed_n"], analysed)

    m1 = suppression_cells(table_one, "table_one", min_count=min_count)
    i, part = _row_of(table_one, key="participants")
    if part is not None:
        hidden = m1["cbp_n"][i]
        pct = 100.0 * part["cbp_n"] / part["all_n"] if part["all_n"] else None
        add("Cohort", "CBP, n (%)", f"{PAPER['cbp_n']:,} ({PAPER['cbp_pct']} %)",
            hidden_marker if hidden else f"{part['cbp_n']:,} ({pct:.1f} %)", PAPER["cbp_pct"],
            None if hidden else pct)
    i, fem = _row_of(table_one, key="female")
    if fem is not None:
        hidden = m1["all_n"][i]
        add("Cohort", "Women, n (%)", f"{PAPER['women_n']:,} ({PAPER['women_pct']} %)",
            hidden_marker if hidden else f"{fem['all_n']:,} ({fem['all_pct']:.1f} %)", PAPER["women_pct"],
            None if hidden else fem["all_pct"])
        for g, key, lab in (("cbp", "women_cbp_n", "Women in the CBP group, n"),
                            ("no_cbp", "women_no_cbp_n", "Women in the no-CBP group, n")):
            hidden = m1[f"{g}_n"][i]
            add("Cohort", lab, f"{PAPER[key]:,}", hidden_marker if hidden else f"{fem[f'{g}_n']:,}", PAPER[key],
                None if hidden else fem[f"{g}_n"])
    i, age = _row_of(table_one, key="age")
    if age is not None:
        for g, lab in (("all", "all"), ("cbp", "CBP"), ("no_cbp", "no CBP")):
            med, q1, q3 = PAPER["age"][g]
            hidden = m1[f"{g}_n"][i] or age[f"{g}_median"] is None
            run = hidden_marker if hidden else f"{age[f'{g}_median']:.0f} ({age[f'{g}_q1']:.0f}-{age[f'{g}_q3']:.0f})"
            add("Cohort", f"Age, median (IQR), {lab}", f"{med} ({q1}-{q3})", run, med,
                None if hidden else age[f"{g}_median"])

    mp = suppression_cells(pa_prevalence, "pa_prevalence", min_count=min_count)
    for c in MET_CATEGORIES:
        n_paper, prev_paper = PAPER["pa"][c]
        i, r = _row_of(pa_prevalence, category=c)
        if r is None:
            continue
        hide_n, hide_p = mp["all_n"][i], mp["cbp_pct"][i]
        add("Physical activity", f"MET {c}: n", f"{n_paper:,}", hidden_marker if hide_n else f"{r['all_n']:,}",
            n_paper, None if hide_n else r["all_n"])
        run = (hidden_marker if hide_p else "" if r["cbp_pct"] is None else
               f"{r['cbp_pct']:.1f} ({r['cbp_pct_low']:.1f}-{r['cbp_pct_high']:.1f})")
        add("Physical activity", f"MET {c}: CBP prevalence, % (95 % CI)", f"{prev_paper}", run, prev_paper,
            None if hide_p or r["cbp_pct"] is None else r["cbp_pct"])
    _, tot = _row_of(pa_prevalence, category="all")
    if tot is not None:
        add("Physical activity", "Chi-square test, 3 x 2 table", f"p {PAPER['pa_p']}",
            (f"chi2 = {tot['chi2']:.1f}, df = {tot['dof']}, {p_phrase(tot['p_value'])}"
             if tot["chi2"] is not None else ""), None, tot["p_value"])

    found: dict[tuple[str, str], dict] = {}
    for name, df in model_results.items():
        _check_or_table(name, df)
        a = study.find_analysis(name)
        if a is None or a.role != study.PRIMARY:
            continue
        for r in df.iter_rows(named=True):
            e = study.exposure_of(str(r["term"]))
            if e is not None and e.name in a.paper_or and (a.key, e.name) not in found:
                found[(a.key, e.name)] = r
    for a in study.PRIMARY_ANALYSES:
        for name, paper in a.paper_or.items():
            e, (o, lo, hi, p) = study.exposure(name), paper.as_tuple()
            r = found.get((a.key, name))
            run = f"{_fmt_or(r['or'], r['or_low'], r['or_high'])}, {p_phrase(r['p'])}" if r else "not fitted"
            add("Models", f"{a.label}: OR {e.term_label} (95 % CI)", f"{o:.2f} ({lo:.2f}-{hi:.2f}), {p}",
                run, o, r["or"] if r else None)

    ms = suppression_cells(stratified, "stratified", min_count=min_count)
    for s in study.STRATA:
        for e in study.PRIMARY_EXPOSURES:
            if s not in e.paper_stratified:
                continue
            paper = e.paper_stratified[s]
            i, r = _row_of(stratified, stratum=s, exposure=e.name)
            unit = f" {e.unit}" if e.unit else ""
            d = e.decimals
            label = f"{s.capitalize()}: {e.label}"
            for g, pv, lab in (("cbp", paper.cbp, "CBP"), ("no_cbp", paper.no_cbp, "no CBP")):
                hidden = r is None or ms[f"{g}_n"][i] or r[f"{g}_median"] is None
                add("Stratified", f"{label}, {lab} (run: median)", f"{pv}{unit}",
                    hidden_marker if hidden and r is not None else "" if hidden
                    else f"{r[f'{g}_median']:.{d}f}{unit}", pv, None if hidden else r[f"{g}_median"])
            hidden = r is None or ms["p_value"][i]
            add("Stratified", f"{label}, Mann-Whitney U p", paper.p,
                hidden_marker if hidden and r is not None else "" if hidden else p_phrase(r["p_value"]),
                None, None if hidden else r["p_value"])
    return pl.DataFrame(rows, schema={"section": pl.String, "quantity": pl.String, "paper": pl.String,
                                      "this_run": pl.String, "paper_value": pl.Float64, "run_value": pl.Float64})


# --------------------------------------------------------------------------------------------------------
# figures


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI, metadata=_PNG_META)
    return buf.getvalue()


def figure_pa_prevalence(pa: pl.DataFrame, *, min_count: int = MIN_COUNT) -> tuple[bytes, list[str]]:
    """Bar chart of CBP prevalence per MET category with Wilson 95 % CIs and the paper's values (PNG, labels)."""
    mask = suppression_cells(pa, "pa_prevalence", min_count=min_count)
    marker = suppressed_marker(min_count)
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    labels = []
    for x, c in enumerate(MET_CATEGORIES):
        i, r = _row_of(pa, category=c)
        hidden = r is None or mask["cbp_pct"][i] or r["cbp_pct"] is None
        n_txt = marker if r is None or mask["all_n"][i] else f"{r['all_n']:,}"
        labels.append(f"{c}\nn = {n_txt}")
        if hidden:
            ax.text(x, 1.0, f"suppressed\n(< {min_count})", ha="center", va="bottom", fontsize=8)
        else:
            err = [[r["cbp_pct"] - r["cbp_pct_low"]], [r["cbp_pct_high"] - r["cbp_pct"]]]
            ax.bar(x, r["cbp_pct"], width=0.6, color="#9ecae9", edgecolor="#4c78a8", yerr=err, capsize=5,
                   error_kw=dict(ecolor="#333333"), label="this run (95 % CI)" if x == 0 else None)
        ax.plot(x + 0.18, PAPER["pa"][c][1], marker="D", color="black", mfc="white", linestyle="none",
                markersize=6, label="paper" if x == 0 else None)
    ax.set_xticks(range(len(MET_CATEGORIES)), labels)
    ax.set_xlabel("Physical activity, MET-min/week")
    ax.set_ylabel("CBP prevalence, %")
    ax.set_ylim(0, None)
    ax.set_title("CBP prevalence by physical activity")
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _png(fig), labels


def figure_forest(model_results: Mapping[str, pl.DataFrame], *,
                  title: str = "Mixed logistic regression: odds ratios") -> tuple[bytes, list[str]]:
    """Forest plot of the models' ORs (log scale), the paper's ORs beside the exposures of the paper's analyses
    (PNG, labels)."""
    items: list[tuple[str, float, float, float, tuple | None]] = []
    headers: list[tuple[int, str]] = []
    for name, df in model_results.items():
        _check_or_table(name, df)
        headers.append((len(items), model_label(name)))
        a = study.find_analysis(name)
        paper_or = a.paper_or if a is not None and a.role == study.PRIMARY else {}
        for r in df.iter_rows(named=True):
            term = str(r["term"])
            if term.lower() in INTERCEPT_TERMS:
                continue
            vals = (r["or"], r["or_low"], r["or_high"])
            if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in vals):
                continue
            e = study.exposure_of(term)
            paper = paper_or[e.name].as_tuple() if e is not None and e.name in paper_or else None
            items.append((term_label(term), *vals, paper))
    rows = len(items) + len(headers)
    fig = Figure(figsize=(7.0, 1.2 + 0.32 * max(rows, 1)))
    ax = fig.add_subplot()
    labels: list[str] = []
    ticks: list[float] = []
    y = 0.0
    paper_labelled = False
    hdr = dict(headers)
    for idx, (lab, o, lo, hi, paper) in enumerate(items):
        if idx in hdr:
            y -= 1
            ticks.append(y)
            labels.append(hdr[idx])
        y -= 1
        ticks.append(y)
        labels.append(lab)
        ax.errorbar(o, y, xerr=[[o - lo], [hi - o]], fmt="o", color="#4c78a8", capsize=3,
                    label="this run" if idx == 0 else None)
        if paper is not None:
            po, plo, phi, _ = paper
            ax.errorbar(po, y - 0.3, xerr=[[po - plo], [phi - po]], fmt="D", color="black", mfc="white",
                        capsize=3, label=None if paper_labelled else "paper")
            paper_labelled = True
    for idx, name in headers:
        if idx >= len(items):          # a model without plottable terms
            y -= 1
            ticks.append(y)
            labels.append(name)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(OR_TICKS))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_yticks(ticks, labels)
    for t, text in zip(ax.get_yticklabels(), labels):
        if text in hdr.values():
            t.set_fontweight("bold")
    ax.set_ylim(y - 1, 0)
    ax.set_xlabel("Odds ratio (95 % CI), log scale")
    if items:
        lo = min(min(it[2], it[4][1] if it[4] else it[2]) for it in items)
        hi = max(max(it[3], it[4][2] if it[4] else it[3]) for it in items)
        ax.set_xlim(min(lo, 1.0) / 1.1, max(hi, 1.0) * 1.1)
        fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no model results", transform=ax.transAxes, ha="center")
    ax.set_title(title)
    fig.tight_layout(rect=(0, 0.05 if items else 0, 1, 1))
    return _png(fig), labels


def figure_comparison(forest: pl.DataFrame, models: list[str]) -> tuple[bytes, list[str]]:
    """The exposures' ORs of each model side by side (log scale): one row per (analysis, exposure), one marker per
    model. ``forest``: analysis, term, model, or, or_low, or_high (:func:`~cbp_platform.segmentation.compare.
    forest_rows`)."""
    terms = [e.z_column for e in study.EXPOSURES]
    keys = [(a, t) for a in dict.fromkeys(forest["analysis"].to_list()) for t in terms
            if forest.filter((pl.col("analysis") == a) & (pl.col("term") == t)).height]
    fig = Figure(figsize=(7.0, 1.4 + 0.55 * max(len(keys), 1)))
    ax = fig.add_subplot()
    colours = ("#4c78a8", "#f58518", "#54a24b", "#b279a2")
    labels, ticks = [], []
    step = 0.6 / max(len(models), 1)
    for i, (analysis, term) in enumerate(keys):
        y = -float(i)
        ticks.append(y)
        labels.append(f"{model_label(analysis)}: {term_label(term)}")
        for k, model in enumerate(models):
            r = forest.filter((pl.col("analysis") == analysis) & (pl.col("term") == term) & (pl.col("model") == model))
            if not r.height:
                continue
            o, lo, hi = r["or"][0], r["or_low"][0], r["or_high"][0]
            if not all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in (o, lo, hi)):
                continue
            ax.errorbar(o, y + 0.3 - (k + 0.5) * step, xerr=[[o - lo], [hi - o]], fmt="o", capsize=3,
                        color=colours[k % len(colours)], label=model if i == 0 else None)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator((0.25, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 4.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_yticks(ticks, labels)
    ax.set_ylim(-len(keys) + 0.4, 0.6)
    ax.set_xlabel("Odds ratio per 2 SD (95 % CI), log scale")
    ax.set_title("Odds ratios by segmentation model")
    if keys:
        fig.legend(loc="lower center", ncol=len(models), fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no model results", transform=ax.transAxes, ha="center")
    fig.tight_layout(rect=(0, 0.08 if keys else 0, 1, 1))
    return _png(fig), labels + list(models)


def _measure_label(e: study.Exposure) -> str:
    """An exposure as a measured quantity with its fixed unit: ``LMM index``, ``InterMAT %``."""
    return f"{e.measure} {e.unit}" if e.unit else e.measure


def comparison_tables(c: Mapping) -> dict[str, pl.DataFrame]:
    """The report's tables of one model comparison (:func:`cbp_platform.segmentation.compare` output)."""
    a, b = c["primary"]["name"], c["other"]["name"]
    dice = pl.DataFrame([{"Class": k, "Mean Dice": f"{v['mean']:.3f}", "Worst participant": f"{v['min']:.3f}",
                          "Participants": str(v["n"])} for k, v in c["label_dice"].items()])
    ag = c["agreement"]
    rows = []
    for e in study.EXPOSURES:
        if e.name in ag:
            x = ag[e.name]
            rows.append({"Measure": _measure_label(e), "ICC(A,1)": f"{x['icc']:.4f}",
                         "Mean difference (% of primary)": f"{x['bias']:+.2f} %",
                         "95 % limits of agreement": f"{x['loa_low']:+.2f} % to {x['loa_high']:+.2f} %",
                         "Proportional (slope)": f"{x['proportional']['slope']:+.3f}"})
    agree = pl.DataFrame(rows, schema=["Measure", "ICC(A,1)", "Mean difference (% of primary)",
                                       "95 % limits of agreement", "Proportional (slope)"])
    ors = []
    for r in pl.DataFrame(c["forest"]).iter_rows(named=True) if c["forest"] else []:
        ors.append({"Analysis": model_label(r["analysis"]),
                    "Exposure": term_label(r["term"]), "Model": r["model"],
                    "OR (95 % CI)": _fmt_or(r["or"], r["or_low"], r["or_high"]), "p": format_p(r["p"])})
    ors_df = pl.DataFrame(ors, schema=["Analysis", "Exposure", "Model", "OR (95 % CI)", "p"])
    truth = []
    sides = [c[side].get("truth") or {} for side in ("primary", "other")]
    measured = [e for e in study.EXPOSURES if any(e.name in t for t in sides if t.get("n"))]
    for side, t in zip(("primary", "other"), sides):
        if t.get("n"):
            truth.append({"Model": c[side]["name"], "Participants": str(t["n"]),
                          "Min Dice": f"{min(t['dice'].values()):.3f}",
                          **{f"{e.label} ICC / bias": (f"{t[e.name]['icc']:.4f} / {t[e.name]['bias']:+.2f} %"
                                                       if e.name in t else "") for e in measured}})
    truth_df = pl.DataFrame(truth, schema=["Model", "Participants", "Min Dice",
                                           *(f"{e.label} ICC / bias" for e in measured)])
    models = pl.DataFrame([{"Role": role, "Model": c[side]["name"], "Backend": c[side]["backend"],
                            "Weights sha256": c[side]["weights_sha256"][:16] + "...",
                            "Participants": str(c[side].get("segmented", ""))}
                           for role, side in (("primary", "primary"), ("compared", "other"))])
    return {"models": models, "dice": dice, "agreement": agree, "odds_ratios": ors_df, "truth": truth_df,
            "names": pl.DataFrame({"a": [a], "b": [b]})}


def figure_flow(flow: pl.DataFrame) -> tuple[bytes, list[str]]:
    """The exclusion flow as a diagram: start and analysed boxes, one side box per exclusion rule (PNG, labels)."""
    fl = list(flow.iter_rows(named=True))
    steps = [r for r in fl if r["criterion"] not in ("start", "analysed")]
    start = next(r for r in fl if r["criterion"] == "start")
    end = next(r for r in fl if r["criterion"] == "analysed")
    n = len(steps)
    fig = Figure(figsize=(8.0, 1.6 + 0.45 * n))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 10)
    ax.set_ylim(-(n + 2), 1)
    ax.axis("off")
    box = dict(boxstyle="round,pad=0.4", facecolor="#eef3f8", edgecolor="#4c78a8")
    side = dict(boxstyle="round,pad=0.3", facecolor="#f7f7f7", edgecolor="#999999")
    labels = [f"{start['description']}\nn = {start['remaining']:,}", f"{end['description']}\nn = {end['remaining']:,}"]
    ax.text(2.2, 0, labels[0], ha="center", va="center", fontsize=9, bbox=box)
    ax.text(2.2, -(n + 1), labels[1], ha="center", va="center", fontsize=9, bbox=box, fontweight="bold")
    ax.annotate("", xy=(2.2, -(n + 1) + 0.45), xytext=(2.2, -0.45),
                arrowprops=dict(arrowstyle="->", color="#4c78a8", linewidth=1.2))
    for j, r in enumerate(steps, start=1):
        text = f"{r['description']}: n = {r['excluded']:,}"
        labels.append(text)
        ax.annotate("", xy=(4.3, -j), xytext=(2.2, -j), arrowprops=dict(arrowstyle="->", color="#999999"))
        ax.text(4.4, -j, text, ha="left", va="center", fontsize=8, bbox=side,
                color="black" if r["excluded"] else "#777777")
    return _png(fig), labels


# --------------------------------------------------------------------------------------------------------
# rendering


def model_table(df: pl.DataFrame) -> pl.DataFrame:
    """A model's OR table in display form: Term, OR (95 % CI), p."""
    rows = [{"Term": term_label(str(r["term"])), "OR (95 % CI)": _fmt_or(r["or"], r["or_low"], r["or_high"]),
             "p": format_p(r["p"])}
            for r in df.iter_rows(named=True) if str(r["term"]).lower() not in INTERCEPT_TERMS]
    return pl.DataFrame(rows, schema={"Term": pl.String, "OR (95 % CI)": pl.String, "p": pl.String})


def _flatten(d: Mapping, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for k in sorted(d, key=str):
        v = d[k]
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += _flatten(v, key + ".")
        elif isinstance(v, (list, tuple)):
            out.append((key, json.dumps(list(v), sort_keys=True, default=str)))
        else:
            out.append((key, "" if v is None else str(v)))
    return out


def _anchor(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-").lower()


def _md_cell(v: str) -> str:
    return v.replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pl.DataFrame) -> str:
    """A text table as GitHub Markdown (cells escaped; nulls empty)."""
    lines = ["| " + " | ".join(_md_cell(c) for c in df.columns) + " |",
             "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(_md_cell(v or "") for v in row) + " |" for row in df.iter_rows()]
    return "\n".join(lines)


def _html_table(df: pl.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v or '')}</td>" for v in row) + "</tr>"
                   for row in df.iter_rows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eef3f8; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
.note { color: #555; font-size: 0.9em; }
"""


class _Doc:
    """Builds the Markdown and HTML versions of the report side by side."""

    def __init__(self, title: str):
        self.md: list[str] = [f"# {title}", ""]
        self.html: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str, anchor: str, level: int = 2) -> None:
        self.md += [f"{'#' * level} {text}", ""]
        self.html.append(f'<h{level} id="{anchor}">{html.escape(text)}</h{level}>')

    def para(self, text: str, note: bool = False) -> None:
        self.md += [f"*{text}*" if note else text, ""]
        cls = ' class="note"' if note else ""
        self.html.append(f"<p{cls}>{html.escape(text)}</p>")

    def table(self, df: pl.DataFrame) -> None:
        self.md += [markdown_table(df), ""]
        self.html.append(_html_table(df))

    def figure(self, rel: str, alt: str) -> None:
        self.md += [f"![{alt}]({rel})", ""]
        self.html.append(f'<p><img src="{html.escape(rel)}" alt="{html.escape(alt)}"></p>')

    def pre(self, text: str) -> None:
        fence = "~~~~" if "```" in text else "```"
        self.md += [fence, text.rstrip("\n"), fence, ""]
        self.html.append(f"<pre>{html.escape(text)}</pre>")

    def markdown(self) -> str:
        return "\n".join(self.md).rstrip("\n") + "\n"

    def html_page(self, title: str) -> str:
        body = "\n".join(self.html)
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n"
                f"</body>\n</html>\n")


SECTIONS = ("flow", "table-one", "physical-activity", "models", "stratified", "paper-vs-run", "lineage",
            "disclosure")
STROBE_SECTIONS = ("main-results", "site-effect", "sensitivity")   # present when the analyses carry assessments
APPENDIX_SECTION = "appendix-model-checks"
SECONDARY_SECTION = "secondary-exposures"      # present when the registry has a secondary exposure with results
COMPARISON_SECTION = "model-comparison"        # present when model comparisons are supplied
DEFAULT_TITLE = "Back-muscle composition and chronic back pain"


class _Report:
    """The report being built: the document, the published texts (CSV tables) and the figures, in the order they
    are written. Each ``_section_*`` function adds one numbered section; numbering follows the sections present."""

    def __init__(self, title: str, min_count: int):
        self.title = title
        self.min_count = min_count
        self.doc = _Doc(title)
        self.tables: dict[str, bytes] = {}
        self.figures: dict[str, tuple[bytes, list[str]]] = {}
        self._number = 0

    def section(self, title: str, anchor: str) -> None:
        self._number += 1
        self.doc.heading(f"{self._number}. {title}", anchor)

    def publish(self, name: str, df: pl.DataFrame) -> pl.DataFrame:
        """Keep ``df`` (already in published form) as ``tables/<name>.csv``; returns it."""
        self.tables[f"tables/{name}.csv"] = df.write_csv().encode()
        return df

    def figure(self, name: str, png_labels: tuple[bytes, list[str]], alt: str) -> None:
        self.figures[name] = png_labels
        self.doc.figure(f"figures/{name}.png", alt)

    def texts(self) -> dict[str, bytes]:
        return {"report.md": self.doc.markdown().encode(), "report.html": self.doc.html_page(self.title).encode(),
                **self.tables}

    def write(self, out: Path, known_pseudonyms: Iterable[str]) -> dict[str, Path]:
        """Check every text and figure label for pseudonyms, then write them all (atomically, each)."""
        texts = self.texts()
        known = set(known_pseudonyms)
        for rel, payload in texts.items():
            assert_no_pseudonyms(payload.decode(), known, where=rel)
        for name, (_, labels) in self.figures.items():
            assert_no_pseudonyms("\n".join(labels), known, where=f"figures/{name}.png")
        written: dict[str, Path] = {}
        for name, (png, _) in self.figures.items():
            path = out / "figures" / f"{name}.png"
            atomic_write_bytes(path, png)
            written[f"figure_{name}"] = path
        for rel, payload in texts.items():
            path = out / rel
            atomic_write_bytes(path, payload)
            key = {"report.md": "report_md", "report.html": "report_html"}.get(rel, "table_" + Path(rel).stem)
            written[key] = path
        return written


def _standardisation_text(exposures: Iterable[study.Exposure], standardisation: Mapping | None,
                          lmm_unit: str) -> str | None:
    """What "per k SD" is in this cohort: ``LMM mean 22.10, SD 3.00 (2 SD = 6.00 cm3/(kg/m))``."""
    parts = []
    for e in exposures:
        st = (standardisation or {}).get(e.name)
        if st and all(isinstance(st.get(k), float) and math.isfinite(st[k]) for k in ("mean", "sd")):
            k = e.sd_multiple
            parts.append(f"{e.label} mean {st['mean']:.2f}, SD {st['sd']:.2f} ({k} SD = {k * st['sd']:.2f} "
                         f"{e.unit_for(lmm_unit)})")
    return "Standardisation of this cohort: " + "; ".join(parts) + "." if parts else None


def _model_tables(r: _Report, models: Mapping[str, pl.DataFrame], summaries: Mapping[str, str]) -> None:
    """One OR table (and its summary) per model, each published as ``tables/model_<name>.csv``."""
    for name, df in models.items():
        r.doc.heading(f"Model: {model_label(name)} ({name})", _anchor(f"model-{name}"), level=3)
        r.doc.table(r.publish(f"model_{name}", model_table(df)))
        if name in summaries:
            r.doc.pre(summaries[name])


def _intro(r: _Report, flow: pl.DataFrame, lineage: Mapping) -> None:
    fl = {row["criterion"]: row for row in flow.iter_rows(named=True)}
    r.doc.para(f"Reproduction of Ziegelmayer et al., Lancet Reg Health Eur 2025 (NAKO whole-body MRI). "
               f"{fl['analysed']['remaining']:,} of {fl['start']['remaining']:,} participants with an MRI delivery "
               f"analysed. Data release {lineage.get('release', 'n/a')}. "
               f"Analysis cohort hash: {lineage.get('cohort_hash', 'n/a')}.")


def _section_flow(r: _Report, flow: pl.DataFrame) -> None:
    r.section("Exclusion flow", "flow")
    r.doc.para("Rules applied in this order; a participant is counted once, at the first rule they fail.")
    r.doc.table(r.publish("flow", publishable(flow, "flow", min_count=r.min_count)))
    r.figure("flow", figure_flow(flow), "Exclusion flow diagram")


def _section_table_one(r: _Report, table_one: pl.DataFrame) -> None:
    r.section("Participant characteristics (Table 1)", "table-one")
    r.doc.para("Continuous: median (IQR), Mann-Whitney U test; categorical: n (% of answered), Pearson "
               "chi-square test without continuity correction; CBP vs no CBP.", note=True)
    rows = _role_rows(table_one, study.PRIMARY)
    r.doc.table(r.publish("table_one", publishable(rows, "table_one", min_count=r.min_count)))


MISSINGNESS_LABELS = {"met_min_week": "Physical activity (MET-min/week)", "diabetes": "Diabetes",
                      "dyslipidemia": "Dyslipidemia", "osteoporosis": "Osteoporosis",
                      "osteoarthritis": "Osteoarthritis"}


def _section_missing_data(r: _Report, missingness: pl.DataFrame | None, strobe: Mapping[str, Mapping]) -> None:
    """STROBE items 12c and 14b: missing covariate answers per variable and site, and how they were handled."""
    if missingness is None or not missingness.height:
        return
    from cbp_platform.analysis.cohort import publishable_missingness

    r.section("Missing data", "missing-data")
    r.doc.para("Participants with a missing covariate answer (physical activity or a comorbidity) are excluded from "
               "the primary, complete-case analysis (see the flow). The table counts the missing answers among the "
               "analysed participants and those excluded only for such an answer (the multiple-imputation "
               "population), per variable and site. The sensitivity analysis imputes them by chained equations "
               "(predictive mean matching, the outcome in every imputation model) and pools the GLMM over the "
               "completed data sets with Rubin's rules (docs/statistics.md).", note=True)
    shown = publishable_missingness(missingness, min_count=r.min_count).with_columns(
        pl.col("variable").replace_strict(MISSINGNESS_LABELS, default=pl.col("variable")))
    shown = shown.rename({"variable": "Variable", "site": "Site", "participants_n": "Participants",
                          "missing_n": "Missing", "missing_pct": "Missing %"})
    r.doc.table(r.publish("missingness", shown.select([pl.col(c).cast(pl.String) for c in shown.columns])))
    for key, t in strobe.items():
        mi = t.get("mi")
        if mi and mi.get("m"):
            fmi = ", ".join(f"{study.exposure_of(k).label if study.exposure_of(k) else k} {v:.3f}"
                            for k, v in mi["fmi"].items())
            r.doc.para(f"{t['label']}: m = {mi['m']} imputations, {mi['nobs']:,} participants, "
                       f"{mi['imputed_participants']:,} with at least one imputed answer; fraction of missing "
                       f"information {fmi}.")
        elif mi is not None:
            r.doc.para(f"{t['label']}: no participant is missing only a covariate answer; multiple imputation "
                       "was not needed.")


def _section_physical_activity(r: _Report, pa: pl.DataFrame) -> None:
    r.section("Physical activity and CBP prevalence", "physical-activity")
    r.doc.para("MET-min/week: low < 500, moderate 500-5000, high > 5000. Prevalence with Wilson 95 % CI; "
               "chi-square test of the 3 x 2 table.", note=True)
    r.doc.table(r.publish("pa_prevalence", publishable(pa, "pa_prevalence", min_count=r.min_count)))
    r.figure("pa_prevalence", figure_pa_prevalence(pa, min_count=r.min_count),
             "CBP prevalence by physical activity category")


def _section_models(r: _Report, models: Mapping[str, pl.DataFrame], summaries: Mapping[str, str],
                    standardisation: Mapping | None, lmm_unit: str) -> None:
    r.section("Mixed logistic regression", "models")
    r.doc.para("Odds ratios per 2 SD of the standardised exposures, adjusted for age, sex, diabetes, dyslipidemia, "
               "osteoporosis, osteoarthritis and physical activity; study site as random intercept.", note=True)
    text = _standardisation_text(study.PRIMARY_EXPOSURES, standardisation, lmm_unit)
    if text:
        r.doc.para(text)
    if not models:
        r.doc.para("No model results were supplied to this report.")
    _model_tables(r, models, summaries)
    for name in summaries:
        if name not in models and not _is_secondary(name):
            r.doc.heading(f"Model summary: {name}", _anchor(f"summary-{name}"), level=3)
            r.doc.pre(summaries[name])
    r.figure("forest", figure_forest(models), "Forest plot of odds ratios (log scale), paper values for comparison")


def _section_strobe(r: _Report, strobe: Mapping[str, Mapping]) -> None:
    """STROBE item 16 (main results: unadjusted and adjusted, profile CIs; the site effect) and items 12e / 17 (the
    sensitivity analyses in one table per analysis)."""
    if not strobe:
        return
    sections = (
        ("Main results: unadjusted and adjusted odds ratios", "main-results", "main", "main_results",
         "Per 2 SD of each exposure. Unadjusted: the exposure alone with the study site as random intercept; "
         "adjusted: the full model. Profile-likelihood CIs (primary) beside Wald CIs; complete-case analysis "
         "(participants with a missing answer excluded, see the flow), the documented primary."),
        ("The site effect", "site-effect", "site", "site_effect",
         "Random-intercept SD on the logit scale; ICC on the latent scale, sigma^2 / (sigma^2 + pi^2 / 3); median "
         "odds ratio exp(0.954 sigma), the median OR between two participants with the same covariates in two "
         "random sites. CIs from the profile likelihood of the SD; the variance is tested against 0 at its "
         "boundary."),
        ("Sensitivity analyses", "sensitivity", "sensitivity", "sensitivity",
         "The exposures' ORs under each estimator: the primary GLMM (adaptive Gauss-Hermite, 25 nodes) with Wald "
         "and profile CIs, its Laplace approximation, site as a fixed effect, GEE (population-averaged ORs) and, "
         "where run, multiple imputation of the missing covariates (Rubin's rules)."),
    )
    for title, anchor, table, published, note in sections:
        r.section(title, anchor)
        r.doc.para(note, note=True)
        for key, t in strobe.items():
            r.doc.heading(f"{t['label']} ({key})", _anchor(f"{anchor}-{key}"), level=3)
            r.doc.table(r.publish(f"{published}_{key}", t[table]))


def figure_calibration(bins: list[Mapping], title: str) -> tuple[bytes, list[str]]:
    """Observed vs mean predicted risk per bin with Wilson 95 % CIs (bins under the disclosure limit left out)."""
    fig = Figure(figsize=(4.2, 4.0))
    ax = fig.add_subplot(111)
    top = max([0.05] + [b["observed_high"] for b in bins] + [b["mean_predicted"] for b in bins]) * 1.08
    ax.plot([0, top], [0, top], color="0.6", lw=1, ls="--")
    if bins:
        x = [b["mean_predicted"] for b in bins]
        y = [b["observed"] for b in bins]
        err = [[b["observed"] - b["observed_low"] for b in bins], [b["observed_high"] - b["observed"] for b in bins]]
        ax.errorbar(x, y, yerr=err, fmt="o", color="#1f4e79", ms=4, capsize=2)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("Mean predicted probability")
    ax.set_ylabel("Observed proportion")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _png(fig), [title, "Mean predicted probability", "Observed proportion"]


def _section_appendix(r: _Report, strobe: Mapping[str, Mapping]) -> None:
    if not strobe:
        return
    r.section("Appendix: prediction and model checks", APPENDIX_SECTION)
    r.doc.para("In-sample discrimination and calibration of the conditional fitted probabilities (site effects "
               "included; no optimism correction), and the average marginal effect of each exposure per 2 SD "
               "(population-averaged over sites, delta-method CI).", note=True)
    for key, t in strobe.items():
        r.doc.heading(f"{t['label']} ({key})", _anchor(f"appendix-{key}"), level=3)
        r.doc.table(r.publish(f"prediction_{key}", t["prediction"]))
        r.doc.table(r.publish(f"marginal_effects_{key}", t["ame"]))
        r.doc.table(r.publish(f"calibration_{key}", t["calibration"]))
        r.figure(f"calibration_{key}", figure_calibration(t["bins"], f"Calibration: {t['label']}"),
                 f"Calibration plot, {t['label']}")


def _section_stratified(r: _Report, stratified: pl.DataFrame) -> None:
    r.section("Stratified comparisons", "stratified")
    r.doc.para("Within participants with osteoarthritis and with osteoporosis: CBP vs no CBP, two-sided "
               "Mann-Whitney U test.", note=True)
    rows = _role_rows(stratified, study.PRIMARY)
    r.doc.table(r.publish("stratified", publishable(rows, "stratified", min_count=r.min_count)))


def _section_paper_vs_run(r: _Report, paper_vs_run: pl.DataFrame) -> None:
    r.section("Paper vs this run", "paper-vs-run")
    r.doc.para("Paper values from the published abstract (docs/study.md); the abstract does not say whether the "
               "stratified values are medians or means (this run: medians).", note=True)
    r.doc.table(r.publish("paper_vs_run", paper_vs_run.select(
        pl.col("section").alias("Section"), pl.col("quantity").alias("Quantity"),
        pl.col("paper").alias("Paper"), pl.col("this_run").alias("This run"))))


def _section_secondary(r: _Report, table_one: pl.DataFrame, stratified: pl.DataFrame,
                       models: Mapping[str, pl.DataFrame], summaries: Mapping[str, str],
                       standardisation: Mapping | None, lmm_unit: str) -> None:
    """The secondary exposures (:data:`cbp_platform.study.SECONDARY_EXPOSURES`): described, standardised and
    modelled apart from the paper's, never beside a paper value. Absent when there is nothing to show."""
    exposures = study.SECONDARY_EXPOSURES
    t1, st = _role_rows(table_one, study.SECONDARY), _role_rows(stratified, study.SECONDARY)
    only_summary = [n for n in summaries if _is_secondary(n) and n not in models]    # e.g. a fit that failed
    if not exposures or not (t1.height or st.height or models or only_summary):
        return
    r.section("Secondary exposures", SECONDARY_SECTION)
    r.doc.para("Not exposures of the paper: shown here only, never in its tables, its forest plot or the paper-vs-"
               "run comparison. " + " ".join(f"{e.label}: {e.description}." for e in exposures) + " Each secondary "
               "model is the paper's model of the same outcome with the exposure added (the paper's exposures and "
               "adjustment unchanged), fitted on the participants with the exposure measured.", note=True)
    text = _standardisation_text(exposures, standardisation, lmm_unit)
    if text:
        r.doc.para(text)
    if t1.height:
        r.doc.para("By CBP group: median (IQR), Mann-Whitney U test.", note=True)
        r.doc.table(r.publish("secondary_table_one", publishable(t1, "table_one", min_count=r.min_count)))
    if st.height:
        r.doc.para("Within participants with osteoarthritis and with osteoporosis: CBP vs no CBP.", note=True)
        r.doc.table(r.publish("secondary_stratified", publishable(st, "stratified", min_count=r.min_count)))
    if not models:
        r.doc.para("No secondary model results were supplied to this report.")
    _model_tables(r, models, summaries)
    for name in only_summary:
        r.doc.heading(f"Model summary: {model_label(name)} ({name})", _anchor(f"summary-{name}"), level=3)
        r.doc.pre(summaries[name])
    if not models:
        return
    r.figure("forest_secondary", figure_forest(models, title="Secondary analyses: odds ratios"),
             "Forest plot of the secondary analyses' odds ratios (log scale)")


def _section_lineage(r: _Report, lineage: Mapping) -> None:
    r.section("Lineage", "lineage")
    r.doc.table(pl.DataFrame(_flatten(lineage), schema={"Item": pl.String, "Value": pl.String}, orient="row"))


def _section_disclosure(r: _Report) -> None:
    r.section("Disclosure control", "disclosure")
    r.doc.para(f"Counts below {r.min_count} and every statistic computed from them are shown as "
               f"'{suppressed_marker(r.min_count)}'; where a hidden count could be recovered by subtraction from a "
               "published total, the next smallest cell of the same row or variable is hidden too. The exclusion "
               "flow lists processing counts and is not suppressed. No pseudonym appears in this report.")


def _section_comparisons(r: _Report, comparisons: list[Mapping]) -> None:
    if not comparisons:
        return
    r.section("Segmentation model comparison", COMPARISON_SECTION)
    r.doc.para("A second registered model segmented the same participants (its results never replace the "
               "primary's). Dice between the two models' label maps, agreement of their metrics (the compared "
               "model minus the primary, in % of the primary), the study's odds ratios computed from each "
               "model's metrics through the same cohort rules and mixed model, and each model against the "
               "simulated truth where one exists.", note=True)
    for c in comparisons:
        name = c["other"]["name"]
        t = comparison_tables(c)
        r.doc.heading(f"{c['primary']['name']} vs {name}", _anchor(f"comparison-{name}"), level=3)
        r.doc.table(t["models"])
        r.doc.table(t["dice"])
        r.doc.table(t["agreement"])
        r.doc.table(t["odds_ratios"])
        if t["truth"].height:
            r.doc.table(t["truth"])
        key = f"comparison_{_anchor(name)}"
        forest = (pl.DataFrame(c["forest"]) if c["forest"] else
                  pl.DataFrame(schema=["analysis", "term", "model", "or", "or_low", "or_high"]))
        r.figure(key, figure_comparison(forest, [c["primary"]["name"], name]),
                 f"Odds ratios by model: {c['primary']['name']} and {name}")
        for tname in ("dice", "agreement", "odds_ratios"):
            r.publish(f"{key}_{tname}", t[tname])


def render_report(out_dir: str | Path, *, flow: pl.DataFrame, table_one: pl.DataFrame,
                  pa_prevalence: pl.DataFrame, stratified: pl.DataFrame,
                  model_results: Mapping[str, pl.DataFrame], model_summaries: Mapping[str, str],
                  paper_vs_run: pl.DataFrame, lineage: Mapping, known_pseudonyms: Iterable[str] = (),
                  standardisation: Mapping[str, Mapping[str, float]] | None = None,
                  lmm_unit: str = "cm3/(kg/m)", min_count: int = MIN_COUNT,
                  comparisons: Iterable[Mapping] = (), title: str = DEFAULT_TITLE,
                  strobe: Mapping[str, Mapping] | None = None,
                  missingness: pl.DataFrame | None = None) -> dict[str, Path]:
    """Write the report, its figures and published tables under ``out_dir``; returns name -> path.

    Tables are the *numeric* ones (``table_one(...)`` etc., ``AnalysisCohort.flow``); they are suppressed
    (limit ``min_count``, marker ``<min_count``) and formatted here; their secondary-exposure rows (``role``)
    go to the secondary section. ``model_results``: analysis name or key (:mod:`cbp_platform.study`) -> frame
    with columns term, or, or_low, or_high, p; secondary analyses go to the secondary section, the others to
    the models section (the paper's analyses beside the paper's values). ``known_pseudonyms``: the cohort's
    pseudonyms (e.g. ``cohort.frame['pseudonym']``); any of them, or any pseudonym-shaped token, in the texts
    raises :class:`~cbp_platform.analysis.disclosure.PseudonymLeak` before a file is written.
    ``standardisation`` (``AnalysisCohort.standardisation``) and ``lmm_unit`` state what "per 2 SD" means in
    this run. ``strobe``: analysis key -> its STROBE tables (:func:`cbp_platform.analysis.strobe.analysis_tables`):
    main results, site effect, sensitivity table and the appendix of model checks. ``missingness``: missing
    covariate answers per variable and site (raw counts, :func:`cbp_platform.analysis.cohort.missingness_counts`),
    published with small cells suppressed in the section "Missing data".
    """
    for name, df in model_results.items():
        _check_or_table(name, df)
    primary = {k: v for k, v in model_results.items() if not _is_secondary(k)}
    secondary = {k: v for k, v in model_results.items() if _is_secondary(k)}
    r = _Report(title, min_count)
    _intro(r, flow, lineage)
    _section_flow(r, flow)
    _section_table_one(r, table_one)
    _section_missing_data(r, missingness, strobe or {})
    _section_physical_activity(r, pa_prevalence)
    _section_models(r, primary, model_summaries, standardisation, lmm_unit)
    _section_strobe(r, strobe or {})
    _section_stratified(r, stratified)
    _section_paper_vs_run(r, paper_vs_run)
    _section_secondary(r, table_one, stratified, secondary, model_summaries, standardisation, lmm_unit)
    _section_lineage(r, lineage)
    _section_disclosure(r)
    _section_comparisons(r, list(comparisons))
    _section_appendix(r, strobe or {})
    return r.write(Path(out_dir), known_pseudonyms)
