"""Model comparison statistics without MRI: metrics tables from the simulator's truth (tests/analysis/synthetic)."""

import numpy as np
import polars as pl
import pytest

from cbp_platform.classes import BACK_TOTAL, NAMES
from cbp_platform.segmentation.compare import forest_rows, metric_agreement, odds_ratios
from tests.analysis.synthetic import warehouse_tables


@pytest.fixture(scope="module")
def tables():
    return warehouse_tables(3000, seed=5)


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
