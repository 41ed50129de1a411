"""Ingesting DICOM deliveries: from a participant's zips of scanner series to stitched Dixon volumes.

A DICOM delivery (manifest ``"scan_format": "dicom"``) lists, per participant, zips under ``dicom/<pseudonym>/``.
What a zip holds is read from the DICOM headers, never from names: a whole-body Dixon acquired as overlapping
stations, each station one series per contrast. For one participant, in this order (each problem its own
quarantine reason; the rest of the batch goes on):

1. **The zips**, verified like any listed file (regular file inside the delivery, size and sha256 against the
   manifest), then opened by their central directory only: more than :attr:`DicomRules.max_members` files, one
   file over :attr:`DicomRules.max_member_bytes` or all of them over :attr:`DicomRules.max_participant_bytes`
   uncompressed is ``zip_too_large``, refused before anything is extracted. Extraction streams each member into
   a private work folder with its sha256; it can never write more than the declared size (a lying header ends in a
   CRC error: ``corrupt_zip``).
2. **Classification** by header: a file without the DICOM preamble is ignored (a PACS note), and so is a series of
   another modality or a localizer; each ignored file is counted in the sidecar. A file with the preamble that
   does not parse is ``unreadable_dicom``. The contrast comes from ``ImageType`` (``WATER``, ``FAT``,
   ``IN_PHASE``, ``OPP_PHASE``), else from the ``SeriesDescription`` suffix (``_W``, ``_F``, ``_in``,
   ``_opp``); the station from ``ProtocolName`` (``..._S<n>``); ``COMPOSED`` marks the scanner's whole-body
   series. A station acquired twice keeps its newest series (acquisition time, then series number).
3. **Geometry from the headers**: every series' slices share orientation, matrix and pixel spacing and are evenly
   spaced (a missing or doubled slice is ``station_incomplete``); water and fat of each station lie on the same
   grid (``water_fat_geometry``; in-phase/opposed-phase: ``in_opp_geometry``); the stations are numbered without
   a gap and overlap or touch (``station_gap``); a series or the stitched volume larger than
   :attr:`~cbp_platform.ingest.scans.ScanRules.max_image_bytes` is ``series_too_large``.
4. **Conversion** with dcm2niix (the PyPI wheel's binary), one run per participant; each output is oriented to
   the platform's LAS voxel order and its affine must equal the one computed from the headers
   (``conversion_geometry``).
5. **Per-station checks**: fat-water swap (``station_fat_water_swap``) and, where delivered, in-phase close to
   water + fat (``in_phase_inconsistent``).
6. **Stitching** each contrast onto one grid (the first station's in-plane grid, the whole superior-inferior
   extent) with linear ramps over the overlaps. The weights depend on geometry only, so they are identical for
   water and fat and the fat fraction is preserved; stations on the target lattice are copied, others resampled
   trilinearly. The stitched volume must cover :attr:`DicomRules.min_coverage_mm` superior-inferior
   (``fov_too_short``). When the stations are incomplete or have a gap and the composed series is delivered and
   passes the same checks, the composed series is used instead (``source: composed`` in the sidecar).
7. **Outputs** under ``$CBP_DATA_ROOT/derived/dicom/<delivery>/<pseudonym>/`` (never the landing zone): one
   ``.nii.gz`` per contrast and ``<pseudonym>_dixon.json``, a sidecar holding a whitelisted, de-identified subset
   of the header (no name, birth date, institution, UID or date). The sha256 of every DICOM file read is
   returned for provenance.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from cbp_platform.imaging.nifti import atomic_write_bytes, nifti_bytes, sha256_bytes
from cbp_platform.imaging.qc import fat_water_swap, subsample
from cbp_platform.ingest.scans import (MISSING_CHANNEL, RULES, ByteBudget, ScanProblem, _Listed, _open, _verify,
                                       role_of)
from cbp_platform.landing import DICOM_DIR, OPTIONAL_CHANNELS, REQUIRED_CHANNELS
from cbp_platform.reasons import R

CONTRASTS = REQUIRED_CHANNELS + OPTIONAL_CHANNELS              # water, fat, in, opp
IMAGE_TYPE_TOKENS = {"WATER": "water", "FAT": "fat", "IN_PHASE": "in", "OPP_PHASE": "opp", "OUT_PHASE": "opp"}
DESCRIPTION_SUFFIX = re.compile(r"_(W|F|IN|OPP)(_COMPOSED)?$", re.IGNORECASE)
SUFFIX_CONTRAST = {"W": "water", "F": "fat", "IN": "in", "OPP": "opp"}
OUTPUT_AXES = ("L", "A", "S")            # the platform's voxel order (NIfTI deliveries and the simulator's)
CHUNK = 1 << 20
# the only header fields a sidecar may carry (acquisition physics and scanner model; nothing that identifies)
SIDECAR_FIELDS = ("Manufacturer", "ManufacturerModelName", "MagneticFieldStrength", "EchoTime", "RepetitionTime",
                  "FlipAngle", "SliceThickness")


@dataclass(frozen=True)
class DicomRules:
    """What a DICOM delivery must satisfy (documented in ``docs/landing-zone.md``)."""

    max_members: int = 20_000                 # files in one zip
    max_member_bytes: int = 64 << 20          # one file, uncompressed
    max_participant_bytes: int = 2 << 30      # all of a participant's zips, uncompressed (work-folder disk)
    min_coverage_mm: float = 280.0            # superior-inferior extent the stitched volume must cover (T10-S1)
    slice_gap_tolerance: float = 0.05         # a slice step may differ from the series' spacing by this share
    geometry_tolerance_mm: float = 0.01       # grids of water and fat, header and converter
    in_phase_tolerance: float = 0.2           # median |IP - (W + F)| / median (W + F) inside the body
    station_swap_reversed: float = 0.5        # share of a station's slices reversed that calls it swapped
    dcm2niix_timeout_s: float = 600.0


DICOM_RULES = DicomRules()
SWAP_MIN_REVERSED = 0.2          # the share of reversed slices that flags a volume (as for NIfTI scans)
# the only tags parsed (the rest of each header is skipped: identifying fields are never even decoded)
HEADER_TAGS = ["SOPClassUID", "SeriesInstanceUID", "Modality", "ImageType", "SeriesDescription", "ProtocolName",
               "SeriesNumber", "AcquisitionDate", "AcquisitionTime", "SeriesDate", "SeriesTime",
               "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
               "BitsAllocated", "SamplesPerPixel", *SIDECAR_FIELDS]
STATION_RE = re.compile(r"_S(\d+)$")


@dataclass
class _Slice:
    path: Path
    ipp: np.ndarray
    iop: np.ndarray
    spacing: tuple[float, float]          # PixelSpacing: between rows, between columns
    matrix: tuple[int, int]               # rows, columns


@dataclass
class _Series:
    uid: str
    contrast: str
    station: int | None
    composed: bool
    acquired: str
    number: int
    header: dict
    slices: list[_Slice] = field(default_factory=list)
    affine: np.ndarray | None = None      # RAS+ affine of the sorted slice stack, LAS voxel order
    shape: tuple[int, int, int] | None = None

    @property
    def label(self) -> str:
        where = "composed series" if self.composed else (f"station {self.station}" if self.station is not None
                                                         else "a station")
        return f"{self.contrast} {where}"


@dataclass
class DicomResult:
    facts: dict
    inputs: dict[str, str]                # "<zip>#<member index>" (and "<zip>") -> sha256
    sidecar: dict


def dicom_zips(pseudonym: str, files_by_path: dict[str, dict]) -> list[str]:
    prefix = f"{DICOM_DIR}/{pseudonym}/"
    return sorted(p for p in files_by_path if p.startswith(prefix) and p.lower().endswith(".zip"))


# ----------------------------------------------------------------------------------------------------------
# 1. zips


def _extract(f: _Listed, work: Path, zip_no: int, state: dict, rules: DicomRules) -> list[tuple[int, Path, str]]:
    """Members of one verified zip, streamed into ``work`` with their sha256: ``[(member index, path, sha)]``."""
    out = []
    with _open(f.path, f.role) as fh:
        try:
            zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise ScanProblem(R.corrupt_zip, f"{f.role}: not a readable zip archive ({type(exc).__name__})") from None
        with zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            if len(infos) > rules.max_members:
                raise ScanProblem(R.zip_too_large, f"{f.role}: {len(infos)} files (limit {rules.max_members}); "
                                                   "refused before extracting")
            big = max(infos, key=lambda i: i.file_size, default=None)
            if big is not None and big.file_size > rules.max_member_bytes:
                raise ScanProblem(R.zip_too_large, f"{f.role}: a file declares {big.file_size / 2**20:.0f} MiB "
                                                   f"uncompressed (limit {rules.max_member_bytes >> 20} MiB); "
                                                   "refused before extracting")
            state["declared"] += sum(i.file_size for i in infos)
            if state["declared"] > rules.max_participant_bytes:
                raise ScanProblem(R.zip_too_large, f"{f.role}: the participant's zips declare "
                                                   f"{state['declared'] / 2**30:.1f} GiB uncompressed (limit "
                                                   f"{rules.max_participant_bytes / 2**30:.1f} GiB); refused "
                                                   "before extracting")
            for k, info in enumerate(infos):
                if info.flag_bits & 0x1:
                    raise ScanProblem(R.corrupt_zip, f"{f.role}: member {k} is encrypted")
                dest = work / f"z{zip_no}-{k:05d}"
                h = hashlib.sha256()
                try:
                    with zf.open(info) as src, open(dest, "wb") as dst:
                        while block := src.read(CHUNK):
                            h.update(block)
                            dst.write(block)
                # a real refusal, not a skip: CRC or stream errors (BadZipFile, zlib.error, EOFError), a compression
                # method zipfile cannot read (NotImplementedError), a password-protected member (RuntimeError)
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
                    # (the exception's text names the member, and member names may hold a patient's name)
                    why = "CRC check failed" if "CRC" in str(exc) else type(exc).__name__
                    raise ScanProblem(R.corrupt_zip, f"{f.role}: member {k} cannot be extracted ({why})") from None
                out.append((k, dest, h.hexdigest()))
    return out


# ----------------------------------------------------------------------------------------------------------
# 2. classification


def _contrast(ds) -> tuple[str | None, bool]:
    tokens = {str(t).upper() for t in (ds.get("ImageType") or [])}
    desc = str(ds.get("SeriesDescription") or "").strip()
    composed = "COMPOSED" in tokens or desc.upper().endswith("_COMPOSED")
    for tok, c in IMAGE_TYPE_TOKENS.items():
        if tok in tokens:
            return c, composed
    m = DESCRIPTION_SUFFIX.search(desc)
    return (SUFFIX_CONTRAST[m.group(1).upper()] if m else None), composed


def _classify(members: list[tuple[str, int, Path, str]], role_of_zip: dict[str, str]
              ) -> tuple[dict[str, _Series], list[dict]]:
    """Series by UID from the extracted files, and the files ignored (with why)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, _Series] = {}
    ignored: list[dict] = []
    for zrel, k, path, _sha in members:
        where = f"{role_of_zip[zrel]} member {k}"
        with open(path, "rb") as fh:
            head = fh.read(132)
        if len(head) < 132 or head[128:132] != b"DICM":
            ignored.append(dict(file=where, why="not a DICOM file"))
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            if not ds.get("SOPClassUID") or not ds.get("SeriesInstanceUID"):
                raise ScanProblem(R.unreadable_dicom, f"{where}: has the DICOM preamble but no SOP class or series "
                                                      "UID (a damaged file)")
            modality = str(ds.get("Modality") or "")
            image_type = {str(t).upper() for t in (ds.get("ImageType") or [])}
            if modality != "MR":
                ignored.append(dict(file=where, why=f"a series of modality {modality or 'unknown'}"))
                continue
            if "LOCALIZER" in image_type:
                ignored.append(dict(file=where, why="a localizer"))
                continue
            contrast, composed = _contrast(ds)
            if contrast is None:
                ignored.append(dict(file=where, why="an MR series that is not a Dixon contrast"))
                continue
            uid = str(ds.SeriesInstanceUID)
            m = STATION_RE.search(str(ds.get("ProtocolName") or ""))
            sl = _Slice(path, np.array([float(x) for x in ds.ImagePositionPatient]),
                        np.array([float(x) for x in ds.ImageOrientationPatient]),
                        (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])), (int(ds.Rows), int(ds.Columns)))
            if int(ds.get("BitsAllocated", 16)) not in (8, 16) or int(ds.get("SamplesPerPixel", 1)) != 1:
                raise ScanProblem(R.unreadable_dicom, f"{where}: {ds.get('BitsAllocated')}-bit, "
                                                      f"{ds.get('SamplesPerPixel')} samples per pixel (want "
                                                      "8- or 16-bit grey levels)")
        except ScanProblem:
            raise
        except (InvalidDicomError, AttributeError, KeyError, TypeError, ValueError, IndexError, OSError) as exc:
            raise ScanProblem(R.unreadable_dicom, f"{where}: DICOM header unreadable or incomplete "
                                                  f"({type(exc).__name__})") from None
        if uid not in series:
            acquired = f"{ds.get('AcquisitionDate') or ds.get('SeriesDate') or ''}" \
                       f"{ds.get('AcquisitionTime') or ds.get('SeriesTime') or ''}"
            header = {k: _plain(ds.get(k)) for k in SIDECAR_FIELDS if ds.get(k) is not None}
            header["SeriesDescription"] = str(ds.get("SeriesDescription") or "")
            header["ImageType"] = sorted(image_type)
            series[uid] = _Series(uid, contrast, None if composed or not m else int(m.group(1)), composed,
                                  acquired, int(ds.get("SeriesNumber") or 0), header)
        series[uid].slices.append(sl)
    return series, ignored


def _plain(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


# ----------------------------------------------------------------------------------------------------------
# 3. geometry from the headers


def _stack(s: _Series, rules: DicomRules) -> None:
    """Sort a series' slices along their normal, check them, and set its LAS affine and shape."""
    first = s.slices[0]
    for sl in s.slices[1:]:
        if (not np.allclose(sl.iop, first.iop, atol=1e-4) or sl.matrix != first.matrix
                or not np.allclose(sl.spacing, first.spacing, atol=1e-4)):
            raise ScanProblem(R.station_incomplete, f"{s.label}: slices differ in orientation, matrix or pixel "
                                                    "spacing")
    row, col = first.iop[:3], first.iop[3:]
    normal = np.cross(row, col)
    if abs(np.linalg.norm(normal) - 1) > 1e-3:
        raise ScanProblem(R.station_incomplete, f"{s.label}: ImageOrientationPatient is not two unit vectors")
    pos = np.array([float(sl.ipp @ normal) for sl in s.slices])
    order = np.argsort(pos, kind="stable")
    s.slices = [s.slices[i] for i in order]
    pos = pos[order]
    if len(pos) < 2:
        raise ScanProblem(R.station_incomplete, f"{s.label}: {len(pos)} slice")
    steps = np.diff(pos)
    if (steps < 1e-3).any():
        raise ScanProblem(R.station_incomplete, f"{s.label}: two slices at the same position")
    dz = float(np.median(steps))
    bad = np.abs(steps - dz) > rules.slice_gap_tolerance * dz
    if bad.any():
        i = int(np.argmax(bad))
        missing = round(steps[i] / dz) - 1
        what = f"{missing} slice{'s' if missing != 1 else ''} missing" if missing >= 1 else "uneven slice spacing"
        raise ScanProblem(R.station_incomplete, f"{s.label}: {what} after slice {i + 1} of {len(pos)} "
                                                f"(step {steps[i]:.2f} mm, spacing {dz:.2f} mm)")
    rows, cols = first.matrix
    nbytes = rows * cols * len(pos) * 2
    if nbytes > RULES.max_image_bytes:
        raise ScanProblem(R.series_too_large, f"{s.label}: {cols} x {rows} x {len(pos)} voxels "
                                              f"({nbytes / 2**20:.0f} MiB, limit {RULES.max_image_bytes >> 20} MiB)")
    # voxel (i = column, j = row, k = slice) -> LPS mm, then RAS+, then LAS voxel order
    lps = np.eye(4)
    lps[:3, 0] = row * first.spacing[1]
    lps[:3, 1] = col * first.spacing[0]
    lps[:3, 2] = normal * dz
    lps[:3, 3] = s.slices[0].ipp
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    shape = (cols, rows, len(pos))
    ornt = nib.orientations.ornt_transform(nib.io_orientation(ras), nib.orientations.axcodes2ornt(OUTPUT_AXES))
    s.affine = ras @ nib.orientations.inv_ornt_aff(ornt, shape)
    new_shape = [0, 0, 0]
    for axis, (to, _flip) in enumerate(ornt):          # input axis ``axis`` becomes output axis ``to``
        new_shape[int(to)] = shape[axis]
    s.shape = tuple(new_shape)


def _select(series: dict[str, _Series], composed: bool) -> tuple[dict[str, dict], list[dict]]:
    """contrast -> station key -> newest series (``composed``: the composed series only); superseded ones."""
    chosen: dict[str, dict] = {}
    superseded = []
    for s in sorted(series.values(), key=lambda s: (s.acquired, s.number)):
        if s.composed != composed:
            continue
        key = s.station if s.station is not None else f"z{round(float(np.mean([sl.ipp[2] for sl in s.slices])))}"
        prev = chosen.setdefault(s.contrast, {}).get(key)
        if prev is not None:
            superseded.append(dict(series=prev.label, kept="a newer acquisition of the same station"))
        chosen[s.contrast][key] = s
    return chosen, superseded


def _check_stations(chosen: dict[str, dict], rules: DicomRules) -> list[_Series]:
    """Checks across series; returns the water stations ordered inferior to superior."""
    for c in REQUIRED_CHANNELS:
        if not chosen.get(c):
            raise ScanProblem(MISSING_CHANNEL[c], f"{c}: no {c} series delivered")
    water = chosen["water"]
    for c, by in chosen.items():
        if set(by) != set(water):
            gone = sorted(set(water) - set(by), key=str) or sorted(set(by) - set(water), key=str)
            raise ScanProblem(R.station_gap, f"{c}: station {gone[0]} delivered for "
                                             f"{'water' if set(water) - set(by) else c} only")
    numbered = [k for k in water if isinstance(k, int)]
    if numbered:
        missing = sorted(set(range(1, max(numbered) + 1)) - set(numbered))
        if missing:
            raise ScanProblem(R.station_gap, f"station {missing[0]} of 1-{max(numbered)} not delivered")
    tol = rules.geometry_tolerance_mm
    for c, by in chosen.items():
        if c == "water":
            continue
        for key, s in by.items():
            w = water[key]
            if s.shape != w.shape or not np.allclose(s.affine, w.affine, atol=tol):
                d = float(np.abs(s.affine[:3, 3] - w.affine[:3, 3]).max()) if s.shape == w.shape else float("nan")
                reason = R.water_fat_geometry if c == "fat" else R.in_opp_geometry
                shift = f"origins {d:.1f} mm apart" if d == d else f"matrix {s.shape} vs {w.shape}"
                raise ScanProblem(reason, f"{s.label}: grid differs from the water series' ({shift})")
    stations = sorted(water.values(), key=lambda s: _z_range(s)[0])
    ref = stations[0]
    for s in stations[1:]:
        if not np.allclose(s.affine[:3, :3], ref.affine[:3, :3], atol=1e-3):
            raise ScanProblem(R.station_geometry, f"{s.label}: orientation or voxel size differs from "
                                                  f"{ref.label}'s; stations must share them")
    for a, b in zip(stations, stations[1:]):
        gap = _z_range(b)[0] - _z_range(a)[1]
        dz = float(np.linalg.norm(a.affine[:3, 2]))
        if gap > dz * (1 + rules.slice_gap_tolerance):
            raise ScanProblem(R.station_gap, f"{a.label} and {b.label} leave {gap - dz:.1f} mm uncovered "
                                             "between them")
    return stations


def _z_range(s: _Series) -> tuple[float, float]:
    z = [float((s.affine @ np.array([0, 0, k, 1.0]))[2]) for k in (0, s.shape[2] - 1)]
    return min(z), max(z)


# ----------------------------------------------------------------------------------------------------------
# 4. conversion


def _convert(chosen: dict[str, dict], work: Path, rules: DicomRules) -> tuple[dict[str, np.ndarray], str]:
    """dcm2niix on the chosen series (one run); each output in LAS order, its affine checked against the
    headers'. Returns series uid -> voxels, and the converter's version line."""
    import dcm2niix

    src, out = work / "series", work / "nifti"
    for d in (src, out):
        d.mkdir()
    todo = [s for by in chosen.values() for s in by.values()]
    for j, s in enumerate(todo):
        folder = src / f"{j:03d}"
        folder.mkdir()
        for n, sl in enumerate(s.slices):
            sl.path.rename(folder / f"{n:05d}.dcm")
            sl.path = folder / f"{n:05d}.dcm"
    try:
        run = subprocess.run([dcm2niix.bin, "-z", "n", "-b", "n", "-f", "%j", "-o", str(out), str(src)],
                             capture_output=True, text=True, timeout=rules.dcm2niix_timeout_s)
    except subprocess.TimeoutExpired:
        raise ScanProblem(R.conversion_failed, f"dcm2niix did not finish in {rules.dcm2niix_timeout_s:.0f} s") from None
    version = next((ln.strip() for ln in run.stdout.splitlines() if "version" in ln), "dcm2niix")
    if run.returncode != 0:
        raise ScanProblem(R.conversion_failed, f"dcm2niix exited with status {run.returncode}")
    arrays = {}
    for s in todo:
        found = sorted(out.glob(f"{s.uid}*.nii"))
        if len(found) != 1:
            raise ScanProblem(R.conversion_failed, f"{s.label}: dcm2niix wrote {len(found)} volumes for the "
                                                   "series (want 1)")
        img = nib.load(found[0])
        if len(img.shape) != 3:
            raise ScanProblem(R.conversion_failed, f"{s.label}: dcm2niix wrote a {len(img.shape)}D volume")
        ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine),
                                               nib.orientations.axcodes2ornt(OUTPUT_AXES))
        img = img.as_reoriented(ornt)
        if img.shape != s.shape or not np.allclose(img.affine, s.affine, atol=max(rules.geometry_tolerance_mm, 1e-3)):
            d = float(np.abs(img.affine - s.affine).max()) if img.shape == s.shape else float("nan")
            raise ScanProblem(R.conversion_geometry, f"{s.label}: the converted volume's geometry differs from "
                                                     f"the headers' (shape {img.shape} vs {s.shape}, max affine "
                                                     f"difference {d:.3g})")
        data = np.asanyarray(img.dataobj)         # 16-bit as stored (float32 only when dcm2niix scaled it)
        arrays[s.uid] = data if data.dtype in (np.uint8, np.uint16, np.int16) else data.astype(np.float32)
        found[0].unlink()
    return arrays, version


# ----------------------------------------------------------------------------------------------------------
# 5-6. per-station checks, stitching


def _station_checks(chosen: dict[str, dict], arrays: dict[str, np.ndarray], rules: DicomRules) -> list[dict]:
    report = []
    for key, w in chosen["water"].items():
        f = chosen["fat"][key]
        q = fat_water_swap(arrays[w.uid], arrays[f.uid], tuple(abs(float(x)) for x in np.diag(w.affine)[:3]),
                           max_slices=8)
        entry = dict(station=w.station, swap_reversed_fraction=None if q.n_slices == 0 else round(q.reversed_fraction, 3),
                     _swap=q)
        if q.n_slices >= 3 and q.reversed_fraction >= rules.station_swap_reversed:
            raise ScanProblem(R.station_fat_water_swap, f"{w.label}: water and fat appear exchanged "
                                                        f"({q.reversed_fraction:.0%} of {q.n_slices} slices "
                                                        "reversed)")
        if "in" in chosen:
            s = arrays[w.uid].astype(np.float32) + arrays[f.uid]
            body = s > 0.25 * float(np.percentile(subsample(s), 99))
            if body.any():
                dev = float(np.median(np.abs(arrays[chosen["in"][key].uid][body] - s[body])) / np.median(s[body]))
                entry["in_phase_deviation"] = round(dev, 4)
                if dev > rules.in_phase_tolerance:
                    raise ScanProblem(R.in_phase_inconsistent, f"{chosen['in'][key].label}: differs from water + "
                                                               f"fat by {dev:.0%} inside the body (tolerance "
                                                               f"{rules.in_phase_tolerance:.0%})")
        report.append(entry)
    return report


def target_grid(stations: list[_Series]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The stitched grid: the lowest station's in-plane grid and voxel size, extended over every station."""
    ref = stations[0]
    dz = float(np.linalg.norm(ref.affine[:3, 2]))
    top = max(_z_range(s)[1] for s in stations)
    nz = int(round((top - _z_range(ref)[0]) / dz)) + 1
    return ref.affine.copy(), (ref.shape[0], ref.shape[1], nz)


def stitch(stations: list[tuple[np.ndarray, np.ndarray]], affine: np.ndarray, shape: tuple[int, int, int],
           contrasts: int = 1) -> tuple[list[np.ndarray], dict]:
    """Blend stations ``[(affine, [volume per contrast, stacked on axis 0])]`` onto the grid ``affine``/``shape``.

    Each station's weight on a target slice is its distance (in slices, plus one) to its own nearest edge, so
    weights ramp linearly across every overlap and are 1 where a single station covers. The weights depend on
    geometry only: the same for every contrast. A station whose voxels lie on the target lattice is copied;
    any other is resampled trilinearly. Returns the stitched volumes (float32) and a summary."""
    from scipy import ndimage

    acc = np.zeros((contrasts, *shape), np.float32)
    wsum = np.zeros(shape[2], np.float32)
    resampled = 0
    for st_aff, vols in stations:
        m = np.linalg.inv(st_aff) @ affine              # target voxel -> station voxel
        kz = np.array([(m @ np.array([0, 0, k, 1.0]))[2] for k in range(shape[2])])
        n_st = vols.shape[3]
        inside = (kz > -0.5) & (kz < n_st - 0.5)
        w = np.where(inside, np.minimum(kz + 1, n_st - kz), 0.0).clip(min=0)
        # on the lattice: every station voxel within 1 % of a voxel of a target voxel (the headers' rounding of
        # positions to 0.1 um makes the slice spacings of two stations differ in the 6th digit)
        rest = np.abs(m[:3, :3] - np.eye(3)).max() * max(max(shape), n_st)
        lattice = rest < 0.01 and np.allclose(m[:3, 3], np.round(m[:3, 3]), atol=0.01)
        if lattice:
            off = np.round(m[:3, 3]).astype(int)
            for k in np.nonzero(inside)[0]:
                src = vols[:, :, :, int(round(kz[k]))]
                acc[:, :, :, k] += w[k] * _shifted(src, off[0], off[1], shape[:2])
        else:
            resampled += 1
            ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
            for k in np.nonzero(inside)[0]:
                p = m @ np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k), np.ones(ii.size)])
                ok = ((p[0] > -0.5) & (p[0] < vols.shape[1] - 0.5) & (p[1] > -0.5) & (p[1] < vols.shape[2] - 0.5))
                for c in range(contrasts):
                    vals = ndimage.map_coordinates(vols[c], p[:3], order=1, mode="nearest", output=np.float32)
                    acc[c, :, :, k] += (w[k] * vals * ok).reshape(shape[:2])
        wsum += w
    if (wsum <= 0).any():
        raise ScanProblem(R.station_gap, f"{int((wsum <= 0).sum())} slices of the stitched grid are covered by no "
                                         "station")
    out = [(acc[c] / wsum[None, None, :]) for c in range(contrasts)]
    return out, dict(resampled_stations=resampled, slices=int(shape[2]))


def _shifted(src: np.ndarray, di: int, dj: int, shape2: tuple[int, int]) -> np.ndarray:
    """``src`` ([contrast, i, j]) placed on the target grid: target (i, j) takes source (i + di, j + dj)."""
    out = np.zeros((src.shape[0], *shape2), np.float32)
    i0, i1 = max(0, -di), min(shape2[0], src.shape[1] - di)
    j0, j1 = max(0, -dj), min(shape2[1], src.shape[2] - dj)
    if i1 > i0 and j1 > j0:
        out[:, i0:i1, j0:j1] = src[:, i0 + di:i1 + di, j0 + dj:j1 + dj]
    return out


# ----------------------------------------------------------------------------------------------------------
# the participant


def inspect_dicom_participant(delivery_dir: Path, pseudonym: str, files_by_path: dict[str, dict], *,
                              out_dir: Path, rel_out: str, budget: ByteBudget | None = None,
                              files_index: dict[str, int] | None = None,
                              rules: DicomRules = DICOM_RULES) -> DicomResult:
    """Validated, stitched volumes of one participant's DICOM zips, written to ``out_dir`` (``rel_out`` is its
    path relative to the data root, for the facts); or raise :class:`ScanProblem`."""
    idx = files_index if files_index is not None else {p: i for i, p in enumerate(files_by_path)}
    shutil.rmtree(out_dir, ignore_errors=True)               # a re-run never keeps an earlier run's volumes
    zips = dicom_zips(pseudonym, files_by_path)
    if not zips:
        raise ScanProblem(R.missing_water, "no DICOM zip listed for the participant")
    listed = [_Listed("dicom", z, Path(delivery_dir) / z, role_of("DICOM zip", z, idx).replace(" image", ""),
                      files_by_path[z]) for z in zips]
    inputs: dict[str, str] = {}
    for f in listed:
        _verify(f, Path(delivery_dir))
        inputs[f.rel] = f.entry["sha256"]
    work_root = out_dir.parent.parent / ".work"
    work_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="p-", dir=work_root))
    held = 0
    try:
        state = {"declared": 0}
        members = []
        for n, f in enumerate(listed):
            for k, path, sha in _extract(f, work, n, state, rules):
                members.append((f.rel, k, path, sha))
                inputs[f"{f.rel}#{k}"] = sha
        series, ignored = _classify(members, {f.rel: f.role for f in listed})
        for s in series.values():
            _stack(s, rules)
        source, problem = "stations", None
        chosen, superseded = _select(series, composed=False)
        try:
            stations = _check_stations(chosen, rules)
        except ScanProblem as exc:
            comp, _ = _select(series, composed=True)
            if (exc.reason not in (R.station_gap.code, R.station_incomplete.code)
                    or not all(comp.get(c) for c in REQUIRED_CHANNELS)):
                raise
            source, problem, chosen = "composed", exc, comp
            stations = _check_stations(chosen, rules)
        affine, shape = target_grid(stations)
        contrasts = [c for c in CONTRASTS if c in chosen]
        coverage = shape[2] * float(np.linalg.norm(affine[:3, 2]))
        if coverage < rules.min_coverage_mm:
            raise ScanProblem(R.fov_too_short, f"the stitched volume covers {coverage:.0f} mm superior-inferior; "
                                               f"the lumbar back muscles need {rules.min_coverage_mm:.0f} mm "
                                               "(a station missing at an end?)")
        if int(np.prod(shape)) * 2 > RULES.max_image_bytes:
            raise ScanProblem(R.series_too_large, f"the stitched volume would have {shape} voxels, over "
                                                  f"{RULES.max_image_bytes >> 20} MiB per contrast")
        # held at once: the converted series (16-bit), one contrast's float32 accumulator and the 16-bit outputs
        need = sum(int(np.prod(s.shape)) * 2 for by in chosen.values() for s in by.values()) \
            + int(np.prod(shape)) * (8 + 2 * len(contrasts))
        held = budget.acquire(need) if budget is not None else 0
        arrays, converter = _convert(chosen, work, rules)
        station_report = _station_checks(chosen, arrays, rules)
        keys = [next(k for k, s in chosen["water"].items() if s is st) for st in stations]
        vols = {}
        for c in contrasts:              # one contrast at a time; the weights are the same for each
            (v,), summary = stitch([(chosen["water"][k].affine, arrays[chosen[c][k].uid][None]) for k in keys],
                                   affine, shape, contrasts=1)
            vols[c] = np.clip(np.rint(v), 0, 65535).astype(np.uint16)
            del v
        del arrays
        facts, sidecar = _write_outputs(vols, affine, out_dir, rel_out, pseudonym, chosen, stations, source,
                                        problem, superseded, ignored, station_report, summary, converter, inputs)
        return DicomResult(facts, inputs, sidecar)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if budget is not None and held:
            budget.release(held)


def _write_outputs(vols, affine, out_dir: Path, rel_out: str, pseudonym: str, chosen, stations, source, problem,
                   superseded, ignored, station_report, summary, converter, inputs) -> tuple[dict, dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    facts: dict = {"pseudonym": pseudonym, "source_format": "dicom"}
    for c, v in vols.items():
        payload = nifti_bytes(v, affine)
        name = f"{pseudonym}_{c}.nii.gz"
        atomic_write_bytes(out_dir / name, payload)
        facts.update({f"{c}_path": f"{rel_out}/{name}", f"{c}_sha256": sha256_bytes(payload),
                      f"{c}_bytes": len(payload)})
    w, fat = vols["water"], vols["fat"]
    zooms = tuple(float(np.linalg.norm(affine[:3, a])) for a in range(3))
    # the volume's swap QC from its stations' (each slice evaluated once; a swapped station was refused already)
    qs = [r["_swap"] for r in station_report if r["_swap"].n_slices]
    n = sum(q.n_slices for q in qs)
    reversed_fraction = sum(q.reversed_fraction * q.n_slices for q in qs) / n if n else float("nan")
    score = float(np.median([q.score for q in qs])) if qs else float("nan")
    facts.update(
        channels=",".join(vols), shape_x=int(w.shape[0]), shape_y=int(w.shape[1]), shape_z=int(w.shape[2]),
        spacing_x=zooms[0], spacing_y=zooms[1], spacing_z=zooms[2], orientation="".join(nib.aff2axcodes(affine)),
        affine=json.dumps([round(float(x), 6) for x in affine.ravel()]), dtype=str(w.dtype),
        water_min=float(w.min()), water_max=float(w.max()), water_p99=float(np.percentile(subsample(w), 99)),
        fat_min=float(fat.min()), fat_max=float(fat.max()), fat_p99=float(np.percentile(subsample(fat), 99)),
        swap_score=score, swap_reversed_fraction=reversed_fraction,
        swap_suspected=bool(n and reversed_fraction >= SWAP_MIN_REVERSED),
        stations=len(stations), dicom_series=sum(len(by) for by in chosen.values()),
        superseded_series=len(superseded), ignored_files=len(ignored),
        dicom_files=sum(1 for k in inputs if "#" in k),
    )
    sidecar = {
        "source": source,
        "why_composed": None if problem is None else f"{problem.reason}: {problem.message}",
        "converter": converter,
        "contrasts": list(vols),
        "stations": [dict(station=s.station, slices=int(s.shape[2]),
                          z_mm=[round(v, 2) for v in _z_range(s)], **rep)
                     for s, rep in zip(stations, _report_for(stations, station_report))],
        "stitching": dict(grid="lowest station's in-plane grid over the whole superior-inferior extent",
                          blend="linear ramps over the overlaps; the same weights for every contrast",
                          output_dtype="uint16 (rounded)", orientation="".join(OUTPUT_AXES), **summary),
        "superseded_series": superseded,
        "ignored_files": ignored,
        "header": {c: next(iter(by.values())).header for c, by in chosen.items()},
        "dicom_files_read": facts["dicom_files"],
    }
    atomic_write_bytes(out_dir / f"{pseudonym}_dixon.json", (json.dumps(sidecar, indent=1) + "\n").encode())
    return facts, sidecar


def _report_for(stations, station_report):
    by_station = {r["station"]: r for r in station_report}
    return [{k: v for k, v in by_station.get(s.station, {}).items() if k != "station" and not k.startswith("_")}
            for s in stations]
