"""`cbp synth --faults` injects each fault kind as recorded in the truth, and leaves the others intact."""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest

from cbp_platform.imaging.nifti import sha256_file
from cbp_platform.landing import COVARIATE_COLUMNS, scan_relpath
from cbp_platform.synth.faults import FAULT_KINDS


def _faults(root: Path) -> pl.DataFrame:
    return pl.concat([pl.read_csv(p, infer_schema=False) for p in sorted((root / "truth").glob("*/faults.csv"))])


def _manifest(root: Path, did: str) -> dict:
    return json.loads((root / "landing" / did / "manifest.json").read_text())


def _gunzip_fails(path: Path) -> bool:
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error):
        return True
    return False


def _cov_rows(root: Path, did: str) -> list[list[str]]:
    with (root / "landing" / did / "covariates.csv").open() as fh:
        return list(csv.reader(fh))[1:]


def test_every_fault_kind_injected_twice(faulty_cohort):
    root, res = faulty_cohort
    f = _faults(root)
    assert f.height == 20 == len(res.faults)
    counts = dict(f.group_by("fault").len().iter_rows())
    assert counts == {k: 2 for k in FAULT_KINDS}
    truth = pl.concat([pl.read_csv(p) for p in sorted((root / "truth").glob("*/participants.csv"))])
    assert truth.filter(pl.col("fault").is_not_null() & (pl.col("fault") != "")).height == 20


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_fault_is_observable_as_recorded(faulty_cohort, kind):
    root, _ = faulty_cohort
    rows = _faults(root).filter(pl.col("fault") == kind)
    assert rows.height == 2
    for r in rows.iter_rows(named=True):
        did, p = r["delivery_id"], r["pseudonym"]
        d = root / "landing" / did
        man = _manifest(root, did)
        listed = {f["path"]: f for f in man["files"]}
        water, fat = d / scan_relpath(p, "water"), d / scan_relpath(p, "fat")
        if kind == "corrupt_gzip":
            assert _gunzip_fails(water) and not _gunzip_fails(fat)
            assert listed[scan_relpath(p, "water")]["sha256"] == sha256_file(water)  # corrupt at the source
        elif kind == "truncated_gzip":
            assert _gunzip_fails(fat) and not _gunzip_fails(water)
            assert listed[scan_relpath(p, "fat")]["size"] == fat.stat().st_size
        elif kind == "missing_fat":
            assert not fat.exists() and scan_relpath(p, "fat") not in listed and water.exists()
        elif kind == "shape_mismatch":
            assert nib.load(water).shape != nib.load(fat).shape
        elif kind == "affine_mismatch":
            assert nib.load(water).shape == nib.load(fat).shape
            assert not np.allclose(nib.load(water).affine, nib.load(fat).affine)
        elif kind == "nan_values":
            assert np.isnan(np.asarray(nib.load(water).dataobj)).any()
        elif kind == "checksum_mismatch":
            assert listed[scan_relpath(p, "water")]["sha256"] != sha256_file(water)
            assert listed[scan_relpath(p, "water")]["size"] == water.stat().st_size
        elif kind in ("malformed_covariate_row", "out_of_range_covariate"):
            row = [x for x in _cov_rows(root, did) if x[0] == p]
            assert len(row) == 1
            cells = row[0]
            if kind == "malformed_covariate_row":
                bad = len(cells) != len(COVARIATE_COLUMNS)
                if not bad:
                    rec = dict(zip(COVARIATE_COLUMNS, cells))
                    try:
                        float(rec["height_cm"])
                        np.datetime64(rec["exam_date"])
                    except ValueError:
                        bad = True
                assert bad, cells
            else:
                rec = dict(zip(COVARIATE_COLUMNS, cells))
                age, h, w = int(rec["age"]), float(rec["height_cm"]), float(rec["weight_kg"])
                nrs = int(rec["nrs_pain"]) if rec["nrs_pain"] else 0
                met = int(rec["met_min_week"]) if rec["met_min_week"] else 0
                assert not (19 <= age <= 74 and 120 <= h <= 220 and 30 <= w <= 250 and 0 <= nrs <= 10 and met >= 0)
        elif kind == "duplicate_pseudonym":
            earlier = [x.name for x in sorted((root / "landing").iterdir()) if x.name < did]
            assert any(p in _manifest(root, e)["participants"] for e in earlier)


def test_good_participants_are_untouched(faulty_cohort):
    root, _ = faulty_cohort
    bad = set(_faults(root)["pseudonym"].to_list())
    for did_dir in sorted((root / "landing").iterdir()):
        man = _manifest(root, did_dir.name)
        for f in man["files"]:
            if f.get("pseudonym") in bad or "pseudonym" not in f:
                continue
            path = did_dir / f["path"]
            assert sha256_file(path) == f["sha256"]
            img = nib.load(path)
            assert img.shape == (96, 72, 48) and np.isfinite(np.asarray(img.dataobj)).all()
        for cells in _cov_rows(root, did_dir.name):
            if cells[0] not in bad:
                assert len(cells) == len(COVARIATE_COLUMNS)
                assert 19 <= int(cells[3]) <= 74
