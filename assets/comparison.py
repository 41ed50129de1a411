"""Model comparison: ``comparison_metrics[batch]`` (a second registered model's label maps and metrics for the
participants the primary model segmented) and ``model_comparison`` (Dice, agreement, odds ratios per model,
accuracy against truth; published in the next report).

The compared model's outputs live apart from the primary's: label maps under
``derived/comparisons/<model>/<delivery>``, rows in ``comparison_segmentations`` / ``comparison_metrics`` keyed by
(batch, model). Nothing the primary analysis reads is touched. ``cbp model compare NAME`` runs both.
"""

import json
import time

import dagster as dg
import polars as pl

from assets.partitions import batches_partitions
from assets.segmentation import muscle_metrics, muscle_segmentations
from assets.writes import run_is_live, version_of
from cbp_platform.deployment import k8s_step_tags
from cbp_platform.ingest.batch import redact, scan_files
from cbp_platform.progress import RateLogger
from cbp_platform.reasons import R
from resources import WAREHOUSE_KIND, DataRootResource, SegmentationRuntime, Warehouse

COMPARISON_METRICS_VERSION = "comparison_metrics/1"
MODEL_COMPARISON_VERSION = "model_comparison/1"
GROUP = "comparison"


class ComparisonConfig(dg.Config):
    model: str                      # a registered model (`cbp model list`) to compare with the primary


def _manifest(runtime: SegmentationRuntime, name: str):
    from cbp_platform.segmentation.manifest import ManifestError, load_manifest

    try:
        return load_manifest(runtime.registry_path, name)
    except ManifestError as exc:
        raise dg.Failure(description=str(exc)) from None


@dg.asset(partitions_def=batches_partitions, deps=[muscle_segmentations], pool="gpu",
          code_version=COMPARISON_METRICS_VERSION, group_name=GROUP, kinds={"pytorch", WAREHOUSE_KIND},
          op_tags=k8s_step_tags("gpu"),
          description="A second registered model (config `model`) segments and measures the participants the "
                      "primary model segmented in this batch. Rows in comparison_segmentations / "
                      "comparison_metrics keyed by (batch, model); the primary's tables are not touched.")
def comparison_metrics(context: dg.AssetExecutionContext, config: ComparisonConfig, data_root: DataRootResource,
                       warehouse: Warehouse, runtime: SegmentationRuntime) -> dg.MaterializeResult:
    from cbp_platform.metrics.body_composition import METRIC_SCHEMA
    from cbp_platform.segmentation.roi import load_segmenter
    from cbp_platform.segmentation.manifest import ManifestError
    from cbp_platform.segmentation.pipeline import VOXEL_SCHEMA, configure_threads, metrics_for, segment_scans
    from cbp_platform.warehouse import provenance_frame, quarantine_frame, versioned

    key = context.partition_key
    batch = data_root.registry.read(key)
    configure_threads(runtime.threads)
    manifest = _manifest(runtime, config.model)
    try:
        runner = load_segmenter(manifest, runtime.models_path, device=runtime.device,
                                sw_batch_size=runtime.sw_batch_size)
    except ManifestError as exc:
        raise dg.Failure(description=str(exc)) from None
    rows = warehouse.segmented_scans(key).drop("label_path", "label_sha256")
    ddir = data_root.landing / batch.delivery_id
    items = [{"pseudonym": r["pseudonym"], **scan_files(data_root.layout, batch.delivery_id, r)}
             for r in rows.iter_rows(named=True)]
    out_dir = data_root.layout.comparisons(manifest.name, batch.delivery_id)
    t0 = time.perf_counter()
    results, failures = segment_scans(items, runner, out_dir, num_workers=runtime.num_workers,
                                      progress=RateLogger(context.log.info, len(items),
                                                          f"batch {key}: {manifest.name} segmented", unit="scans"))
    src = {r["pseudonym"]: r for r in rows.iter_rows(named=True)}
    metrics, prov = [], []
    for r in results:
        s = src[r["pseudonym"]]
        try:
            ms = metrics_for(r["label_path"], *scan_files(data_root.layout, batch.delivery_id, s).values())
        except Exception as exc:  # noqa: BLE001  (one participant's failure is quarantined, the batch goes on)
            cut = getattr(exc, "reason", "") == R.muscle_at_fov_edge.code
            failures.append({"pseudonym": r["pseudonym"],
                             "reason": R.muscle_at_fov_edge.code if cut else R.metrics_failed.code,
                             "message": str(exc) if cut else f"{type(exc).__name__}: {exc}"})
            continue
        metrics += [{"pseudonym": r["pseudonym"], **m} for m in ms]
        prov.append({"pseudonym": r["pseudonym"], "output": r["label_sha256"],
                     "inputs": {"water": s["water_sha256"], "fat": s["fat_sha256"], "model": manifest.sha256}})
    seconds = time.perf_counter() - t0
    failures = [{**f, "message": redact(f["message"], f["pseudonym"], ddir)} for f in failures]
    ident = [pl.lit(key).alias("batch_key"), pl.lit(batch.delivery_id).alias("delivery_id"),
             pl.lit(manifest.name).alias("model_name"), pl.lit(manifest.sha256).alias("model_sha256")]
    segs = pl.DataFrame(results, schema={"pseudonym": pl.String, "label_path": pl.String, "label_sha256": pl.String,
                                         **{k: getattr(pl, v) for k, v in VOXEL_SCHEMA.items()}}).with_columns(ident)
    segs = data_root.layout.stored_paths(segs, "label_path")           # relative to the data root
    met = pl.DataFrame(metrics, schema={"pseudonym": pl.String, **METRIC_SCHEMA}).with_columns(ident)
    where = {"batch_key": key, "model_name": manifest.name}
    stage = f"comparison_metrics:{manifest.name}"
    run_id = context.run.run_id
    q = quarantine_frame(failures, delivery_id=batch.delivery_id, batch_key=key, stage=stage, run_id=run_id)
    pv = provenance_frame(prov, delivery_id=batch.delivery_id, batch_key=key, stage=stage,
                          code_version=COMPARISON_METRICS_VERSION, run_id=run_id)
    seq, corrections = version_of(data_root, batch)        # versions ordered by registration (assets/writes.py)
    sup = {p: e["supersedes"] for p, e in corrections.items()}
    segs = versioned("comparison_segmentations", segs, seq, sup)
    met = versioned("comparison_metrics", met, seq, sup)
    checksum = warehouse.replace_many([("comparison_segmentations", segs, where), ("comparison_metrics", met, where),
                                       ("quarantine", q, {"batch_key": key, "stage": stage}),
                                       ("provenance", pv, {"batch_key": key, "stage": stage})],
                                      guard=run_is_live(context))[1]
    context.log.info(f"batch {key}: {manifest.name} segmented and measured {len(prov)} participants, "
                     f"{len(failures)} failed, {seconds:.1f} s")
    return dg.MaterializeResult(metadata={
        "model_name": manifest.name, "backend": manifest.backend, "model_sha256": manifest.sha256,
        "dagster/row_count": len(prov), "failed": len(failures), "seconds": round(seconds, 2),
        "device": str(runner.device), "table_checksum": checksum, "output_dir": str(out_dir),
        "inference": "region of interest" if hasattr(runner, "stats") else "whole volume",
        "preprocessing": (manifest.options.get("preprocessing") or {}).get("name", "-"),
        **({"roi": dg.MetadataValue.json(runner.stats.to_dict()), "roi_reruns_whole_volume": runner.stats.reruns}
           if hasattr(runner, "stats") else {})},
        data_version=dg.DataVersion(checksum))


@dg.asset(deps=[comparison_metrics, muscle_metrics], code_version=MODEL_COMPARISON_VERSION, group_name=GROUP,
          kinds={"statsmodels", "polars"}, op_tags=k8s_step_tags("cpu-large"),
          description="The primary model against a registered model (config `model`) on every batch both "
                      "measured: Dice per class between their label maps, ICC and Bland-Altman of every exposure "
                      "(LMM, InterMAT and the secondary ones), the CBP and NRS >= 4 odds ratios from each model's "
                      "metrics, and each model against the simulated truth where it exists. Published in the next "
                      "report (its model comparison section).")
def model_comparison(context: dg.AssetExecutionContext, config: ComparisonConfig, data_root: DataRootResource,
                     warehouse: Warehouse, runtime: SegmentationRuntime) -> dg.MaterializeResult:
    from assets.segmentation import primary_manifest
    from cbp_platform import study
    from cbp_platform.analysis.report import markdown_table
    from cbp_platform.segmentation.accuracy import evaluate
    from cbp_platform.segmentation.compare import forest_rows, label_dice, metric_agreement, odds_ratios
    from cbp_platform.warehouse import now_utc, table_checksum

    other = _manifest(runtime, config.model)
    primary = primary_manifest(runtime)
    if other.name == primary.name:
        raise dg.Failure(description=f"{other.name} is the primary model; compare another registered model")
    segs = warehouse.table("muscle_segmentations", order_by=["pseudonym"])
    csegs = warehouse.table("comparison_segmentations", where={"model_name": other.name}, order_by=["pseudonym"],
                            missing_ok=True)
    if csegs is None or csegs.height == 0:
        raise dg.Failure(description=f"no comparison_metrics rows for {other.name}: materialise comparison_metrics "
                                     "for the batches first (cbp model compare does both)")
    segs, csegs = (data_root.layout.resolved_paths(df, "label_path") for df in (segs, csegs))
    batches = sorted(set(csegs["batch_key"].to_list()))
    segs = segs.filter(pl.col("batch_key").is_in(batches))
    pairs = segs.select("pseudonym", "delivery_id", "label_path").join(
        csegs.select("pseudonym", pl.col("label_path").alias("label_path_other")), on="pseudonym")
    t0 = time.perf_counter()
    dice = label_dice(pairs, progress=RateLogger(context.log.info, pairs.height, "label maps compared",
                                                 unit="pairs"))
    in_batches = {"batch_key": batches}
    met = warehouse.table("muscle_metrics", where=in_batches, order_by=["pseudonym", "muscle"])
    cmet = warehouse.table("comparison_metrics", where={"model_name": other.name}, order_by=["pseudonym", "muscle"])
    cov = warehouse.table("participant_covariates", where=in_batches, order_by=["pseudonym"])
    scans = warehouse.table("raw_mri_scans", where=in_batches, order_by=["pseudonym"])
    quarantine = warehouse.table("quarantine", where=in_batches, order_by=["batch_key", "stage", "pseudonym"])
    body = cov.select("pseudonym", "weight_kg", "height_cm")
    agreement = metric_agreement(met, cmet, body)
    keep = pl.col("pseudonym").is_in(pairs["pseudonym"].to_list())
    ors = {}
    for name, m in ((primary.name, met.filter(keep)), (other.name, cmet.filter(keep).drop("model_name",
                                                                                          "model_sha256"))):
        try:
            ors[name] = odds_ratios(cov, scans, m, quarantine)
        except ValueError as exc:
            raise dg.Failure(description=f"model_comparison: the analysis cohort of {name}: {exc}") from None
    forest = forest_rows(ors)
    truth = {}
    for name, s, m in ((primary.name, segs, met), (other.name, csegs, cmet)):
        r = evaluate(s.select("delivery_id", "pseudonym", "label_path").filter(keep), m.filter(keep),
                     data_root.layout.truth)
        truth[name] = r if r.get("n") else {}
    result = {
        "primary": {**primary.lineage(), "segmented": pairs.height, "truth": truth[primary.name],
                    "odds_ratios": ors[primary.name]},
        "other": {**other.lineage(), "segmented": csegs.height, "truth": truth[other.name],
                  "odds_ratios": ors[other.name]},
        "batches": batches, "label_dice": dice, "agreement": agreement, "forest": forest.to_dicts(),
    }
    payload = json.dumps(result, sort_keys=True, default=float)
    checksum = table_checksum(pl.DataFrame({"comparison": [payload]}))
    warehouse.replace_rows("model_comparisons", pl.DataFrame([{
        "model_name": other.name, "primary_name": primary.name, "primary_sha256": primary.sha256,
        "model_sha256": other.sha256, "batches": json.dumps(batches), "comparison": payload,
        "run_id": context.run.run_id, "recorded_at": now_utc()}]), {"model_name": other.name})
    seconds = time.perf_counter() - t0
    context.log.info(f"model comparison {primary.name} vs {other.name}: {pairs.height} participants in "
                     f"{len(batches)} batches, {seconds:.1f} s")
    steps = {m.name: {"preprocessing": (m.options.get("preprocessing") or {}).get("name", "-"),
                      "inference": "region of interest" if m.options.get("roi") else "whole volume"}
             for m in (primary, other)}
    md = {"primary": primary.name, "compared": other.name, "participants": pairs.height, "batches": len(batches),
          "how_each_ran": dg.MetadataValue.json(steps),
          "dice": dg.MetadataValue.json({k: round(v["mean"], 4) for k, v in dice.items()}),
          "odds_ratios": dg.MetadataValue.md(markdown_table(forest.select(
              "analysis", "term", "model", *[pl.col(c).round(3).cast(pl.String) for c in ("or", "or_low", "or_high")]))
              if forest.height else "none"),
          "seconds": round(seconds, 1)}
    for e in study.EXPOSURES:
        if e.name in agreement:
            md[f"{e.name}_icc"] = round(agreement[e.name]["icc"], 4)
            md[f"{e.name}_bias_pct"] = round(agreement[e.name]["bias"], 3)
    return dg.MaterializeResult(metadata=md, data_version=dg.DataVersion(checksum))
