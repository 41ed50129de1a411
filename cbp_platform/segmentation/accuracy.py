"""Accuracy of segmentation and metrics against the simulator's ground truth.

Dice per class (predicted vs true label maps), and for the LMM index (lean back-muscle volume / (weight kg /
height m)) and InterMAT % the ICC(A,1), mean relative bias and 95 % limits of agreement of measured vs true
values, and the proportional bias (Bland-Altman regression of the difference on the true value). Works on any set
of (pseudonym, delivery) pairs that have both a segmentation and a truth row.
"""

from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl

from cbp_platform.classes import BACK_TOTAL
from cbp_platform.metrics.agreement import bland_altman, icc_a1, proportional_bias
from cbp_platform.metrics.body_composition import MUSCLES, dice_per_class, muscle_metrics
from cbp_platform.progress import bar

TARGETS = {"dice": 0.90, "icc": 0.95, "abs_bias_pct": 2.0}


def truth_table(truth_root: Path, delivery_ids: list[str]) -> pl.DataFrame:
    frames = [pl.read_csv(truth_root / d / "participants.csv") for d in sorted(set(delivery_ids))
              if (truth_root / d / "participants.csv").exists()]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def evaluate(segs: pl.DataFrame, metrics: pl.DataFrame, truth_root: Path, progress: bool | None = False) -> dict:
    """segs: delivery_id, pseudonym, label_path; metrics: long muscle_metrics rows (back_total used).

    ``progress``: a bar over the label maps compared (None: on a terminal only)."""
    if segs.height == 0:
        return {"n": 0}
    truth = truth_table(truth_root, segs["delivery_id"].to_list())
    if truth.height == 0:
        return {"n": 0}
    truth = truth.filter(pl.col("fault").is_null() | (pl.col("fault") == ""))
    tot = metrics.filter(pl.col("muscle") == BACK_TOTAL).select("delivery_id", "pseudonym", "lean_ml", "imat_pct")
    j = (segs.select("delivery_id", "pseudonym", "label_path")
         .join(tot, on=["delivery_id", "pseudonym"])
         .join(truth.select("delivery_id", "pseudonym", "weight_kg", "height_cm", "lean_ml", "imat_pct_true",
                            "lmm_index_true").rename({"lean_ml": "lean_ml_true"}), on=["delivery_id", "pseudonym"]))
    if j.height == 0:
        return {"n": 0}
    dice = {c: [] for c in MUSCLES}
    for r in bar(j.iter_rows(named=True), total=j.height, desc="accuracy", unit="label map", enabled=progress):
        pred = np.asarray(nib.load(r["label_path"]).dataobj)
        tpath = truth_root / r["delivery_id"] / "labels" / f"{r['pseudonym']}_labels.nii.gz"
        true = np.asarray(nib.load(tpath).dataobj)
        for c, d in dice_per_class(pred, true).items():
            dice[c].append(d)
    lmm = (j["lean_ml"] / (j["weight_kg"] / (j["height_cm"] / 100.0))).to_numpy()
    return summarise(dice, lmm, j["lmm_index_true"].to_numpy(), j["imat_pct"].to_numpy(),
                     j["imat_pct_true"].to_numpy())


def evaluate_items(segmenter, items: list[dict], voxel_ml: float, progress=None) -> dict:
    """The same figures for labelled in-memory scans (``water``, ``fat``, ``affine``, ``labels``, ``truth`` as
    :func:`~cbp_platform.segmentation.train.simulated_set` makes them), segmented by ``segmenter``."""
    dice = {c: [] for c in MUSCLES}
    lmm, lmm_true, imat, imat_true = [], [], [], []
    for k, it in enumerate(items, start=1):
        pred = segmenter.segment(it["water"], it["fat"], it["affine"])
        for c, d in dice_per_class(pred, it["labels"]).items():
            dice[c].append(d)
        tot = {r["muscle"]: r for r in muscle_metrics(pred, it["water"], it["fat"], voxel_ml)}[BACK_TOTAL]
        t = it["truth"]
        lmm.append(t["lmm_index"] * tot["lean_ml"] / t["lean_ml"])      # lean / (weight / height), same person
        lmm_true.append(t["lmm_index"])
        imat.append(tot["imat_pct"])
        imat_true.append(t["imat_pct"])
        if progress is not None:
            progress(k)
    return summarise(dice, np.array(lmm), np.array(lmm_true), np.array(imat), np.array(imat_true))


def summarise(dice: dict[int, list[float]], lmm, lmm_true, imat, imat_true) -> dict:
    """Dice per class, and ICC, Bland-Altman and proportional bias of the LMM index and InterMAT %."""
    out = {
        "n": int(len(imat)),
        "dice": {MUSCLES[c]: float(np.mean(v)) for c, v in dice.items()},
        "dice_min_participant": {MUSCLES[c]: float(np.min(v)) for c, v in dice.items()},
        "lmm": {"icc": icc_a1(lmm, lmm_true), **bland_altman(lmm, lmm_true),
                "proportional": proportional_bias(lmm, lmm_true)},
        "imat": {"icc": icc_a1(imat, imat_true), **bland_altman(imat, imat_true),
                 "proportional": proportional_bias(imat, imat_true)},
    }
    out["meets_targets"] = bool(
        min(out["dice"].values()) >= TARGETS["dice"]
        and out["lmm"]["icc"] >= TARGETS["icc"] and out["imat"]["icc"] >= TARGETS["icc"]
        and abs(out["lmm"]["bias"]) < TARGETS["abs_bias_pct"] and abs(out["imat"]["bias"]) < TARGETS["abs_bias_pct"])
    return out


def format_report(r: dict) -> str:
    if not r.get("n"):
        return "no segmented participants with ground truth found"
    lines = [f"Segmentation accuracy against ground truth (n = {r['n']} participants)", "",
             "| measure | value | target |", "|---|---|---|"]
    for k, v in r["dice"].items():
        lines.append(f"| Dice {k} (mean; worst participant {r['dice_min_participant'][k]:.3f}) | {v:.3f} | >= 0.90 |")
    for name, label in (("lmm", "LMM index"), ("imat", "InterMAT %")):
        a = r[name]
        lines.append(f"| {label}: ICC(A,1) | {a['icc']:.4f} | >= 0.95 |")
        lines.append(f"| {label}: mean bias (% of true) | {a['bias']:+.2f} % | abs < 2 % |")
        lines.append(f"| {label}: 95 % limits of agreement | {a['loa_low']:+.2f} % to {a['loa_high']:+.2f} % | |")
        p = a["proportional"]
        lines.append(f"| {label}: proportional bias, measured - true = a + b x true | a {p['intercept']:+.3f}, "
                     f"b {p['slope']:+.3f} (SE {p['slope_se']:.3f}) | |")
    lines.append("")
    lines.append("all targets met" if r["meets_targets"] else "TARGETS NOT MET")
    return "\n".join(lines)
