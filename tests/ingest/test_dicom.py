"""DICOM ingestion of one participant (no Dagster): from the simulated scanner's zips to stitched volumes, checked
against the phantom they were written from, and every refusal with its reason."""

from __future__ import annotations

import gzip
import io
import json
import re
import struct
import zipfile
from datetime import datetime, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cbp_platform.imaging.nifti import sha256_bytes
from cbp_platform.ingest.dicom import DicomRules, inspect_dicom_participant, stitch
from cbp_platform.ingest.scans import ScanProblem
from cbp_platform.landing import dicom_relpath
from cbp_platform.synth.dicom import CONTRASTS as SYNTH_CONTRASTS
from cbp_platform.synth.dicom import (SERIES_PREFIX, UID_ROOT, FakeIdentity, StationPlan, enhanced_series,
                                      participant_zips, plan_stations, series_slices, station_ranges, uid)
from cbp_platform.synth.faults import EXPECTED_REASONS
from tests.support.dicom import members, no_preamble, series_of, with_members, zip_of
from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom

P = "PPPPPPPPPP"
EXAM = datetime(2016, 5, 4, 9, 0)


@pytest.fixture(scope="module")
def phantom():
    s = Subject(female=False, age=55.0, height_cm=178.0, weight_kg=82.0, imat_pct=7.0, mfi=0.06,
                lean_ml=(420.0, 410.0, 130.0, 125.0))
    return render_phantom(s, PRESETS["fast"], np.random.default_rng(12), in_opp=True)


def _volumes(ph, in_opp=True):
    v = {"water": ph.water, "fat": ph.fat}
    if in_opp:
        v.update({"in": ph.in_phase, "opp": ph.opp_phase})
    return v


def _deliver(tmp: Path, zips: dict[str, bytes], extra: dict[str, bytes] | None = None):
    ddir = tmp / "landing" / "d1"
    files = {}
    for c, payload in {**{dicom_relpath(P, c): z for c, z in zips.items()}, **(extra or {})}.items():
        (ddir / c).parent.mkdir(parents=True, exist_ok=True)
        (ddir / c).write_bytes(payload)
        files[c] = {"path": c, "size": len(payload), "sha256": sha256_bytes(payload)}
    return ddir, files


def _ingest(tmp: Path, ddir: Path, files: dict, **kw):
    out = tmp / "derived" / "dicom" / "d1" / P
    return inspect_dicom_participant(ddir, P, files, out_dir=out, rel_out=f"derived/dicom/d1/{P}", **kw)


def _plan(ph, fault="", swap="none", composed=False) -> StationPlan:
    return plan_stations(ph.water.shape[2], fault, swap, np.random.default_rng(0), composed=composed)


def test_stations_overlap_and_cover_the_volume():
    for nz in (48, 96, 61):
        st = station_ranges(nz)
        assert len(st) == 4 and st[0][0] == 0 and st[-1][1] == nz
        assert all(b[0] < a[1] for a, b in zip(st, st[1:]))          # each overlaps the next
        assert len({k1 - k0 for k0, k1 in st}) == 1


def test_stitched_volumes_equal_the_phantom_and_keep_its_geometry(tmp_path, phantom):
    ph = phantom
    ddir, files = _deliver(tmp_path, participant_zips(_volumes(ph), ph.affine, _plan(ph), pseudonym=P, seed=1,
                                                      exam=EXAM))
    res = _ingest(tmp_path, ddir, files)
    f = res.facts
    assert (f["stations"], f["superseded_series"], f["ignored_files"], f["channels"]) == (4, 0, 0, "water,fat,in,opp")
    for c, want in (("water", ph.water), ("fat", ph.fat), ("in", ph.in_phase), ("opp", ph.opp_phase)):
        img = nib.load(tmp_path / f[f"{c}_path"])
        np.testing.assert_allclose(img.affine, ph.affine, atol=1e-3)          # geometry: the phantom's
        np.testing.assert_array_equal(np.asarray(img.dataobj), want)           # stations on its lattice: exact
        assert sha256_bytes((tmp_path / f[f"{c}_path"]).read_bytes()) == f[f"{c}_sha256"]
    # provenance: every DICOM file read, and each zip
    n_files = sum(len(zipfile.ZipFile(io.BytesIO((ddir / z).read_bytes())).namelist()) for z in files)
    assert f["dicom_files"] == n_files == sum(1 for k in res.inputs if "#" in k)
    assert all(res.inputs[z] == files[z]["sha256"] for z in files)
    side = json.loads((tmp_path / "derived" / "dicom" / "d1" / P / f"{P}_dixon.json").read_text())
    assert side["source"] == "stations" and [s["station"] for s in side["stations"]] == [1, 2, 3, 4]
    assert side["stitching"]["resampled_stations"] == 0
    assert not list((tmp_path / "derived" / "dicom" / ".work").iterdir())    # the work folder is cleaned


def test_the_sidecar_and_volumes_hold_no_identifying_header_value(tmp_path, phantom):
    ph = phantom
    ddir, files = _deliver(tmp_path, participant_zips(_volumes(ph, False), ph.affine, _plan(ph), pseudonym=P,
                                                      seed=1, exam=EXAM))
    res = _ingest(tmp_path, ddir, files)
    ident = FakeIdentity()
    secrets = [ident.patient_name, "Mustermann", ident.birth_date, ident.institution, ident.referring,
               "1.2.826.0.1.3680043.10.1234", EXAM.strftime("%Y%m%d")]
    import gzip

    blobs = [gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
             for p in (tmp_path / "derived").rglob("*") if p.is_file()]
    blobs.append(json.dumps(res.facts).encode())
    assert len(blobs) >= 3
    assert [s for s in secrets if any(s.encode() in b for b in blobs)] == []


def test_a_repeated_station_keeps_the_newer_series(tmp_path, phantom):
    ph = phantom
    ddir, files = _deliver(tmp_path, participant_zips(_volumes(ph, False), ph.affine, _plan(ph, "repeated_station"),
                                                      pseudonym=P, seed=1, exam=EXAM))
    f = _ingest(tmp_path, ddir, files).facts
    assert f["superseded_series"] == 2                      # water and fat of station 2
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / f["water_path"]).dataobj), ph.water)


def test_non_dicom_files_and_other_modalities_are_ignored_and_counted(tmp_path, phantom):
    ph = phantom
    for fault in ("non_dicom_file", "other_modality"):
        ddir, files = _deliver(tmp_path / fault, participant_zips(_volumes(ph, False), ph.affine, _plan(ph, fault),
                                                                  pseudonym=P, seed=1, exam=EXAM))
        res = _ingest(tmp_path / fault, ddir, files)
        assert res.facts["ignored_files"] == 1
        why = res.sidecar["ignored_files"][0]["why"]
        assert why == ("not a DICOM file" if fault == "non_dicom_file" else "a series of modality OT")
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / fault / res.facts["fat_path"]).dataobj), ph.fat)


@pytest.mark.parametrize("fault, words", [
    ("missing_station", "station 2 of 1-4 not delivered"),
    ("missing_slice", "water station 3: 1 slice missing"),
    ("water_fat_grid", "fat station 3: grid differs"),
    ("swapped_station", "water station 2: water and fat appear exchanged"),
])
def test_each_station_fault_has_its_own_reason(tmp_path, phantom, fault, words):
    ph = phantom
    ddir, files = _deliver(tmp_path, participant_zips(_volumes(ph), ph.affine, _plan(ph, fault), pseudonym=P, seed=1,
                                                      exam=EXAM))
    with pytest.raises(ScanProblem) as e:
        _ingest(tmp_path, ddir, files)
    assert e.value.reason in EXPECTED_REASONS[fault] and words in e.value.message, e.value
    assert P not in e.value.message
    assert not (tmp_path / "derived" / "dicom" / "d1" / P).exists()    # nothing half-written is left


def test_in_phase_inconsistent_with_water_plus_fat_is_refused(tmp_path, phantom):
    ph = phantom
    vols = _volumes(ph)
    vols["in"] = (ph.water.astype(np.int32) * 2 + 10).clip(0, 32767).astype(np.int16)   # not W + F
    ddir, files = _deliver(tmp_path, participant_zips(vols, ph.affine, _plan(ph), pseudonym=P, seed=1, exam=EXAM))
    with pytest.raises(ScanProblem) as e:
        _ingest(tmp_path, ddir, files)
    assert e.value.reason == "in_phase_inconsistent"


def test_a_missing_end_station_leaves_the_field_of_view_too_short(tmp_path, phantom):
    ph = phantom
    plan = _plan(ph)
    plan.stations = plan.stations[:3]                      # the scanner stopped after station 3
    ddir, files = _deliver(tmp_path, participant_zips(_volumes(ph, False), ph.affine, plan, pseudonym=P, seed=1,
                                                      exam=EXAM))
    with pytest.raises(ScanProblem) as e:
        _ingest(tmp_path, ddir, files)
    assert e.value.reason == "fov_too_short" and "covers 222 mm" in e.value.message


def test_the_composed_series_stands_in_for_incomplete_stations(tmp_path, phantom):
    ph = phantom
    ddir, files = _deliver(tmp_path, participant_zips(_volumes(ph, False), ph.affine,
                                                      _plan(ph, "missing_station", composed=True), pseudonym=P,
                                                      seed=1, exam=EXAM))
    res = _ingest(tmp_path, ddir, files)
    assert res.sidecar["source"] == "composed" and res.sidecar["why_composed"].startswith("station_gap")
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / res.facts["water_path"]).dataobj), ph.water)


# ---------------------------------------------------------------------------------------------------------
# stitching on its own


def test_blending_ramps_across_the_overlap_and_preserves_the_fat_fraction():
    aff = np.diag([-2.0, 2.0, 3.0, 1.0])
    low, high = aff.copy(), aff.copy()
    high[2, 3] = 3.0 * 10                                      # station 2 starts at slice 10: 6 slices overlap
    a = np.stack([np.full((8, 6, 16), 100.0), np.full((8, 6, 16), 50.0)])     # water, fat: FF 1/3
    b = np.stack([np.full((8, 6, 16), 200.0), np.full((8, 6, 16), 100.0)])
    (w, f), info = stitch([(low, a), (high, b)], aff, (8, 6, 26), contrasts=2)
    assert info["resampled_stations"] == 0
    col = w[0, 0]
    assert (col[:10] == 100).all() and (col[16:] == 200).all()
    assert (np.diff(col[9:17]) > 0).all()                      # a monotone ramp over the overlap
    np.testing.assert_allclose(f / (w + f), 1 / 3, rtol=1e-6)  # the same weights for water and fat


def test_a_station_off_the_lattice_is_resampled_within_interpolation_error():
    aff = np.diag([-2.0, 2.0, 3.0, 1.0])
    z = lambda k0, n: 3.0 * (k0 + np.arange(n))                   # noqa: E731  world z of a station's slices
    ramp = lambda zz: np.broadcast_to(10.0 + 2.0 * zz, (8, 6, len(zz)))  # noqa: E731  linear in z
    low = aff.copy()
    high = aff.copy()
    high[2, 3] = 3.0 * 9.5                                      # half a slice off the target lattice
    a = ramp(z(0, 14))[None]
    b = ramp(z(9.5, 14))[None]
    (w,), info = stitch([(low, a), (high, b)], aff, (8, 6, 22), contrasts=1)
    assert info["resampled_stations"] == 1
    np.testing.assert_allclose(w[0, 0, :21], 10.0 + 2.0 * z(0, 21), atol=1e-3)   # linear: trilinear is exact


# ---------------------------------------------------------------------------------------------------------
# bounded: bombs and huge series are refused before they fill memory or disk




def test_a_zip_declaring_a_huge_file_is_refused_before_extracting(tmp_path):
    bomb = zip_of([("a/IM0001.dcm", bytes(80 << 20))])           # 80 MiB of zeros, ~80 KB on disk
    assert len(bomb) < 1 << 20
    ddir, files = _deliver(tmp_path, {"water": bomb})
    with pytest.raises(ScanProblem) as e:
        _ingest(tmp_path, ddir, files)
    assert e.value.reason == "zip_too_large" and "refused before extracting" in e.value.message
    with pytest.raises(ScanProblem) as e:
        _ingest(tmp_path, ddir, files, rules=DicomRules(max_member_bytes=1 << 30, max_participant_bytes=64 << 20))
    assert e.value.reason == "zip_too_large" and "GiB uncompressed" in e.value.message
    assert not any((tmp_path / "derived" / "dicom" / ".work").iterdir())


def test_a_zip_whose_headers_lie_about_the_size_stops_at_the_declared_size(tmp_path):
    payload = zip_of([("a/IM0001.dcm", bytes(8 << 20))])
    # shrink the declared uncompressed size (local header and central directory) to 1000 bytes
    raw = bytearray(payload)
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        i = raw.find(sig)
        raw[i + off:i + off + 4] = struct.pack("<I", 1000)
    ddir, files = _deliver(tmp_path, {"water": bytes(raw)})
    with pytest.raises(ScanProblem) as e:
        _ingest(tmp_path, ddir, files)
    assert e.value.reason == "corrupt_zip" and "CRC check failed" in e.value.message
    assert "IM0001" not in e.value.message                     # member names never reach a message
    assert not any((tmp_path / "derived" / "dicom" / ".work").iterdir())


def test_a_huge_series_is_refused_from_its_headers(tmp_path):
    """Headers declaring 1024 x 1024 x 70 slices of 16 bits (140 MiB) are refused before any pixel is decoded
    (the files carry no pixel data at all: only the headers are read first)."""
    import pydicom

    aff = np.diag([-0.4, 0.4, 3.0, 1.0])
    items = []
    for c in ("water", "fat"):
        _, slices = series_slices(np.ones((16, 16, 70), np.uint16), aff, contrast=c, station=1, k_range=(0, 70),
                                  pseudonym=P, seed=1, acquired=EXAM)
        for n, b in enumerate(slices):
            ds = pydicom.dcmread(io.BytesIO(b))
            ds.Rows = ds.Columns = 1024
            del ds.PixelData
            out = io.BytesIO()
            ds.save_as(out)
            items.append((f"{c}/IM{n}.dcm", out.getvalue()))
    ddir, files = _deliver(tmp_path, {"water": zip_of(items)})
    with pytest.raises(ScanProblem) as e:
        _ingest(tmp_path, ddir, files)
    assert e.value.reason == "series_too_large" and "140 MiB" in e.value.message, e.value


def test_a_file_with_the_dicom_preamble_that_does_not_parse_is_unreadable(tmp_path):
    ddir, files = _deliver(tmp_path, {"water": zip_of([("x/IM1.dcm", bytes(128) + b"DICM" + b"\xff" * 40)])})
    with pytest.raises(ScanProblem) as e:
        _ingest(tmp_path, ddir, files)
    assert e.value.reason == "unreadable_dicom" and "member 0" in e.value.message


def test_a_zip_listed_with_a_wrong_checksum_is_refused(tmp_path, phantom):
    ph = phantom
    ddir, files = _deliver(tmp_path, participant_zips(_volumes(ph, False), ph.affine, _plan(ph), pseudonym=P, seed=1,
                                                      exam=EXAM))
    rel = dicom_relpath(P, "fat")
    files[rel] = {**files[rel], "sha256": "0" * 64}
    with pytest.raises(ScanProblem) as e:
        _ingest(tmp_path, ddir, files)
    assert e.value.reason == "checksum_mismatch" and "DICOM zip (files[" in e.value.message


def test_a_coronal_stack_gets_the_shape_and_affine_nibabel_gives_it_in_las_order():
    """The header-derived geometry follows the orientation transform's permutation, not only the axial case."""
    from cbp_platform.ingest.dicom import DICOM_RULES, _Series, _Slice, _stack

    row, col = np.array([1.0, 0, 0]), np.array([0, 0, -1.0])           # rows along x, columns down z
    normal = np.cross(row, col)
    s = _Series("u", "water", 1, False, "", 1, {},
                [_Slice(Path("x"), k * 3.0 * normal, np.r_[row, col], (2.0, 1.5), (20, 30)) for k in range(7)])
    _stack(s, DICOM_RULES)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * 1.5, col * 2.0, normal * 3.0
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    ornt = nib.orientations.ornt_transform(nib.io_orientation(ras), nib.orientations.axcodes2ornt(("L", "A", "S")))
    want = nib.Nifti1Image(np.zeros((30, 20, 7), np.uint8), ras).as_reoriented(ornt)
    assert s.shape == want.shape == (30, 7, 20)
    np.testing.assert_allclose(s.affine, want.affine, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# DICOM as exports really come (issue 26): one person per participant, DICOMDIR, no preamble, water and fat in
# one series, the converter's own words, a slice cut short, free text never copied. Every case is the
# simulator's output, edited the way exports differ.

Q = "QQQQQQQQQQ"                     # another participant






def _edited(zips: dict[str, bytes], select, change) -> dict[str, bytes]:
    """``zips`` with each selected member's header changed by ``change(ds)``; saved as a standard file unless
    ``change`` returns the bytes to store."""
    import pydicom

    out = {}
    for c, payload in zips.items():
        items = []
        for name, b in members(payload):
            if select(name):
                ds = pydicom.dcmread(io.BytesIO(b))
                b2 = change(ds)
                if b2 is None:
                    buf = io.BytesIO()
                    ds.save_as(buf, enforce_file_format=True)
                    b2 = buf.getvalue()
                b = b2
            items.append((name, b))
        out[c] = zip_of(items)
    return out




def _zips(ph, plan=None, in_opp=False) -> dict[str, bytes]:
    return participant_zips(_volumes(ph, in_opp), ph.affine, plan or _plan(ph), pseudonym=P, seed=1, exam=EXAM)


def _refused(tmp: Path, zips: dict[str, bytes]) -> ScanProblem:
    ddir, files = _deliver(tmp, zips)
    with pytest.raises(ScanProblem) as e:
        _ingest(tmp, ddir, files)
    assert P not in e.value.message and Q not in e.value.message and UID_ROOT[:-1] not in e.value.message
    assert not (tmp / "derived" / "dicom" / "d1" / P).exists()
    return e.value


def _water(tmp: Path, res) -> np.ndarray:
    return np.asarray(nib.load(tmp / res.facts["water_path"]).dataobj)


def test_a_newer_station_of_another_participant_is_not_taken_for_a_repeat(tmp_path, phantom):
    """Participant B's station 2, acquired later, in A's zips: by date it would replace A's station 2 as a
    repeat (a third of the water voxels another person's); PatientID tells it apart."""
    ph = phantom
    plan = _plan(ph)
    zips = _zips(ph, plan)
    for c in ("water", "fat"):
        other = np.roll(getattr(ph, c), 9, axis=1)                     # another body
        _, slices = series_slices(other, ph.affine, contrast=c, station=2, k_range=plan.stations[1], pseudonym=Q,
                                  seed=2, acquired=EXAM + timedelta(hours=2))
        zips[c] = with_members(zips[c], [(f"0121_{c}/IM{n:04d}.dcm", b) for n, b in enumerate(slices, start=1)])
    e = _refused(tmp_path, zips)
    assert e.reason == "participant_mismatch" and "station 2: PatientID differs" in e.message, e


@pytest.mark.parametrize("field, contrasts, words", [
    ("PatientID", ("water",), "water station 3: PatientID differs from the participant's other series"),
    ("StudyInstanceUID", ("water", "fat"), "water station 3: StudyInstanceUID differs from the other stations'"),
    ("FrameOfReferenceUID", ("water", "fat"), "water station 3: FrameOfReferenceUID differs from the other stations'"),
    ("FrameOfReferenceUID", ("fat",), "fat station 3: FrameOfReferenceUID differs from the other series of its "
                                      "station"),
])
def test_a_station_of_another_person_or_examination_is_refused(tmp_path, phantom, field, contrasts, words):
    ph = phantom
    value = Q if field == "PatientID" else uid("another examination", field)
    e = _refused(tmp_path, _edited(_zips(ph), series_of(3, *contrasts), lambda ds: setattr(ds, field, value)))
    assert e.reason == "participant_mismatch" and words in e.message, e
    assert value not in e.message and field in e.message


def test_stations_each_with_their_own_frame_of_reference_are_accepted(tmp_path, phantom):
    """Some scanners start a frame of reference (even a study) per table position: no two stations share one."""
    ph = phantom
    zips = _zips(ph)
    for s in range(1, 5):
        zips = _edited(zips, series_of(s, "water", "fat"), lambda ds, s=s: setattr(ds, "FrameOfReferenceUID",
                                                                            uid("frame", s)))
    ddir, files = _deliver(tmp_path, zips)
    res = _ingest(tmp_path, ddir, files)
    np.testing.assert_array_equal(_water(tmp_path, res), ph.water)


def test_a_dicomdir_is_ignored_and_counted(tmp_path, phantom):
    """A real DICOMDIR (written by pydicom's FileSet) named DICOMDIR in any case, or by its SOP class only."""
    import pydicom
    from pydicom.fileset import FileSet

    ph = phantom
    zips = _zips(ph)
    fs = FileSet()
    for _name, b in members(zips["water"])[:3]:
        ds = pydicom.dcmread(io.BytesIO(b))
        ds.StudyID = "1"                                       # what a DICOMDIR's study record needs
        fs.add(ds)
    fs.write(tmp_path / "export")
    dicomdir = (tmp_path / "export" / "DICOMDIR").read_bytes()
    assert pydicom.dcmread(io.BytesIO(dicomdir)).file_meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10"
    zips["water"] = with_members(zips["water"], [("EXPORT/DICOMDIR", dicomdir), ("export2/dicomdir", dicomdir),
                                          ("export3/INDEX", dicomdir)])
    ddir, files = _deliver(tmp_path / "d", zips)
    res = _ingest(tmp_path / "d", ddir, files)
    assert res.facts["ignored_files"] == 3
    assert [i["why"] for i in res.sidecar["ignored_files"]] == ["a DICOMDIR (the export's index)"] * 3
    np.testing.assert_array_equal(_water(tmp_path / "d", res), ph.water)


def _bare(ds) -> bytes:
    """The data set alone: no preamble, no file meta, implicit VR little endian (an old ACR-NEMA-like export)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    return fp.getvalue()




def test_dicom_files_without_the_preamble_are_read_when_they_parse(tmp_path, phantom):
    ph = phantom
    zips = _edited(_zips(ph), series_of(2, "water"), _bare)
    zips = _edited(zips, series_of(2, "fat"), no_preamble)
    zips["water"] = with_members(zips["water"], [("NOTE.TXT", b"exported by the PACS\n")])
    ddir, files = _deliver(tmp_path, zips)
    res = _ingest(tmp_path, ddir, files)
    assert res.facts["ignored_files"] == 1 and res.sidecar["ignored_files"][0]["why"] == "not a DICOM file"
    np.testing.assert_array_equal(_water(tmp_path, res), ph.water)
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / res.facts["fat_path"]).dataobj), ph.fat)


def test_files_without_the_preamble_that_do_not_parse_are_named_when_no_water_is_left(tmp_path, phantom):
    ph = phantom
    zips = _zips(ph)
    zips["water"] = zip_of([(f"w/IM{n}", b"\x00\x01 not an image " * 40 + bytes([n])) for n in range(5)])
    e = _refused(tmp_path, zips)
    assert e.reason == "unreadable_dicom" and "no water series, and 5 files without the DICOM preamble" in e.message
    assert "member 0" in e.message


def test_water_and_fat_in_one_series_are_split_by_image_type(tmp_path, phantom):
    ph = phantom
    zips = _zips(ph)
    import pydicom

    station2_water = pydicom.dcmread(io.BytesIO(next(b for n, b in members(zips["water"]) if series_of(2, "water")(n))))

    def one_series(ds):
        ds.SeriesInstanceUID, ds.SeriesNumber = station2_water.SeriesInstanceUID, 21
        ds.SeriesDescription = "3D_GRE_TRA_DIXON"

    ddir, files = _deliver(tmp_path, _edited(zips, series_of(2, "water", "fat"), one_series))
    res = _ingest(tmp_path, ddir, files)
    assert res.facts["dicom_series"] == 8
    np.testing.assert_array_equal(_water(tmp_path, res), ph.water)
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / res.facts["fat_path"]).dataobj), ph.fat)

    def mixed(ds):
        one_series(ds)
        ds.SeriesDescription = "3D_GRE_TRA_W" if "WATER" in ds.ImageType else "3D_GRE_TRA_F"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "DIXON"]

    e = _refused(tmp_path / "mixed", _edited(zips, series_of(2, "water", "fat"), mixed))
    assert e.reason == "mixed_series" and e.message.startswith("water station 2: one series holds water and fat"), e


def test_a_deflated_series_is_inflated_before_conversion(tmp_path, phantom):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ph = phantom

    def deflate(ds):
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian

    zips = _edited(_zips(ph), series_of(2, "water", "fat"), deflate)
    name, b = next((n, b) for n, b in members(zips["water"]) if series_of(2, "water")(n))
    assert b"1.2.840.10008.1.2.1.99" in b[:400]
    ddir, files = _deliver(tmp_path, zips)
    res = _ingest(tmp_path, ddir, files)
    np.testing.assert_array_equal(_water(tmp_path, res), ph.water)


def test_a_series_the_converter_cannot_read_is_refused_in_its_own_words(tmp_path, phantom):
    """dcm2niix reads no MPEG-2 (nor deflated data sets, which are inflated for it: above); its line, with the
    series and the first slice of that transfer syntax, is the reason's message."""
    from pydicom.encaps import encapsulate

    ph = phantom

    def mpeg2(ds):
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
        ds.PixelData = encapsulate([ds.PixelData])
        ds["PixelData"].VR = "OB"

    e = _refused(tmp_path, _edited(_zips(ph), series_of(2, "water"), mpeg2))
    assert e.reason == "conversion_failed", e
    assert "Unsupported transfer syntax '1.2.840.10008.1.2.4.100'" in e.message, e
    assert "(from water station 2 slice 1: " in e.message and str(tmp_path) not in e.message and ".dcm" not in e.message


def test_the_converters_own_words_reach_the_reason_without_a_path(tmp_path):
    from cbp_platform.ingest.dicom import _converter_said, _Series

    work = tmp_path / ".work" / "p-x"
    todo = [_Series("1.2.3.4.5", "water", 2, False, "", 21, {}), _Series("1.2.3.4.6", "fat", 2, False, "", 22, {})]
    text = (f"Chris Rorden's dcm2niiX version v1.0\nFound 140 DICOM file(s)\n"
            f"Error: Unsupported transfer syntax '1.2.840.10008.1.2.4.100' {work}/series/all/001/00004.dcm\n"
            f"Warning: unable to read {work}/series/all/000 (series 1.2.826.0.1.3680043.10.1234.77)\n"
            f"Convert 70 DICOM as {work}/nifti/all/1.2.3.4.5 (64x64x70x1)\n")
    said = _converter_said(text, todo, work)
    assert said == ("Error: Unsupported transfer syntax '1.2.840.10008.1.2.4.100' fat station 2 slice 5; "
                    "Warning: unable to read water station 2 (series <uid>)")
    assert str(tmp_path) not in said and ".work" not in said


def test_a_slice_cut_inside_its_pixel_data_is_named(tmp_path, phantom):
    ph = phantom
    zips = _zips(ph)
    names = [n for n, _ in members(zips["water"])]
    target = [n for n in names if series_of(3, "water")(n)][4]                 # the 5th slice from the bottom
    zips = _edited(zips, lambda n: n == target, _cut)
    e = _refused(tmp_path, zips)
    n_slices = len([n for n in names if series_of(3, "water")(n)])
    role = "DICOM zip (files[0])"                          # the water zip, listed first by _deliver
    assert e.reason == "truncated_dicom", e
    assert re.match(rf"water station 3: slice \d+ of {n_slices} \({re.escape(role)} member {names.index(target)}\): "
                    r"the pixel data ends after \d+ of the \d+ bytes", e.message), e.message


def _cut(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()[:-1000]


# ---------------------------------------------------------------------------------------------------------
# enhanced (multi-frame) MR: one file per series, its frames the slices (the native export of current scanners)


def _enhanced_zips(ph, stations=(1, 2, 3, 4), in_opp=False, edit=None) -> dict[str, bytes]:
    """``_zips(ph)`` with ``stations``' series (every contrast) each replaced by ONE enhanced MR file written from
    the same volume, series number and acquisition time; ``edit(contrast, station, bytes)`` may change a file."""
    plan = _plan(ph)
    out = {}
    for c, payload in _zips(ph, plan, in_opp).items():
        kept = [(n, b) for n, b in members(payload) if not any(series_of(s, c)(n) for s in stations)]
        for s in stations:
            number = 10 * s + list(SYNTH_CONTRASTS).index(c) + 1
            _, b = enhanced_series(_volumes(ph, in_opp)[c], ph.affine, contrast=c, station=s,
                                   k_range=plan.stations[s - 1], pseudonym=P, seed=1,
                                   acquired=EXAM + timedelta(seconds=95 * s), series_number=number)
            b = edit(c, s, b) if edit else b
            kept.append((f"{number:04d}_{SERIES_PREFIX}_{SYNTH_CONTRASTS[c][0]}/ENHANCED.dcm", b))
        out[c] = zip_of(kept)
    return out


def test_the_simulators_enhanced_file_is_one_multi_frame_series():
    import pydicom

    aff = np.diag([-2.0, 2.0, 3.0, 1.0])
    vol = np.arange(6 * 5 * 9, dtype=np.uint16).reshape(6, 5, 9)
    kw = dict(contrast="fat", station=2, k_range=(2, 8), pseudonym=P, seed=1, acquired=EXAM)
    series, b = enhanced_series(vol, aff, **kw)
    classic_series, slices = series_slices(vol, aff, **kw)
    ds = pydicom.dcmread(io.BytesIO(b))
    assert series == classic_series and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1"
    assert ds.NumberOfFrames == 6 and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "M", "DIXON", "FAT"]
    assert "ImagePositionPatient" not in ds and "PixelSpacing" not in ds
    frames = [pydicom.dcmread(io.BytesIO(x)) for x in slices]
    assert [list(f.PlanePositionSequence[0].ImagePositionPatient) for f in ds.PerFrameFunctionalGroupsSequence] \
        == [list(f.ImagePositionPatient) for f in frames]
    assert ds.PixelData == b"".join(f.PixelData for f in frames)
    assert enhanced_series(vol, aff, **kw)[1] == b                    # deterministic, like the classic series


def _ingest_zips(tmp: Path, zips: dict[str, bytes]):
    ddir, files = _deliver(tmp, zips)
    return _ingest(tmp, ddir, files)


def _volume(tmp: Path, res, c: str) -> nib.Nifti1Image:
    return nib.load(tmp / res.facts[f"{c}_path"])


def test_enhanced_stations_convert_as_the_classic_series_do(tmp_path, phantom):
    """Every station an enhanced file: the same stitched volumes (within one grey level), affine and sidecar
    header (TE, TR, flip angle and slice thickness from the functional groups) as the classic delivery."""
    ph = phantom
    classic = _ingest_zips(tmp_path / "classic", _zips(ph))
    enhanced = _ingest_zips(tmp_path / "enhanced", _enhanced_zips(ph))
    assert enhanced.facts["stations"] == 4 and enhanced.facts["dicom_files"] == 8       # 4 stations x 2 contrasts
    assert enhanced.facts["ignored_files"] == 0 and enhanced.sidecar["source"] == "stations"
    for c in ("water", "fat"):
        a, b = _volume(tmp_path / "classic", classic, c), _volume(tmp_path / "enhanced", enhanced, c)
        np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
        assert b.shape == a.shape
        assert np.abs(np.asarray(b.dataobj).astype(np.int32) - np.asarray(a.dataobj)).max() <= 1
    assert enhanced.sidecar["header"] == classic.sidecar["header"]
    assert {"EchoTime", "RepetitionTime", "FlipAngle", "SliceThickness"} <= set(enhanced.sidecar["header"]["water"])
    assert enhanced.sidecar["stations"] == classic.sidecar["stations"]


def test_a_participant_with_classic_and_enhanced_stations_converts(tmp_path, phantom):
    ph = phantom
    res = _ingest_zips(tmp_path, _enhanced_zips(ph, stations=(2, 4), in_opp=True))
    assert res.facts["stations"] == 4 and res.facts["channels"] == "water,fat,in,opp"
    for c, want in (("water", ph.water), ("fat", ph.fat), ("in", ph.in_phase), ("opp", ph.opp_phase)):
        img = _volume(tmp_path, res, c)
        np.testing.assert_allclose(img.affine, ph.affine, atol=1e-3)
        assert np.abs(np.asarray(img.dataobj).astype(np.int32) - want).max() <= 1, c


def _frames_edited(change):
    """An ``edit`` for :func:`_enhanced_zips`: water station 3's file, its data set changed by ``change(ds)``."""
    import pydicom

    def edit(c, s, b):
        if (c, s) != ("water", 3):
            return b
        ds = pydicom.dcmread(io.BytesIO(b))
        change(ds)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()
    return edit


def _drop_frame(ds, k=10):
    """Frame ``k`` (0-based) taken out: its functional groups and its pixels (a gap in the positions)."""
    n = ds.Rows * ds.Columns * 2
    del ds.PerFrameFunctionalGroupsSequence[k]
    ds.PixelData = ds.PixelData[:k * n] + ds.PixelData[(k + 1) * n:]
    ds.NumberOfFrames = int(ds.NumberOfFrames) - 1


def _tilt_frame(ds, k=5):
    """Frame ``k`` with an orientation of its own (per frame, overriding the shared one), tilted 2 degrees."""
    from pydicom import Dataset
    from pydicom.sequence import Sequence

    a = np.radians(2.0)
    iop = list(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient)
    row = np.array(iop[:3])
    tilted = [*(np.cos(a) * row + np.sin(a) * np.array([0, 0, 1.0])), *iop[3:]]
    item = Dataset()
    item.ImageOrientationPatient = [round(float(x), 6) for x in tilted]
    ds.PerFrameFunctionalGroupsSequence[k].PlaneOrientationSequence = Sequence([item])


def _fat_frame(ds, k=7):
    """Frame ``k`` typed FAT (its own MR image frame type) in the water file."""
    from pydicom import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.FrameType = ["ORIGINAL", "PRIMARY", "M", "FAT"]
    ds.PerFrameFunctionalGroupsSequence[k].MRImageFrameTypeSequence = Sequence([item])


def _no_position(ds, k=3):
    del ds.PerFrameFunctionalGroupsSequence[k].PlanePositionSequence


@pytest.mark.parametrize("change, reason, words", [
    (_drop_frame, "station_incomplete", "water station 3: 1 slice missing after slice 4 of 14"),
    (_tilt_frame, "station_incomplete", "water station 3: slices differ in orientation"),
    (_fat_frame, "mixed_series", "an enhanced MR file whose frames hold water and fat"),
    (_no_position, "unreadable_dicom", "frame 4 of 15 of an enhanced MR file has no complete ImagePositionPatient"),
])
def test_an_enhanced_file_whose_frames_disagree_is_refused_as_a_classic_series_is(tmp_path, phantom, change,
                                                                                  reason, words):
    e = _refused(tmp_path, _enhanced_zips(phantom, edit=_frames_edited(change)))
    assert e.reason == reason and words in e.message, e


def test_an_enhanced_file_cut_inside_its_pixel_data_is_named(tmp_path, phantom):
    ph = phantom
    zips = _enhanced_zips(ph, edit=lambda c, s, b: b[:-1000] if (c, s) == ("water", 3) else b)
    names = [n for n, _ in members(zips["water"])]
    k = names.index(next(n for n in names if series_of(3, "water")(n)))
    e = _refused(tmp_path, zips)
    n = ph.water.shape[0] * ph.water.shape[1] * 2                      # bytes per frame
    frames = station_ranges(ph.water.shape[2])[2][1] - station_ranges(ph.water.shape[2])[2][0]
    assert e.reason == "truncated_dicom", e
    assert e.message == (f"water station 3: the enhanced file of {frames} frames (DICOM zip (files[0]) member {k}): "
                         f"the pixel data ends after {frames * n - 1000} of the {frames * n} bytes its frames, rows, "
                         f"columns and bits declare (a file cut short; frame {frames} of {frames} on incomplete)")


FREE_TEXT = ("SeriesDescription", "StudyDescription", "ImageComments", "PatientComments", "AdditionalPatientHistory",
             "RequestedProcedureDescription", "PerformedProcedureStepDescription", "OperatorsName",
             "PerformingPhysicianName", "InstitutionalDepartmentName", "ReasonForStudy",
             "AdmittingDiagnosesDescription", "DerivationDescription", "ContrastBolusAgent")
SHORT_TEXT = ("StationName", "SequenceName")             # 16 characters at most


def test_names_typed_into_free_text_never_leave_the_landing_zone(tmp_path, phantom):
    """A name typed into every free-text field of every series (the protocol name keeps its station suffix, the
    image type gains a typed token): the participant still converts, and the name is nowhere in the outputs."""
    ph = phantom
    name = "Hildegard Quellenstein"

    def typed(ds):
        for kw in FREE_TEXT:
            setattr(ds, kw, name)
        for kw in SHORT_TEXT:
            setattr(ds, kw, name.split()[1])
        ds.ProtocolName = name + re.search(r"_S\d+$", ds.ProtocolName).group(0)
        ds.ImageType = [*ds.ImageType, "QUELLENSTEIN"]

    ddir, files = _deliver(tmp_path, _edited(_zips(ph, in_opp=True), lambda n: True, typed))
    res = _ingest(tmp_path, ddir, files)
    assert res.facts["stations"] == 4 and res.facts["channels"] == "water,fat,in,opp"
    np.testing.assert_array_equal(_water(tmp_path, res), ph.water)
    blobs = [gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
             for p in (tmp_path / "derived").rglob("*") if p.is_file()]
    blobs.append(json.dumps(res.facts).encode())
    assert len(blobs) >= 5
    for word in ("Hildegard", "Quellenstein", "QUELLENSTEIN"):
        assert not any(word.encode() in b for b in blobs), word
    header = res.sidecar["header"]["water"]
    assert header["contrast"] == "water" and header["series"] == "station 1"
    assert header["ImageType"] == ["DIXON", "M", "ORIGINAL", "PRIMARY", "WATER"]
    assert set(header) <= {"contrast", "series", "ImageType", "Manufacturer", "ManufacturerModelName",
                           "MagneticFieldStrength", "EchoTime", "RepetitionTime", "FlipAngle", "SliceThickness"}
