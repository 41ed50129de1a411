"""QC features, triage and the QC image on simulated phantoms with their true label maps (no model: a perfect
segmentation is the clean reference, and the failures are made from it as cbp_platform.qc.evaluate makes them)."""

import io

import numpy as np
import polars as pl
import pytest
from PIL import Image

from cbp_platform.classes import IDS
from cbp_platform.qc.evaluate import degrade, recall_table, shift, truncate_fov
from cbp_platform.qc.features import FEATURE_NAMES, scan_features, triage
from cbp_platform.qc.pipeline import ScanQC, batch_montage, batch_qc, si_axis
from cbp_platform.qc.render import COLOURS, qc_image


@pytest.fixture(scope="module")
def phantoms():
    from cbp_platform.segmentation.train import simulated_set

    return simulated_set(34, 5150)


def _features(s, labels=None, water=None, fat=None, affine=None) -> dict:
    import nibabel as nib

    aff = s["affine"] if affine is None else affine
    lab = s["labels"] if labels is None else labels
    vox = float(np.prod(nib.affines.voxel_sizes(aff))) / 1000
    return scan_features(lab, s["water"] if water is None else water, s["fat"] if fat is None else fat, vox,
                         0.05, si_axis=si_axis(aff))


def test_a_true_label_map_is_whole_symmetric_on_the_body_and_inside_the_field_of_view(phantoms):
    f = _features(phantoms[0])
    assert set(FEATURE_NAMES) <= set(f)
    assert f["fragmentation"] == 0 and f["slice_gaps"] == 0 and f["off_signal"] == 0 and f["edge_fraction"] == 0
    assert f["asymmetry"] < 0.1 and f["border_contrast"] > 0
    truth = phantoms[0]["truth"]
    assert f["lean_ml"] == pytest.approx(truth["lean_ml"], rel=0.02)
    assert f["imat_pct"] == pytest.approx(truth["imat_pct"], abs=0.5)


def test_each_failure_moves_its_feature(phantoms):
    s = phantoms[1]
    clean = _features(s)
    rng = np.random.default_rng(3)
    assert _features(s, labels=degrade(s["labels"], rng))["slice_gaps"] >= 0.3
    moved = _features(s, labels=shift(s["labels"], rng))
    assert moved["border_contrast"] < 0.8 * clean["border_contrast"]
    w, f, aff = truncate_fov(s["water"], s["fat"], s["labels"], s["affine"])
    lab, _, _ = truncate_fov(s["labels"], s["labels"], s["labels"], s["affine"])
    assert _features(s, labels=lab, water=w, fat=f, affine=aff)["edge_fraction"] > 0.01


def test_triage_puts_every_failure_above_every_clean_map(phantoms):
    rng = np.random.default_rng(11)
    rows = [{"pseudonym": f"C{i:03d}", "batch_key": "b1", "site": f"S{i % 2}", "failed": False, **_features(s)}
            for i, s in enumerate(phantoms[:30])]
    s = phantoms[30]
    rows.append({"pseudonym": "F1", "batch_key": "b1", "site": "S0", "failed": True,
                 **_features(s, labels=degrade(s["labels"], rng))})
    s = phantoms[31]
    rows.append({"pseudonym": "F2", "batch_key": "b1", "site": "S1", "failed": True,
                 **_features(s, labels=shift(s["labels"], rng))})
    s = phantoms[32]
    w, f, aff = truncate_fov(s["water"], s["fat"], s["labels"], s["affine"])
    lab, _, _ = truncate_fov(s["labels"], s["labels"], s["labels"], s["affine"])
    rows.append({"pseudonym": "F3", "batch_key": "b1", "site": "S0", "failed": True,
                 **_features(s, labels=lab, water=w, fat=f, affine=aff)})
    df = triage(pl.DataFrame(rows))
    top = df.sort("triage_rank").head(3)
    assert set(top["pseudonym"].to_list()) == {"F1", "F2", "F3"}, df.select("pseudonym", "triage_score",
                                                                           "triage_flags").sort("triage_score")
    assert all(top["triage_flags"].str.len_chars() > 0)
    assert df.filter(~pl.col("failed"))["triage_score"].max() < df.filter(pl.col("failed"))["triage_score"].min()
    # deterministic: the same features in another row order give the same scores and ranks
    again = triage(pl.DataFrame(rows[::-1]))
    assert again.sort("pseudonym")["triage_rank"].to_list() == df.sort("pseudonym")["triage_rank"].to_list()


def test_recall_counts_the_failures_found_against_the_share_reviewed():
    """99 clean maps scored 0..98 and one failure scored 50.5, at 1 % prevalence: reviewing 2 % reads the maps
    scored 97 and 98 (share 0.99 x 2/99 = 0.02) and misses it; reviewing half the cohort reaches it, the
    failure itself counting 1 % of the share."""
    df = pl.DataFrame({"triage_score": [float(i) for i in range(99)] + [50.5], "failed": [False] * 99 + [True]})
    rec = {r["review_fraction"]: r for r in recall_table(df, fractions=(0.02, 0.5))}
    assert (rec[0.02]["score_threshold"], rec[0.02]["recall"]) == (97.0, 0.0)
    assert (rec[0.5]["score_threshold"], rec[0.5]["recall"]) == (50.0, 1.0)


def test_qc_image_rows_colours_and_radiological_orientation(phantoms, tmp_path):
    """Both rows, every class colour, and the participant's right on the viewer's left (the right
    autochthonous muscle's outline left of the left one's in the first axial panel)."""
    s = phantoms[2]
    png = qc_image(s["water"], s["fat"], s["labels"], s["affine"], {"LMM": "27.1 cm3/(kg/m)"})
    im = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert im.shape[0] > 150 and im.shape[1] > 3 * im.shape[0] // 2
    colours = {tuple(c) for c in im.reshape(-1, 3)[::7].tolist()}
    for cid in IDS:
        assert COLOURS[cid] in colours, cid
    from cbp_platform.classes import BY_NAME

    panel = im[46:46 + 120, :im.shape[1] // 4]              # the first axial panel of the water row
    cols = {side: np.nonzero((panel == COLOURS[BY_NAME[f"autochthonous_{side}"].id]).all(axis=-1))[1].mean()
            for side in ("left", "right")}
    assert cols["right"] < cols["left"], cols
    out = ScanQC(tmp_path, {"P1": 80.0}, "cm3/(kg/m)")("P1", s["labels"], s["water"], s["fat"], s["affine"], 0.04)
    assert (tmp_path / "P1_qc.png").read_bytes()[:4] == b"\x89PNG" and out["lmm"] == pytest.approx(
        out["lean_ml"] / 80.0)
    qc = batch_qc([{"pseudonym": "P1", "label_sha256": "a" * 64, "qc": out}], batch_key="b1", delivery_id="d1",
                  model_sha256="m" * 64, model_name="m", sites={"P1": "S1"})
    assert qc["triage_rank"].to_list() == [1] and qc["site"].to_list() == ["S1"]
    assert Image.open(io.BytesIO(batch_montage(qc))).size[0] > 300
