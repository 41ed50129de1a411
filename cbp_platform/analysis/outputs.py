"""Everything the report publishes, computed from an analysis cohort in memory: for ``cbp reproduce`` (rebuild a
release's report and compare it with the published one) and ``cbp impact`` (what a pending correction or
retirement would change). The analysis assets compute the same through the warehouse; this module calls the very
functions they call (:mod:`.tables`, :mod:`.models`, :mod:`.publish`), in the same order, on the same frame.
Framework-free: no Dagster.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from cbp_platform import study
from cbp_platform.analysis.disclosure import MIN_COUNT
from cbp_platform.analysis.publish import ReportTables, report_models
from cbp_platform.stats import ModelCheckError

MODEL_ASSETS = ("cbp_association_model", "pain_intensity_model")   # the assets that fit the analyses, in order
NOT_RELEASED = ("comparison",)          # published tables of the model comparisons: not part of a data release


def analysis_outputs(frame: pl.DataFrame, flow: pl.DataFrame, *, lmm_unit: str, cohort_hash: str, nagq: int = 25,
                     min_epv: float = 10.0, imputation_frame: pl.DataFrame | None = None,
                     imputations: int = 20) -> ReportTables:
    """The report's numeric tables from the analysed ``frame`` (as the warehouse stores ``analysis_cohort``: sorted
    by pseudonym, ``met_category`` as text) and the exclusion ``flow``. A failed check of a primary analysis
    raises :class:`ModelCheckError`, as it fails its asset."""
    from cbp_platform.analysis.cohort import MET_CATEGORY, missingness_counts
    from cbp_platform.analysis.models import failed_fit, fit_analysis, fits_frame, results_frame
    from cbp_platform.analysis.tables import physical_activity_prevalence, stratified_comparisons, table_one

    described = frame.with_columns(pl.col("met_category").cast(pl.String).cast(MET_CATEGORY))
    fits = []
    for asset in MODEL_ASSETS:
        primary, *secondary = study.analyses_fitted_by(asset)
        kw = dict(cohort_hash=cohort_hash, nagq=nagq, min_epv=min_epv)
        fits.append(fit_analysis(frame, primary, imputation_frame=imputation_frame, imputations=imputations, **kw))
        for a in secondary:
            try:
                fits.append(fit_analysis(frame, a, **kw))
            except ModelCheckError as exc:
                fits.append(failed_fit(frame, a, exc, cohort_hash=cohort_hash))
    results = results_frame(fits).with_row_index("_order").sort("analysis", "_order", maintain_order=True)
    return ReportTables(flow=flow, table_one=table_one(described, lmm_unit=lmm_unit),
                        pa_prevalence=physical_activity_prevalence(described),
                        stratified=stratified_comparisons(described), model_results=results.drop("_order"),
                        model_fits=fits_frame(fits).sort("analysis", maintain_order=True),
                        missingness=missingness_counts(imputation_frame if imputation_frame is not None else frame))


def published_tables(tables: ReportTables, *, standardisation: dict, lmm_unit: str,
                     min_count: int = MIN_COUNT) -> dict[str, bytes]:
    """The published tables (``tables/<name>.csv``: suppressed, formatted) the report of ``tables`` would have,
    rendered as the report renders them (in a scratch folder, removed after)."""
    from cbp_platform.analysis.report import paper_vs_run_table, render_report

    from cbp_platform.analysis.strobe import analysis_tables

    models, summaries = report_models(tables.model_results, tables.model_fits)
    pvr = paper_vs_run_table(flow=tables.flow, table_one=tables.table_one, pa_prevalence=tables.pa_prevalence,
                             stratified=tables.stratified, model_results=models, min_count=min_count)
    with tempfile.TemporaryDirectory(prefix="cbp-reproduce-") as tmp:
        render_report(tmp, flow=tables.flow, table_one=tables.table_one, pa_prevalence=tables.pa_prevalence,
                      stratified=tables.stratified, model_results=models, model_summaries=summaries,
                      paper_vs_run=pvr, lineage={}, standardisation=standardisation, lmm_unit=lmm_unit,
                      min_count=min_count, strobe=analysis_tables(tables.model_results, tables.model_fits, min_count),
                      missingness=tables.missingness)
        return read_tables(Path(tmp))


def read_tables(report_dir: Path) -> dict[str, bytes]:
    """``tables/<name>.csv`` of a report folder (the model comparisons' tables left out: no release holds them)."""
    d = Path(report_dir) / "tables"
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.csv")) if not p.name.startswith(NOT_RELEASED)}


@dataclass(frozen=True)
class Difference:
    table: str
    row: str
    column: str
    published: str
    rebuilt: str


def compare_tables(published: dict[str, bytes], rebuilt: dict[str, bytes]) -> list[Difference]:
    """Every cell in which two sets of published tables differ (a table only in one of them: one difference)."""
    import csv
    import io

    out = []
    for name in sorted(set(published) | set(rebuilt)):
        if name not in published or name not in rebuilt:
            out.append(Difference(name, "", "", "present" if name in published else "absent",
                                  "present" if name in rebuilt else "absent"))
            continue
        a = list(csv.reader(io.StringIO(published[name].decode())))
        b = list(csv.reader(io.StringIO(rebuilt[name].decode())))
        head = a[0] if a else []
        for i in range(max(len(a), len(b))):
            ra, rb = (a[i] if i < len(a) else []), (b[i] if i < len(b) else [])
            label = (ra or rb or [""])[0]
            for j in range(max(len(ra), len(rb))):
                va, vb = (ra[j] if j < len(ra) else ""), (rb[j] if j < len(rb) else "")
                if va != vb:
                    out.append(Difference(name, f"{i}: {label}"[:60], head[j] if j < len(head) else str(j), va, vb))
    return out


def _reported(tables: ReportTables) -> pl.DataFrame:
    """The reported model's rows of every primary analysis (intercept left out)."""
    primary = [a.name for a in study.PRIMARY_ANALYSES]
    fits = tables.model_fits.filter(pl.col("primary_model").is_not_null())
    reported = dict(zip(fits["analysis"], fits["primary_model"]))
    rows = tables.model_results.filter(pl.col("analysis").is_in(primary)
                                       & (pl.col("model") == pl.col("analysis").replace_strict(reported, default=None)))
    return rows.filter(pl.col("term") != "(Intercept)").select("analysis", "term", "or", "or_low", "or_high", "p")


def _crosses_one(low: float | None, high: float | None) -> bool | None:
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return None
    return low <= 1.0 <= high


def impact(before: ReportTables, after: ReportTables, *, changed_participants: int,
           min_count: int = MIN_COUNT) -> dict:
    """What moving from ``before`` (a release's tables) to ``after`` (the data in force now) changes in the
    published results: every reported OR and its CI (and whether the CI now crosses 1), each exclusion-flow step,
    each Table 1 cell. Withheld, with the reason only, when fewer than ``min_count`` participants changed: one
    participant's contribution must not be readable from a difference. No pseudonym."""
    if changed_participants < min_count:
        return {"withheld": True, "changed_participants": f"<{min_count}",
                "why": f"fewer than {min_count} participants changed: an impact computed from them could reveal "
                          "one participant's values; it is shown once more changes are pending"}
    a, b = _reported(before), _reported(after)
    joined = a.join(b, on=["analysis", "term"], how="full", suffix="_new", coalesce=True).sort("analysis", "term")
    ors = []
    for r in joined.iter_rows(named=True):
        was, now = _crosses_one(r["or_low"], r["or_high"]), _crosses_one(r["or_low_new"], r["or_high_new"])
        ors.append({"analysis": r["analysis"], "term": r["term"],
                    "or": [r["or"], r["or_new"]], "ci_low": [r["or_low"], r["or_low_new"]],
                    "ci_high": [r["or_high"], r["or_high_new"]], "p": [r["p"], r["p_new"]],
                    "or_change": None if r["or"] is None or r["or_new"] is None else r["or_new"] - r["or"],
                    "ci_crosses_1": [was, now], "crossing_changed": was is not None and now is not None and was != now})
    fa = dict(zip(before.flow["criterion"], before.flow["excluded"].fill_null(0)))
    fb = dict(zip(after.flow["criterion"], after.flow["excluded"].fill_null(0)))
    ra = dict(zip(before.flow["criterion"], before.flow["remaining"]))
    rb = dict(zip(after.flow["criterion"], after.flow["remaining"]))
    flow = [{"step": c, "excluded": [int(fa.get(c) or 0), int(fb.get(c) or 0)],
             "remaining": [ra.get(c), rb.get(c)]} for c in after.flow["criterion"]]
    t1 = _table_one_changes(before.table_one, after.table_one)
    return {"withheld": False, "changed_participants": changed_participants, "odds_ratios": ors,
            "ci_crossing_changed": [f"{o['analysis']}: {o['term']}" for o in ors if o["crossing_changed"]],
            "flow": flow, "flow_changed": [f["step"] for f in flow if f["excluded"][0] != f["excluded"][1]],
            "table_one": t1}


def _table_one_changes(a: pl.DataFrame, b: pl.DataFrame) -> list[dict]:
    """Table 1 cells that differ (numeric columns of rows matched by their key), before and after."""
    key = [c for c in ("key", "level") if c in a.columns and c in b.columns]
    if not key:
        return []
    num = [c for c, t in a.schema.items() if t.is_numeric() and c in b.columns and c not in key]
    j = a.select(*key, *num).join(b.select(*key, *num), on=key, how="full", suffix="_new", coalesce=True)
    out = []
    for r in j.iter_rows(named=True):
        for c in num:
            x, y = r[c], r[f"{c}_new"]
            if x != y and not (isinstance(x, float) and isinstance(y, float) and math.isclose(x, y, rel_tol=1e-12)):
                out.append({"row": " ".join(str(r[k]) for k in key), "column": c, "values": [x, y]})
    return out


def format_impact(doc: dict) -> str:
    """The impact report as text (no pseudonym)."""
    lines = [f"impact of the pending changes on release {doc['release']} (content {doc['release_content_hash'][:16]}"
             f" -> {doc['pending_content_hash'][:16]})"]
    if not doc.get("pending"):
        return "\n".join(lines + [f"  {doc.get('note')}"])
    if doc.get("withheld"):
        return "\n".join(lines + [f"  withheld: {doc['why']}"])
    since = doc.get("since_release", {})
    lines.append(f"  {doc['changed_participants']} participants changed ({since.get('corrected_participants')} "
                 f"corrected, {since.get('new_participants')} new, {len(since.get('retirements', []))} deliveries "
                 f"retired); analysed {doc['analysed'][0]} -> {doc['analysed'][1]}")
    wa = max([len("analysis"), *(len(o["analysis"]) for o in doc["odds_ratios"])])
    wt = max([len("term"), *(len(o["term"]) for o in doc["odds_ratios"])])
    lines.append(f"  {'analysis':<{wa}} {'term':<{wt}} {'OR (95% CI) in the release':>28}   {'OR (95% CI) now':>28}  "
                 "CI crosses 1")
    for o in doc["odds_ratios"]:
        def ci(i: int) -> str:
            if o["or"][i] is None:
                return "-"
            return f"{o['or'][i]:.3f} ({o['ci_low'][i]:.3f}-{o['ci_high'][i]:.3f})"
        cross = "/".join("-" if c is None else ("yes" if c else "no") for c in o["ci_crosses_1"])
        flag = "  CHANGED" if o["crossing_changed"] else ""
        lines.append(f"  {o['analysis']:<{wa}} {o['term']:<{wt}} {ci(0):>28}   {ci(1):>28}  {cross}{flag}")
    moved = [f for f in doc["flow"] if f["excluded"][0] != f["excluded"][1]]
    lines.append("  exclusion flow: " + ("; ".join(f"{f['step']} {f['excluded'][0]} -> {f['excluded'][1]}"
                                                   for f in moved) or "unchanged"))
    lines.append(f"  Table 1: {len(doc['table_one'])} cells change")
    return "\n".join(lines)
