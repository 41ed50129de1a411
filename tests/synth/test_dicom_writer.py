"""The simulated scanner's DICOM series convert back, with dcm2niix (the PyPI wheel's binary), to the volume and
the geometry they were written from."""

import subprocess
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from cbp_platform.synth.dicom import FakeIdentity, write_series
from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom


def _dcm2niix(src: Path, out: Path) -> Path:
    import dcm2niix

    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([dcm2niix.bin, "-z", "y", "-b", "n", "-f", "vol", "-o", str(out), str(src)], check=True,
                   capture_output=True)
    (nii,) = out.glob("vol*.nii.gz")
    return nii


def test_a_station_series_converts_back_to_its_voxels_and_world_geometry(tmp_path):
    s = Subject(female=True, age=50.0, height_cm=168.0, weight_kg=70.0, imat_pct=8.0, mfi=0.1,
                lean_ml=(300.0, 300.0, 150.0, 150.0))
    ph = render_phantom(s, PRESETS["fast"], np.random.default_rng(3))
    k0, k1 = 5, ph.water.shape[2] - 4
    files = write_series(ph.water, ph.affine, tmp_path / "dicom", contrast="water", station=2, k_range=(k0, k1),
                         pseudonym="PPPPPPPPPP", seed=3, acquired=datetime(2016, 3, 4, 10, 15, 30))
    assert len(files) == k1 - k0
    ds = pydicom.dcmread(files[0])
    assert ds.SeriesDescription == "3D_GRE_TRA_W" and ds.ProtocolName == "3D_GRE_TRA_S2"
    assert list(ds.ImageType)[-2:] == ["DIXON", "WATER"] and ds.PatientName == FakeIdentity().patient_name
    img = nib.as_closest_canonical(nib.load(_dcm2niix(tmp_path / "dicom", tmp_path / "nii")))
    sub = ph.affine.copy()
    sub[:3, 3] = ph.affine[:3, :3] @ np.array([0, 0, k0]) + ph.affine[:3, 3]     # the station's first slice
    want = nib.as_closest_canonical(nib.Nifti1Image(ph.water[:, :, k0:k1], sub))
    np.testing.assert_allclose(img.affine, want.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(want.dataobj))


def test_the_same_seed_writes_the_same_bytes(tmp_path):
    vol = (np.arange(24 * 20 * 6, dtype=np.int16).reshape(24, 20, 6) % 500)
    aff = np.diag([-1.4, 1.4, 3.0, 1.0])
    kw = dict(contrast="fat", station=1, k_range=(0, 6), pseudonym="PPPPPPPPPP", seed=9,
              acquired=datetime(2016, 3, 4, 10, 0, 0))
    a = write_series(vol, aff, tmp_path / "a", **kw)
    b = write_series(vol, aff, tmp_path / "b", **kw)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_anisotropic_in_plane_spacing_and_a_random_volume_survive_the_round_trip(tmp_path):
    vol = np.random.default_rng(1).integers(1, 1000, (30, 20, 8)).astype(np.int16)
    aff = np.array([[-1.4, 0, 0, 20.0], [0, 2.0, 0, -15.0], [0, 0, 3.0, -80.0], [0, 0, 0, 1.0]])
    write_series(vol, aff, tmp_path / "d", contrast="opp", station=4, k_range=(0, 8), pseudonym="PPPPPPPPPP",
                 seed=1, acquired=datetime(2016, 1, 1))
    img = nib.as_closest_canonical(nib.load(_dcm2niix(tmp_path / "d", tmp_path / "n")))
    want = nib.as_closest_canonical(nib.Nifti1Image(vol, aff))
    np.testing.assert_allclose(img.affine, want.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(want.dataobj))
