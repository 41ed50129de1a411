"""The published report: ``report.md``, ``report.html`` (self-contained), PNG figures and the published tables.

:func:`render_report` takes the numeric tables (:mod:`cbp_platform.analysis.tables`), the model OR tables and
summaries, the paper-vs-run table (:func:`paper_vs_run_table`) and the lineage, and writes

* ``report.md`` and ``report.html``: exclusion flow, Table 1, physical activity, models (OR tables, forest
  plot, summaries), stratified comparisons, paper vs this run, lineage, disclosure note;
* ``figures/flow.png``, ``figures/pa_prevalence.png``, ``figures/forest.png``;
* ``tables/*.csv``: the published (suppressed, formatted) tables.

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

from cbp_platform.analysis.cohort import MET_CATEGORIES
from cbp_platform.analysis.disclosure import MIN_COUNT, SUPPRESSED, assert_no_pseudonyms
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
    # (model, exposure) -> OR per 2 SD, 95 % CI, p as printed
    "or": {("cbp", "lmm"): (0.87, 0.79, 0.95, "p = 0.003"),
           ("cbp", "imat"): (1.22, 1.13, 1.30, "p < 0.0001"),
           ("nrs_high", "lmm"): (0.63, 0.57, 0.70, "p < 0.0001"),
           ("nrs_high", "imat"): (1.22, 1.13, 1.30, "p < 0.0001")},
    # (stratum, exposure) -> CBP, no CBP, p as printed (the abstract does not say median or mean)
    "stratified": {("osteoarthritis", "lmm"): (22.9, 24.3, "p < 0.0001"),
                   ("osteoarthritis", "imat"): (7.53, 6.96, "p < 0.0001"),
                   ("osteoporosis", "lmm"): (20.9, 21.3, "p = 0.16"),
                   ("osteoporosis", "imat"): (8.43, 7.9, "p = 0.0019")},
}
MODEL_LABELS = {"cbp": "CBP", "nrs_high": "Pain intensity NRS >= 4"}
EXPOSURE_LABELS = {"lmm": "LMM, per 2 SD", "imat": "InterMAT, per 2 SD"}
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


def exposure_of(term: str) -> str | None:
    """'lmm' or 'imat' when a model term is one of the standardised exposures (e.g. ``lmm_z2``), else None."""
    t = term.lower()
    if "imat" in t or "intermat" in t:
        return "imat"
    if "lmm" in t:
        return "lmm"
    return None


def paper_model_of(name: str) -> str | None:
    """Which of the paper's models a model-results key stands for: 'nrs_high' (pain intensity) or 'cbp'."""
    n = name.lower()
    if "nrs" in n or "intensity" in n:
        return "nrs_high"
    if "cbp" in n:
        return "cbp"
    return None


def term_label(term: str) -> str:
    exp = exposure_of(term)
    return EXPOSURE_LABELS[exp] if exp else TERM_LABELS.get(term, term)


def model_label(name: str) -> str:
    m = paper_model_of(name)
    return MODEL_LABELS[m] if m else name


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
    null where not a single number). Cells the published tables suppress are suppressed here too.
    """
    rows: list[dict] = []

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
            SUPPRESSED if hidden else f"{part['cbp_n']:,} ({pct:.1f} %)", PAPER["cbp_pct"], None if hidden else pct)
    i, fem = _row_of(table_one, key="female")
    if fem is not None:
        hidden = m1["all_n"][i]
        add("Cohort", "Women, n (%)", f"{PAPER['women_n']:,} ({PAPER['women_pct']} %)",
            SUPPRESSED if hidden else f"{fem['all_n']:,} ({fem['all_pct']:.1f} %)", PAPER["women_pct"],
            None if hidden else fem["all_pct"])
        for g, key, lab in (("cbp", "women_cbp_n", "Women in the CBP group, n"),
                            ("no_cbp", "women_no_cbp_n", "Women in the no-CBP group, n")):
            hidden = m1[f"{g}_n"][i]
            add("Cohort", lab, f"{PAPER[key]:,}", SUPPRESSED if hidden else f"{fem[f'{g}_n']:,}", PAPER[key],
                None if hidden else fem[f"{g}_n"])
    i, age = _row_of(table_one, key="age")
    if age is not None:
        for g, lab in (("all", "all"), ("cbp", "CBP"), ("no_cbp", "no CBP")):
            med, q1, q3 = PAPER["age"][g]
            hidden = m1[f"{g}_n"][i] or age[f"{g}_median"] is None
            run = SUPPRESSED if hidden else f"{age[f'{g}_median']:.0f} ({age[f'{g}_q1']:.0f}-{age[f'{g}_q3']:.0f})"
            add("Cohort", f"Age, median (IQR), {lab}", f"{med} ({q1}-{q3})", run, med,
                None if hidden else age[f"{g}_median"])

    mp = suppression_cells(pa_prevalence, "pa_prevalence", min_count=min_count)
    for c in MET_CATEGORIES:
        n_paper, prev_paper = PAPER["pa"][c]
        i, r = _row_of(pa_prevalence, category=c)
        if r is None:
            continue
        hide_n, hide_p = mp["all_n"][i], mp["cbp_pct"][i]
        add("Physical activity", f"MET {c}: n", f"{n_paper:,}", SUPPRESSED if hide_n else f"{r['all_n']:,}",
            n_paper, None if hide_n else r["all_n"])
        run = (SUPPRESSED if hide_p else "" if r["cbp_pct"] is None else
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
        m = paper_model_of(name)
        for r in df.iter_rows(named=True):
            e = exposure_of(str(r["term"]))
            if m and e and (m, e) not in found:
                found[(m, e)] = r
    for (m, e), (o, lo, hi, p) in PAPER["or"].items():
        r = found.get((m, e))
        run = f"{_fmt_or(r['or'], r['or_low'], r['or_high'])}, {p_phrase(r['p'])}" if r else "not fitted"
        add("Models", f"{MODEL_LABELS[m]}: OR {EXPOSURE_LABELS[e]} (95 % CI)", f"{o:.2f} ({lo:.2f}-{hi:.2f}), {p}",
            run, o, r["or"] if r else None)

    ms = suppression_cells(stratified, "stratified", min_count=min_count)
    for (s, e), (cbp, no_cbp, p) in PAPER["stratified"].items():
        i, r = _row_of(stratified, stratum=s, exposure=e)
        unit = " %" if e == "imat" else ""
        d = 2 if e == "imat" else 1
        label = f"{s.capitalize()}: {'InterMAT' if e == 'imat' else 'LMM'}"
        for g, pv, lab in (("cbp", cbp, "CBP"), ("no_cbp", no_cbp, "no CBP")):
            hidden = r is None or ms[f"{g}_n"][i] or r[f"{g}_median"] is None
            add("Stratified", f"{label}, {lab} (run: median)", f"{pv}{unit}",
                SUPPRESSED if hidden and r is not None else "" if hidden else f"{r[f'{g}_median']:.{d}f}{unit}",
                pv, None if hidden else r[f"{g}_median"])
        hidden = r is None or ms["p_value"][i]
        add("Stratified", f"{label}, Mann-Whitney U p", p,
            SUPPRESSED if hidden and r is not None else "" if hidden else p_phrase(r["p_value"]),
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
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    labels = []
    for x, c in enumerate(MET_CATEGORIES):
        i, r = _row_of(pa, category=c)
        hidden = r is None or mask["cbp_pct"][i] or r["cbp_pct"] is None
        n_txt = SUPPRESSED if r is None or mask["all_n"][i] else f"{r['all_n']:,}"
        labels.append(f"{c}\nn = {n_txt}")
        if hidden:
            ax.text(x, 1.0, "suppressed\n(< 5)", ha="center", va="bottom", fontsize=8)
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


def figure_forest(model_results: Mapping[str, pl.DataFrame]) -> tuple[bytes, list[str]]:
    """Forest plot of the models' ORs (log scale), the paper's ORs beside the exposures (PNG, labels)."""
    items: list[tuple[str, float, float, float, tuple | None]] = []
    headers: list[tuple[int, str]] = []
    for name, df in model_results.items():
        _check_or_table(name, df)
        headers.append((len(items), model_label(name)))
        m = paper_model_of(name)
        for r in df.iter_rows(named=True):
            term = str(r["term"])
            if term.lower() in INTERCEPT_TERMS:
                continue
            vals = (r["or"], r["or_low"], r["or_high"])
            if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in vals):
                continue
            e = exposure_of(term)
            paper = PAPER["or"].get((m, e)) if m and e else None
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
    ax.set_title("Mixed logistic regression: odds ratios")
    fig.tight_layout(rect=(0, 0.05 if items else 0, 1, 1))
    return _png(fig), labels


def figure_comparison(forest: pl.DataFrame, models: list[str]) -> tuple[bytes, list[str]]:
    """The exposures' ORs of each model side by side (log scale): one row per (analysis, exposure), one marker per
    model. ``forest``: analysis, term, model, or, or_low, or_high (:func:`~cbp_platform.segmentation.compare.
    forest_rows`)."""
    keys = [(a, t) for a in dict.fromkeys(forest["analysis"].to_list()) for t in ("lmm_z2", "imat_z2")
            if forest.filter((pl.col("analysis") == a) & (pl.col("term") == t)).height]
    fig = Figure(figsize=(7.0, 1.4 + 0.55 * max(len(keys), 1)))
    ax = fig.add_subplot()
    colours = ("#4c78a8", "#f58518", "#54a24b", "#b279a2")
    labels, ticks = [], []
    step = 0.6 / max(len(models), 1)
    for i, (analysis, term) in enumerate(keys):
        y = -float(i)
        ticks.append(y)
        m = paper_model_of(analysis)
        labels.append(f"{MODEL_LABELS.get(m, analysis)}: {term_label(term)}")
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


def comparison_tables(c: Mapping) -> dict[str, pl.DataFrame]:
    """The report's tables of one model comparison (:func:`cbp_platform.segmentation.compare` output)."""
    a, b = c["primary"]["name"], c["other"]["name"]
    dice = pl.DataFrame([{"Class": k, "Mean Dice": f"{v['mean']:.3f}", "Worst participant": f"{v['min']:.3f}",
                          "Participants": str(v["n"])} for k, v in c["label_dice"].items()])
    ag = c["agreement"]
    rows = []
    for key, label in (("lmm", "LMM index"), ("imat", "InterMAT %")):
        if key in ag:
            x = ag[key]
            rows.append({"Measure": label, "ICC(A,1)": f"{x['icc']:.4f}",
                         "Mean difference (% of primary)": f"{x['bias']:+.2f} %",
                         "95 % limits of agreement": f"{x['loa_low']:+.2f} % to {x['loa_high']:+.2f} %",
                         "Proportional (slope)": f"{x['proportional']['slope']:+.3f}"})
    agree = pl.DataFrame(rows, schema=["Measure", "ICC(A,1)", "Mean difference (% of primary)",
                                       "95 % limits of agreement", "Proportional (slope)"])
    ors = []
    for r in pl.DataFrame(c["forest"]).iter_rows(named=True) if c["forest"] else []:
        ors.append({"Analysis": MODEL_LABELS.get(paper_model_of(r["analysis"]), r["analysis"]),
                    "Exposure": term_label(r["term"]), "Model": r["model"],
                    "OR (95 % CI)": _fmt_or(r["or"], r["or_low"], r["or_high"]), "p": format_p(r["p"])})
    ors_df = pl.DataFrame(ors, schema=["Analysis", "Exposure", "Model", "OR (95 % CI)", "p"])
    truth = []
    for side in ("primary", "other"):
        t = c[side].get("truth") or {}
        if t.get("n"):
            truth.append({"Model": c[side]["name"], "Participants": str(t["n"]),
                          "Min Dice": f"{min(t['dice'].values()):.3f}",
                          "LMM ICC / bias": f"{t['lmm']['icc']:.4f} / {t['lmm']['bias']:+.2f} %",
                          "InterMAT ICC / bias": f"{t['imat']['icc']:.4f} / {t['imat']['bias']:+.2f} %"})
    truth_df = pl.DataFrame(truth, schema=["Model", "Participants", "Min Dice", "LMM ICC / bias",
                                           "InterMAT ICC / bias"])
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


def render_report(out_dir: str | Path, *, flow: pl.DataFrame, table_one: pl.DataFrame,
                  pa_prevalence: pl.DataFrame, stratified: pl.DataFrame,
                  model_results: Mapping[str, pl.DataFrame], model_summaries: Mapping[str, str],
                  paper_vs_run: pl.DataFrame, lineage: Mapping, known_pseudonyms: Iterable[str] = (),
                  standardisation: Mapping[str, Mapping[str, float]] | None = None,
                  lmm_unit: str = "cm3/(kg/m)", min_count: int = MIN_COUNT,
                  comparisons: Iterable[Mapping] = (),
                  title: str = "Back-muscle composition and chronic back pain") -> dict[str, Path]:
    """Write the report, its figures and published tables under ``out_dir``; returns name -> path.

    Tables are the *numeric* ones (``table_one(...)`` etc., ``AnalysisCohort.flow``); they are suppressed
    and formatted here. ``model_results``: model name -> frame with columns term, or, or_low, or_high, p
    (names containing 'cbp' / 'nrs' are matched to the paper's CBP / pain-intensity models).
    ``known_pseudonyms``: the cohort's pseudonyms (e.g. ``cohort.frame['pseudonym']``); any of them, or any
    pseudonym-shaped token, in the texts raises :class:`~cbp_platform.analysis.disclosure.PseudonymLeak`
    before a file is written. ``standardisation`` (``AnalysisCohort.standardisation``) and ``lmm_unit`` state
    what "per 2 SD" means in this run.
    """
    out = Path(out_dir)
    for name, df in model_results.items():
        _check_or_table(name, df)
    pub = {
        "flow": publishable(flow, "flow", min_count=min_count),
        "table_one": publishable(table_one, "table_one", min_count=min_count),
        "pa_prevalence": publishable(pa_prevalence, "pa_prevalence", min_count=min_count),
        "stratified": publishable(stratified, "stratified", min_count=min_count),
        "paper_vs_run": paper_vs_run.select(
            pl.col("section").alias("Section"), pl.col("quantity").alias("Quantity"),
            pl.col("paper").alias("Paper"), pl.col("this_run").alias("This run")),
    }
    models = {name: model_table(df) for name, df in model_results.items()}

    figures: dict[str, tuple[bytes, list[str]]] = {
        "flow": figure_flow(flow),
        "pa_prevalence": figure_pa_prevalence(pa_prevalence, min_count=min_count),
        "forest": figure_forest(model_results),
    }

    fl = {r["criterion"]: r for r in flow.iter_rows(named=True)}
    doc = _Doc(title)
    doc.para(f"Reproduction of Ziegelmayer et al., Lancet Reg Health Eur 2025 (NAKO whole-body MRI). "
             f"{fl['analysed']['remaining']:,} of {fl['start']['remaining']:,} participants with an MRI delivery "
             f"analysed. Analysis cohort hash: {lineage.get('cohort_hash', 'n/a')}.")

    doc.heading("1. Exclusion flow", "flow")
    doc.para("Rules applied in this order; a participant is counted once, at the first rule they fail.")
    doc.table(pub["flow"])
    doc.figure("figures/flow.png", "Exclusion flow diagram")

    doc.heading("2. Participant characteristics (Table 1)", "table-one")
    doc.para("Continuous: median (IQR), Mann-Whitney U test; categorical: n (% of answered), Pearson "
             "chi-square test without continuity correction; CBP vs no CBP.", note=True)
    doc.table(pub["table_one"])

    doc.heading("3. Physical activity and CBP prevalence", "physical-activity")
    doc.para("MET-min/week: low < 500, moderate 500-5000, high > 5000. Prevalence with Wilson 95 % CI; "
             "chi-square test of the 3 x 2 table.", note=True)
    doc.table(pub["pa_prevalence"])
    doc.figure("figures/pa_prevalence.png", "CBP prevalence by physical activity category")

    doc.heading("4. Mixed logistic regression", "models")
    doc.para("Odds ratios per 2 SD of the standardised exposures, adjusted for age, sex, diabetes, dyslipidemia, "
             "osteoporosis, osteoarthritis and physical activity; study site as random intercept.", note=True)
    if standardisation:
        parts = []
        for var, name, unit in (("lmm", "LMM", lmm_unit), ("imat", "InterMAT", "%")):
            st = standardisation.get(var)
            if st and all(isinstance(st.get(k), float) and math.isfinite(st[k]) for k in ("mean", "sd")):
                parts.append(f"{name} mean {st['mean']:.2f}, SD {st['sd']:.2f} (2 SD = {2 * st['sd']:.2f} {unit})")
        if parts:
            doc.para("Standardisation of this cohort: " + "; ".join(parts) + ".")
    if not models:
        doc.para("No model results were supplied to this report.")
    for name, table in models.items():
        doc.heading(f"Model: {model_label(name)} ({name})", _anchor(f"model-{name}"), level=3)
        doc.table(table)
        if name in model_summaries:
            doc.pre(model_summaries[name])
    for name in model_summaries:
        if name not in models:
            doc.heading(f"Model summary: {name}", _anchor(f"summary-{name}"), level=3)
            doc.pre(model_summaries[name])
    doc.figure("figures/forest.png", "Forest plot of odds ratios (log scale), paper values for comparison")

    doc.heading("5. Stratified comparisons", "stratified")
    doc.para("Within participants with osteoarthritis and with osteoporosis: CBP vs no CBP, two-sided "
             "Mann-Whitney U test.", note=True)
    doc.table(pub["stratified"])

    doc.heading("6. Paper vs this run", "paper-vs-run")
    doc.para("Paper values from the published abstract (docs/study.md); the abstract does not say whether the "
             "stratified values are medians or means (this run: medians).", note=True)
    doc.table(pub["paper_vs_run"])

    doc.heading("7. Lineage", "lineage")
    doc.table(pl.DataFrame(_flatten(lineage), schema={"Item": pl.String, "Value": pl.String}, orient="row"))

    doc.heading("8. Disclosure control", "disclosure")
    doc.para(f"Counts below {min_count} and every statistic computed from them are shown as '{SUPPRESSED}'; "
             "where a hidden count could be recovered by subtraction from a published total, the next smallest "
             "cell of the same row or variable is hidden too. The exclusion flow lists processing counts and is "
             "not suppressed. No pseudonym appears in this report.")

    texts: dict[str, bytes] = {
        "report.md": doc.markdown().encode(),
        "report.html": doc.html_page(title).encode(),
        **{f"tables/{k}.csv": v.write_csv().encode() for k, v in pub.items()},
        **{f"tables/model_{k}.csv": v.write_csv().encode() for k, v in models.items()},
    }
    comparisons = list(comparisons)
    if comparisons:
        doc.heading("9. Segmentation model comparison", "model-comparison")
        doc.para("A second registered model segmented the same participants (its results never replace the "
                 "primary's). Dice between the two models' label maps, agreement of their metrics (the compared "
                 "model minus the primary, in % of the primary), the study's odds ratios computed from each "
                 "model's metrics through the same cohort rules and mixed model, and each model against the "
                 "simulated truth where one exists.", note=True)
    for c in comparisons:
        name = c["other"]["name"]
        t = comparison_tables(c)
        doc.heading(f"{c['primary']['name']} vs {name}", _anchor(f"comparison-{name}"), level=3)
        doc.table(t["models"])
        doc.table(t["dice"])
        doc.table(t["agreement"])
        doc.table(t["odds_ratios"])
        if t["truth"].height:
            doc.table(t["truth"])
        key = f"comparison_{_anchor(name)}"
        figures[key] = figure_comparison(pl.DataFrame(c["forest"]) if c["forest"] else
                                         pl.DataFrame(schema=["analysis", "term", "model", "or", "or_low",
                                                              "or_high"]),
                                         [c["primary"]["name"], name])
        doc.figure(f"figures/{key}.png", f"Odds ratios by model: {c['primary']['name']} and {name}")
        for tname in ("dice", "agreement", "odds_ratios"):
            texts[f"tables/{key}_{tname}.csv"] = t[tname].write_csv().encode()
    if comparisons:
        texts["report.md"] = doc.markdown().encode()
        texts["report.html"] = doc.html_page(title).encode()
    known = set(known_pseudonyms)
    for rel, payload in texts.items():
        assert_no_pseudonyms(payload.decode(), known, where=rel)
    for name, (_, labels) in figures.items():
        assert_no_pseudonyms("\n".join(labels), known, where=f"figures/{name}.png")

    written: dict[str, Path] = {}
    for name, (png, _) in figures.items():
        path = out / "figures" / f"{name}.png"
        atomic_write_bytes(path, png)
        written[f"figure_{name}"] = path
    for rel, payload in texts.items():
        path = out / rel
        atomic_write_bytes(path, payload)
        key = {"report.md": "report_md", "report.html": "report_html"}.get(rel, "table_" + Path(rel).stem)
        written[key] = path
    return written
