"""Publishing: from the analysis assets' warehouse tables to the report folder with its lineage manifest.

The ``published_results`` asset reads the tables and gathers the lineage from the warehouse and the Dagster
instance; everything in between lives here, framework-free:

* :func:`stale_inputs`: which report inputs were not computed on the current analysis cohort;
* :func:`report_models`: the report's model OR tables and summaries from ``model_results`` / ``model_fits``
  (analysis keys of :mod:`cbp_platform.study`; a secondary analysis that could not be fitted is a summary saying
  so);
* :func:`publish`: the paper-vs-run table, the report (:func:`cbp_platform.analysis.report.render_report`) and the
  manifest (:func:`cbp_platform.lineage.build_manifest` output, completed with the written files' checksums).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from cbp_platform import study
from cbp_platform.analysis.disclosure import MIN_COUNT
from cbp_platform.analysis.report import paper_vs_run_table, render_report
from cbp_platform.lineage import MANIFEST_NAME, add_files, report_lineage, write_manifest


@dataclass(frozen=True)
class ReportTables:
    """The analysis assets' tables a report is made of (numeric forms, as the warehouse holds them)."""

    flow: pl.DataFrame
    table_one: pl.DataFrame
    pa_prevalence: pl.DataFrame
    stratified: pl.DataFrame
    model_results: pl.DataFrame       # every analysis' rows (column ``analysis``), in row order
    model_fits: pl.DataFrame          # one row per analysis
    missingness: pl.DataFrame | None = None   # missing covariate answers per variable and site (raw counts)


@dataclass(frozen=True)
class Published:
    out_dir: Path
    written: dict[str, Path]
    manifest_path: Path
    paper_vs_run: pl.DataFrame


def stale_inputs(lineage_rows: pl.DataFrame, cohort_hash: str, assets: Iterable[str]) -> list[str]:
    """The ``assets`` whose latest lineage row was recorded on another analysis cohort than ``cohort_hash``."""
    made_on = {r["asset"]: r["cohort_hash"] for r in lineage_rows.iter_rows(named=True)}
    return [a for a in assets if made_on.get(a) != cohort_hash]


def sensitivity_text(results: pl.DataFrame, analysis: str) -> str:
    """The exposures' ORs of one analysis by estimator (GLMM, Laplace, site-fixed, GEE)."""
    terms = [e.z_column for e in study.EXPOSURES]
    r = results.filter((pl.col("analysis") == analysis) & pl.col("term").is_in(terms))
    lines = ["Exposure ORs per 2 SD by estimator (sensitivity):"]
    for row in r.sort("term", "model").iter_rows(named=True):
        lines.append(f"  {row['term']:<8} {row['model']:<14} OR {row['or']:.3f} ({row['or_low']:.3f}-"
                     f"{row['or_high']:.3f}), p {row['p']:.2g}")
    return "\n".join(lines)


def _correlation_text(fit: Mapping) -> str:
    """The exposures' correlations in the fitted rows (a secondary analysis: collinearity with the paper's)."""
    corr = json.loads(fit.get("exposure_correlations") or "{}")
    if not corr:
        return ""
    parts = []
    for pair, r in corr.items():
        x, y = (study.exposure_of(t) for t in pair.split("~"))
        if x is not None and y is not None and r is not None:
            parts.append(f"{x.label} ~ {y.label} r = {r:.2f}")
    return "\n\nCorrelation of the standardised exposures in the fitted data: " + "; ".join(parts) if parts else ""


def report_models(results: pl.DataFrame, fits: pl.DataFrame) -> tuple[dict[str, pl.DataFrame], dict[str, str]]:
    """analysis key -> the reported model's OR table, and analysis key -> its summary text (fits in order)."""
    models, summaries = {}, {}
    for r in fits.iter_rows(named=True):
        a = study.find_analysis(r["analysis"])
        key = a.key if a is not None else r["analysis"]
        if r.get("error"):                  # a secondary analysis whose checks failed (model_fits keeps why)
            summaries[key] = (f"Not fitted on {r['nobs']} participants: {r['error']}. The paper's analyses are not "
                              "affected.")
            continue
        models[key] = results.filter((pl.col("analysis") == r["analysis"]) & (pl.col("model") == r["primary_model"]))
        secondary = a is not None and a.role == study.SECONDARY
        summaries[key] = (f"{r['method']} (nAGQ {r['nagq']}), {r['nobs']} participants, {r['events']} "
                          f"events, {r['n_groups']} sites; site variance {r['site_variance']:.4f}; "
                          f"log-likelihood {r['loglik']:.3f} (Laplace {r['laplace_loglik']:.3f}); "
                          f"converged {r['converged']}"
                          # a primary analysis' estimators are one table (the report's sensitivity section)
                          + ("\n\n" + sensitivity_text(results, r["analysis"]) + _correlation_text(r)
                             if secondary else ""))
    return models, summaries


def publish(out_dir: Path, tables: ReportTables, manifest: dict, *, run_id: str, known_pseudonyms: Iterable[str],
            cohort_meta: Mapping, comparisons: list[Mapping] = (), min_count: int = MIN_COUNT) -> Published:
    """Write the report of ``tables`` and its lineage manifest (``manifest`` from :func:`cbp_platform.lineage.
    build_manifest`) into ``out_dir``. Disclosure guards and rendering errors raise before the manifest is written.
    """
    from cbp_platform.analysis.strobe import analysis_tables

    models, summaries = report_models(tables.model_results, tables.model_fits)
    strobe = analysis_tables(tables.model_results, tables.model_fits, min_count)
    paper_vs_run = paper_vs_run_table(flow=tables.flow, table_one=tables.table_one,
                                      pa_prevalence=tables.pa_prevalence, stratified=tables.stratified,
                                      model_results=models, min_count=min_count)
    written = render_report(out_dir, flow=tables.flow, table_one=tables.table_one,
                            pa_prevalence=tables.pa_prevalence, stratified=tables.stratified, model_results=models,
                            model_summaries=summaries, paper_vs_run=paper_vs_run,
                            lineage=report_lineage(manifest, run_id), known_pseudonyms=known_pseudonyms,
                            standardisation=json.loads(cohort_meta["standardisation"]),
                            lmm_unit=cohort_meta["lmm_unit"], min_count=min_count, comparisons=comparisons,
                            strobe=strobe, missingness=tables.missingness)
    path = Path(out_dir) / MANIFEST_NAME
    write_manifest(path, add_files(manifest, Path(out_dir), written))
    return Published(out_dir=Path(out_dir), written=written, manifest_path=path, paper_vs_run=paper_vs_run)
