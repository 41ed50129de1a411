"""Image quality control without a segmentation: fat-water swap detection on Dixon images.

Anatomy gives a prior that holds in every body: just under the skin lies subcutaneous fat (fat-dominant),
while the trunk's interior (muscle, organs, bowel, spine) is mostly water-dominant. In each axial slice the body
is found as the bright region of W + F; its outer band (the first ~12 mm inside the boundary) and its core
(deeper than ~30 mm) are compared by their median signal fat fraction F / (W + F). A normal slice has
``outer - core > 0``; a swapped slice the reverse. A scan is flagged when enough slices are reversed, which
catches whole-volume swaps and swaps limited to one station of a multi-station acquisition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class SwapResult:
    score: float                 # median over body slices of (outer FF - core FF); > 0 normal, < 0 swapped
    reversed_fraction: float     # share of body slices whose outer band is less fatty than the core
    n_slices: int                # body slices evaluated
    suspected: bool


# the robust statistics (99th percentile) of a volume use at most this many voxels: every voxel of a NAKO-size
# volume (6 M), an evenly strided subset of a larger one, so memory stays bounded whatever the scan's size
MAX_STAT_VOXELS = 8_000_000


def subsample(arr: np.ndarray, max_voxels: int = MAX_STAT_VOXELS) -> np.ndarray:
    """``arr`` itself when small enough, else an evenly strided view of at most ``max_voxels`` voxels."""
    if arr.size <= max_voxels:
        return arr
    k = int(np.ceil((arr.size / max_voxels) ** (1 / arr.ndim)))
    return arr[(slice(None, None, k),) * arr.ndim]


def _signal(water: np.ndarray, fat: np.ndarray) -> np.ndarray:
    return np.nan_to_num(np.asarray(water, np.float32)) + np.nan_to_num(np.asarray(fat, np.float32))


def fat_water_swap(water: np.ndarray, fat: np.ndarray, spacing: tuple[float, float, float], *,
                   outer_mm: float = 12.0, core_mm: float = 30.0, min_reversed: float = 0.2,
                   max_slices: int = 32) -> SwapResult:
    """Detect a (full or partial) fat-water swap. ``water``/``fat``: 3D arrays indexed [x, y, z] (axial z)."""
    water, fat = np.asarray(water), np.asarray(fat)
    if not water.size:
        return SwapResult(float("nan"), float("nan"), 0, False)
    ref = float(np.percentile(_signal(subsample(water), subsample(fat)), 99))
    if ref <= 0:
        return SwapResult(float("nan"), float("nan"), 0, False)
    diffs = []
    px = (spacing[0] + spacing[1]) / 2.0
    step = max(1, int(np.ceil(water.shape[2] / max_slices)))   # evenly spaced slices bound the cost
    for k in range(0, water.shape[2], step):
        f = np.nan_to_num(np.asarray(fat[:, :, k], np.float32))
        s = _signal(water[:, :, k], fat[:, :, k])              # one slice at a time: memory stays small
        m = s > 0.25 * ref
        if m.sum() < 50:
            continue
        m = ndimage.binary_opening(m, iterations=1)
        m = ndimage.binary_fill_holes(m)
        lab, n = ndimage.label(m)
        if n == 0:
            continue
        sizes = ndimage.sum_labels(m, lab, index=np.arange(1, n + 1))
        m = lab == (1 + int(np.argmax(sizes)))
        d = ndimage.distance_transform_edt(m) * px
        outer = m & (d <= outer_mm)
        core = m & (d > core_mm)
        if outer.sum() < 20 or core.sum() < 20:
            continue
        sl = f / np.maximum(s, 1e-6)
        diffs.append(float(np.median(sl[outer]) - np.median(sl[core])))
    if not diffs:
        return SwapResult(float("nan"), float("nan"), 0, False)
    arr = np.array(diffs)
    rev = float((arr < 0).mean())
    return SwapResult(float(np.median(arr)), rev, len(arr), bool(rev >= min_reversed))
