"""The landing-zone contract holds for what `cbp synth` writes (docs/landing-zone.md)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl

from cbp_platform.imaging.nifti import sha256_file
from cbp_platform.landing import COVARIATE_COLUMNS, PSEUDONYM_RE, SCHEMA_VERSION, SITES, scan_relpath
from cbp_platform.synth.phantom import PRESETS


def _deliveries(root: Path):
    return sorted(p for p in (root / "landing").iterdir() if p.is_dir())


def test_manifest_lists_every_file_with_size_and_checksum(small_cohort):
    root, res = small_cohort
    dirs = _deliveries(root)
    assert [d.name for d in dirs] == res.delivery_ids == ["sim7-d01", "sim7-d02"]
    total = 0
    for d in dirs:
        assert (d / "_SUCCESS").exists()
        man = json.loads((d / "manifest.json").read_text())
        assert man["schema_version"] == SCHEMA_VERSION
        assert man["delivery_id"] == d.name
        assert man["created_at"].endswith("Z")
        listed = {f["path"] for f in man["files"]}
        on_disk = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()} - {"manifest.json", "_SUCCESS"}
        assert listed == on_disk
        for f in man["files"]:
            p = d / f["path"]
            assert p.stat().st_size == f["size"]
            assert sha256_file(p) == f["sha256"]
        # participants: manifest == covariates == mri folders, all well-formed pseudonyms
        rows = list(csv.DictReader((d / "covariates.csv").open()))
        assert tuple(rows[0].keys()) == COVARIATE_COLUMNS
        pseudos = [r["pseudonym"] for r in rows]
        assert sorted(pseudos) == man["participants"] == sorted(p.name for p in (d / "mri").iterdir())
        assert man["n_participants"] == len(pseudos)
        assert all(PSEUDONYM_RE.match(p) for p in pseudos)
        assert all(r["site"] in SITES for r in rows)
        for p in pseudos:
            assert f"{scan_relpath(p, 'water')}" in listed and f"{scan_relpath(p, 'fat')}" in listed
        total += len(pseudos)
    assert total == 24


def test_pseudonyms_are_opaque_and_unordered(small_cohort):
    root, _ = small_cohort
    rows = []
    for d in _deliveries(root):
        rows += list(csv.DictReader((d / "covariates.csv").open()))
    ps = [r["pseudonym"] for r in rows]
    assert len(set(ps)) == len(ps)
    # rows are in examination-date order; pseudonyms must not follow any order
    dates = [r["exam_date"] for r in rows]
    assert dates == sorted(dates)
    assert ps != sorted(ps) and ps != sorted(ps, reverse=True)
    for p, r in zip(ps, rows):
        assert r["site"][:3].upper() not in p


def test_nifti_images_load_and_agree_with_labels(small_cohort):
    root, _ = small_cohort
    preset = PRESETS["fast"]
    d = _deliveries(root)[0]
    truth = pl.read_csv(root / "truth" / d.name / "participants.csv")
    for pseudo in truth["pseudonym"].to_list()[:6]:
        w = nib.load(d / scan_relpath(pseudo, "water"))
        f = nib.load(d / scan_relpath(pseudo, "fat"))
        lab = nib.load(root / "truth" / d.name / "labels" / f"{pseudo}_labels.nii.gz")
        assert w.shape == f.shape == lab.shape == preset.shape
        np.testing.assert_allclose(w.affine, f.affine)
        np.testing.assert_allclose(w.affine, lab.affine)
        assert nib.aff2axcodes(w.affine) == ("L", "A", "S")
        np.testing.assert_allclose(w.header.get_zooms(), preset.spacing)
        assert w.get_data_dtype() == np.int16
        L = np.asarray(lab.dataobj)
        assert set(np.unique(L)) == {0, 1, 2, 3, 4}
        # left compartments lie on the participant's left: smaller world x in RAS+
        ijk = {k: np.argwhere(L == k).mean(axis=0) for k in (1, 2, 3, 4)}
        world = {k: nib.affines.apply_affine(w.affine, v) for k, v in ijk.items()}
        assert world[1][0] < world[2][0] and world[3][0] < world[4][0]
        # autochthonous muscles are posterior to psoas
        assert world[1][1] < world[3][1] and world[2][1] < world[4][1]


def test_truth_table_matches_label_maps_and_cohort_targets(small_cohort):
    root, _ = small_cohort
    preset = PRESETS["fast"]
    for d in _deliveries(root):
        truth = pl.read_csv(root / "truth" / d.name / "participants.csv")
        assert truth.height == len(json.loads((d / "manifest.json").read_text())["participants"])
        for row in truth.iter_rows(named=True):
            L = np.asarray(nib.load(root / "truth" / d.name / "labels" / f"{row['pseudonym']}_labels.nii.gz").dataobj)
            vol = np.bincount(L.ravel(), minlength=5) * preset.voxel_ml
            assert abs(vol[1] - row["autochthonous_left_compartment_ml"]) < 1e-6
            assert abs(vol[4] - row["psoas_right_compartment_ml"]) < 1e-6
            assert abs(vol[1:].sum() - row["compartment_ml"]) < 1e-6
            # the rendered anatomy realises the cohort model's values
            assert abs(row["imat_pct_true"] - row["imat_pct_latent"]) < 0.15
            assert abs(row["lmm_index_true"] / row["lmm_index_latent"] - 1) < 0.01
            assert abs(row["lean_ml"] - (row["compartment_ml"] - row["fat_ml"])) < 1e-6


def test_dixon_signal_is_physical(small_cohort):
    """Fat dominates subcutaneous fat, water dominates lean muscle, except in fat-water-swapped scans."""
    root, _ = small_cohort
    d = _deliveries(root)[1]
    truth = pl.read_csv(root / "truth" / d.name / "participants.csv")
    for row in truth.iter_rows(named=True):
        w = np.asarray(nib.load(d / scan_relpath(row["pseudonym"], "water")).dataobj).astype(float)
        f = np.asarray(nib.load(d / scan_relpath(row["pseudonym"], "fat")).dataobj).astype(float)
        L = np.asarray(nib.load(root / "truth" / d.name / "labels" / f"{row['pseudonym']}_labels.nii.gz").dataobj)
        muscle = L > 0
        ff = f[muscle] / np.maximum(w[muscle] + f[muscle], 1)
        share_fat = float((ff >= 0.5).mean())
        if row["fat_water_swap"] == "none":
            # measured fat share close to the true InterMAT (noise and bias move it only a little)
            assert abs(100 * share_fat - row["imat_pct_true"]) < 3.0
            assert np.median(ff) < 0.2
        assert np.isfinite(w).all() and np.isfinite(f).all()
        assert w.max() > 300 and f.max() > 300


def test_ground_truth_is_outside_the_landing_zone(small_cohort):
    root, res = small_cohort
    for t in res.truth_dirs:
        assert (root / "landing") not in t.parents
    assert not list((root / "landing").rglob("*labels*"))
    assert not list((root / "landing").rglob("participants.csv"))
    cohort = json.loads((root / "truth" / "cohort-sim7.json").read_text())
    assert cohort["seed"] == 7 and cohort["participants"] == 24
    assert set(cohort["site_effects"]) == set(SITES)
    assert abs(np.exp(2 * cohort["true_log_odds_per_sd"]["cbp"]["lmm"]) - 0.87) < 1e-9
    assert abs(np.exp(2 * cohort["true_log_odds_per_sd"]["nrs_ge_4"]["lmm"]) - 0.63) < 1e-9
