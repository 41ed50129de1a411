"""Per-muscle body-composition metrics from a label map and the Dixon water/fat images.

For each compartment (the classes of :mod:`cbp_platform.classes`) and for their total ("back_total"):
* ``compartment_ml``: labelled volume (cm3), fat inside the fascia included;
* ``fat_ml``: voxels whose signal fat fraction F / (W + F) is >= ``threshold`` (default 0.5);
* ``lean_ml`` = compartment - fat; ``imat_pct`` = 100 fat / compartment (InterMAT);
* ``mfi``: mean fat fraction of the lean voxels (muscle fat infiltration, as UK Biobank's AMRA defines it).
NaN or infinite voxels are treated as zero signal, so NaNs never reach the metrics.
"""

import numpy as np
import polars as pl

from cbp_platform.classes import BACK_TOTAL, IDS, NAMES

MUSCLES = NAMES
METRIC_SCHEMA = {"muscle": pl.String, "voxels": pl.Int64, "compartment_ml": pl.Float64, "fat_ml": pl.Float64,
                 "lean_ml": pl.Float64, "imat_pct": pl.Float64, "mfi": pl.Float64}


def muscle_metrics(labels: np.ndarray, water: np.ndarray, fat: np.ndarray, voxel_ml: float,
                   threshold: float = 0.5) -> list[dict]:
    if labels.shape != water.shape or water.shape != fat.shape:
        raise ValueError(f"label map {labels.shape} and images {water.shape}/{fat.shape} differ in shape")
    ff = signal_fat_fraction(water, fat)
    rows = []
    tot = dict(voxels=0, fat=0, ff_lean_sum=0.0)
    for lab, name in MUSCLES.items():
        m = labels == lab
        n = int(m.sum())
        ffm = ff[m]
        is_fat = ffm >= threshold
        nf = int(is_fat.sum())
        lean_ff = ffm[~is_fat]
        rows.append(_row(name, n, nf, float(lean_ff.sum()), voxel_ml))
        tot["voxels"] += n
        tot["fat"] += nf
        tot["ff_lean_sum"] += float(lean_ff.sum())
    rows.append(_row(BACK_TOTAL, tot["voxels"], tot["fat"], tot["ff_lean_sum"], voxel_ml))
    return rows


def signal_fat_fraction(water: np.ndarray, fat: np.ndarray) -> np.ndarray:
    """F / (W + F) per voxel, non-finite or negative signal taken as 0 (0 where there is no signal)."""
    w = np.nan_to_num(np.asarray(water, np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    f = np.nan_to_num(np.asarray(fat, np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    s = w + f
    return np.divide(f, s, out=np.zeros_like(s), where=s > 0)


def _row(name: str, n: int, nf: int, ff_lean_sum: float, voxel_ml: float) -> dict:
    lean = n - nf
    return {"muscle": name, "voxels": n, "compartment_ml": n * voxel_ml, "fat_ml": nf * voxel_ml,
            "lean_ml": lean * voxel_ml, "imat_pct": 100.0 * nf / n if n else float("nan"),
            "mfi": ff_lean_sum / lean if lean else float("nan")}


def dice_per_class(pred: np.ndarray, truth: np.ndarray, classes=IDS) -> dict[int, float]:
    out = {}
    for c in classes:
        a, b = pred == c, truth == c
        denom = int(a.sum()) + int(b.sum())
        out[c] = 2.0 * int((a & b).sum()) / denom if denom else float("nan")
    return out
