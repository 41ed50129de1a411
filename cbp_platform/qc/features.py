"""Segmentation QC: the per-participant features that predict a wrong label map, and the triage score.

:func:`scan_features` measures one label map on its scan (no ground truth); :func:`triage` turns a batch's
features into robust z-scores and one score per participant, the largest of them, so a reviewer who reads the
queue from the top sees first the maps most likely to be wrong. The features (:data:`FEATURES`, the one registry):

- the model's own **uncertainty**: the mean normalised entropy of the class probabilities over the voxels it
  labelled muscle. The probabilities are the average of the direct and the left-right mirrored pass (test-time
  augmentation), so the passes' disagreement raises it; a low-signal or unfamiliar scan raises it everywhere;
- **metric outliers** within the batch and site: each class's volume (log) and the InterMAT, against the
  participants of the same site in the batch (the whole batch when the site has fewer than
  :data:`MIN_GROUP` of them);
- **left/right asymmetry** of each muscle's volume;
- **fragmentation**: the share of each class's voxels outside its largest connected component;
- **labels off the body**: the share of muscle voxels whose water + fat signal is background-like (a label map
  shifted against its image);
- **contact with the field of view's edge** (in-plane): a muscle cut by the field of view.

Each feature's z is (value - median) / max(1.4826 MAD, floor) within its group; one-sided features count only
above the median. Framework-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import ndimage

from cbp_platform.classes import IDS, LR_PAIRS, NAMES
from cbp_platform.metrics.body_composition import muscle_metrics

MIN_GROUP = 8                    # a site group smaller than this is compared with the whole batch
Z_CAP = 50.0                     # one feature cannot dominate the sort beyond this
FLAG_Z = 3.5                     # a feature with a z above this is named in the participant's flags
OFF_SIGNAL_FRACTION = 0.08       # background-like: water + fat below this share of the body's 99th percentile


@dataclass(frozen=True)
class Feature:
    name: str
    label: str                   # the reviewer's words (flags, the app)
    sided: str                   # "high" / "low": only values above / below the median are risky; "both"
    floor: float                 # the smallest robust scale (a feature that is ~constant in good maps)
    by_site: bool                # compared within site (anatomy differs by scanner and population)


def _class_feature(cid: int) -> Feature:
    return Feature(f"log_ml_{NAMES[cid]}", f"{NAMES[cid]} volume", "both", 0.04, True)


FEATURES: tuple[Feature, ...] = (
    Feature("uncertainty", "model uncertainty", "high", 0.004, False),
    *(_class_feature(c) for c in IDS),
    Feature("imat_pct", "InterMAT", "both", 0.4, True),
    Feature("asymmetry", "left/right asymmetry", "high", 0.03, False),
    Feature("fragmentation", "fragmented labels", "high", 0.002, False),
    Feature("slice_gaps", "muscle missing in slices", "high", 0.01, False),
    Feature("border_contrast", "labels off the muscle borders", "low", 0.01, False),
    Feature("off_signal", "labels off the body", "high", 0.003, False),
    Feature("edge_fraction", "muscle at the field-of-view edge", "high", 0.0005, False),
)
FEATURE_NAMES = tuple(f.name for f in FEATURES)


def entropy_in_muscle(probs: np.ndarray, muscle: np.ndarray) -> float:
    """Mean entropy / log(C) of the class probabilities (C, ...) over the voxels of ``muscle`` (bool, ...)."""
    if not muscle.any():
        return 1.0
    p = np.clip(probs[:, muscle].astype(np.float64), 1e-8, 1.0)
    h = -(p * np.log(p)).sum(axis=0) / math.log(probs.shape[0])
    return float(h.mean())


def _rim(shape: tuple[int, ...]) -> np.ndarray:
    rim = np.zeros(shape[:2], bool)
    rim[0, :] = rim[-1, :] = rim[:, 0] = rim[:, -1] = True
    return rim


def _slice_gaps(labels: np.ndarray, counts: np.ndarray, si_axis: int) -> float:
    """The largest share, over classes, of the slices between a class's first and last whose area is under a
    quarter of its median area (a muscle lost over part of its length)."""
    worst = 0.0
    other = tuple(a for a in range(3) if a != si_axis)
    for c in IDS:
        if counts[c] == 0:
            continue
        area = (labels == c).sum(axis=other)
        ks = np.nonzero(area)[0]
        inside = area[ks.min():ks.max() + 1]
        if inside.size >= 4:
            worst = max(worst, float((inside < 0.25 * np.median(inside[inside > 0])).mean()))
    return worst


def _border_contrast(labels: np.ndarray, signal: np.ndarray, ref: float, si_axis: int) -> float:
    """Median in-plane gradient of the signal on the muscles' outer border, relative to the body signal: a map
    laid on its image follows the muscles' edges; a displaced one crosses flat tissue."""
    muscle = labels > 0
    box = ndimage.find_objects(muscle.astype(np.uint8))
    if not box:
        return 0.0
    sl = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in box[0])
    m = muscle[sl]
    img = signal[sl] / max(ref, 1e-6)
    inplane = tuple(a for a in range(3) if a != si_axis)
    grads = np.gradient(img, axis=inplane)
    mag = np.sqrt(grads[0] ** 2 + grads[1] ** 2)
    structure = np.zeros((3, 3, 3), bool)           # the in-plane 4-neighbourhood
    structure[1, 1, 1] = True
    for a in inplane:
        for d in (0, 2):
            idx = [1, 1, 1]
            idx[a] = d
            structure[tuple(idx)] = True
    border = m & ~ndimage.binary_erosion(m, structure=structure)
    return float(np.median(mag[border])) if border.any() else 0.0


def scan_features(labels: np.ndarray, water: np.ndarray, fat: np.ndarray, voxel_ml: float,
                  uncertainty: float | None = None, threshold: float = 0.5, si_axis: int = 2) -> dict:
    """The QC features of one label map on its scan, with the back-total lean volume, compartment volume and
    InterMAT of :func:`~cbp_platform.metrics.body_composition.muscle_metrics` (the numbers ``muscle_metrics``
    stores). ``si_axis``: the array axis running superior-inferior (the other two are in-plane)."""
    labels = np.asarray(labels)
    w = np.nan_to_num(np.asarray(water, np.float32))
    f = np.nan_to_num(np.asarray(fat, np.float32))
    muscle = labels > 0
    n = int(muscle.sum())
    metrics = {m["muscle"]: m for m in muscle_metrics(labels, w, f, voxel_ml, threshold)}
    total = metrics.get("back_total", {})
    counts = np.bincount(labels.ravel(), minlength=max(IDS) + 1)
    out = {"uncertainty": float("nan") if uncertainty is None else float(uncertainty),
           "lean_ml": float(total.get("lean_ml", 0.0)), "compartment_ml": float(total.get("compartment_ml", 0.0)),
           "imat_pct": float(total.get("imat_pct", float("nan")))}
    for c in IDS:
        out[f"log_ml_{NAMES[c]}"] = math.log(max(counts[c] * voxel_ml, 1e-3))
    out["asymmetry"] = max(abs(math.log(max(counts[a.id], 1) / max(counts[b.id], 1))) for a, b in LR_PAIRS)
    outside = 0
    for c in IDS:
        if counts[c] == 0:
            continue
        sl = ndimage.find_objects((labels == c).astype(np.uint8))[0]
        comp, k = ndimage.label(labels[sl] == c)
        if k > 1:
            sizes = np.bincount(comp.ravel())[1:]
            outside += int(sizes.sum() - sizes.max())
    out["fragmentation"] = outside / n if n else 1.0
    out["slice_gaps"] = _slice_gaps(labels, counts, si_axis)
    signal = w + f
    ref = float(np.percentile(signal[signal > 0], 99)) if (signal > 0).any() else 1.0
    out["border_contrast"] = _border_contrast(labels, signal, ref, si_axis)
    out["off_signal"] = float((signal[muscle] < OFF_SIGNAL_FRACTION * ref).mean()) if n else 1.0
    on_rim = int(np.moveaxis(muscle, si_axis, 2)[_rim(np.moveaxis(muscle, si_axis, 2).shape)].sum())
    out["edge_fraction"] = on_rim / n if n else 1.0
    out["muscle_voxels"] = n
    return out


def _robust_z(values: pl.Expr, floor: float) -> pl.Expr:
    med = values.median()
    mad = (values - med).abs().median() * 1.4826
    return (values - med) / pl.max_horizontal(mad.fill_null(0.0), pl.lit(floor))


def triage(features: pl.DataFrame, *, batch_col: str = "batch_key", site_col: str = "site") -> pl.DataFrame:
    """The features' z-scores (``z_<feature>``), ``triage_score`` (the largest z, capped at :data:`Z_CAP`),
    ``triage_rank`` within the batch (1 = highest risk; ties by pseudonym) and ``triage_flags`` (the features
    above :data:`FLAG_Z`, highest first). A missing site is its own group."""
    df = features
    if site_col not in df.columns:
        df = df.with_columns(pl.lit(None, pl.String).alias(site_col))
    df = df.with_columns(pl.col(site_col).cast(pl.String).fill_null("?").alias("_site"))
    df = df.with_columns(pl.len().over(batch_col, "_site").alias("_n_site"))
    zs = []
    for ft in FEATURES:
        x = pl.col(ft.name).cast(pl.Float64)
        z_batch = _robust_z(x, ft.floor).over(batch_col)
        z = z_batch
        if ft.by_site:
            z = pl.when(pl.col("_n_site") >= MIN_GROUP).then(_robust_z(x, ft.floor).over(batch_col, "_site")) \
                .otherwise(z_batch)
        z = {"high": z, "low": -z, "both": z.abs()}[ft.sided].clip(0.0, Z_CAP)
        zs.append(z.fill_nan(0.0).fill_null(0.0).alias(f"z_{ft.name}"))
    df = df.with_columns(zs)
    zcols = [f"z_{ft.name}" for ft in FEATURES]
    df = df.with_columns(pl.max_horizontal(zcols).alias("triage_score"))
    labels = {f"z_{ft.name}": ft.label for ft in FEATURES}
    flags = []
    for row in df.select(zcols).iter_rows(named=True):
        top = sorted(((z, c) for c, z in row.items() if z > FLAG_Z), reverse=True)
        flags.append("; ".join(f"{labels[c]} z {z:.1f}" for z, c in top))
    df = df.with_columns(pl.Series("triage_flags", flags, pl.String))
    # a deterministic rank: score descending, then pseudonym
    df = df.sort([batch_col, "triage_score", "pseudonym"], descending=[False, True, False]).with_columns(
        pl.int_range(1, pl.len() + 1).over(batch_col).cast(pl.Int64).alias("triage_rank"))
    return df.drop("_site", "_n_site")
