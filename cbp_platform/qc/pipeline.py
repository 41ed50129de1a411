"""QC during segmentation: the features and image of each label map as it is made, then the batch's triage.

:class:`ScanQC` is the per-scan hook of :func:`cbp_platform.segmentation.pipeline.segment_scans`: it measures the
label map still in memory (:func:`~cbp_platform.qc.features.scan_features`) and writes its QC image next to it
(``<pseudonym>_qc.png``). :func:`batch_qc` turns the batch's rows into the ``segmentation_qc`` table with the
triage score; :func:`batch_montage` draws the batch's highest-risk maps side by side (no pseudonym on it).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl

from cbp_platform.imaging.nifti import atomic_write_bytes
from cbp_platform.study import LMM
from cbp_platform.qc.features import FEATURE_NAMES, Z_CAP, scan_features, triage
from cbp_platform.qc.render import montage, qc_image

QC_SCHEMA = {
    "pseudonym": pl.String, "batch_key": pl.String, "delivery_id": pl.String, "site": pl.String,
    "label_sha256": pl.String, "model_sha256": pl.String, "model_name": pl.String, "qc_image": pl.String,
    "lean_ml": pl.Float64, "compartment_ml": pl.Float64, LMM.name: pl.Float64,
    **{f: pl.Float64 for f in FEATURE_NAMES}, "muscle_voxels": pl.Int64, "qc_error": pl.String,
}


def si_axis(affine: np.ndarray) -> int:
    """The array axis that runs superior-inferior."""
    return [c in "SI" for c in nib.orientations.aff2axcodes(affine)].index(True)


def qc_path(out_dir: Path, pseudonym: str) -> Path:
    return Path(out_dir) / f"{pseudonym}_qc.png"


class ScanQC:
    """Measure one label map and write its QC image. ``lmm_denominator``: pseudonym -> the LMM normaliser's
    denominator (body size from the covariates), for the LMM printed on the image; absent: lean volume only."""

    def __init__(self, out_dir: Path, lmm_denominator: dict[str, float] | None = None, lmm_unit: str = ""):
        self.out_dir = Path(out_dir)
        self.lmm_denominator = lmm_denominator or {}
        self.lmm_unit = lmm_unit

    def __call__(self, pseudonym: str, labels: np.ndarray, water: np.ndarray, fat: np.ndarray,
                 affine: np.ndarray, uncertainty: float | None) -> dict:
        voxel_ml = float(np.prod(nib.affines.voxel_sizes(affine))) / 1000.0
        feats = scan_features(labels, water, fat, voxel_ml, uncertainty, si_axis=si_axis(affine))
        den = self.lmm_denominator.get(pseudonym)
        lmm = feats["lean_ml"] / den if den else None
        figures = {"LMM": f"{lmm:.1f} {self.lmm_unit}" if lmm is not None else "n/a (no covariates)",
                   "lean muscle": f"{feats['lean_ml']:.0f} cm3", "InterMAT": f"{feats['imat_pct']:.2f} %",
                   "model uncertainty": "n/a" if uncertainty is None else f"{uncertainty:.3f}"}
        path = qc_path(self.out_dir, pseudonym)
        atomic_write_bytes(path, qc_image(water, fat, labels, affine, figures, title="segmentation QC"))
        return {**feats, LMM.name: lmm, "qc_image": str(path)}


def batch_qc(rows: list[dict], *, batch_key: str, delivery_id: str, model_sha256: str, model_name: str,
             sites: dict[str, str]) -> pl.DataFrame:
    """The ``segmentation_qc`` rows of a batch with its triage (``rows``: segment_scans results with ``qc``)."""
    data = [{**{c: None for c in QC_SCHEMA}, "pseudonym": r["pseudonym"], "batch_key": batch_key,
             "delivery_id": delivery_id, "site": sites.get(r["pseudonym"]), "label_sha256": r["label_sha256"],
             "model_sha256": model_sha256, "model_name": model_name, **r.get("qc", {}),
             "qc_error": r.get("qc_error")} for r in rows]
    df = pl.DataFrame(data, schema=QC_SCHEMA)
    if df.height == 0:
        return df.with_columns(pl.lit(None, pl.Float64).alias("triage_score"),
                               pl.lit(None, pl.String).alias("triage_flags"),
                               pl.lit(None, pl.Int64).alias("triage_rank"))
    # a map whose QC failed is unmeasured, hence at the top of the queue: its features do not move the others'
    scored = triage(df.filter(pl.col("qc_error").is_null())) if df["qc_error"].null_count() else None
    failed = df.filter(pl.col("qc_error").is_not_null()).with_columns(
        pl.lit(Z_CAP).alias("triage_score"),
        pl.format("QC failed ({}): review the map by hand", pl.col("qc_error")).alias("triage_flags"))
    both = pl.concat([failed, scored.drop("triage_rank")], how="diagonal_relaxed") if scored is not None else failed
    return both.sort(["triage_score", "pseudonym"], descending=[True, False]).with_columns(
        pl.int_range(1, pl.len() + 1).cast(pl.Int64).alias("triage_rank"))


def batch_montage(qc: pl.DataFrame, k: int = 6) -> bytes:
    """The ``k`` highest-risk QC images of a batch, captioned with rank, score and flags (no pseudonym)."""
    top = qc.filter(pl.col("qc_image").is_not_null()).sort("triage_rank").head(k) if qc.height else qc
    images, captions = [], []
    for r in top.iter_rows(named=True):
        images.append(Path(r["qc_image"]).read_bytes())
        flags = r["triage_flags"] or "no feature above the flag threshold"
        captions.append(f"#{r['triage_rank']}  score {r['triage_score']:.1f}  {flags}"[:110])
    return montage(images, captions)
