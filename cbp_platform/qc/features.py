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
    Feature("slice_gaps", "one side missing in slices", "high", 0.01, False),
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


def _slice_gaps(labels: np.ndarray, si_axis: int) -> float:
    """The largest share, over the left/right pairs, of the slices through a muscle in which one side has under a
    quarter of the other side's area (a muscle lost over part of its length; tapering ends, symmetric, do not
    count: only slices where the larger side has at least 30 % of its median area are compared)."""
    worst = 0.0
    other = tuple(a for a in range(3) if a != si_axis)
    for left, right in LR_PAIRS:
        a = (labels == left.id).sum(axis=other).astype(float)
        b = (labels == right.id).sum(axis=other).astype(float)
        big = np.maximum(a, b)
        if not (big > 0).any():
            continue
        keep = big >= 0.3 * np.median(big[big > 0])
        if keep.sum() >= 4:
            worst = max(worst, float((np.minimum(a, b)[keep] < 0.25 * big[keep]).mean()))
    return worst


def _border_contrast(labels: np.ndarray, water: np.ndarray, ref: float, si_axis: int) -> float:
    """Median in-plane gradient of the water image on the muscles' outer border, relative to the body signal
    ``ref``: a map laid on its image follows the edge between bright muscle and dark fat; a displaced one
    crosses flat tissue (water + fat would not do: muscle and fat have about the same total signal)."""
    muscle = labels > 0
    box = ndimage.find_objects(muscle.astype(np.uint8))
    if not box:
        return 0.0
    sl = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in box[0])
    m = muscle[sl]
    img = water[sl] / max(ref, 1e-6)
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


def body_reference(water: np.ndarray, fat: np.ndarray) -> float:
    """The body's bright signal: the 99th percentile of water + fat over the voxels with signal, on a regular
    subsample (every 4th in-plane, every 2nd slice: a NAKO volume in a few ms)."""
    sub = np.nan_to_num(np.asarray(water[::4, ::4, ::2], np.float32)) + \
        np.nan_to_num(np.asarray(fat[::4, ::4, ::2], np.float32))
    sub = sub[sub > 0]
    return float(np.percentile(sub, 99)) if sub.size else 1.0


def scan_features(labels: np.ndarray, water: np.ndarray, fat: np.ndarray, voxel_ml: float,
                  uncertainty: float | None = None, threshold: float = 0.5, si_axis: int = 2) -> dict:
    """The QC features of one label map on its scan, with the back-total lean volume, compartment volume and
    InterMAT of :func:`~cbp_platform.metrics.body_composition.muscle_metrics` (the numbers ``muscle_metrics``
    stores: they depend on labelled voxels only, so they are computed on the muscles' bounding box). ``si_axis``:
    the array axis running superior-inferior (the other two are in-plane)."""
    labels = np.asarray(labels)
    muscle_full = labels > 0
    n = int(muscle_full.sum())
    moved = np.moveaxis(muscle_full, si_axis, 2)
    on_rim = int(moved[_rim(moved.shape)].sum())
    ref = body_reference(water, fat)
    out = {"uncertainty": float("nan") if uncertainty is None else float(uncertainty)}
    box = ndimage.find_objects(muscle_full.astype(np.uint8))
    if not box:
        return {**out, "lean_ml": 0.0, "compartment_ml": 0.0, "imat_pct": float("nan"),
                **{f"log_ml_{NAMES[c]}": math.log(1e-3) for c in IDS}, "asymmetry": 0.0, "fragmentation": 1.0,
                "slice_gaps": 1.0, "border_contrast": 0.0, "off_signal": 1.0, "edge_fraction": 1.0,
                "muscle_voxels": 0}
    sl = tuple(slice(max(b.start - 2, 0), b.stop + 2) for b in box[0])
    lab = labels[sl]
    w = np.nan_to_num(np.asarray(water[sl], np.float32))
    f = np.nan_to_num(np.asarray(fat[sl], np.float32))
    muscle = lab > 0
    total = {m["muscle"]: m for m in muscle_metrics(lab, w, f, voxel_ml, threshold)}.get("back_total", {})
    counts = np.bincount(lab.ravel(), minlength=max(IDS) + 1)
    out.update(lean_ml=float(total.get("lean_ml", 0.0)), compartment_ml=float(total.get("compartment_ml", 0.0)),
               imat_pct=float(total.get("imat_pct", float("nan"))))
    for c in IDS:
        out[f"log_ml_{NAMES[c]}"] = math.log(max(counts[c] * voxel_ml, 1e-3))
    out["asymmetry"] = max(abs(math.log(max(counts[a.id], 1) / max(counts[b.id], 1))) for a, b in LR_PAIRS)
    outside = 0
    for c in IDS:
        if counts[c] == 0:
            continue
        csl = ndimage.find_objects((lab == c).astype(np.uint8))[0]
        comp, k = ndimage.label(lab[csl] == c)
        if k > 1:
            sizes = np.bincount(comp.ravel())[1:]
            outside += int(sizes.sum() - sizes.max())
    out["fragmentation"] = outside / n
    out["slice_gaps"] = _slice_gaps(lab, si_axis)
    out["border_contrast"] = _border_contrast(lab, w, ref, si_axis)
    out["off_signal"] = float(((w + f)[muscle] < OFF_SIGNAL_FRACTION * ref).mean())
    out["edge_fraction"] = on_rim / n
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
