"""Model comparison statistics without MRI: metrics tables from the simulator's truth (the session's ``tables``,
tests/conftest.py)."""

import numpy as np
import polars as pl
import pytest

from cbp_platform.classes import BACK_TOTAL, NAMES
from cbp_platform.segmentation.compare import forest_rows, metric_agreement, odds_ratios


def _other(metrics: pl.DataFrame, lean: float, imat: float) -> pl.DataFrame:
    """A second model's metrics: lean volume and InterMAT scaled (a systematic difference)."""
    return metrics.with_columns(pl.col("lean_ml") * lean, pl.col("imat_pct") * imat)


def test_identical_models_agree_exactly_and_give_the_same_odds_ratios(tables):
    t = tables
    body = t["covariates"].select("pseudonym", "weight_kg", "height_cm")
    a = metric_agreement(t["metrics"], t["metrics"], body)
    assert a["n"] == t["metrics"].filter(pl.col("muscle") == BACK_TOTAL).height
    for k in ("lmm", "imat"):
        assert a[k]["icc"] == pytest.approx(1.0) and a[k]["bias"] == pytest.approx(0.0, abs=1e-12)
    ors = odds_ratios(t["covariates"], t["scans"], t["metrics"], t["quarantine"], nagq=1)
    assert set(ors["analyses"]) == {"cbp_association_model", "pain_intensity_model"}
    for name, res in ors["analyses"].items():
        assert set(res["terms"]) == {"lmm_z2", "imat_z2"}, (name, res)
        for term in res["terms"].values():
            assert 0 < term["or_low"] < term["or"] < term["or_high"]


def test_a_systematic_difference_shows_in_the_agreement_and_not_in_per_sd_odds_ratios(tables):
    """A model measuring every lean volume 5 % high has bias +5 % and a lower ICC(A,1) but, the exposures being
    standardised, the same per-2-SD odds ratios; a model with noisy InterMAT moves the InterMAT OR."""
    t = tables
    body = t["covariates"].select("pseudonym", "weight_kg", "height_cm")
    scaled = _other(t["metrics"], 1.05, 1.0)
    a = metric_agreement(t["metrics"], scaled, body)
    assert a["lmm"]["bias"] == pytest.approx(5.0, abs=1e-9) and a["lmm"]["icc"] < 1.0
    assert a["imat"]["bias"] == pytest.approx(0.0, abs=1e-12)
    ref = odds_ratios(t["covariates"], t["scans"], t["metrics"], t["quarantine"], nagq=1)
    alt = odds_ratios(t["covariates"], t["scans"], scaled, t["quarantine"], nagq=1)
    r, s = (x["analyses"]["cbp_association_model"]["terms"] for x in (ref, alt))
    assert s["lmm_z2"]["or"] == pytest.approx(r["lmm_z2"]["or"], rel=1e-6)
    rng = np.random.default_rng(1)
    noisy = t["metrics"].with_columns(pl.col("imat_pct") * pl.Series(np.exp(rng.normal(0, 0.4, t["metrics"].height))))
    alt2 = odds_ratios(t["covariates"], t["scans"], noisy, t["quarantine"], nagq=1)
    n = alt2["analyses"]["cbp_association_model"]["terms"]
    assert abs(np.log(n["imat_z2"]["or"])) < abs(np.log(r["imat_z2"]["or"]))    # attenuated by the noise
    f = forest_rows({"a": ref, "b": alt2})
    assert f.height == 8 and set(f["model"].to_list()) == {"a", "b"}


def test_comparison_section_renders_with_a_side_by_side_forest_plot(tables, tmp_path):
    from cbp_platform.analysis.report import comparison_tables, figure_comparison

    t = tables
    ref = odds_ratios(t["covariates"], t["scans"], t["metrics"], t["quarantine"], nagq=1)
    body = t["covariates"].select("pseudonym", "weight_kg", "height_cm")
    c = {"primary": {"name": "cbp", "backend": "monai-bundle", "weights_sha256": "a" * 64, "segmented": 10},
         "other": {"name": "mrsegmentator", "backend": "nnunetv2", "weights_sha256": "b" * 64, "segmented": 10},
         "label_dice": {n: {"mean": 0.9, "min": 0.8, "n": 10} for n in NAMES.values()},
         "agreement": metric_agreement(t["metrics"], _other(t["metrics"], 1.02, 0.97), body),
         "forest": forest_rows({"cbp": ref, "mrsegmentator": ref}).to_dicts()}
    tabs = comparison_tables(c)
    assert tabs["odds_ratios"].height == 8 and tabs["dice"].height == 4
    assert tabs["agreement"]["Mean difference (% of primary)"].to_list()[0] == "+2.00 %"
    png, labels = figure_comparison(pl.DataFrame(c["forest"]), ["cbp", "mrsegmentator"])
    assert png.startswith(b"\x89PNG") and "mrsegmentator" in labels


def test_fat_fraction_agreement_between_models_beside_lmm_and_intermat(tables):
    """The secondary exposure (muscle fat fraction, from the mfi metric) is compared between models like the
    paper's two: a model measuring mfi 10 % high shows +10 % on fat fraction only; the report's agreement table
    lists all three; the odds ratios compared stay the paper's analyses'."""
    from cbp_platform import study
    from cbp_platform.analysis.report import comparison_tables
    from cbp_platform.segmentation.compare import ANALYSES

    t = tables
    body = t["covariates"].select("pseudonym", "weight_kg", "height_cm")
    other = t["metrics"].with_columns(pl.col("mfi") * 1.10)
    a = metric_agreement(t["metrics"], other, body)
    assert {e.name for e in study.EXPOSURES} <= set(a)
    assert a["ff"]["bias"] == pytest.approx(10.0, abs=1e-9) and a["ff"]["icc"] < 1.0
    assert a["ff"]["n"] == a["n"] and a["ff"]["mean_other"] == pytest.approx(1.10 * a["ff"]["mean_primary"])
    for k in ("lmm", "imat"):
        assert a[k]["bias"] == pytest.approx(0.0, abs=1e-12) and a[k]["icc"] == pytest.approx(1.0)
    # a participant the other model could not measure mfi for is left out of the fat fraction only
    p0 = t["metrics"]["pseudonym"][0]
    gap = other.with_columns(pl.when(pl.col("pseudonym") == p0).then(float("nan")).otherwise(pl.col("mfi"))
                             .alias("mfi"))
    b = metric_agreement(t["metrics"], gap, body)
    assert b["ff"]["n"] == a["ff"]["n"] - 1 and b["lmm"]["n"] == b["n"] == a["n"]
    c = {"primary": {"name": "cbp", "backend": "monai-bundle", "weights_sha256": "a" * 64, "segmented": 10},
         "other": {"name": "other", "backend": "nnunetv2", "weights_sha256": "b" * 64, "segmented": 10},
         "label_dice": {n: {"mean": 0.9, "min": 0.8, "n": 10} for n in NAMES.values()}, "agreement": a,
         "forest": []}
    ag = comparison_tables(c)["agreement"]
    assert ag["Measure"].to_list() == ["LMM index", "InterMAT %", "Muscle fat fraction %"]
    assert ag["Mean difference (% of primary)"].to_list() == ["+0.00 %", "+0.00 %", "+10.00 %"]
    assert [x.name for x in ANALYSES] == ["cbp_association_model", "pain_intensity_model"]


def _nifti(path, array):
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.eye(4)), str(path))


def test_accuracy_covers_every_exposure_with_a_truth_and_targets_the_papers(tmp_path):
    """cbp_platform.segmentation.accuracy against a hand-made truth folder: LMM, InterMAT and fat fraction each
    compared on the analysis' scale (fat fraction in %); a 20 % fat-fraction error is reported but only the
    paper's exposures decide whether the targets are met."""
    from cbp_platform.segmentation.accuracy import evaluate, format_report

    rng = np.random.default_rng(3)
    n = 8
    labels = np.zeros((6, 6, 6), np.uint8)
    for k, c in enumerate(NAMES):
        labels[k, :, :] = c
    rows, segs, mets = [], [], []
    for i in range(n):
        p = f"P{i:09d}"
        w, h = float(rng.uniform(55, 100)), float(rng.uniform(155, 195))
        lean, imat, mfi = float(rng.uniform(600, 1200)), float(rng.uniform(4, 12)), float(rng.uniform(0.02, 0.06))
        rows.append({"delivery_id": "d1", "pseudonym": p, "weight_kg": w, "height_cm": h, "lean_ml": lean,
                     "imat_pct_true": imat, "mfi_true": mfi, "lmm_index_true": lean / (w / (h / 100)), "fault": ""})
        _nifti(tmp_path / "truth" / "d1" / "labels" / f"{p}_labels.nii.gz", labels)
        _nifti(tmp_path / "pred" / f"{p}.nii.gz", labels)
        segs.append({"delivery_id": "d1", "pseudonym": p, "label_path": str(tmp_path / "pred" / f"{p}.nii.gz")})
        mets.append({"delivery_id": "d1", "pseudonym": p, "muscle": BACK_TOTAL, "lean_ml": lean * 1.001,
                     "imat_pct": imat, "mfi": mfi * 1.2})
    pl.DataFrame(rows).write_csv(tmp_path / "truth" / "d1" / "participants.csv")
    r = evaluate(pl.DataFrame(segs), pl.DataFrame(mets), tmp_path / "truth")
    assert r["n"] == n and min(r["dice"].values()) == 1.0
    assert r["lmm"]["bias"] == pytest.approx(0.1, abs=1e-9) and r["imat"]["bias"] == pytest.approx(0.0, abs=1e-12)
    assert r["ff"]["bias"] == pytest.approx(20.0, abs=1e-9) and r["meets_targets"] is True
    text = format_report(r)
    assert "Muscle fat fraction %: mean bias (% of true) | +20.00 %" in text and "all targets met" in text
    worse = [{**m, "imat_pct": m["imat_pct"] * 1.05} for m in mets]
    assert evaluate(pl.DataFrame(segs), pl.DataFrame(worse), tmp_path / "truth")["meets_targets"] is False
