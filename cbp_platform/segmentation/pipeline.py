"""Batch-level segmentation and metrics (framework-free; the Dagster assets call these)."""

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cbp_platform.classes import IDS, NAMES, NUM_CLASSES
from cbp_platform.imaging.nifti import atomic_write_bytes, nifti_bytes, sha256_bytes
from cbp_platform.metrics.body_composition import dice_per_class, muscle_metrics
from cbp_platform.reasons import R
from cbp_platform.segmentation.train import simulated_set


def voxel_column(class_id: int) -> str:
    """The muscle_segmentations column counting a class's voxels."""
    return f"voxels_{class_id}"


VOXEL_SCHEMA = {voxel_column(c): "Int64" for c in IDS}


class _Scans(Dataset):
    """Loads and preprocesses scans in DataLoader workers while the model runs in the main process."""

    def __init__(self, items: list[dict], segmenter, keep_images: bool = False):
        self.items = items
        self.seg = segmenter
        self.keep_images = keep_images

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        it = self.items[i]
        try:
            w = nib.load(it["water"])
            f = nib.load(it["fat"])
            water, fat = np.asarray(w.dataobj), np.asarray(f.dataobj)
            prepared = self.seg.prepare(water, fat, w.affine)
            prepared.update(index=i, affine=w.affine, shape=w.shape, error="")
            if self.keep_images:           # for the QC hook (features and image), without reading them again
                prepared.update(water=water, fat=fat)
        except Exception as exc:   # one unreadable scan is reported, not fatal to the batch
            prepared = {"index": i, "error": f"{it['water']}: {type(exc).__name__}: {exc}"}
        return prepared


def segment_scans(items: list[dict], segmenter, out_dir: Path, *, num_workers: int = 1,
                  progress=None, qc=None) -> tuple[list[dict], list[dict]]:
    """Segment each item (``pseudonym``, ``water``, ``fat`` paths) with ``segmenter``, a runner of any backend
    (:func:`cbp_platform.segmentation.backends.load_runner`); write ``<pseudonym>_seg.nii.gz`` atomically.

    ``qc``: called as ``qc(pseudonym, labels, water, fat, affine, uncertainty)`` on each label map while it is in
    memory (:class:`cbp_platform.qc.pipeline.ScanQC`); what it returns is the result's ``qc``.
    Returns (results with label path, sha256 and voxel counts; failures with messages).
    """
    loader = DataLoader(_Scans(items, segmenter, keep_images=qc is not None), batch_size=None,
                        num_workers=num_workers,
                        prefetch_factor=2 if num_workers else None, persistent_workers=False)
    results, failures = [], []
    t0 = time.perf_counter()
    for k, prep in enumerate(loader, start=1):
        it = items[prep["index"]]
        if prep["error"]:
            failures.append({"pseudonym": it["pseudonym"], "reason": R.unreadable_scan.code, "message": prep["error"]})
            if progress is not None:
                progress(k, len(items), time.perf_counter() - t0)
            continue
        if qc is None:
            labels, uncertainty = segmenter.predict(prep), None
        else:
            labels, uncertainty = segmenter.predict_qc(prep)
        affine = np.asarray(prep["affine"])
        payload = nifti_bytes(labels.astype(np.uint8), affine)
        path = out_dir / f"{it['pseudonym']}_seg.nii.gz"
        atomic_write_bytes(path, payload)
        counts = np.bincount(labels.ravel(), minlength=NUM_CLASSES)
        results.append({"pseudonym": it["pseudonym"], "label_path": str(path), "label_sha256": sha256_bytes(payload),
                        **{voxel_column(c): int(counts[c]) for c in IDS}})
        if qc is not None:
            try:
                results[-1]["qc"] = qc(it["pseudonym"], labels, np.asarray(prep["water"]), np.asarray(prep["fat"]),
                                       affine, uncertainty)
            except Exception as exc:  # noqa: BLE001 - a QC failure must not cost the batch its label maps: the
                # map is kept and goes to the top of the review queue; only the type is kept (the message may
                # name the participant's files)
                results[-1]["qc_error"] = type(exc).__name__
        if progress is not None:
            progress(k, len(items), time.perf_counter() - t0)
    return results, failures


class MuscleAtFovEdge(ValueError):
    """A muscle reaches the in-plane border of the image: it is cut by the field of view, and its volume would be
    measured short. (Superior-inferior, the image is the measured slab by design: a scan too short there is
    refused at ingestion, ``fov_too_short``.)"""

    reason = R.muscle_at_fov_edge.code


def muscles_at_fov_edge(labels: np.ndarray) -> list[str]:
    """The muscle classes with voxels on the image's left, right, anterior or posterior border."""
    rim = np.concatenate([labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(), labels[:, -1].ravel()])
    present = set(np.unique(rim).tolist())
    return [NAMES[c] for c in IDS if c in present]


def metrics_for(label_path: str, water_path: str, fat_path: str, threshold: float = 0.5) -> list[dict]:
    """Per-muscle metrics of one label map on its scan; raises :class:`MuscleAtFovEdge` for a cut muscle."""
    lab = nib.load(label_path)
    w = nib.load(water_path)
    f = nib.load(fat_path)
    if not np.allclose(lab.affine, w.affine, atol=1e-3):
        raise ValueError(f"{label_path}: affine differs from its scan {water_path}")
    labels = np.asarray(lab.dataobj)
    cut = muscles_at_fov_edge(labels)
    if cut:
        raise MuscleAtFovEdge(f"{', '.join(cut)} reach{'es' if len(cut) == 1 else ''} the edge of the field of "
                              "view (cut: would be measured short)")
    voxel_ml = float(np.prod(w.header.get_zooms()[:3])) / 1000.0
    return muscle_metrics(labels, np.asarray(w.dataobj), np.asarray(f.dataobj), voxel_ml, threshold)


def validate(segmenter, n: int = 10, seed: int = 2000) -> dict[str, float]:
    """Mean Dice per class on ``n`` held-out simulated scans (their own cohort seed)."""
    acc = {c: [] for c in IDS}
    for item in simulated_set(n, seed):
        pred = segmenter.segment(item["water"], item["fat"], item["affine"])
        for c, d in dice_per_class(pred, item["labels"]).items():
            acc[c].append(d)
    return {NAMES[c]: float(np.mean(v)) for c, v in acc.items()}


def configure_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
