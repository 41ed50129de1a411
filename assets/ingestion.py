"""Ingestion assets, partitioned by batch: ``raw_mri_scans`` and ``participant_covariates``.

Each reads its batch from the landing zone (read-only), calls the domain core, writes its rows, the
quarantined participants and one provenance row per participant to the warehouse, and reports counts,
reasons, a preview (no pseudonyms) and the checksum of the written table.
"""


import time
from collections import Counter

import dagster as dg
import polars as pl

from assets.partitions import batches_partitions
from assets.writes import write_stage
from cbp_platform.deployment import k8s_step_tags
from cbp_platform.ingest.batch import facts_frame, ingest_covariates, ingest_scans
from cbp_platform.ingest.registry import duplicates_of, registered_manifest
from cbp_platform.landing import COVARIATES, SCAN
from cbp_platform.progress import RateLogger
from resources import WAREHOUSE_KIND, DataRootResource, Warehouse

RAW_MRI_SCANS_VERSION = "raw_mri_scans/4"        # 2: bounded; 3: DICOM; 4: one person, one scan
COVARIATES_VERSION = "participant_covariates/3"  # 2: row by row, BOM, manifest; 3: streamed, bounded
PREVIEW_ROWS = 5


LANDING_ZONE = dg.AssetKey("landing_zone")

landing_zone = dg.AssetSpec(
    LANDING_ZONE, group_name="ingestion", kinds={"filesystem"},
    description="The landing zone ($CBP_DATA_ROOT/landing), written by the data centre and never by the platform. "
                "delivery_sensor observes it: deliveries by state (waiting, refused, registered, changed, gone) "
                "with the reason of each that is not registered. `cbp status` prints the same from the shell.")


def _preview(df: pl.DataFrame, cols: list[str]) -> dg.MetadataValue:
    """A few rows for the UI, never with pseudonyms."""
    cols = [c for c in cols if c in df.columns and c != "pseudonym"]
    if df.height == 0 or not cols:
        return dg.MetadataValue.md("_no rows_")
    head = df.select(cols).head(PREVIEW_ROWS)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in head.iter_rows():
        lines.append("| " + " | ".join("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
                                       for v in row) + " |")
    return dg.MetadataValue.md("\n".join(lines))


def _reasons(quarantine: list[dict]) -> dict:
    return dict(sorted(Counter(q["reason"] for q in quarantine).items()))


def _not_corrected(context: dg.AssetExecutionContext, batch, part: str) -> dg.MaterializeResult:
    """A correction's batch that does not correct this stage's part: its run requests never include the stage, and
    materialised by hand it writes nothing (the versions in force stay as they are)."""
    context.log.info(f"batch {batch.key}: a correction of {' and '.join(batch.parts)}; it brings no {part}, so "
                     "nothing is written")
    return dg.MaterializeResult(metadata={"participants": len(batch.participants), "dagster/row_count": 0,
                                          "not_corrected": f"this correction's batch brings no {part}",
                                          "delivery_id": batch.delivery_id})


def _batch(context: dg.AssetExecutionContext, data_root: DataRootResource):
    key = context.partition_key
    batch = data_root.registry.read(key)
    ddir = data_root.landing / batch.delivery_id
    manifest = registered_manifest(data_root.path, batch.delivery_id, data_root.landing)   # never the edited one
    return batch, ddir, manifest


@dg.asset(
    partitions_def=batches_partitions,
    deps=[landing_zone],
    code_version=RAW_MRI_SCANS_VERSION,
    group_name="ingestion",
    op_tags=k8s_step_tags("cpu"),
    kinds={WAREHOUSE_KIND, "nifti"},
    description="One row per participant with validated Dixon scan facts (paths, sha256 verified against the "
                "manifest, shape, spacing, orientation, affine, dtype, intensity range, channels, swap QC). "
                "Failures go to the quarantine table.",
)
def raw_mri_scans(context: dg.AssetExecutionContext, data_root: DataRootResource,
                  warehouse: Warehouse) -> dg.MaterializeResult:
    batch, ddir, manifest = _batch(context, data_root)
    if not batch.covers(SCAN):
        return _not_corrected(context, batch, SCAN)
    dups = duplicates_of(data_root.path, batch.delivery_id)
    t0 = time.perf_counter()
    steady = RateLogger(context.log.info, len(manifest["participants"]), f"batch {batch.key}: validated",
                        unit="scans")

    def progress(done: int, total: int) -> None:
        steady.total = total
        steady(done)

    facts, quarantine = ingest_scans(batch, ddir, manifest, duplicates=dups, threads=data_root.ingest_threads,
                                     progress=progress, layout=data_root.layout)
    df = facts_frame(facts, batch)
    # NIfTI: the delivered files; DICOM: every DICOM file read (and its zip), by sha256
    # (DICOM: the stitched water volume is this stage's output)
    prov = [dict(pseudonym=f["pseudonym"], inputs=f["inputs"], output=f["water_sha256"]) if "inputs" in f else
            dict(pseudonym=f["pseudonym"], inputs={"water": f["water_sha256"], "fat": f["fat_sha256"]}) for f in facts]
    checksum = write_stage(warehouse, context, "raw_mri_scans", df, batch, quarantine, prov, RAW_MRI_SCANS_VERSION,
                           data_root=data_root)
    seconds = time.perf_counter() - t0
    reasons = _reasons(quarantine)
    context.log.info(f"batch {batch.key}: {df.height} scans valid, {len(quarantine)} quarantined {reasons}, "
                     f"{seconds:.1f} s")
    return dg.MaterializeResult(
        metadata={
            "participants": len(batch.participants),
            "dagster/row_count": df.height,
            "quarantined": len(quarantine),
            "quarantine_reasons": dg.MetadataValue.json(reasons),
            "swap_suspected": int(df["swap_suspected"].sum()) if df.height else 0,
            "seconds": round(seconds, 2),
            "table_checksum": checksum,
            "delivery_id": batch.delivery_id,
            "preview": _preview(df, ["shape_x", "shape_y", "shape_z", "spacing_x", "spacing_z", "orientation",
                                     "dtype", "water_p99", "fat_p99", "swap_score"]),
        },
        data_version=dg.DataVersion(checksum),
    )


@dg.asset(
    partitions_def=batches_partitions,
    deps=[landing_zone],
    code_version=COVARIATES_VERSION,
    group_name="ingestion",
    op_tags=k8s_step_tags("cpu"),
    kinds={WAREHOUSE_KIND, "polars"},
    description="The batch's rows of covariates.csv in the typed participant schema (docs/covariates.md). "
                "Unparseable, out-of-range, missing or duplicated rows go to the quarantine table.",
)
def participant_covariates(context: dg.AssetExecutionContext, data_root: DataRootResource,
                           warehouse: Warehouse) -> dg.MaterializeResult:
    batch, ddir, manifest = _batch(context, data_root)
    if not batch.covers(COVARIATES):
        return _not_corrected(context, batch, COVARIATES)
    dups = duplicates_of(data_root.path, batch.delivery_id)
    res, entry = ingest_covariates(batch, ddir, manifest, duplicates=dups)
    df = res.rows.with_columns(pl.lit(batch.key).alias("batch_key"), pl.lit(batch.delivery_id).alias("delivery_id"))
    df = df.select(["batch_key", "delivery_id", *res.rows.columns])
    cov_sha = entry["sha256"] if entry else ""
    prov = [dict(pseudonym=p, inputs={"covariates.csv": cov_sha}) for p in df["pseudonym"].to_list()]
    checksum = write_stage(warehouse, context, "participant_covariates", df, batch, res.quarantine, prov,
                           COVARIATES_VERSION, data_root=data_root)
    reasons = _reasons(res.quarantine)
    context.log.info(f"batch {batch.key}: {df.height} covariate rows valid, {len(res.quarantine)} quarantined "
                     f"{reasons}")
    missing = {c: int(df[c].null_count()) for c in ("cbp", "nrs_pain", "met_min_week", "diabetes", "dyslipidemia",
                                                   "osteoporosis", "osteoarthritis")}
    return dg.MaterializeResult(
        metadata={
            "participants": len(batch.participants),
            "dagster/row_count": df.height,
            "quarantined": len(res.quarantine),
            "quarantine_reasons": dg.MetadataValue.json(reasons),
            "unanswered": dg.MetadataValue.json(missing),
            "table_checksum": checksum,
            "delivery_id": batch.delivery_id,
            "preview": _preview(df, ["site", "age", "sex", "height_cm", "weight_kg", "cbp", "nrs_pain", "met_min_week"]),
        },
        data_version=dg.DataVersion(checksum),
    )
