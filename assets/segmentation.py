"""Segmentation and body-composition metrics: ``segmentation_model``, ``muscle_segmentations[batch]``,
``muscle_metrics[batch]``.

Policy for suspected fat-water swaps (flagged by the ingestion QC): the scan is *excluded* from segmentation and
metrics, with reason ``fat_water_swap_suspected`` in the quarantine table, and counted in the metadata. Swaps
limited to one station cannot be undone by exchanging the channels of the whole volume, and a partially
corrected scan would bias InterMAT; excluding ~1.8 % of scans costs little power.
"""

import json
import time

import dagster as dg
import polars as pl

from assets.ingestion import participant_covariates, raw_mri_scans
from assets.partitions import batches_partitions
from assets.writes import write_stage
from cbp_platform.classes import BACK_TOTAL
from cbp_platform.deployment import k8s_step_tags
from cbp_platform.ingest.batch import redact, scan_files
from cbp_platform.paths import stored_under
from cbp_platform.progress import RateLogger
from cbp_platform.reasons import R
from resources import WAREHOUSE_KIND, DataRootResource, SegmentationRuntime, Warehouse

MODEL_VERSION = "segmentation_model/1"
SEGMENTATIONS_VERSION = "muscle_segmentations/2"   # 2: QC images, features and triage
METRICS_VERSION = "muscle_metrics/1"


class SegmentationModelConfig(dg.Config):
    model: str = ""                # a registered model (`cbp model register`) to use instead of training
    bundle_path: str = ""          # a MONAI bundle folder to load instead of training (registered on the fly)
    max_iterations: int = 900      # training length: a fixed iteration count keeps the model reproducible
    # optional wall-clock cap (s), 0 = none. Reaching it fails the asset: a model trained for fewer iterations is
    # another model, never published silently (900 iterations take ~7 min on 2 idle cores, an hour on a loaded one)
    train_budget_s: float = 0.0
    n_train: int = 120             # simulated training scans (their own cohort seed), rendered in memory
    n_val: int = 10                # held-out simulated scans for the Dice figures
    n_calibration: int = 120       # held-out simulated scans (seed + 2000) that calibrate the border (InterMAT)
    seed: int = 1000


def current_model(runtime: SegmentationRuntime) -> dict:
    p = runtime.current_pointer
    if not p.exists():
        raise dg.Failure(description=f"{p}: no segmentation model yet; materialise segmentation_model first")
    return json.loads(p.read_text())


def primary_manifest(runtime: SegmentationRuntime):
    """The primary model's manifest, its weights checked against the registration (a Failure naming the file
    otherwise)."""
    from cbp_platform.segmentation.manifest import ManifestError
    from cbp_platform.segmentation.registry import manifest_for_pointer

    try:
        return manifest_for_pointer(current_model(runtime), runtime.registry_path)
    except ManifestError as exc:
        raise dg.Failure(description=str(exc)) from None


@dg.asset(code_version=MODEL_VERSION, group_name="segmentation", kinds={"pytorch", "monai"}, pool="gpu",
          op_tags=k8s_step_tags("gpu"),
          description="The primary back-muscle segmentation model: trained here (MONAI 3D residual UNet, on "
                      "simulated labelled scans kept apart from the deliveries), loaded from `bundle_path`, or a "
                      "registered model (`model`: e.g. an nnU-Net v2 folder of MRSegmentator). Its manifest "
                      "(backend, classes, geometry, weights sha256) is its identity in lineage.")
def segmentation_model(context: dg.AssetExecutionContext, config: SegmentationModelConfig,
                       runtime: SegmentationRuntime) -> dg.MaterializeResult:
    from cbp_platform.imaging.nifti import atomic_write_bytes
    from cbp_platform.segmentation.backends import describe_monai_bundle, load_runner
    from cbp_platform.segmentation.manifest import ManifestError, load_manifest, save_manifest
    from cbp_platform.segmentation.pipeline import configure_threads, validate
    from cbp_platform.segmentation.registry import train_default_model
    from cbp_platform.segmentation.train import TrainingCapReached

    configure_threads(runtime.threads)
    t0 = time.perf_counter()
    trained = None
    if config.model and config.bundle_path:
        raise dg.Failure(description="give either `model` (a registered model) or `bundle_path`, not both")
    try:
        if config.model:
            manifest = load_manifest(runtime.registry_path, config.model)
            source = "registered"
        elif config.bundle_path:
            manifest = describe_monai_bundle(config.bundle_path)
            save_manifest(runtime.registry_path, manifest)
            source = "loaded"
    except ManifestError as exc:
        raise dg.Failure(description=str(exc)) from None
    if config.model or config.bundle_path:
        context.log.info(f"{source} model {manifest.name} ({manifest.backend}, {manifest.folder}, weights "
                         f"{manifest.sha256[:12]})")
    else:
        try:
            manifest, trained, cal = train_default_model(
                runtime.models_path, runtime.registry_path, n_train=config.n_train, budget_s=config.train_budget_s,
                seed=config.seed, max_iterations=config.max_iterations, n_calibration=config.n_calibration,
                device=runtime.device, sw_batch_size=runtime.sw_batch_size, log=context.log.info,
                calibration_progress=RateLogger(context.log.info, config.n_calibration, "border calibration",
                                                unit="scans"))
        except TrainingCapReached as exc:
            raise dg.Failure(description=str(exc)) from None
        context.log.info(f"border calibration: background offset {cal.offset:+.2f}, InterMAT bias on "
                         f"{cal.n} held-out scans {cal.imat_bias_before:+.2f} % -> {cal.imat_bias_after:+.2f} %")
        source = "trained"
    try:
        runner = load_runner(manifest, device=runtime.device, sw_batch_size=runtime.sw_batch_size)
    except ManifestError as exc:
        raise dg.Failure(description=str(exc)) from None
    dice = validate(runner, n=config.n_val, seed=config.seed + 1000) if config.n_val else {}
    pointer = {"name": manifest.name, "backend": manifest.backend,
               "path": stored_under(runtime.models_path, manifest.folder),       # relative to models/ when inside
               "weights_sha256": manifest.sha256, "source": source, "validation_dice": dice,
               "n_val": config.n_val, "validation_seed": config.seed + 1000}
    atomic_write_bytes(runtime.current_pointer, json.dumps(pointer, indent=1).encode())
    seconds = time.perf_counter() - t0
    context.log.info(f"model {manifest.name} ({manifest.sha256[:12]}): Dice on {config.n_val} held-out simulated "
                     f"scans {dice}")
    md = {"model_name": manifest.name, "backend": manifest.backend, "backend_version": manifest.backend_version,
          "weights_sha256": manifest.sha256, "bundle_path": manifest.folder, "preset": manifest.preset or "-",
          "inputs": ", ".join(manifest.inputs), "orientation": manifest.orientation,
          "spacing_mm": dg.MetadataValue.json(list(manifest.spacing_mm)),
          "labels": dg.MetadataValue.json({str(k): v for k, v in sorted(manifest.labels.items())}),
          "validation_dice": dg.MetadataValue.json({k: round(v, 4) for k, v in dice.items()}),
          "min_dice": round(min(dice.values()), 4) if dice else float("nan"), "n_validation_scans": config.n_val,
          "source": source, "seconds": round(seconds, 1)}
    if trained is not None:
        md.update(training_seconds=round(trained.seconds, 1), training_iterations=trained.iterations,
                  n_training_scans=config.n_train)
    cal = getattr(runner, "bundle", None) and runner.bundle.metadata.get("calibration")
    if cal:
        md.update(background_offset=cal["offset"], n_calibration_scans=cal["n"],
                  calibration_imat_bias_before=cal["imat_bias_before"],
                  calibration_imat_bias_after=cal["imat_bias_after"])
    return dg.MaterializeResult(metadata=md, data_version=dg.DataVersion(manifest.sha256))


@dg.asset_check(asset=segmentation_model, blocking=True,
                description="A model trained or loaded here: Dice >= 0.90 for every class on held-out simulated "
                            "scans. A registered model (validated by its publisher on real scans, where phantom "
                            "Dice says little): its weight files still match their registration; its phantom "
                            "Dice is reported.")
def segmentation_model_dice(runtime: SegmentationRuntime) -> dg.AssetCheckResult:
    from cbp_platform.segmentation.manifest import ManifestError, verify_weights

    cur = current_model(runtime)
    dice = cur["validation_dice"]
    md = {"dice": dg.MetadataValue.json(dice), "weights_sha256": cur["weights_sha256"], "model_name": cur.get("name")}
    if cur.get("source") == "registered":
        try:
            verify_weights(primary_manifest(runtime))
            return dg.AssetCheckResult(passed=True, metadata={**md, "rule": "weights match the registration"})
        except (ManifestError, dg.Failure) as exc:
            return dg.AssetCheckResult(passed=False, metadata={**md, "rule": "weights match the registration",
                                                               "problem": str(getattr(exc, "description", exc))})
    return dg.AssetCheckResult(passed=bool(dice) and min(dice.values()) >= 0.90,
                               metadata={**md, "rule": "phantom Dice", "threshold": 0.90})


@dg.asset(partitions_def=batches_partitions, deps=[raw_mri_scans, participant_covariates, segmentation_model],
          pool="gpu", code_version=SEGMENTATIONS_VERSION, group_name="segmentation", kinds={"pytorch", "nifti"},
          op_tags=k8s_step_tags("gpu"),
          description="Label maps (NIfTI, the scan's grid and affine) of the batch's valid scans; suspected "
                      "fat-water swaps are excluded (quarantine). Each map gets a QC image beside it and a row "
                      "of segmentation_qc: QC features and the triage score (within batch and site; the "
                      "covariates give the site). The metadata name the file of a montage of the batch's "
                      "highest-risk maps and link the review app. Runs in the concurrency pool `gpu`.")
def muscle_segmentations(context: dg.AssetExecutionContext, data_root: DataRootResource, warehouse: Warehouse,
                         runtime: SegmentationRuntime) -> dg.MaterializeResult:
    from cbp_platform.qc.pipeline import ScanQC
    from cbp_platform.segmentation.manifest import ManifestError
    from cbp_platform.segmentation.pipeline import VOXEL_SCHEMA, configure_threads, segment_scans
    from cbp_platform.segmentation.roi import load_segmenter

    key = context.partition_key
    batch = data_root.registry.read(key)
    configure_threads(runtime.threads)
    manifest = primary_manifest(runtime)
    try:
        seg = load_segmenter(manifest, runtime.models_path, device=runtime.device,
                             sw_batch_size=runtime.sw_batch_size)
    except ManifestError as exc:
        raise dg.Failure(description=str(exc)) from None
    roi = getattr(seg, "stats", None)
    context.log.info(f"batch {key}: model {manifest.name} ({manifest.backend}, weights {manifest.sha256[:12]}) "
                     f"loaded once for {seg.device}" + (f", on the region located by {seg.locator.manifest.name}"
                                                        if roi is not None else ""))
    scans = warehouse.table("raw_mri_scans", columns=["pseudonym", "water_path", "fat_path", "water_sha256",
                                                      "fat_sha256", "swap_suspected", "source_format"],
                            where={"batch_key": key}, order_by=["pseudonym"])
    ddir = data_root.landing / batch.delivery_id
    swapped = scans.filter(pl.col("swap_suspected"))
    todo = scans.filter(~pl.col("swap_suspected"))
    items = [{"pseudonym": r["pseudonym"], **scan_files(data_root.layout, batch.delivery_id, r)}
             for r in todo.iter_rows(named=True)]
    out_dir = data_root.layout.segmentations(batch.delivery_id)
    progress = RateLogger(context.log.info, len(items), f"batch {key}: segmented", unit="scans",
                          suffix=f"on {seg.device}")

    sites, denominators, lmm_unit = _batch_covariates(warehouse, todo["pseudonym"].to_list() if todo.height else [])
    t0 = time.perf_counter()
    results, failures = segment_scans(items, seg, out_dir, num_workers=runtime.num_workers, progress=progress,
                                      qc=ScanQC(out_dir, denominators, lmm_unit))
    seconds = time.perf_counter() - t0
    failures = [{**f, "message": redact(f["message"], f["pseudonym"], ddir)} for f in failures]
    quarantine = failures + [{"pseudonym": p, "reason": R.fat_water_swap_suspected.code,
                              "message": "excluded from segmentation by the swap policy (ingestion QC flag)"}
                             for p in (swapped["pseudonym"].to_list() if swapped.height else [])]
    df = pl.DataFrame(results, schema={"pseudonym": pl.String, "label_path": pl.String, "label_sha256": pl.String,
                                       **{k: getattr(pl, v) for k, v in VOXEL_SCHEMA.items()}})
    df = df.with_columns(pl.lit(key).alias("batch_key"), pl.lit(batch.delivery_id).alias("delivery_id"),
                         pl.lit(manifest.sha256).alias("model_sha256"))
    src = {r["pseudonym"]: r for r in scans.iter_rows(named=True)} if scans.height else {}
    prov = [dict(pseudonym=r["pseudonym"], output=r["label_sha256"],
                 inputs={"water": src[r["pseudonym"]]["water_sha256"], "fat": src[r["pseudonym"]]["fat_sha256"],
                         "model": manifest.sha256}) for r in results]
    qc, qc_md = _batch_qc(results, batch, manifest, sites, out_dir)
    # paths are stored relative to the data root: a root restored or copied elsewhere works there
    df, qc = data_root.layout.stored_paths(df, "label_path"), data_root.layout.stored_paths(qc, "qc_image")
    checksum = write_stage(warehouse, context, "muscle_segmentations", df, batch, quarantine, prov,
                           SEGMENTATIONS_VERSION, data_root=data_root, extra=(("segmentation_qc", qc, {"batch_key": key}),))
    context.log.info(f"batch {key}: {len(results)} segmented, {len(quarantine)} excluded, {seconds:.1f} s; "
                     f"{qc.filter(pl.col('triage_flags') != '').height if qc.height else 0} maps flagged for "
                     "review")
    return dg.MaterializeResult(metadata={**qc_md,
        "dagster/row_count": len(results), "excluded_swap_suspected": swapped.height if scans.height else 0,
        "failed": len(failures), "model_sha256": manifest.sha256, "model_name": manifest.name,
        "backend": manifest.backend, "model_folder": manifest.folder, "device": str(seg.device),
        "seconds": round(seconds, 2), "scans_per_second": round(len(results) / max(seconds, 1e-9), 2),
        "table_checksum": checksum, "output_dir": str(out_dir),
        "inference": "region of interest" if roi is not None else "whole volume",
        "preprocessing": (manifest.options.get("preprocessing") or {}).get("name", "-"),
        **({"roi": dg.MetadataValue.json(roi.to_dict()), "roi_reruns_whole_volume": roi.reruns}
           if roi is not None else {})},
        data_version=dg.DataVersion(checksum))


def _batch_covariates(warehouse: Warehouse, pseudonyms: list[str]) -> tuple[dict[str, str], dict[str, float], str]:
    """The sites and LMM denominators (the analysis' normaliser, from the covariates in force) of the batch's
    participants, by pseudonym (a correction's re-scan reads the covariates its participant has, from any
    delivery)."""
    from cbp_platform.analysis.cohort import NORMALISERS

    norm = NORMALISERS["weight_per_height"]
    cov = warehouse.table("participant_covariates", columns=["pseudonym", "site", "weight_kg", "height_cm"],
                          where={"pseudonym": pseudonyms}, missing_ok=True)
    if cov is None or cov.height == 0:   # covariates not ingested yet: QC by batch, no LMM on the QC image
        return {}, {}, norm.unit
    cov = cov.with_columns(norm.denominator().alias("den"))
    return (dict(zip(cov["pseudonym"], cov["site"])),
            {p: d for p, d in zip(cov["pseudonym"], cov["den"]) if d is not None and d > 0}, norm.unit)


def _batch_qc(results: list[dict], batch, manifest, sites: dict[str, str], out_dir) -> tuple[pl.DataFrame, dict]:
    """The batch's segmentation_qc rows (triage) and the materialisation's QC metadata: the montage of the
    highest-risk maps as a file (never embedded: Dagster's event log cannot be erased, so no image of a participant
    goes there; docs/lifecycle.md), and the review app's link to the batch."""
    from cbp_platform.imaging.nifti import atomic_write_bytes
    from cbp_platform.qc import app_url
    from cbp_platform.qc.pipeline import batch_montage, batch_qc

    qc = batch_qc(results, batch_key=batch.key, delivery_id=batch.delivery_id, model_sha256=manifest.sha256,
                  model_name=manifest.name, sites=sites)
    png = batch_montage(qc)
    path = out_dir / f"qc_montage_{batch.key}.png"
    atomic_write_bytes(path, png)
    top = qc.sort("triage_rank").head(10) if qc.height else qc
    lines = ["| rank | score | flags |", "|---|---|---|"] + [
        f"| {r['triage_rank']} | {r['triage_score']:.1f} | {r['triage_flags'] or '-'} |" for r in top.iter_rows(named=True)]
    return qc, {
        "qc_montage_path": dg.MetadataValue.path(str(path)),
        "qc_review_app": dg.MetadataValue.url(f"{app_url()}/?batch={batch.key}"),
        "qc_top_risk": dg.MetadataValue.md("\n".join(lines)),
        "qc_flagged": qc.filter(pl.col("triage_flags") != "").height if qc.height else 0}


@dg.asset(partitions_def=batches_partitions, deps=[muscle_segmentations], code_version=METRICS_VERSION,
          op_tags=k8s_step_tags("cpu"),
          group_name="segmentation", kinds={WAREHOUSE_KIND},
          description="Per participant and muscle (and the back total): compartment, fat and lean volume (cm3), "
                      "InterMAT % (voxel fat fraction >= 0.5) and MFI (mean fat fraction of lean voxels).")
def muscle_metrics(context: dg.AssetExecutionContext, data_root: DataRootResource,
                   warehouse: Warehouse) -> dg.MaterializeResult:
    from cbp_platform.metrics.body_composition import METRIC_SCHEMA
    from cbp_platform.segmentation.pipeline import metrics_for

    key = context.partition_key
    batch = data_root.registry.read(key)
    rows = data_root.layout.resolved_paths(warehouse.segmented_scans(key), "label_path")
    ddir = data_root.landing / batch.delivery_id
    out, quarantine, prov = [], [], []
    steady = RateLogger(context.log.info, rows.height, f"batch {key}: measured", unit="label maps")
    for i, r in enumerate(rows.iter_rows(named=True), start=1):
        steady(i)
        try:
            ms = metrics_for(r["label_path"], *scan_files(data_root.layout, batch.delivery_id, r).values())
        except Exception as exc:
            cut = getattr(exc, "reason", "") == R.muscle_at_fov_edge.code
            quarantine.append({"pseudonym": r["pseudonym"],
                               "reason": R.muscle_at_fov_edge.code if cut else R.metrics_failed.code,
                               "message": redact(str(exc) if cut else f"{type(exc).__name__}: {exc}",
                                                 r["pseudonym"], ddir)})
            continue
        out += [{"pseudonym": r["pseudonym"], **m} for m in ms]
        prov.append({"pseudonym": r["pseudonym"], "inputs": {"labels": r["label_sha256"]}})
    df = pl.DataFrame(out, schema={"pseudonym": pl.String, **METRIC_SCHEMA}).with_columns(
        pl.lit(key).alias("batch_key"), pl.lit(batch.delivery_id).alias("delivery_id"))
    checksum = write_stage(warehouse, context, "muscle_metrics", df, batch, quarantine, prov, METRICS_VERSION,
                           data_root=data_root)
    tot = df.filter(pl.col("muscle") == BACK_TOTAL)
    md = {"participants": tot.height, "quarantined": len(quarantine), "table_checksum": checksum}
    if tot.height:
        md.update(median_back_compartment_ml=round(float(tot["compartment_ml"].median()), 1),
                  median_imat_pct=round(float(tot["imat_pct"].median()), 2),
                  median_mfi=round(float(tot["mfi"].median()), 4))
    md.update(_accuracy_metadata(data_root, warehouse, key, df))
    return dg.MaterializeResult(metadata=md, data_version=dg.DataVersion(checksum))


def _accuracy_metadata(data_root: DataRootResource, warehouse: Warehouse, key: str, metrics: pl.DataFrame) -> dict:
    """Accuracy against ground truth for a simulated delivery (truth beside the landing zone); {} otherwise."""
    from cbp_platform import study
    from cbp_platform.segmentation.accuracy import evaluate

    segs = data_root.layout.resolved_paths(
        warehouse.table("muscle_segmentations", columns=["delivery_id", "pseudonym", "label_path"],
                        where={"batch_key": key}, order_by=["pseudonym"]), "label_path")
    if segs.height == 0 or not (data_root.layout.truth / segs["delivery_id"][0] / "participants.csv").exists():
        return {}
    r = evaluate(segs, metrics, data_root.layout.truth)
    if not r.get("n"):
        return {}
    md = {"accuracy_n": r["n"], "accuracy_dice": dg.MetadataValue.json({k: round(v, 4) for k, v in r["dice"].items()}),
          "accuracy_meets_targets": r["meets_targets"]}
    for name in (e.name for e in study.EXPOSURES if e.name in r):
        a = r[name]
        md.update({f"accuracy_{name}_icc": round(a["icc"], 4), f"accuracy_{name}_bias_pct": round(a["bias"], 3),
                   f"accuracy_{name}_loa_pct": dg.MetadataValue.json([round(a["loa_low"], 3),
                                                                      round(a["loa_high"], 3)]),
                   f"accuracy_{name}_proportional_bias": dg.MetadataValue.json(
                       {k: round(v, 4) for k, v in a["proportional"].items()})})
    return md
