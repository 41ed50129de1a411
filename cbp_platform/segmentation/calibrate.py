"""Calibration of the compartment border on held-out simulated scans.

At 4 mm the fascial border is one voxel, and whether a border voxel is labelled muscle or background decides
InterMAT: a border voxel that is mostly fat outside the fascia counts as intermuscular fat when it is labelled
in. Which side the softmax puts such a voxel on differs from one trained model to the next (seed, CPU, thread
count), and a shift of the decision by 0.25 on the log-probability scale moves the mean InterMAT bias by about
4 %. So each trained model is calibrated once, like the operating point of any classifier: on ``n`` held-out
simulated scans (their own cohort seed, disjoint from training, validation and every delivery) the offset
``delta`` added to the background log-probability before the argmax is chosen so that the mean relative
InterMAT bias against the phantoms' truth is 0, on a 0.01 grid in [-2, 2].

The decision rule is exact on the label-map scale: a voxel is a compartment voxel iff
``max_c log p_c > log p_0 + delta`` (c the muscle classes), so for every scan the counts of compartment and fat
voxels as a function of ``delta`` follow from one forward pass (sorted margins), and the chosen offset is what
:class:`~cbp_platform.segmentation.infer.Segmenter` applies. The offset is stored in the weights file (buffer
``background_logit_offset``), so the weights' sha256, the model's identity in lineage, covers it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from cbp_platform.metrics.body_composition import signal_fat_fraction
from cbp_platform.segmentation.data import from_model_orientation

GRID = np.round(np.arange(-2.0, 2.0 + 1e-9, 0.01), 2)


@dataclass(frozen=True)
class Calibration:
    offset: float               # added to the background log-probability before the argmax
    n: int                      # calibration scans
    seed: int                   # their cohort seed
    imat_bias_before: float     # mean relative InterMAT bias (%) at offset 0
    imat_bias_after: float      # ... at the chosen offset
    lean_bias_before: float     # mean relative lean-volume bias (%) at offset 0
    lean_bias_after: float
    within_range: bool          # False: the bias has no zero in [-2, 2] and the offset is the nearest end

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def border_counts(probs: np.ndarray, fat_fraction: np.ndarray, threshold: float = 0.5,
                  grid: np.ndarray = GRID) -> tuple[np.ndarray, np.ndarray]:
    """Compartment and fat voxel counts of one scan for every offset of ``grid``.

    ``probs``: (C, X, Y, Z) class probabilities, class 0 background; ``fat_fraction``: (X, Y, Z) on the same grid.
    """
    logp = np.log(np.clip(probs.astype(np.float64), 1e-12, None))
    margin = (logp[0] - logp[1:].max(axis=0)).ravel()       # compartment iff margin < -offset
    fat = fat_fraction.ravel() >= threshold
    s_all, s_fat = np.sort(margin), np.sort(margin[fat])
    return (np.searchsorted(s_all, -grid, side="left").astype(np.int64),
            np.searchsorted(s_fat, -grid, side="left").astype(np.int64))


def choose_offset(comp: np.ndarray, fat: np.ndarray, imat_true: np.ndarray, lean_true_voxels: np.ndarray,
                  grid: np.ndarray = GRID) -> tuple[float, dict]:
    """The offset zeroing the mean relative InterMAT bias; ``comp``/``fat``: (scans, len(grid)) counts."""
    with np.errstate(divide="ignore", invalid="ignore"):
        imat = 100.0 * fat / comp
        bias = np.nanmean(100.0 * (imat - imat_true[:, None]) / imat_true[:, None], axis=0)
        lean = np.nanmean(100.0 * ((comp - fat) - lean_true_voxels[:, None]) / lean_true_voxels[:, None], axis=0)
    i0 = int(np.argmin(np.abs(grid)))
    sign = np.sign(bias)
    cross = np.flatnonzero(sign[:-1] * sign[1:] <= 0)
    if cross.size:
        # the crossing nearest to offset 0, then the better of its two grid points
        j = int(cross[np.argmin(np.abs(cross - i0))])
        k = j if abs(bias[j]) <= abs(bias[j + 1]) else j + 1
        within = True
    else:
        k = int(np.argmin(np.abs(bias)))
        within = False
    return float(grid[k]), {"imat_bias_before": float(bias[i0]), "imat_bias_after": float(bias[k]),
                            "lean_bias_before": float(lean[i0]), "lean_bias_after": float(lean[k]),
                            "within_range": within}


def calibrate(segmenter, items: list[dict], seed: int, voxel_ml: float, progress=None) -> Calibration:
    """Choose the background offset of ``segmenter``'s model on labelled simulated ``items`` (see the module).

    ``items``: dicts with ``water``, ``fat``, ``affine`` and ``truth`` (``imat_pct``, ``lean_ml``), as
    :func:`~cbp_platform.segmentation.train.simulated_set` makes them. The segmenter's current offset is ignored.
    """
    comp, fat, imat_true, lean_true = [], [], [], []
    for k, it in enumerate(items, start=1):
        prepared = segmenter.prepare(it["water"], it["fat"], it["affine"])
        probs = from_model_orientation(segmenter.probabilities(prepared), np.asarray(prepared["back"]))
        c, f = border_counts(probs, signal_fat_fraction(it["water"], it["fat"]))
        comp.append(c)
        fat.append(f)
        imat_true.append(it["truth"]["imat_pct"])
        lean_true.append(it["truth"]["lean_ml"] / voxel_ml)
        if progress is not None:
            progress(k)
    offset, figures = choose_offset(np.array(comp, float), np.array(fat, float), np.array(imat_true),
                                    np.array(lean_true))
    return Calibration(offset=offset, n=len(items), seed=seed, **figures)


def calibrate_network(network, *, n: int, seed: int, device: str = "auto", sw_batch_size: int = 2,
                      progress=None) -> Calibration:
    """Calibrate a trained network in place (its ``background_logit_offset``) on ``n`` simulated scans of
    cohort seed ``seed``; returns the figures for the bundle's metadata."""
    from cbp_platform.segmentation.bundle import Bundle, set_background_offset
    from cbp_platform.segmentation.infer import Segmenter
    from cbp_platform.segmentation.train import simulated_set
    from cbp_platform.synth.phantom import PRESETS

    items = simulated_set(n, seed)
    seg = Segmenter(Bundle.in_memory(network), device=device, sw_batch_size=sw_batch_size)
    cal = calibrate(seg, items, seed, PRESETS["fast"].voxel_ml, progress=progress)
    set_background_offset(network, cal.offset)
    network.cpu().eval()
    return cal
