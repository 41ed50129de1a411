"""Cohort-level analysis: ``analysis_cohort``, the two mixed models, the descriptive tables and
``published_results`` (report + lineage manifest).

Every asset reads what the previous one wrote to the warehouse, so each is recomputed from all materialised
batches when it runs; each records a lineage row (run id, data version, upstream) in the warehouse table
``asset_lineage``. Pseudonyms stay in the internal tables (``analysis_cohort``, ``analysis_exclusions``);
nothing published carries them, and their logs print counts only.
"""

import json
import time
from datetime import datetime, timezone

import dagster as dg
import polars as pl

from assets.ingestion import participant_covariates, raw_mri_scans
from assets.segmentation import muscle_metrics, muscle_segmentations, segmentation_model
from cbp_platform.deployment import k8s_step_tags
from resources import DataRootResource, MissingTable, SegmentationRuntime, Warehouse
from resources.reviews import REVIEWS_ASSET, ReviewStore

COHORT_STEP = k8s_step_tags("cpu-large")    # whole-cohort steps: Kubernetes CPU nodes with memory headroom

COHORT_VERSION = "analysis_cohort/1"
MODEL_VERSION = "association_models/1"
TABLES_VERSION = "descriptive_tables/1"
REPORT_VERSION = "published_results/1"
PER_BATCH = (raw_mri_scans, participant_covariates, muscle_segmentations, muscle_metrics)
GROUP = "analysis"


# the report's names of the two models (cbp_platform.analysis.report: MODEL_LABELS, the paper's values)
REPORT_MODEL_KEY = {"cbp_association_model": "cbp", "pain_intensity_model": "nrs_high"}


class CohortConfig(dg.Config):
    lmm_normaliser: str = "weight_per_height"   # weight_per_height (cm3/(kg/m), the paper's), per_height2, ...


class ModelConfig(dg.Config):
    nagq: int = 25               # adaptive Gauss-Hermite points (1 = Laplace)
    min_events_per_variable: float = 10.0


def _lineage_row(context: dg.AssetExecutionContext, data_version: str, upstream: list[str],
                 cohort_hash: str) -> tuple[str, pl.DataFrame, dict]:
    """The asset's ``asset_lineage`` row, as a write for the same transaction as the asset's tables."""
    from cbp_platform.warehouse import now_utc

    asset = context.asset_key.to_user_string()
    df = pl.DataFrame([{"asset": asset, "run_id": context.run.run_id, "data_version": data_version,
                        "cohort_hash": cohort_hash, "upstream": json.dumps(upstream),
                        "code_version": context.assets_def.code_versions_by_key.get(context.asset_key) or "",
                        "recorded_at": now_utc()}])
    return ("asset_lineage", df, {"asset": asset})


def _required(warehouse: Warehouse, table: str, hint: str, **kw) -> pl.DataFrame:
    """A table the asset cannot do without: missing or empty, the run fails with ``hint``."""
    try:
        df = warehouse.table(table, **kw)
    except MissingTable:
        raise dg.Failure(description=f"{table} does not exist in the warehouse: {hint}") from None
    if df.height == 0:
        raise dg.Failure(description=f"{table} is empty: {hint}")
    return df


def _cohort_meta(warehouse: Warehouse) -> dict:
    return _required(warehouse, "analysis_cohort_meta", "materialise analysis_cohort first").row(0, named=True)


def _cohort_hash(warehouse: Warehouse) -> str:
    return _cohort_meta(warehouse)["cohort_hash"]


@dg.asset(op_tags=COHORT_STEP,
          deps=[*PER_BATCH, REVIEWS_ASSET], code_version=COHORT_VERSION, group_name=GROUP, kinds={"polars", "duckdb"},
          description="All materialised batches joined: inclusion rules with the exclusion flow (start -> one row "
                      "per reason -> analysed; reviewers' rejections of the current label maps at qc_rejected), "
                      "LMM index, MET categories, NRS >= 4, exposures per 2 SD. The cohort hash (content of the "
                      "analysed frame) is its data version.")
def analysis_cohort(context: dg.AssetExecutionContext, config: CohortConfig, warehouse: Warehouse) -> dg.MaterializeResult:
    from cbp_platform.analysis.cohort import build_analysis_cohort
    from cbp_platform.analysis.report import markdown_table
    from cbp_platform.qc import reviews as rv

    ingest = "ingest at least one batch first"
    cov = _required(warehouse, "participant_covariates", ingest, order_by=["pseudonym"])
    scans = _required(warehouse, "raw_mri_scans", ingest, order_by=["pseudonym"])
    metrics = warehouse.table("muscle_metrics", order_by=["pseudonym", "muscle"], missing_ok=True)
    if metrics is None:            # no batch segmented yet: every participant is excluded as not segmented
        metrics = pl.DataFrame()
    quarantine = warehouse.table("quarantine", order_by=["batch_key", "stage", "pseudonym"])
    reviews = ReviewStore(warehouse)
    history = reviews.reviews()
    prov = warehouse.table("provenance", columns=["pseudonym", "input_checksums", "recorded_at"],
                           where={"stage": "muscle_metrics"}, order_by=["recorded_at", "pseudonym"])
    decisions = rv.effective_reviews(history, rv.analysed_maps(reviews.current_maps(), prov))
    n_reviews, reviews_sha = rv.digest(history)
    try:
        cohort = build_analysis_cohort(cov, scans, metrics, quarantine, lmm_normaliser=config.lmm_normaliser,
                                       rejected=decisions.filter(pl.col("decision") == "reject"))
    except ValueError as exc:
        raise dg.Failure(description=f"analysis_cohort: {exc}") from None
    batches = sorted(set(cov["batch_key"].to_list()) | set(metrics["batch_key"].to_list() if metrics.height else []))
    meta = pl.DataFrame([{"cohort_hash": cohort.cohort_hash, "lmm_normaliser": cohort.lmm_normaliser,
                          "lmm_unit": cohort.lmm_unit, "standardisation": json.dumps(cohort.standardisation),
                          "batches": json.dumps(batches), "n_analysed": cohort.n,
                          "reviews_count": n_reviews, "reviews_sha256": reviews_sha,
                          "qc_rejected": int(decisions.filter(pl.col("decision") == "reject").height),
                          "qc_outdated": int(decisions["outdated"].sum()) if decisions.height else 0}])
    # the cohort, its exclusions, its flow, its meta (with the hash) and its lineage row in one transaction:
    # never a hash that describes another cohort than the one stored
    warehouse.replace_many([("analysis_cohort", cohort.frame, {}), ("analysis_exclusions", cohort.exclusions, {}),
                            ("exclusion_flow", cohort.flow, {}), ("analysis_cohort_meta", meta, {}),
                            _lineage_row(context, cohort.cohort_hash, [a.key.to_user_string() for a in PER_BATCH],
                                         cohort.cohort_hash)])
    flow_md = markdown_table(cohort.flow.select("description", pl.col("excluded").cast(pl.String),
                                                pl.col("remaining").cast(pl.String)))
    context.log.info(f"analysis cohort: {cohort.n} analysed from {len(batches)} batches "
                     f"(hash {cohort.cohort_hash[:12]})")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": cohort.n, "cohort_hash": cohort.cohort_hash, "batches": len(batches),
        "start": int(cohort.flow["remaining"][0]), "analysed": cohort.n,
        "exclusion_flow": dg.MetadataValue.md(flow_md), "lmm_normaliser": cohort.lmm_normaliser,
        "reviews": n_reviews, "reviews_sha256": reviews_sha,
        "standardisation": dg.MetadataValue.json(cohort.standardisation)},
        data_version=dg.DataVersion(cohort.cohort_hash))


def _fit_model(context: dg.AssetExecutionContext, config: ModelConfig, warehouse: Warehouse, *, name: str,
               outcome: str, population: str, answered_only: bool = False) -> dg.MaterializeResult:
    from cbp_platform.stats import PAPER_COVARIATES, ModelCheckError, fit_glmm, sensitivity_table
    from cbp_platform.warehouse import table_checksum

    frame = _cohort_frame(warehouse)
    if answered_only:
        frame = frame.filter(pl.col(outcome).is_not_null())
    cohort_hash = _cohort_hash(warehouse)
    fixed = list(PAPER_COVARIATES)
    t0 = time.perf_counter()
    try:
        res = fit_glmm(frame, outcome, fixed, "site", nagq=config.nagq, min_epv=config.min_events_per_variable)
        laplace = fit_glmm(frame, outcome, fixed, "site", nagq=1, min_epv=config.min_events_per_variable)
    except ModelCheckError as exc:
        raise dg.Failure(description=f"{name}: model checks failed on {frame.height} participants: {exc}",
                         metadata={"failed_checks": dg.MetadataValue.json(list(exc.names))}) from None
    seconds = time.perf_counter() - t0
    table = sensitivity_table(frame, outcome, fixed, "site", glmm=res)
    table = pl.concat([table, laplace.coefficients.with_columns(pl.lit("glmm_laplace").alias("model"))],
                      how="diagonal_relaxed")
    table = table.with_columns(pl.lit(name).alias("analysis"))
    d = res.diagnostics
    fit = pl.DataFrame([{
        "analysis": name, "outcome": outcome, "population": population, "method": res.method, "nagq": res.nagq,
        "primary_model": res.coefficients["model"][0],
        "nobs": res.nobs, "events": res.events, "n_groups": res.n_groups, "loglik": res.loglik, "aic": res.aic,
        "site_variance": res.site_variance, "site_sd": res.site_sd, "laplace_loglik": laplace.loglik,
        "converged": bool(d.converged), "fit_seconds": seconds,
        "checks": json.dumps([c.to_dict() for c in res.checks], default=str),
        "summary": str(res.sm_results.summary()) if res.sm_results is not None else "",
        "cohort_hash": cohort_hash}])
    checksum = table_checksum(table)
    warehouse.replace_many([("model_results", _ordered(table), {"analysis": name}), ("model_fits", fit, {"analysis": name}),
                            _lineage_row(context, checksum, ["analysis_cohort"], cohort_hash)])
    ors = {r["term"]: f"{r['or']:.3f} ({r['or_low']:.3f}-{r['or_high']:.3f}), p {r['p']:.2g}"
           for r in res.coefficients.iter_rows(named=True) if r["term"] != "(Intercept)"}
    context.log.info(f"{name}: {res.nobs} participants, {res.events} events, fitted in {seconds:.2f} s")
    return dg.MaterializeResult(metadata={
        "population": population, "nobs": res.nobs, "events": res.events, "sites": res.n_groups,
        "method": f"{res.method} (nAGQ {res.nagq})", "odds_ratios": dg.MetadataValue.json(ors),
        "site_variance": round(res.site_variance, 6), "loglik": round(res.loglik, 4),
        "converged": bool(d.converged), "fit_seconds": round(seconds, 3), "cohort_hash": cohort_hash,
        "table_checksum": checksum}, data_version=dg.DataVersion(checksum))


@dg.asset(op_tags=COHORT_STEP,
          deps=[analysis_cohort], code_version=MODEL_VERSION, group_name=GROUP, kinds={"statsmodels"},
          description="Mixed logistic regression, CBP ~ LMM + InterMAT (per 2 SD) + age + sex + diabetes + "
                      "dyslipidemia + osteoporosis + osteoarthritis + physical activity, site as random intercept "
                      "(ML, adaptive Gauss-Hermite quadrature; Laplace and sensitivity fits beside it).")
def cbp_association_model(context: dg.AssetExecutionContext, config: ModelConfig,
                          warehouse: Warehouse) -> dg.MaterializeResult:
    return _fit_model(context, config, warehouse, name="cbp_association_model", outcome="cbp",
                      population="all analysed participants")


@dg.asset(op_tags=COHORT_STEP,
          deps=[analysis_cohort], code_version=MODEL_VERSION, group_name=GROUP, kinds={"statsmodels"},
          description="The same model for pain intensity NRS >= 4 (vs < 4), fitted on the analysed participants "
                      "who answered the NRS question (with or without CBP), as the paper's abstract reports it "
                      "for the cohort.")
def pain_intensity_model(context: dg.AssetExecutionContext, config: ModelConfig,
                         warehouse: Warehouse) -> dg.MaterializeResult:
    return _fit_model(context, config, warehouse, name="pain_intensity_model", outcome="nrs_high",
                      population="analysed participants with an NRS answer", answered_only=True)


ROW_ORDER = "row_order"      # a published table's rows in the order its builder made them (no backend keeps it)


def _ordered(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_row_index(ROW_ORDER)


def _in_order(warehouse: Warehouse, table: str, hint: str) -> pl.DataFrame:
    return _required(warehouse, table, hint, order_by=[ROW_ORDER]).drop(ROW_ORDER)


def _table_asset(context, warehouse: Warehouse, table: str, df: pl.DataFrame) -> dg.MaterializeResult:
    from cbp_platform.warehouse import table_checksum

    cohort_hash = _cohort_hash(warehouse)
    checksum = table_checksum(df)
    warehouse.replace_many([(table, _ordered(df), {}),
                            _lineage_row(context, checksum, ["analysis_cohort"], cohort_hash)])
    return dg.MaterializeResult(metadata={"dagster/row_count": df.height, "table_checksum": checksum,
                                          "cohort_hash": cohort_hash},
                                data_version=dg.DataVersion(checksum))


@dg.asset(op_tags=COHORT_STEP,
          deps=[analysis_cohort], code_version=TABLES_VERSION, group_name=GROUP, kinds={"polars"},
          description="Table 1: characteristics by CBP group (n, %, medians and IQRs) with Mann-Whitney U / "
                      "chi-square tests.")
def table_one(context: dg.AssetExecutionContext, warehouse: Warehouse) -> dg.MaterializeResult:
    from cbp_platform.analysis.tables import table_one as build

    return _table_asset(context, warehouse, "table_one",
                        build(_frame(warehouse), lmm_unit=_cohort_meta(warehouse)["lmm_unit"]))


@dg.asset(op_tags=COHORT_STEP,
          deps=[analysis_cohort], code_version=TABLES_VERSION, group_name=GROUP, kinds={"polars"},
          description="Osteoarthritis and osteoporosis strata: LMM and InterMAT in CBP vs no CBP (Mann-Whitney U).")
def stratified_comparisons(context: dg.AssetExecutionContext, warehouse: Warehouse) -> dg.MaterializeResult:
    from cbp_platform.analysis.tables import stratified_comparisons as build

    return _table_asset(context, warehouse, "stratified_comparisons", build(_frame(warehouse)))


@dg.asset(op_tags=COHORT_STEP,
          deps=[analysis_cohort], code_version=TABLES_VERSION, group_name=GROUP, kinds={"polars"},
          description="CBP prevalence per MET category (< 500, 500-5000, > 5000) with Wilson CIs and the "
                      "chi-square test of the 3 x 2 table.")
def physical_activity_prevalence(context: dg.AssetExecutionContext, warehouse: Warehouse) -> dg.MaterializeResult:
    from cbp_platform.analysis.tables import physical_activity_prevalence as build

    return _table_asset(context, warehouse, "physical_activity_prevalence", build(_frame(warehouse)))


def _cohort_frame(warehouse: Warehouse) -> pl.DataFrame:
    return _required(warehouse, "analysis_cohort", "materialise analysis_cohort first", order_by=["pseudonym"])


def _frame(warehouse: Warehouse) -> pl.DataFrame:
    """The analysed cohort for the descriptive tables: MET categories in their order."""
    from cbp_platform.analysis.cohort import MET_CATEGORY

    return _cohort_frame(warehouse).with_columns(pl.col("met_category").cast(pl.String).cast(MET_CATEGORY))


def _latest(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None) -> dict:
    recs = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1).records
    if not recs:
        return {"run_id": None, "data_version": None}
    r = recs[0]
    mat = r.asset_materialization
    return {"run_id": r.run_id, "data_version": (mat.tags or {}).get("dagster/data_version"),
            "timestamp": str(datetime.fromtimestamp(r.timestamp, tz=timezone.utc))}


REPORT_INPUTS = (table_one, stratified_comparisons, physical_activity_prevalence, cbp_association_model,
                 pain_intensity_model, segmentation_model)


@dg.asset(op_tags=COHORT_STEP,
          deps=list(REPORT_INPUTS), code_version=REPORT_VERSION, group_name=GROUP, kinds={"html", "markdown"},
          description="The report (Markdown and HTML, PNG figures, published CSV tables) under "
                      "$CBP_DATA_ROOT/published/<cohort hash>/ with its lineage manifest lineage.json. Cells "
                      "under 5 suppressed; no pseudonym anywhere.")
def published_results(context: dg.AssetExecutionContext, data_root: DataRootResource, warehouse: Warehouse,
                      runtime: SegmentationRuntime) -> dg.MaterializeResult:
    from cbp_platform.analysis.report import markdown_table, paper_vs_run_table, render_report
    from cbp_platform.imaging.nifti import atomic_write_bytes, sha256_file
    from cbp_platform.lineage import (MANIFEST_NAME, MANIFEST_VERSION, code_version, delivery_checksums,
                                      input_digests, package_versions, write_manifest)
    from cbp_platform.warehouse import now_utc

    meta = _cohort_meta(warehouse)
    cohort_hash = meta["cohort_hash"]
    first = "materialise the analysis assets first"
    flow = _required(warehouse, "exclusion_flow", first, order_by=["step"])
    t1 = _in_order(warehouse, "table_one", first)
    pa = _in_order(warehouse, "physical_activity_prevalence", first)
    strat = _in_order(warehouse, "stratified_comparisons", first)
    results = _required(warehouse, "model_results", first, order_by=["analysis", ROW_ORDER]).drop(ROW_ORDER)
    fits = _required(warehouse, "model_fits", first, order_by=["analysis"])
    lineage_rows = _required(warehouse, "asset_lineage", first, order_by=["asset"])
    made_on = {r["asset"]: r["cohort_hash"] for r in lineage_rows.iter_rows(named=True)}
    stale = [a.key.to_user_string() for a in REPORT_INPUTS if a is not segmentation_model
             and made_on.get(a.key.to_user_string()) != cohort_hash]
    if stale:
        raise dg.Failure(description=f"{stale} were not computed on the current analysis cohort "
                                     f"({cohort_hash[:12]}); re-materialise them first")
    models = {REPORT_MODEL_KEY[r["analysis"]]: results.filter((pl.col("analysis") == r["analysis"])
                                                              & (pl.col("model") == r["primary_model"]))
              for r in fits.iter_rows(named=True)}
    summaries = {}
    for r in fits.iter_rows(named=True):
        summaries[REPORT_MODEL_KEY[r["analysis"]]] = (f"{r['method']} (nAGQ {r['nagq']}), {r['nobs']} participants, {r['events']} "
                                    f"events, {r['n_groups']} sites; site variance {r['site_variance']:.4f}; "
                                    f"log-likelihood {r['loglik']:.3f} (Laplace {r['laplace_loglik']:.3f}); "
                                    f"converged {r['converged']}\n\n" + _sensitivity_text(results, r["analysis"]))
    paper_vs_run = paper_vs_run_table(flow=flow, table_one=t1, pa_prevalence=pa, stratified=strat,
                                      model_results=models)

    # lineage: per-batch data versions and runs from the Dagster instance; files and weights from the warehouse
    instance = context.instance
    batches = json.loads(meta["batches"])
    batch_rows = []
    for b in batches:
        batch_rows.append({"batch_key": b, "assets": {a.key.to_user_string(): _latest(instance, a.key, b)
                                                      for a in PER_BATCH}})
    scans = warehouse.table("raw_mri_scans", columns=["pseudonym", "delivery_id", "water_sha256", "fat_sha256"],
                            order_by=["pseudonym"])
    segs = warehouse.table("muscle_segmentations", columns=["pseudonym", "label_sha256", "model_sha256"],
                           order_by=["pseudonym"])
    analysed = warehouse.table("analysis_cohort", columns=["pseudonym"], order_by=["pseudonym"])["pseudonym"].to_list()
    cur = json.loads(runtime.current_pointer.read_text()) if runtime.current_pointer.exists() else {}
    comparisons = _current_comparisons(warehouse, cur.get("weights_sha256"))
    cohort_assets = {}
    for r in lineage_rows.iter_rows(named=True):
        cohort_assets[r["asset"]] = {"run_id": r["run_id"], "data_version": r["data_version"],
                                     "code_version": r["code_version"], "upstream": json.loads(r["upstream"]),
                                     "timestamp": str(r["recorded_at"])}
    cohort_assets["published_results"] = {"run_id": context.run.run_id, "data_version": cohort_hash,
                                          "code_version": REPORT_VERSION, "timestamp": str(now_utc()),
                                          "upstream": [a.key.to_user_string() for a in REPORT_INPUTS]}
    cohort_assets["segmentation_model"] = {**_latest(instance, dg.AssetKey("segmentation_model")),
                                           "code_version": "", "upstream": []}
    flow_rows = {r["criterion"]: r for r in flow.iter_rows(named=True)}
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "generated_at": str(now_utc()),
        "cohort": {"cohort_hash": cohort_hash, "analysed": meta["n_analysed"],
                   "start": int(flow_rows["start"]["remaining"]) if "start" in flow_rows else None,
                   "lmm_normaliser": meta["lmm_normaliser"], "standardisation": json.loads(meta["standardisation"])},
        "batches": batch_rows,
        "deliveries": delivery_checksums(data_root.landing, scans["delivery_id"].to_list() if scans.height else [],
                                         registry_root=data_root.path),
        "inputs": input_digests(analysed, scans, segs),
        "model": {"weights_sha256": cur.get("weights_sha256"), "bundle_path": cur.get("path"),
                  "name": cur.get("name"), "backend": cur.get("backend"),
                  "validation_dice": cur.get("validation_dice"), "source": "models/current.json"},
        "reviews": {"count": meta.get("reviews_count") or 0, "sha256": meta.get("reviews_sha256"),
                    "rejected_in_force": meta.get("qc_rejected") or 0, "outdated": meta.get("qc_outdated") or 0,
                    "table": "qc_reviews", "read_by": "analysis_cohort"},
        "model_comparisons": [{"model_name": c["other"]["name"], "backend": c["other"]["backend"],
                               "weights_sha256": c["other"]["weights_sha256"], "batches": c["batches"],
                               "primary_sha256": c["primary"]["weights_sha256"], "run_id": c["run_id"]}
                              for c in comparisons],
        "code": code_version(),
        "packages": package_versions(),
        "cohort_assets": cohort_assets,
    }
    out_dir = data_root.layout.report_dir(cohort_hash)
    report_lineage = {"cohort_hash": cohort_hash, "batches": len(batches),
                      "deliveries": len(manifest["deliveries"]),
                      "input_files_digest": manifest["inputs"]["input_files"]["sha256_digest"],
                      "segmentation_weights_sha256": ", ".join(manifest["inputs"]["segmentation_weights_sha256"]),
                      "reviews": f"{manifest['reviews']['count']} (sha256 {manifest['reviews']['sha256']})",
                      "git_commit": manifest["code"]["git_commit"], "run_id": context.run.run_id,
                      "manifest": MANIFEST_NAME}
    try:
        written = render_report(out_dir, flow=flow, table_one=t1, pa_prevalence=pa, stratified=strat,
                                model_results=models, model_summaries=summaries,
                                paper_vs_run=paper_vs_run, lineage=report_lineage, known_pseudonyms=analysed,
                                standardisation=json.loads(meta["standardisation"]), lmm_unit=meta["lmm_unit"],
                                comparisons=comparisons)
    except Exception as exc:   # noqa: BLE001  (a disclosure guard or rendering failure, reported by name)
        raise dg.Failure(description=f"published_results: {type(exc).__name__}: {exc}") from None
    manifest["files"] = {k: {"path": str(p.relative_to(out_dir)), "sha256": sha256_file(p)} for k, p in written.items()}
    write_manifest(out_dir / MANIFEST_NAME, manifest)
    atomic_write_bytes(data_root.layout.latest_report,
                       json.dumps({"path": str(out_dir), "cohort_hash": cohort_hash,
                                   "run_id": context.run.run_id}, indent=1).encode())
    warehouse.replace_many([_lineage_row(context, cohort_hash, cohort_assets["published_results"]["upstream"],
                                         cohort_hash)])
    context.log.info(f"report written to {out_dir}")
    return dg.MaterializeResult(metadata={
        "report_html": dg.MetadataValue.path(str(written["report_html"])),
        "report_md": dg.MetadataValue.path(str(written["report_md"])),
        "lineage_manifest": dg.MetadataValue.path(str(out_dir / MANIFEST_NAME)),
        "cohort_hash": cohort_hash, "analysed": meta["n_analysed"],
        "paper_vs_run": dg.MetadataValue.md(markdown_table(paper_vs_run.select("section", "quantity", "paper",
                                                                               "this_run")))},
        data_version=dg.DataVersion(cohort_hash))


def _current_comparisons(warehouse: Warehouse, primary_sha256: str | None) -> list[dict]:
    """The model comparisons made against the current primary model (one per compared model, the latest)."""
    rows = warehouse.table("model_comparisons", order_by=["model_name"], missing_ok=True)
    if rows is None:             # no model compared yet
        return []
    return [{**json.loads(r["comparison"]), "run_id": r["run_id"]} for r in rows.iter_rows(named=True)
            if r["primary_sha256"] == primary_sha256]


def _sensitivity_text(results: pl.DataFrame, analysis: str) -> str:
    r = results.filter((pl.col("analysis") == analysis) & pl.col("term").str.contains("lmm|imat"))
    lines = ["Exposure ORs per 2 SD by estimator (sensitivity):"]
    for row in r.sort("term", "model").iter_rows(named=True):
        lines.append(f"  {row['term']:<8} {row['model']:<14} OR {row['or']:.3f} ({row['or_low']:.3f}-"
                     f"{row['or_high']:.3f}), p {row['p']:.2g}")
    return "\n".join(lines)
