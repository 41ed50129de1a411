"""How well the triage score finds wrong segmentations: failures injected into simulated scans, then recall against
the share of the cohort reviewed.

Each failure is made from another participant's scan, of one of :data:`FAILURE_KINDS`, its severity drawn
uniformly from a range that reaches down to the barely visible:

- ``degraded_labels``: the model's map with one muscle erased over a contiguous 15-40 % of its length (a model
  failure on part of the anatomy);
- ``shifted_labels``: the model's map displaced by 2-8 voxels in-plane against its image (a geometry error: a
  wrong affine, a resampling bug);
- ``truncated_fov``: the scan cut in-plane (anterior-posterior) between the back muscles' posterior edge and
  their middle, before segmentation (a field of view too small);
- ``low_signal``: the scan's signal reduced to 12-40 % with noise added (4-8 % of the body's signal) before
  segmentation (a coil failure).

The clean and the failed participants are triaged together as one batch, the way ``muscle_segmentations`` does.
Recall at a review fraction ``f`` is what a reviewer finds reading the top ``f`` of a cohort in which a share ``p``
(:data:`PREVALENCE`, 1 %) of the maps failed: the share of failures at or above the lowest score threshold ``t``
for which (1 - p) P(clean >= t) + p P(failed >= t) <= f, i.e. the failures found count against the reviewed
share too.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import polars as pl

from cbp_platform.classes import IDS
from cbp_platform.qc.features import scan_features, triage
from cbp_platform.qc.pipeline import si_axis

FAILURE_KINDS = ("degraded_labels", "shifted_labels", "truncated_fov", "low_signal")
REVIEW_FRACTIONS = (0.01, 0.02, 0.05, 0.10)


def _ap_axis(affine: np.ndarray) -> int:
    return [c in "AP" for c in nib.orientations.aff2axcodes(affine)].index(True)


def _posterior_end(affine: np.ndarray, axis: int) -> str:
    """'high' if voxel index increases towards posterior along ``axis``, else 'low'."""
    return "high" if nib.orientations.aff2axcodes(affine)[axis] == "P" else "low"


def truncate_fov(water: np.ndarray, fat: np.ndarray, truth: np.ndarray, affine: np.ndarray):
    """The scan cut along the anterior-posterior axis through the middle of the back muscles (class 1, the
    first of the registry, is posterior to the spine); returns water, fat, affine."""
    return truncate_at(water, fat, truth, affine, 0.5)


def truncate_at(water: np.ndarray, fat: np.ndarray, truth: np.ndarray, affine: np.ndarray, depth: float):
    """The scan cut along the anterior-posterior axis ``depth`` (0-1) of the way from the back muscles' posterior
    edge to their anterior edge (at least one voxel into them)."""
    ax = _ap_axis(affine)
    idx = np.nonzero(np.moveaxis(truth == IDS[0], ax, 0).any(axis=(1, 2)))[0]
    if not idx.size:
        raise ValueError("no back muscle in the truth labels to cut through")
    post_high = _posterior_end(affine, ax) == "high"
    edge, far = (int(idx.max()), int(idx.min())) if post_high else (int(idx.min()), int(idx.max()))
    mid = int(round(edge + depth * (far - edge)))
    mid = min(mid, edge - 1) if post_high else max(mid, edge + 1)
    sl = [slice(None)] * 3
    aff = affine.copy()
    if post_high:
        sl[ax] = slice(0, mid + 1)
    else:
        sl[ax] = slice(mid, None)
        offset = np.zeros(3)
        offset[ax] = mid
        aff[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
    return water[tuple(sl)].copy(), fat[tuple(sl)].copy(), aff


def low_signal(water: np.ndarray, fat: np.ndarray, rng: np.random.Generator, factor: float = 0.12,
               noise_share: float = 0.06):
    ref = float(np.percentile(water + fat, 99))
    noise = noise_share * ref
    return (water * factor + rng.normal(0, noise, water.shape).astype(np.float32),
            fat * factor + rng.normal(0, noise, fat.shape).astype(np.float32))


def degrade(labels: np.ndarray, rng: np.random.Generator, share: float = 0.4, si: int = 2) -> np.ndarray:
    """One class erased over a contiguous ``share`` of its extent along the superior-inferior axis ``si``."""
    out = np.moveaxis(labels.copy(), si, 2)
    c = int(rng.choice(IDS))
    ks = np.nonzero((out == c).any(axis=(0, 1)))[0]
    if ks.size:
        n = max(1, int(share * ks.size))
        k0 = int(ks.min() + rng.integers(0, max(1, ks.size - n)))
        block = out[:, :, k0:k0 + n]
        block[block == c] = 0
    return np.moveaxis(out, 2, si)


def shift(labels: np.ndarray, rng: np.random.Generator, voxels: int = 6, si: int = 2) -> np.ndarray:
    """The map displaced by ``voxels`` along one in-plane axis (not ``si``), the vacated border emptied."""
    axis = int(rng.choice([a for a in range(3) if a != si]))
    d = voxels * (1 if rng.random() < 0.5 else -1)
    out = np.roll(labels, d, axis=axis)
    sl = [slice(None)] * 3
    sl[axis] = slice(0, d) if d > 0 else slice(d, None)
    out[tuple(sl)] = 0
    return out


def evaluate_triage(runner, scans: list[dict], failures_per_kind: int, seed: int = 0, progress=None) -> dict:
    """Segment ``scans`` (dicts with water, fat, labels (truth), affine) with ``runner``; the last
    ``failures_per_kind * 4`` of them become failures (one kind after another), the rest stay clean. Returns the
    per-participant frame (features, score, ``failed``, ``kind``) and recall per review fraction and per kind."""
    rng = np.random.default_rng(seed)
    n_fail = failures_per_kind * len(FAILURE_KINDS)
    if n_fail >= len(scans):
        raise ValueError(f"{len(scans)} scans cannot hold {n_fail} failures and clean participants")
    rows = []
    for i, s in enumerate(scans):
        j = i - (len(scans) - n_fail)
        kind = FAILURE_KINDS[j // failures_per_kind] if j >= 0 else ""
        w, f, aff = s["water"], s["fat"], s["affine"]
        severity = ""
        if kind == "truncated_fov":
            depth = float(rng.uniform(0.0, 0.5))
            w, f, aff = truncate_at(w, f, s["labels"], aff, depth)
            severity = f"cut {depth:.0%} into the back muscles"
        elif kind == "low_signal":
            factor, noise = float(rng.uniform(0.12, 0.4)), float(rng.uniform(0.04, 0.08))
            w, f = low_signal(w, f, rng, factor, noise)
            severity = f"signal x {factor:.2f}, noise {noise:.0%}"
        labels, unc = runner.predict_qc(runner.prepare(w, f, aff))
        if kind == "degraded_labels":
            share = float(rng.uniform(0.15, 0.4))
            labels = degrade(labels, rng, share, si_axis(aff))
            severity = f"{share:.0%} of a muscle's length erased"
        elif kind == "shifted_labels":
            voxels = int(rng.integers(2, 9))
            labels = shift(labels, rng, voxels, si_axis(aff))
            severity = f"shifted {voxels} voxels"
        voxel_ml = float(np.prod(nib.affines.voxel_sizes(aff))) / 1000.0
        rows.append({"pseudonym": f"P{i:05d}", "batch_key": "eval", "site": None, "kind": kind, "severity": severity,
                     "failed": bool(kind), **scan_features(labels, w, f, voxel_ml, unc, si_axis=si_axis(aff))})
        if progress is not None:
            progress(i + 1, len(scans))
    df = triage(pl.DataFrame(rows))
    return {"frame": df, "recall": recall_table(df), "by_kind": recall_by_kind(df)}


PREVALENCE = 0.01                # the share of failed maps the review fractions are computed for


def _operating_point(df: pl.DataFrame, fraction: float, prevalence: float) -> tuple[float, float]:
    """(score threshold, recall) of reviewing the top ``fraction`` of a cohort whose share of failures is
    ``prevalence``: the lowest threshold t at which (1 - p) P(clean >= t) + p P(failed >= t) <= fraction."""
    clean = df.filter(~pl.col("failed"))["triage_score"].to_numpy()
    fail = df.filter(pl.col("failed"))["triage_score"].to_numpy()
    thr, recall = math.inf, 0.0
    for t in np.unique(np.concatenate([clean, fail]))[::-1]:
        share = (1 - prevalence) * float((clean >= t).mean()) + prevalence * float((fail >= t).mean())
        if share > fraction:
            break
        thr, recall = float(t), float((fail >= t).mean()) if fail.size else float("nan")
    return thr, recall


def recall_table(df: pl.DataFrame, fractions=REVIEW_FRACTIONS, prevalence: float = PREVALENCE) -> list[dict]:
    """Recall when reviewing the top ``fraction`` of a cohort in which ``prevalence`` of the maps failed (the
    clean and failed participants here are weighted to that prevalence)."""
    n_fail = int(df["failed"].sum())
    out = []
    for fr in fractions:
        thr, recall = _operating_point(df, fr, prevalence)
        out.append({"review_fraction": fr, "prevalence": prevalence, "score_threshold": thr, "failures": n_fail,
                    "found": int(round(recall * n_fail)), "recall": recall})
    return out


def recall_by_kind(df: pl.DataFrame, fraction: float = 0.02, prevalence: float = PREVALENCE) -> dict[str, float]:
    thr, _ = _operating_point(df, fraction, prevalence)
    out = {}
    for kind in FAILURE_KINDS:
        sub = df.filter(pl.col("kind") == kind)
        if sub.height:
            out[kind] = float((sub["triage_score"] >= thr).mean())
    return out
