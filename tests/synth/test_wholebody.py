"""Whole-body phantoms (``extent="whole-body"``, ``cbp synth --extent whole-body``): neck to thighs around the
lumbar slab, which keeps its voxels, labels and truth numbers; unlabelled anatomy outside it; both delivery formats
written and ingested."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import polars as pl
import pytest
from scipy import ndimage

from cbp_platform.cli import main
from cbp_platform.imaging.qc import fat_water_swap
from cbp_platform.ingest.dicom import inspect_dicom_participant
from cbp_platform.ingest.scans import inspect_participant
from cbp_platform.landing import scan_relpath
from cbp_platform.synth.delivery import SynthError, synthesize
from cbp_platform.synth.dicom import stations_for
from cbp_platform.synth.phantom import PRESETS, WB_ABOVE_MM, WB_BELOW_MM, Subject, render_phantom, whole_body_slices

FAST = PRESETS["fast"]
SUBJECT = Subject(female=False, age=52.0, height_cm=177.0, weight_kg=81.0, imat_pct=8.0, mfi=0.05,
                  lean_ml=(410.0, 400.0, 125.0, 120.0))
TRUTH_OF_THE_SLAB = ("extent", "slab_slices", "vertebra_slices", "swap_slices")   # where, not what


@pytest.fixture(scope="module")
def pair():
    lumbar = render_phantom(SUBJECT, FAST, np.random.default_rng(21))
    whole = render_phantom(SUBJECT, FAST, np.random.default_rng(21), extent="whole-body")
    return lumbar, whole


def _body(water: np.ndarray, fat: np.ndarray, ref: float) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: the body (filled, as the swap QC finds it) and the signal fat fraction."""
    s = water.astype(np.float32) + fat
    body = np.stack([ndimage.binary_fill_holes(s[:, :, k] > 0.25 * ref) for k in range(s.shape[2])], axis=2)
    return body, fat / np.maximum(s, 1.0)


def test_unknown_extent_is_refused(tmp_path):
    with pytest.raises(ValueError, match="lumbar, whole-body"):
        render_phantom(SUBJECT, FAST, np.random.default_rng(0), extent="torso")
    with pytest.raises(SynthError, match="unknown --extent 'torso'"):
        synthesize(participants=1, deliveries=1, seed=1, data_root=tmp_path, workers=1, extent="torso")


def test_whole_body_covers_neck_to_thighs_on_the_presets_grid(pair):
    lumbar, whole = pair
    nz, k0 = whole_body_slices(FAST)
    assert whole.water.shape == whole.fat.shape == whole.labels.shape == (96, 72, nz)
    assert nz * FAST.spacing[2] == pytest.approx(FAST.shape[2] * FAST.spacing[2] + WB_ABOVE_MM + WB_BELOW_MM)
    assert 1000 <= nz * FAST.spacing[2] <= 1100
    assert whole_body_slices(PRESETS["nako"]) == (360, 164)
    assert whole.extent == whole.truth["extent"] == "whole-body" and lumbar.extent == "lumbar"
    assert whole.truth["slab_slices"] == (k0, k0 + FAST.shape[2]) and lumbar.truth["slab_slices"] == (0, 48)
    np.testing.assert_allclose(whole.affine[:3, :3], lumbar.affine[:3, :3])
    # NAKO-like stations: 4 of about 300 mm, each overlapping the next, covering the volume
    st = stations_for(nz, "whole-body")
    assert len(st) == 4 and st[0][0] == 0 and st[-1][1] == nz and all(b[0] < a[1] for a, b in zip(st, st[1:]))
    assert all(250 <= (k1 - k0_) * FAST.spacing[2] <= 330 for k0_, k1 in st)


def test_the_slab_is_the_lumbar_render_at_the_same_world_position(pair):
    lumbar, whole = pair
    k0, k1 = whole.truth["slab_slices"]
    for a, b in ((whole.water, lumbar.water), (whole.fat, lumbar.fat), (whole.labels, lumbar.labels)):
        np.testing.assert_array_equal(a[:, :, k0:k1], b)                    # voxel for voxel
    assert not whole.labels[:, :, :k0].any() and not whole.labels[:, :, k1:].any()
    # slice k of the whole body lies where slice k - k0 of the slab lies, in scanner mm
    for k in (0, 17, 47):
        np.testing.assert_allclose(whole.affine @ [5, 9, k + k0, 1], lumbar.affine @ [5, 9, k, 1], atol=1e-9)
    for key, value in lumbar.truth.items():
        if key not in TRUTH_OF_THE_SLAB:
            assert whole.truth[key] == value, key
    assert whole.truth["vertebra_slices"] == {n: k + k0 for n, k in lumbar.truth["vertebra_slices"].items()}
    assert set(whole.truth["vertebra_z_mm"]) == {"T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"}
    assert k0 < whole.truth["vertebra_slices"]["T10"] < k1


def test_swaps_keep_the_truth_and_exchange_whole_body_slices():
    for swap in ("full", "slab"):
        s = Subject(**{**SUBJECT.__dict__, "swap": swap})
        lumbar = render_phantom(s, FAST, np.random.default_rng(8))
        whole = render_phantom(s, FAST, np.random.default_rng(8), extent="whole-body")
        assert whole.truth["imat_pct"] == lumbar.truth["imat_pct"] and whole.truth["lean_ml"] == lumbar.truth["lean_ml"]
        nz = whole.water.shape[2]
        want = [(0, nz)] if swap == "full" else [stations_for(nz, "whole-body")[i] for i in (0, -1)]
        assert whole.truth["swap_slices"] in want
        assert fat_water_swap(whole.water, whole.fat, FAST.spacing).suspected


def test_plausible_unlabelled_tissue_outside_the_slab(pair):
    _, whole = pair
    k0, k1 = whole.truth["slab_slices"]
    w, f = whole.water, whole.fat
    ref = float(np.percentile(w.astype(np.float32) + f, 99))
    body, ff = _body(w, f, ref)
    s = w.astype(np.float32) + f
    dark = body & (s < 0.45 * ref)                     # inside the body outline, little signal: air spaces
    above, slab = range(k1 + 5, k1 + 25), range(k0 + 5, k1 - 5)
    assert np.mean([dark[:, :, k].sum() / body[:, :, k].sum() for k in above]) > 0.15   # lungs
    assert np.mean([dark[:, :, k].sum() / body[:, :, k].sum() for k in slab]) < 0.05
    # thighs: two legs, each with fatty marrow deep inside and water-dominant muscle around it
    for k in range(2, 40, 6):
        lab, n = ndimage.label(body[:, :, k])
        assert n == 2, k
        for leg in (1, 2):
            depth = ndimage.distance_transform_edt(lab == leg) * FAST.spacing[0]
            core = depth > 24
            assert np.median(ff[:, :, k][core]) < 0.25                                   # muscle
            assert (ff[:, :, k][core] > 0.6).sum() >= 2                                  # femoral marrow
    # the slices outside the slab are not swapped in appearance (subcutaneous fat outside, water inside)
    q = fat_water_swap(w, f, FAST.spacing)
    assert not q.suspected and q.reversed_fraction < 0.1 and q.n_slices >= 25
    assert not whole.labels[:, :, :k0].any() and not whole.labels[:, :, k1:].any()


def _run_cli(*argv) -> int:
    try:
        return main(list(argv))
    except SystemExit as exc:
        return int(exc.code)


def test_cli_writes_whole_body_nifti_and_dicom_that_ingest(tmp_path, capsys):
    common = ["synth", "-n", "2", "-k", "1", "--seed", "33", "--workers", "1", "-q"]
    assert _run_cli(*common, "--data-root", str(tmp_path / "lum")) == 0
    assert _run_cli(*common, "--data-root", str(tmp_path / "nii"), "--extent", "whole-body") == 0
    assert _run_cli(*common, "--data-root", str(tmp_path / "dcm"), "--extent", "whole-body", "--format", "dicom") == 0
    capsys.readouterr()
    did = "sim33-d01"
    nz, k0 = whole_body_slices(FAST)
    doc = json.loads((tmp_path / "nii" / "truth" / "cohort-sim33.json").read_text())
    assert doc["extent"] == "whole-body" and doc["shape"] == [96, 72, nz] and doc["slab_slices"] == [k0, k0 + 48]
    assert "extent" not in json.loads((tmp_path / "lum" / "truth" / "cohort-sim33.json").read_text())
    lum = pl.read_csv(tmp_path / "lum" / "truth" / did / "participants.csv").sort("pseudonym")
    nii = pl.read_csv(tmp_path / "nii" / "truth" / did / "participants.csv").sort("pseudonym")
    assert "slab_slices" not in lum.columns
    assert nii["slab_slices"].to_list() == [f"{k0}-{k0 + 47}"] * 2 and nii["extent"].to_list() == ["whole-body"] * 2
    for c in [c for c in lum.columns if c.endswith("_ml") or c in ("imat_pct_true", "lmm_index_true", "mfi_true")]:
        assert nii[c].to_list() == lum[c].to_list(), c                     # the truth numbers are the slab's
    man = json.loads((tmp_path / "nii" / "landing" / did / "manifest.json").read_text())
    files = {f["path"]: f for f in man["files"]}
    for p in nii["pseudonym"]:
        water = nib.load(tmp_path / "nii" / "landing" / did / scan_relpath(p, "water"))
        labels = np.asarray(nib.load(tmp_path / "nii" / "truth" / did / "labels" / f"{p}_labels.nii.gz").dataobj)
        assert water.shape == labels.shape == (96, 72, nz)
        np.testing.assert_allclose(water.affine[:3, :3], np.diag([-4.0, 4.0, 6.0]))
        assert labels[:, :, k0:k0 + 48].any() and not labels[:, :, :k0].any() and not labels[:, :, k0 + 48:].any()
        facts = inspect_participant(tmp_path / "nii" / "landing" / did, p, files)
        assert facts["shape_z"] == nz and not facts["swap_suspected"]
    # DICOM: 4 stations per contrast, stitched back to the NIfTI delivery's volume voxel for voxel
    man = json.loads((tmp_path / "dcm" / "landing" / did / "manifest.json").read_text())
    assert man["scan_format"] == "dicom"
    p = nii.filter(pl.col("fat_water_swap") == "none")["pseudonym"][0]
    files = {f["path"]: f for f in man["files"] if f.get("pseudonym") == p}
    res = inspect_dicom_participant(tmp_path / "dcm" / "landing" / did, p, files, out_dir=tmp_path / "out" / p,
                                    rel_out=f"out/{p}")
    assert res.facts["stations"] == 4 and res.facts["shape_z"] == nz and not res.facts["swap_suspected"]
    want = nib.load(tmp_path / "nii" / "landing" / did / scan_relpath(p, "water"))
    got = nib.load(tmp_path / res.facts["water_path"])
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))


@pytest.mark.parametrize("fault", ["missing_station", "swapped_station", "repeated_station"])
def test_station_faults_of_a_whole_body_delivery_give_their_reasons(tmp_path, pair, fault):
    from datetime import datetime

    from cbp_platform.imaging.nifti import sha256_bytes
    from cbp_platform.ingest.scans import ScanProblem
    from cbp_platform.landing import dicom_relpath
    from cbp_platform.synth.dicom import participant_zips, plan_stations
    from cbp_platform.synth.faults import EXPECTED_REASONS

    _, whole = pair
    p = "PPPPPPPPPP"
    plan = plan_stations(whole.water.shape[2], fault, "none", np.random.default_rng(0), extent="whole-body")
    zips = participant_zips({"water": whole.water, "fat": whole.fat}, whole.affine, plan, pseudonym=p, seed=1,
                            exam=datetime(2016, 5, 4, 9, 0))
    files = {}
    for c, payload in zips.items():
        rel = dicom_relpath(p, c)
        (tmp_path / "d" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / rel).write_bytes(payload)
        files[rel] = {"path": rel, "size": len(payload), "sha256": sha256_bytes(payload)}
    run = lambda: inspect_dicom_participant(tmp_path / "d", p, files, out_dir=tmp_path / "o", rel_out="o")  # noqa: E731
    if EXPECTED_REASONS[fault]:
        with pytest.raises(ScanProblem) as e:
            run()
        assert e.value.reason in EXPECTED_REASONS[fault]
    else:
        res = run()
        assert res.facts["superseded_series"] == 2 and res.facts["shape_z"] == whole.water.shape[2]
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / res.facts["water_path"]).dataobj), whole.water)
