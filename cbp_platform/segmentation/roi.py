"""Region-of-interest inference: a public model runs only where the back muscles are.

The public whole-body models segment 40-100 structures from neck to thighs; the study needs four muscles from T10
to S1. The platform's own model (the trained ``monai-bundle``, about a second per scan) first locates them: the
bounding box of the largest connected component of each muscle class in its label map, grown by a small margin
(``margin_mm``, 20 mm) into the region. Along the body axis the muscles count only between the vertebral levels
S1 and T10 that :mod:`cbp_platform.segmentation.levels` finds (when it was trained: ``cbp model train-levels``):
the autochthon runs on up to the neck and looks the same at T8 as at T11. The public model then runs only the
tiles of its whole-volume sliding window (nnU-Net's own tile grid over the whole scan, normalised and resampled as
a whole) that reach the region, and its label map of the region is placed back on the scan's full grid (background
outside)
(:meth:`cbp_platform.segmentation.backends.nnunet.NnunetRunner.predict`). Inside the region every voxel gets
the same tiles, in the same order, as in the whole-volume run, so its label is the whole-volume run's: the context
is not approximated by a margin, it is the whole-volume run's own. The tiles reach beyond the region by at least
the patch minus the tile step along every axis (half a patch at nnU-Net's step 0.5) where the scan allows
(``RoiStats.context_mm``: the smallest such reach).

A safety net: when a muscle of the public model's map touches a face of the box that is not the image's own border
(the locator missed part of a muscle), the scan is segmented again on the whole volume, and the batch counts it.
The faces across the body axis (superior and inferior) do not count: the back muscles run on above T10 and below S1
(the autochthon up the thorax, the iliopsoas to the femur), so a label crossing them is anatomy, not a miss.

The whole-volume path stays available per model: a manifest whose ``options.roi`` is false (``cbp model register
--no-roi``) is run on the whole volume, as are the models that are their own locator (the platform's bundle).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from scipy import ndimage

from cbp_platform.classes import IDS, NAMES

# how far beyond the level regressor's T10 and S1 (and half a vertebra) the region reaches, for its error: on 8
# held-out simulated whole-body scans the largest was 44 mm, the median 24 mm (docs/segmentation-models.md); with
# the region's 20 mm margin, T10-S1 stays inside for errors up to 60 mm
LEVEL_ALLOWANCE_MM = 40.0
MARGIN_MM = 20.0              # the located box grows by this much into the region


@dataclass(frozen=True)
class Region:
    """A box of a scan's voxel grid: ``box`` the slices the public model runs on (margin included),
    ``located`` the located muscles' box, ``shape`` the scan's shape."""

    box: tuple[slice, slice, slice]
    located: tuple[slice, slice, slice]
    shape: tuple[int, int, int]

    @property
    def voxel_share(self) -> float:
        """The box's share of the scan's voxels."""
        return float(np.prod([s.stop - s.start for s in self.box]) / np.prod(self.shape))

    def to_dict(self) -> dict:
        return {"box": [[s.start, s.stop] for s in self.box], "located": [[s.start, s.stop] for s in self.located],
                "shape": list(self.shape), "voxel_share": round(self.voxel_share, 4)}


def _largest(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of ``mask``."""
    comp, n = ndimage.label(mask)
    if n <= 1:
        return mask
    return comp == 1 + int(np.argmax(np.bincount(comp.ravel())[1:]))


def located_box(labels: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The bounding box of the largest connected component of each muscle class (stray islands ignored), or None
    when the map holds no muscle."""
    lo = np.full(3, np.iinfo(np.int64).max)
    hi = np.full(3, -1)
    for c in IDS:
        mask = labels == c
        if not mask.any():
            continue
        mask = _largest(mask)
        idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        lo = np.minimum(lo, [i[0] for i in idx])
        hi = np.maximum(hi, [i[-1] + 1 for i in idx])
    if hi[0] < 0:
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def margin_voxels(affine: np.ndarray, margin_mm: float) -> tuple[int, int, int]:
    """``margin_mm`` in voxels along each of the scan's axes (rounded up)."""
    return tuple(int(math.ceil(margin_mm / float(z) - 1e-9)) for z in nib.affines.voxel_sizes(np.asarray(affine)))


def region_for(labels: np.ndarray, margin: tuple[int, int, int]) -> Region | None:
    """The region of a locator's label map: the located box grown by ``margin`` voxels per axis, clipped to the
    scan."""
    found = located_box(labels)
    if found is None:
        return None
    box = tuple(slice(max(s.start - m, 0), min(s.stop + m, n)) for s, m, n in zip(found, margin, labels.shape))
    return Region(box=box, located=found, shape=tuple(int(n) for n in labels.shape))


def body_axis(affine: np.ndarray) -> int:
    """The scan's voxel axis closest to the superior-inferior direction."""
    return int(nib.orientations.io_orientation(affine)[:, 0].tolist().index(2))


def cut_muscles(labels: np.ndarray, region: Region, affine: np.ndarray) -> list[str]:
    """The muscle classes whose largest connected component in ``labels`` (the full grid, the region's map placed
    in it) reaches a face of the region's box that lies inside the scan, across the axes other than the body axis.
    Stray islands of a class are not the muscle (as for :func:`located_box`)."""
    si = body_axis(affine)
    inner = [(ax, k) for ax in range(3) if ax != si
             for k, inside in ((0, region.box[ax].start > 0), (-1, region.box[ax].stop < region.shape[ax])) if inside]
    if not inner:
        return []
    sub = labels[region.box]
    cut = []
    for c in IDS:
        mask = sub == c
        if not mask.any():
            continue
        main = _largest(mask)
        if any(np.take(main, k, axis=ax).any() for ax, k in inner):
            cut.append(NAMES[c])
    return cut


@dataclass
class RoiStats:
    """What a batch's region-of-interest inference did, for its metadata."""

    scans: int = 0
    regions: int = 0              # scans run on their region only
    reruns: int = 0               # scans run again on the whole volume: a muscle touched the region's border
    cut: int = 0                  # scans where a muscle touched it (re-run unless the segmenter's rerun is off)
    not_located: int = 0          # scans where the locator found no muscle: run on the whole volume
    voxel_shares: list = field(default_factory=list)
    tiles: list = field(default_factory=list)          # (tiles run, tiles of the whole-volume grid) per region
    context_mm: list = field(default_factory=list)     # the tiles' smallest reach beyond the region, per region
    locate_seconds: float = 0.0
    levels_found: int = 0         # scans whose region along the body axis came from the vertebral levels
    levels_not_found: int = 0     # scans where the level regressor found none: the muscles' extent only

    def to_dict(self) -> dict:
        share = self.voxel_shares
        return {"scans": self.scans, "regions": self.regions, "reruns_whole_volume": self.reruns, "cut": self.cut,
                "not_located": self.not_located,
                "median_voxel_share": round(float(np.median(share)), 4) if share else None,
                "tiles_run": int(sum(t[0] for t in self.tiles)),
                "tiles_whole_volume": int(sum(t[1] for t in self.tiles)),
                "min_context_mm": round(float(min(self.context_mm)), 1) if self.context_mm else None,
                "locate_seconds": round(self.locate_seconds, 2), "levels_found": self.levels_found,
                "levels_not_found": self.levels_not_found}


class RoiSegmenter:
    """A runner that locates the region with ``locator`` (a runner of the platform's model) and runs ``runner``
    (an nnU-Net runner) there; the same interface as a runner (``prepare`` in DataLoader workers, then
    ``predict``/``predict_qc``), so :func:`cbp_platform.segmentation.pipeline.segment_scans` takes either."""

    def __init__(self, runner, locator, *, levels=None, margin_mm: float = MARGIN_MM,
                 level_allowance_mm: float = LEVEL_ALLOWANCE_MM, rerun: bool = True):
        """``levels``: the vertebral-level regressor (:class:`cbp_platform.segmentation.levels.LevelModel`); with
        it the region along the body axis runs from S1 to T10 (each end grown by half a vertebra and
        ``level_allowance_mm``), without it wherever the platform's model finds the muscles.
        ``rerun``: segment a scan whose region cut a muscle again on the whole volume (off only to measure the
        region's own cost, as the benchmark does with random weights, whose label noise touches every face)."""
        self.rerun = rerun
        self.runner = runner
        self.locator = locator
        self.levels = levels
        self.level_allowance_mm = level_allowance_mm
        self.manifest = runner.manifest
        self.device = runner.device
        self.margin_mm = margin_mm
        self.stats = RoiStats()

    def prepare(self, water: np.ndarray, fat: np.ndarray, affine: np.ndarray) -> dict:
        """The locator's run and the public model's preprocessing (CPU work in the DataLoader worker)."""
        t = time.perf_counter()
        located = self.locator.segment(water, fat, affine)
        levels = None
        if self.levels is not None:
            found = self.levels.locate(water, fat, affine)
            ax = body_axis(affine)
            half = abs(found.top_mm - found.bottom_mm) / 16 if found.top_mm is not None else 0.0
            keep = found.slice_range(affine, located.shape[ax], ax, half + self.level_allowance_mm)
            levels = {"found": keep is not None, **found.to_dict()}
            if keep is not None:               # the muscles between the levels only
                outside = np.ones(located.shape[ax], bool)
                outside[keep] = False
                located = np.array(located)
                located[(slice(None),) * ax + (outside,)] = 0
        region = region_for(located, margin_voxels(affine, self.margin_mm))
        seconds = time.perf_counter() - t
        del located
        prepared = self.runner.prepare(water, fat, affine)
        prepared.update(region=region, scan_affine=np.asarray(affine), locate_seconds=seconds, levels=levels)
        return prepared

    def predict(self, prepared: dict) -> np.ndarray:
        return self._run(prepared, qc=False)[0]

    def predict_qc(self, prepared: dict) -> tuple[np.ndarray, float]:
        return self._run(prepared, qc=True)

    def _run(self, prepared: dict, qc: bool):
        run = self.runner.predict_qc if qc else (lambda p, region=None: (self.runner.predict(p, region=region), None))
        region = prepared.get("region")
        self.stats.scans += 1
        self.stats.locate_seconds += float(prepared.get("locate_seconds", 0.0))
        levels = prepared.get("levels")
        if levels is not None:
            self.stats.levels_found += int(bool(levels["found"]))
            self.stats.levels_not_found += int(not levels["found"])
        if region is None:
            self.stats.not_located += 1
            return run(prepared)
        out = run(prepared, region=region)
        tiles = tuple(getattr(self.runner, "last_tiles", (0, 0)))
        context = getattr(self.runner, "last_context_mm", None)
        if cut_muscles(out[0], region, prepared["scan_affine"]):
            self.stats.cut += 1
            if self.rerun:
                self.stats.reruns += 1
                return run(prepared)
        self.stats.regions += 1
        self.stats.voxel_shares.append(region.voxel_share)
        self.stats.tiles.append(tiles)
        if context is not None:
            self.stats.context_mm.append(context)
        return out

    def segment(self, water: np.ndarray, fat: np.ndarray, affine: np.ndarray) -> np.ndarray:
        return self.predict(self.prepare(water, fat, affine))


def load_segmenter(manifest, models_dir, *, device: str = "auto", sw_batch_size: int = 2):
    """The runner a batch segments with: ``manifest``'s runner, wrapped in :class:`RoiSegmenter` with the platform's
    own model as locator when the manifest asks for region-of-interest inference (``options.roi``)."""
    from cbp_platform.segmentation.backends import load_runner
    from cbp_platform.segmentation.registry import platform_levels, platform_model

    runner = load_runner(manifest, device=device, sw_batch_size=sw_batch_size)
    if not manifest.options.get("roi"):
        return runner
    locator = load_runner(platform_model(models_dir), device=device, sw_batch_size=sw_batch_size)
    return RoiSegmenter(runner, locator, levels=platform_levels(models_dir))
