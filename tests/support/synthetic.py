"""Warehouse-shaped tables built from the simulated cohort's truth (no MRI): covariates, scans, metrics, quarantine."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import polars as pl

from cbp_platform.synth.cohort import simulate_cohort
from cbp_platform.synth.delivery import make_pseudonyms
from cbp_platform.warehouse import QUARANTINE_SCHEMA
from cbp_platform.paths import DataLayout

COMORB = ("diabetes", "dyslipidemia", "osteoporosis", "osteoarthritis")
RECORDED = datetime(2024, 1, 1, tzinfo=timezone.utc)


def warehouse_tables(n: int, seed: int, batches: int = 3) -> dict[str, pl.DataFrame]:
    """The four warehouse tables for ``n`` simulated participants split into ``batches`` batches.

    Missing answers and fat-water swaps come from the simulator; metrics are exact (lean_ml from lmm_true with
    the paper's normaliser, imat_pct = imat_true), so the analysed LMM equals the truth. Also returns
    ``truth`` (the simulator's table with the pseudonym) for checks.
    """
    truth = simulate_cohort(n, seed).with_columns(pl.Series("pseudonym", make_pseudonyms(n, seed)))
    b = np.arange(n) * batches // n
    truth = truth.with_columns(pl.Series("batch_key", [f"sim-d01-b{int(i):03d}" for i in b]),
                               pl.lit("sim-d01").alias("delivery_id"))
    mc = pl.col("missing_comorbidity")
    cov = truth.select(
        "batch_key", "delivery_id", "pseudonym", "site", pl.col("exam_date").cast(pl.Date),
        pl.col("age").cast(pl.Int16), "sex", "height_cm", "weight_kg",
        pl.when(pl.col("missing_cbp")).then(None).otherwise(pl.col("cbp_true")).alias("cbp"),
        pl.when(pl.col("missing_cbp")).then(None).otherwise(pl.col("nrs_true")).cast(pl.Int8).alias("nrs_pain"),
        pl.when(pl.col("missing_met")).then(None).otherwise(pl.col("met_min_week")).cast(pl.Int32)
        .alias("met_min_week"),
        *[pl.when(mc.fill_null("") == c).then(None).otherwise(pl.col(c)).alias(c) for c in COMORB],
    )
    swap = pl.col("fat_water_swap") != "none"
    scans = truth.select("batch_key", "delivery_id", "pseudonym", pl.lit(0.1).alias("swap_score"),
                         swap.alias("swap_suspected"))
    seg = truth.filter(~swap)
    lean = pl.col("lmm_true") * pl.col("weight_kg") / (pl.col("height_cm") / 100.0)
    comp = lean / (1.0 - pl.col("imat_true") / 100.0)
    total = seg.select("pseudonym", pl.lit("back_total").alias("muscle"), pl.lit(1000).alias("voxels"),
                       comp.alias("compartment_ml"), (comp - lean).alias("fat_ml"), lean.alias("lean_ml"),
                       pl.col("imat_true").alias("imat_pct"), pl.col("mfi_true").alias("mfi"), "batch_key",
                       "delivery_id")
    # a decoy muscle row with other values: the cohort must read the back_total row
    psoas = total.with_columns(pl.lit("psoas_left").alias("muscle"), pl.col("lean_ml") * 0.12,
                               pl.col("imat_pct") * 0.5)
    metrics = pl.concat([total, psoas]).sort("batch_key", "pseudonym", "muscle")
    quarantine = pl.DataFrame(
        [dict(delivery_id=r["delivery_id"], batch_key=r["batch_key"], pseudonym=r["pseudonym"],
              stage="muscle_segmentations", reason="fat_water_swap_suspected", message="swap policy",
              run_id="run-1", recorded_at=RECORDED) for r in truth.filter(swap).iter_rows(named=True)],
        schema=QUARANTINE_SCHEMA)
    return dict(covariates=cov, scans=scans, metrics=metrics, quarantine=quarantine, truth=truth)


def quarantine_rows(rows: list[dict]) -> pl.DataFrame:
    base = dict(delivery_id="sim-d02", batch_key="sim-d02-b000", message="crafted", run_id="run-2",
                recorded_at=RECORDED)
    return pl.DataFrame([{**base, **r} for r in rows], schema=QUARANTINE_SCHEMA)


def write_warehouse(root, n: int, seed: int, batches: int = 3, warehouse=None) -> dict[str, pl.DataFrame]:
    """:func:`warehouse_tables` written as the per-batch assets would leave them (rows and the metrics'
    provenance), with placeholder file and label-map checksums and one placeholder model (sha256 ``"d" * 64``),
    into ``warehouse`` (default: the DuckDB file under ``root``)."""
    from pathlib import Path

    from cbp_platform.warehouse import provenance_frame
    from resources import DuckDBWarehouse

    t = warehouse_tables(n, seed=seed, batches=batches)
    scans = t["scans"].with_columns(pl.lit("a" * 64).alias("water_sha256"), pl.lit("b" * 64).alias("fat_sha256"))
    segs = t["metrics"].filter(pl.col("muscle") == "back_total").select(
        "pseudonym", "batch_key", "delivery_id", pl.lit("/nonexistent.nii.gz").alias("label_path"),
        pl.lit("c" * 64).alias("label_sha256"), pl.lit("d" * 64).alias("model_sha256"))
    wh = warehouse or DuckDBWarehouse(database=str(DataLayout(Path(root)).warehouse_file))
    prov = pl.concat([provenance_frame([{"pseudonym": r["pseudonym"], "inputs": {"labels": r["label_sha256"]},
                                         "output": ""} for r in g.iter_rows(named=True)],
                                       delivery_id=g["delivery_id"][0], batch_key=key[0], stage="muscle_metrics",
                                       code_version="muscle_metrics/1", run_id="run-1")
                      for key, g in segs.group_by("batch_key", maintain_order=True)])
    for name, df in (("participant_covariates", t["covariates"]), ("raw_mri_scans", scans),
                     ("muscle_metrics", t["metrics"]), ("quarantine", t["quarantine"]),
                     ("muscle_segmentations", segs), ("provenance", prov)):
        wh.replace_rows(name, df, {})
    return t


def correct_covariates(wh, pseudonyms: list[str], delivery: str, seq: int) -> None:
    """A covariate correction's batch, as ``participant_covariates`` writes it (``assets/writes.py``): the full
    corrected rows (``cbp`` flipped, ``nrs_pain`` following) as versions of ``delivery``, registered ``seq``-th,
    each superseding the delivery of the row it replaces."""
    from cbp_platform.warehouse import versioned

    rows = wh.table("participant_covariates", where={"pseudonym": pseudonyms})
    sup = dict(zip(rows["pseudonym"], rows["delivery_id"]))
    new = rows.with_columns(pl.lit(f"{delivery}.b001").alias("batch_key"), pl.lit(delivery).alias("delivery_id"),
                            (~pl.col("cbp")).alias("cbp"),
                            pl.when(pl.col("cbp")).then(1).otherwise(6).cast(rows.schema["nrs_pain"]).alias("nrs_pain"))
    wh.replace_many([("participant_covariates", versioned("participant_covariates", new, seq, sup),
                      {"batch_key": f"{delivery}.b001"})])
