"""Accuracy of segmentation and metrics against the simulator's ground truth.

Dice per class (predicted vs true label maps), and for every exposure of :data:`cbp_platform.study.EXPOSURES`
whose metric the simulator knows the truth of (the LMM index: lean back-muscle volume / (weight kg / height m),
InterMAT %, and the secondary ones) the ICC(A,1), mean relative bias and 95 % limits of agreement of measured vs
true values, and the proportional bias (Bland-Altman regression of the difference on the true value). Measured and
true values go through the same registry expression, so each is compared on the scale the analysis uses. The
targets (:data:`TARGETS`) apply to the paper's (primary) exposures. Works on any set of (pseudonym, delivery)
pairs that have both a segmentation and a truth row.
"""

from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl

from cbp_platform import study
from cbp_platform.classes import BACK_TOTAL
from cbp_platform.metrics.agreement import bland_altman, icc_a1, proportional_bias
from cbp_platform.metrics.body_composition import MUSCLES, dice_per_class, muscle_metrics
from cbp_platform.progress import bar

TARGETS = {"dice": 0.90, "icc": 0.95, "abs_bias_pct": 2.0}
# The simulator's truth of each back_total metric: its column in the truth table (participants.csv) and its key in
# a phantom's truth (:func:`cbp_platform.synth.phantom.render_phantom`).
TRUTH_COLUMNS = {"compartment_ml": "compartment_ml", "fat_ml": "fat_ml", "lean_ml": "lean_ml",
                 "imat_pct": "imat_pct_true", "mfi": "mfi_true"}
PHANTOM_TRUTH = {"compartment_ml": "compartment_ml", "fat_ml": "fat_ml", "lean_ml": "lean_ml",
                 "imat_pct": "imat_pct", "mfi": "mfi"}
# The phantom's LMM index is lean volume / (weight kg / height m): the body size the paper's normaliser divides by.
PHANTOM_NORMALISER = study.NORMALISERS[study.DEFAULT_NORMALISER]


def _with_truth() -> tuple[study.Exposure, ...]:
    """The exposures whose metric has a simulated truth."""
    return tuple(e for e in study.EXPOSURES if e.metric in TRUTH_COLUMNS)


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
    exposures = tuple(e for e in _with_truth() if e.metric in metrics.columns)
    metric_cols = study.metric_columns(exposures)
    tot = metrics.filter(pl.col("muscle") == BACK_TOTAL).select("delivery_id", "pseudonym", *metric_cols)
    true_cols = [pl.col(TRUTH_COLUMNS[m]).cast(pl.Float64).alias(f"{m}__true") for m in metric_cols
                 if TRUTH_COLUMNS[m] in truth.columns]
    j = (segs.select("delivery_id", "pseudonym", "label_path")
         .join(tot, on=["delivery_id", "pseudonym"])
         .join(truth.select("delivery_id", "pseudonym", "weight_kg", "height_cm", *true_cols),
               on=["delivery_id", "pseudonym"]))
    if j.height == 0:
        return {"n": 0}
    dice = {c: [] for c in MUSCLES}
    for r in bar(j.iter_rows(named=True), total=j.height, desc="accuracy", unit="label map", enabled=progress):
        pred = np.asarray(nib.load(r["label_path"]).dataobj)
        tpath = truth_root / r["delivery_id"] / "labels" / f"{r['pseudonym']}_labels.nii.gz"
        true = np.asarray(nib.load(tpath).dataobj)
        for c, d in dice_per_class(pred, true).items():
            dice[c].append(d)
    values = {}
    for e in exposures:
        if f"{e.metric}__true" not in j.columns:       # an older truth table without this metric's truth
            continue
        true = j.with_columns(pl.col(f"{e.metric}__true").alias(e.metric))
        values[e.name] = (j.select(e.expr(PHANTOM_NORMALISER)).to_series().to_numpy(),
                          true.select(e.expr(PHANTOM_NORMALISER)).to_series().to_numpy())
    return summarise(dice, values)


def evaluate_items(segmenter, items: list[dict], voxel_ml: float, progress=None) -> dict:
    """The same figures for labelled in-memory scans (``water``, ``fat``, ``affine``, ``labels``, ``truth`` as
    :func:`~cbp_platform.segmentation.train.simulated_set` makes them), segmented by ``segmenter``."""
    dice = {c: [] for c in MUSCLES}
    exposures = [e for e in _with_truth() if PHANTOM_TRUTH.get(e.metric)]
    measured, true = [], []
    for k, it in enumerate(items, start=1):
        pred = segmenter.segment(it["water"], it["fat"], it["affine"])
        for c, d in dice_per_class(pred, it["labels"]).items():
            dice[c].append(d)
        tot = {r["muscle"]: r for r in muscle_metrics(pred, it["water"], it["fat"], voxel_ml)}[BACK_TOTAL]
        t = it["truth"]
        # the phantom's truth has the body size only as lean / LMM index = weight kg / height m
        body = {"weight_kg": t["lean_ml"] / t["lmm_index"], "height_cm": 100.0}
        measured.append({**body, **{m: tot[m] for m in study.metric_columns(exposures)}})
        true.append({**body, **{m: t[PHANTOM_TRUTH[m]] for m in study.metric_columns(exposures)}})
        if progress is not None:
            progress(k)
    m, t = pl.DataFrame(measured), pl.DataFrame(true)
    values = {e.name: (m.select(e.expr(PHANTOM_NORMALISER)).to_series().to_numpy(),
                       t.select(e.expr(PHANTOM_NORMALISER)).to_series().to_numpy()) for e in exposures}
    return summarise(dice, values)


def summarise(dice: dict[int, list[float]], values: dict[str, tuple]) -> dict:
    """Dice per class, and per exposure name (``values``: name -> (measured, true) arrays) the ICC, Bland-Altman
    and proportional bias. ``meets_targets``: every class's Dice and every primary exposure's ICC and bias."""
    out = {
        "n": int(len(next(iter(values.values()))[0])) if values else 0,
        "dice": {MUSCLES[c]: float(np.mean(v)) for c, v in dice.items()},
        "dice_min_participant": {MUSCLES[c]: float(np.min(v)) for c, v in dice.items()},
    }
    for name, (x, x_true) in values.items():
        x, x_true = np.asarray(x, dtype=float), np.asarray(x_true, dtype=float)
        out[name] = {"icc": icc_a1(x, x_true), **bland_altman(x, x_true), "proportional": proportional_bias(x, x_true)}
    primary = [e.name for e in study.PRIMARY_EXPOSURES if e.name in values]
    out["meets_targets"] = bool(
        min(out["dice"].values()) >= TARGETS["dice"] and len(primary) == len(study.PRIMARY_EXPOSURES)
        and all(out[k]["icc"] >= TARGETS["icc"] and abs(out[k]["bias"]) < TARGETS["abs_bias_pct"] for k in primary))
    return out


def format_report(r: dict) -> str:
    if not r.get("n"):
        return "no segmented participants with ground truth found"
    lines = [f"Segmentation accuracy against ground truth (n = {r['n']} participants)", "",
             "| measure | value | target |", "|---|---|---|"]
    for k, v in r["dice"].items():
        lines.append(f"| Dice {k} (mean; worst participant {r['dice_min_participant'][k]:.3f}) | {v:.3f} | >= 0.90 |")
    for e in study.EXPOSURES:
        if e.name not in r:
            continue
        a = r[e.name]
        label = f"{e.measure} {e.unit}" if e.unit else e.measure
        target = e.role == study.PRIMARY
        lines.append(f"| {label}: ICC(A,1) | {a['icc']:.4f} | {'>= 0.95' if target else '(secondary)'} |")
        lines.append(f"| {label}: mean bias (% of true) | {a['bias']:+.2f} % | {'abs < 2 %' if target else ''} |")
        lines.append(f"| {label}: 95 % limits of agreement | {a['loa_low']:+.2f} % to {a['loa_high']:+.2f} % | |")
        p = a["proportional"]
        lines.append(f"| {label}: proportional bias, measured - true = a + b x true | a {p['intercept']:+.3f}, "
                     f"b {p['slope']:+.3f} (SE {p['slope_se']:.3f}) | |")
    lines.append("")
    lines.append("all targets met" if r["meets_targets"] else "TARGETS NOT MET")
    return "\n".join(lines)
