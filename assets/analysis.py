"""Cohort-level analysis: ``analysis_cohort``, the two mixed models, the descriptive tables and
``published_results`` (report + lineage manifest).

The exposures and analyses are the registry's (:mod:`cbp_platform.study`): each model asset fits its primary
(the paper's) analysis and the secondary analyses extending it (the paper's model plus a secondary exposure).

Every asset reads what the previous one wrote to the warehouse, so each is recomputed from all materialised
batches when it runs; each records a lineage row (run id, data version, upstream) in the warehouse table
``asset_lineage``. Pseudonyms stay in the internal tables (``analysis_cohort``, ``analysis_exclusions``);
nothing published carries them, and their logs print counts only.
"""

import json
import os
import time
from datetime import datetime, timezone

import dagster as dg
import polars as pl

from assets.ingestion import participant_covariates, raw_mri_scans
from assets.segmentation import muscle_metrics, muscle_segmentations, segmentation_model
from cbp_platform import study
from cbp_platform.deployment import k8s_step_tags
from resources import WAREHOUSE_KIND, DataRootResource, MissingTable, SegmentationRuntime, Warehouse
from assets.releases import DATA_RELEASE, NoRelease, release_cohort, release_info

COHORT_STEP = k8s_step_tags("cpu-large")    # whole-cohort steps: Kubernetes CPU nodes with memory headroom

COHORT_VERSION = "analysis_cohort/1"
MODEL_VERSION = "association_models/1"
TABLES_VERSION = "descriptive_tables/1"
REPORT_VERSION = "published_results/1"
PER_BATCH = (raw_mri_scans, participant_covariates, muscle_segmentations, muscle_metrics)
GROUP = "analysis"


class CohortConfig(dg.Config):
    lmm_normaliser: str = "weight_per_height"   # weight_per_height (cm3/(kg/m), the paper's), per_height2, ...
    release: int = 0                            # the data release to analyse (0: the latest; docs/lifecycle.md)


class ModelConfig(dg.Config):
    nagq: int = 25               # adaptive Gauss-Hermite points (1 = Laplace)
    # m of the multiple-imputation sensitivity analysis (0: not run); CBP_MI_IMPUTATIONS sets the default (the test
    # suite's pipelines run m = 5 to stay in their time budget; tests/stats checks the method at m = 20)
    imputations: int = int(os.environ.get("CBP_MI_IMPUTATIONS", "20"))
    min_events_per_variable: float = 10.0


class ReportConfig(dg.Config):
    # disclosure limit: counts below it (and their statistics) are suppressed; None: the platform's default
    # (cbp_platform.analysis.disclosure.MIN_COUNT, 5)
    min_count: int | None = None


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
          deps=[*PER_BATCH, DATA_RELEASE], code_version=COHORT_VERSION, group_name=GROUP,
          kinds={"polars", WAREHOUSE_KIND},
          description="The data release's participants (the latest release, or config release): inclusion rules "
                      "with the exclusion flow (start -> one row per reason -> analysed; retired deliveries at "
                      "delivery_retired, reviewers' rejections at qc_rejected), LMM index, MET categories, NRS >= 4, "
                      "exposures per 2 SD. The cohort hash (content of the analysed frame) is its data version.")
def analysis_cohort(context: dg.AssetExecutionContext, config: CohortConfig, warehouse: Warehouse) -> dg.MaterializeResult:
    from cbp_platform.analysis.report import markdown_table

    try:
        info = release_info(warehouse, config.release or None)
        cohort, inputs = release_cohort(warehouse, info, lmm_normaliser=config.lmm_normaliser)
    except (NoRelease, ValueError) as exc:
        raise dg.Failure(description=f"analysis_cohort: {exc}") from None
    cov, metrics = inputs["covariates"], inputs["metrics"]
    batches = sorted(set(cov["batch_key"].to_list()) | set(metrics["batch_key"].to_list() if metrics.height else []))
    meta = pl.DataFrame([{"cohort_hash": cohort.cohort_hash, "lmm_normaliser": cohort.lmm_normaliser,
                          "lmm_unit": cohort.lmm_unit, "standardisation": json.dumps(cohort.standardisation),
                          "batches": json.dumps(batches), "n_analysed": cohort.n,
                          "reviews_count": info["reviews_count"], "reviews_sha256": info["reviews_sha256"],
                          "qc_rejected": inputs["rejected"].height, "qc_outdated": info["qc_outdated"],
                          "release_id": int(info["release_id"]), "release_content_hash": info["content_hash"],
                          "release_merkle_root": info.get("merkle_root") or ""}])
    # the cohort, its exclusions, its flow, its meta (with the hash) and its lineage row in one transaction:
    # never a hash that describes another cohort than the one stored
    from cbp_platform.analysis.cohort import imputation_missingness

    warehouse.replace_many([("analysis_cohort", cohort.frame, {}), ("analysis_exclusions", cohort.exclusions, {}),
                            ("analysis_imputation", cohort.imputation_frame, {}),
                            ("missingness", _ordered(imputation_missingness(cohort)), {}),
                            ("exclusion_flow", cohort.flow, {}), ("analysis_cohort_meta", meta, {}),
                            _lineage_row(context, cohort.cohort_hash, [a.key.to_user_string() for a in PER_BATCH],
                                         cohort.cohort_hash)])
    flow_md = markdown_table(cohort.flow.select("description", pl.col("excluded").cast(pl.String),
                                                pl.col("remaining").cast(pl.String)))
    context.log.info(f"analysis cohort: {cohort.n} analysed from {len(batches)} batches of release "
                     f"{info['release_id']} (hash {cohort.cohort_hash[:12]})")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": cohort.n, "cohort_hash": cohort.cohort_hash, "batches": len(batches),
        "release": int(info["release_id"]), "release_content_hash": info["content_hash"],
        "start": int(cohort.flow["remaining"][0]), "analysed": cohort.n,
        "imputation_population": cohort.imputation_frame.height,
        "exclusion_flow": dg.MetadataValue.md(flow_md), "lmm_normaliser": cohort.lmm_normaliser,
        "reviews": info["reviews_count"], "reviews_sha256": info["reviews_sha256"],
        "standardisation": dg.MetadataValue.json(cohort.standardisation)},
        data_version=dg.DataVersion(cohort.cohort_hash))


def _fit_models(context: dg.AssetExecutionContext, config: ModelConfig, warehouse: Warehouse,
                name: str) -> dg.MaterializeResult:
    """Fit the analyses of model asset ``name`` (:func:`cbp_platform.study.analyses_fitted_by`): its primary
    analysis (a failed model check fails the asset) and the secondary ones (a failed check is recorded and reported;
    the paper's results stand). Their rows replace the analyses' rows of ``model_results`` / ``model_fits``."""
    from cbp_platform.analysis.models import failed_fit, fit_analysis, fits_frame, results_frame
    from cbp_platform.stats import ModelCheckError
    from cbp_platform.warehouse import table_checksum

    frame = _cohort_frame(warehouse)
    cohort_hash = _cohort_hash(warehouse)
    primary, *secondary = study.analyses_fitted_by(name)
    kw = dict(cohort_hash=cohort_hash, nagq=config.nagq, min_epv=config.min_events_per_variable)
    t0 = time.perf_counter()
    try:
        fits = [fit_analysis(frame, primary, imputation_frame=_imputation_frame(warehouse),
                             imputations=config.imputations, **kw)]
    except ModelCheckError as exc:
        raise dg.Failure(description=f"{name}: model checks failed on {primary.data(frame).height} participants: "
                                     f"{exc}",
                         metadata={"failed_checks": dg.MetadataValue.json(list(exc.names))}) from None
    for a in secondary:
        try:
            fits.append(fit_analysis(frame, a, **kw))
        except ModelCheckError as exc:
            fits.append(failed_fit(frame, a, exc, cohort_hash=cohort_hash))
            context.log.warning(f"{a.name} (secondary) not fitted: model checks failed: {', '.join(exc.names)}")
    seconds = time.perf_counter() - t0
    table = results_frame(fits)
    names = [f.analysis.name for f in fits]
    checksum = table_checksum(table)
    warehouse.replace_many([("model_results", _ordered(table), {"analysis": names}),
                            ("model_fits", fits_frame(fits), {"analysis": names}),
                            _lineage_row(context, checksum, ["analysis_cohort"], cohort_hash)])
    res = fits[0].result
    context.log.info(f"{name}: {res.nobs} participants, {res.events} events; {len(fits)} analyses fitted in "
                     f"{seconds:.2f} s")
    return dg.MaterializeResult(metadata={
        "population": primary.population, "nobs": res.nobs, "events": res.events, "sites": res.n_groups,
        "method": f"{res.method} (nAGQ {res.nagq})", "odds_ratios": dg.MetadataValue.json(fits[0].odds_ratios()),
        "secondary_analyses": dg.MetadataValue.json({f.analysis.name: f.odds_ratios() or f.fit["error"]
                                                     for f in fits[1:]}),
        "site_variance": round(res.site_variance, 6), "loglik": round(res.loglik, 4),
        "site_effect": dg.MetadataValue.json(json.loads(fits[0].fit["assessment"])["site_effect"]),
        "converged": bool(res.diagnostics.converged), "fit_seconds": round(seconds, 3), "cohort_hash": cohort_hash,
        "table_checksum": checksum}, data_version=dg.DataVersion(checksum))


@dg.asset(op_tags=COHORT_STEP,
          deps=[analysis_cohort], code_version=MODEL_VERSION, group_name=GROUP, kinds={"statsmodels"},
          description="Mixed logistic regression, CBP ~ LMM + InterMAT (per 2 SD) + age + sex + diabetes + "
                      "dyslipidemia + osteoporosis + osteoarthritis + physical activity, site as random intercept "
                      "(ML, adaptive Gauss-Hermite quadrature; Laplace and sensitivity fits beside it). Beside "
                      "the paper's model, one secondary model per secondary exposure (cbp_platform.study): the "
                      "same model with that exposure added.")
def cbp_association_model(context: dg.AssetExecutionContext, config: ModelConfig,
                          warehouse: Warehouse) -> dg.MaterializeResult:
    return _fit_models(context, config, warehouse, context.asset_key.to_user_string())


@dg.asset(op_tags=COHORT_STEP,
          deps=[analysis_cohort], code_version=MODEL_VERSION, group_name=GROUP, kinds={"statsmodels"},
          description="The same model for pain intensity NRS >= 4 (vs < 4), fitted on the analysed participants "
                      "who answered the NRS question (with or without CBP), as the paper's abstract reports it "
                      "for the cohort; with its secondary-exposure models as for CBP.")
def pain_intensity_model(context: dg.AssetExecutionContext, config: ModelConfig,
                         warehouse: Warehouse) -> dg.MaterializeResult:
    return _fit_models(context, config, warehouse, context.asset_key.to_user_string())


ROW_ORDER = "row_order"      # a published table's rows in the order its builder made them (no backend keeps it)


def _ordered(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_row_index(ROW_ORDER)


def _in_order(warehouse: Warehouse, table: str, hint: str) -> pl.DataFrame:
    return _required(warehouse, table, hint, order_by=[ROW_ORDER]).drop(ROW_ORDER)


def _optional_in_order(warehouse: Warehouse, table: str) -> pl.DataFrame | None:
    df = warehouse.table(table, order_by=[ROW_ORDER], missing_ok=True)
    return None if df is None else df.drop(ROW_ORDER)


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


def _imputation_frame(warehouse: Warehouse) -> pl.DataFrame | None:
    """The multiple-imputation population as analysis_cohort stored it (None before that table existed)."""
    return warehouse.table("analysis_imputation", order_by=["pseudonym"], missing_ok=True)


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


def _report_tables(warehouse: Warehouse):
    """The report's tables (:class:`cbp_platform.analysis.publish.ReportTables`) as the analysis assets left them."""
    from cbp_platform.analysis.publish import ReportTables

    first = "materialise the analysis assets first"
    return ReportTables(
        flow=_required(warehouse, "exclusion_flow", first, order_by=["step"]),
        table_one=_in_order(warehouse, "table_one", first),
        pa_prevalence=_in_order(warehouse, "physical_activity_prevalence", first),
        stratified=_in_order(warehouse, "stratified_comparisons", first),
        model_results=_required(warehouse, "model_results", first, order_by=["analysis", ROW_ORDER]).drop(ROW_ORDER),
        model_fits=_required(warehouse, "model_fits", first, order_by=["analysis"]),
        missingness=_optional_in_order(warehouse, "missingness"))


def _manifest(context: dg.AssetExecutionContext, data_root: DataRootResource, warehouse: Warehouse, meta: dict,
              flow: pl.DataFrame, lineage_rows: pl.DataFrame, pointer: dict, comparisons: list[dict],
              analysed: list[str]) -> dict:
    """Gather the lineage (per-batch runs from the Dagster instance, files and weights from the warehouse) and
    shape it into the manifest (:func:`cbp_platform.lineage.build_manifest`)."""
    from cbp_platform.lineage import build_manifest, cohort_asset_runs, delivery_checksums
    from cbp_platform.warehouse import now_utc

    instance = context.instance
    batches = [{"batch_key": b, "assets": {a.key.to_user_string(): _latest(instance, a.key, b) for a in PER_BATCH}}
               for b in json.loads(meta["batches"])]
    # the files and label maps of the release the cohort was built from (not the versions in force now)
    release = int(meta["release_id"])
    scans = warehouse.release_rows("raw_mri_scans", release, order_by=["pseudonym"]).select(
        "pseudonym", "delivery_id", "water_sha256", "fat_sha256")
    segs = warehouse.release_rows("muscle_segmentations", release, order_by=["pseudonym"])
    segs = (segs.select("pseudonym", "label_sha256", "model_sha256") if segs is not None else
            pl.DataFrame(schema={"pseudonym": pl.String, "label_sha256": pl.String, "model_sha256": pl.String}))
    runs = cohort_asset_runs(lineage_rows, {
        "published_results": {"run_id": context.run.run_id, "data_version": meta["cohort_hash"],
                              "code_version": REPORT_VERSION, "timestamp": str(now_utc()),
                              "upstream": [a.key.to_user_string() for a in REPORT_INPUTS]},
        "segmentation_model": {**_latest(instance, segmentation_model.key), "code_version": "", "upstream": []}})
    return build_manifest(
        cohort_meta=meta, flow=flow, batches=batches,
        deliveries=delivery_checksums(data_root.landing, scans["delivery_id"].to_list() if scans.height else [],
                                      registry_root=data_root.path),
        analysed=analysed, scans=scans, segmentations=segs, model_pointer=pointer, comparisons=comparisons,
        cohort_assets=runs, generated_at=str(now_utc()))


@dg.asset(op_tags=COHORT_STEP,
          deps=list(REPORT_INPUTS), code_version=REPORT_VERSION, group_name=GROUP, kinds={"html", "markdown"},
          description="The report (Markdown and HTML, PNG figures, published CSV tables) under "
                      "$CBP_DATA_ROOT/published/<cohort hash>/ with its lineage manifest lineage.json. Cells "
                      "under the disclosure limit (config min_count, default 5) suppressed; no pseudonym anywhere.")
def published_results(context: dg.AssetExecutionContext, config: ReportConfig, data_root: DataRootResource,
                      warehouse: Warehouse, runtime: SegmentationRuntime) -> dg.MaterializeResult:
    from cbp_platform.analysis.disclosure import MIN_COUNT
    from cbp_platform.analysis.publish import publish, stale_inputs
    from cbp_platform.analysis.report import markdown_table
    from cbp_platform.imaging.nifti import atomic_write_bytes

    # read
    meta = _cohort_meta(warehouse)
    cohort_hash = meta["cohort_hash"]
    tables = _report_tables(warehouse)
    lineage_rows = _required(warehouse, "asset_lineage", "materialise the analysis assets first", order_by=["asset"])
    stale = stale_inputs(lineage_rows, cohort_hash,
                         [a.key.to_user_string() for a in REPORT_INPUTS if a is not segmentation_model])
    if stale:
        raise dg.Failure(description=f"{stale} were not computed on the current analysis cohort "
                                     f"({cohort_hash[:12]}); re-materialise them first")
    pointer = json.loads(runtime.current_pointer.read_text()) if runtime.current_pointer.exists() else {}
    comparisons = _current_comparisons(warehouse, pointer.get("weights_sha256"))
    analysed = warehouse.table("analysis_cohort", columns=["pseudonym"], order_by=["pseudonym"])["pseudonym"].to_list()
    manifest = _manifest(context, data_root, warehouse, meta, tables.flow, lineage_rows, pointer, comparisons,
                         analysed)
    # core: report + manifest
    out_dir = data_root.layout.report_dir(cohort_hash)
    min_count = MIN_COUNT if config.min_count is None else config.min_count
    try:
        pub = publish(out_dir, tables, manifest, run_id=context.run.run_id, known_pseudonyms=analysed,
                      cohort_meta=meta, comparisons=comparisons, min_count=min_count)
    except Exception as exc:   # noqa: BLE001  (a disclosure guard or rendering failure, reported by name)
        raise dg.Failure(description=f"published_results: {type(exc).__name__}: {exc}") from None
    # write: the latest pointer, the release's report (pointer and published tables: cbp reproduce reads them),
    # and the lineage row
    atomic_write_bytes(data_root.layout.latest_report,
                       json.dumps({"path": data_root.layout.stored(out_dir), "cohort_hash": cohort_hash,
                                   "release": meta["release_id"],
                                   "run_id": context.run.run_id}, indent=1).encode())
    _keep_release_report(data_root, meta, out_dir, tables, min_count, context.run.run_id)
    upstream = manifest["cohort_assets"]["published_results"]["upstream"]
    warehouse.replace_many([_lineage_row(context, cohort_hash, upstream, cohort_hash)])
    context.log.info(f"report written to {out_dir}")
    return dg.MaterializeResult(metadata={
        "report_html": dg.MetadataValue.path(str(pub.written["report_html"])),
        "report_md": dg.MetadataValue.path(str(pub.written["report_md"])),
        "lineage_manifest": dg.MetadataValue.path(str(pub.manifest_path)),
        "cohort_hash": cohort_hash, "analysed": meta["n_analysed"], "disclosure_min_count": min_count,
        "paper_vs_run": dg.MetadataValue.md(markdown_table(pub.paper_vs_run.select("section", "quantity", "paper",
                                                                                   "this_run")))},
        data_version=dg.DataVersion(cohort_hash))


def _keep_release_report(data_root: DataRootResource, meta: dict, out_dir, tables, min_count: int,
                         run_id: str) -> None:
    """Keep what the release's report published (its tables, and how they were made) beside the release, so that
    ``cbp reproduce --release R`` compares with it even after a later report of the same cohort replaced the
    folder."""
    from cbp_platform.analysis.outputs import read_tables
    from cbp_platform.imaging.nifti import atomic_write_bytes
    from cbp_platform.warehouse import now_utc

    pointer = data_root.layout.release_report(meta["release_id"])
    for name, payload in read_tables(out_dir).items():
        atomic_write_bytes(pointer.parent / "tables" / name, payload)
    nagq = tables.model_fits["nagq"].drop_nulls() if "nagq" in tables.model_fits.columns else []
    mi = [json.loads(a).get("multiple_imputation", {}).get("requested", 20)
          for a in (tables.model_fits["assessment"].drop_nulls() if "assessment" in tables.model_fits.columns else [])]
    atomic_write_bytes(pointer, json.dumps({
        "release": meta["release_id"], "release_content_hash": meta["release_content_hash"],
        "cohort_hash": meta["cohort_hash"], "path": data_root.layout.stored(out_dir),
        "lmm_normaliser": meta["lmm_normaliser"],
        "disclosure_min_count": min_count, "nagq": int(nagq[0]) if len(nagq) else 25,
        "imputations": max(mi, default=20), "run_id": run_id,
        "published_at": now_utc().isoformat()}, indent=1).encode())


def _current_comparisons(warehouse: Warehouse, primary_sha256: str | None) -> list[dict]:
    """The model comparisons made against the current primary model (one per compared model, the latest)."""
    rows = warehouse.table("model_comparisons", order_by=["model_name"], missing_ok=True)
    if rows is None:             # no model compared yet
        return []
    return [{**json.loads(r["comparison"]), "run_id": r["run_id"]} for r in rows.iter_rows(named=True)
            if r["primary_sha256"] == primary_sha256]
