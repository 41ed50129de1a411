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
2. **Classification** by header: a DICOMDIR (named so, or of the Media Storage Directory SOP class) is ignored,
   and so is a series of another modality or a localizer; each ignored file is counted in the sidecar. A file
   without the DICOM preamble is read all the same when it parses as an MR image (some exports omit the preamble;
   it is rewritten as a standard file before conversion), else ignored as not a DICOM file (a PACS note); when
   such files exist and no water or fat series is left, that is ``unreadable_dicom`` naming how many, not
   ``missing_water``. A file with the preamble that does not parse is ``unreadable_dicom``. The contrast comes
   from ``ImageType`` (``WATER``, ``FAT``, ``IN_PHASE``, ``OPP_PHASE``), else from the ``SeriesDescription``
   suffix (``_W``, ``_F``, ``_in``, ``_opp``); the station from ``ProtocolName`` (``..._S<n>``); ``COMPOSED``
   marks the scanner's whole-body series. A series is its UID and contrast: water and fat written under one
   ``SeriesInstanceUID`` are split by ``ImageType``; several contrasts in one series that ``ImageType`` does not
   tell apart are ``mixed_series``. An **enhanced (multi-frame) MR file** (Enhanced or Legacy Converted Enhanced
   MR Image Storage, or ``NumberOfFrames`` over 1), the native export of current scanners, is read as the slices
   of its series, one per frame: its functional groups (and only an enhanced file's) give each frame's
   ``ImagePositionPatient`` (per frame) and ``ImageOrientationPatient`` and ``PixelSpacing`` (per frame or
   shared); a frame without them, or per-frame groups that are not one per frame, is ``unreadable_dicom``. Its
   contrast is its ``ImageType``'s, checked against the frames' ``FrameType``: frames of several contrasts in
   one file are ``mixed_series`` (not split). From there on its frames are slices like any other (their
   geometry, identity and selection checked the same way), and the file is converted as it is.
   **One person**: every Dixon series (chosen, superseded or composed) must carry the same ``PatientID``; the
   series of a station share ``StudyInstanceUID`` and ``FrameOfReferenceUID``, and where stations share a value,
   a station with another is refused (stations that each have their own are accepted): ``participant_mismatch``,
   naming the series and the field, never the values (which are compared, never kept). Only then is a station
   acquired twice resolved: the newest series is kept (acquisition time, then series number).
3. **Geometry from the headers**: every series' slices share orientation, matrix and pixel spacing and are evenly
   spaced (a missing or doubled slice is ``station_incomplete``); water and fat of each station lie on the same
   grid (``water_fat_geometry``; in-phase/opposed-phase: ``in_opp_geometry``); the stations are numbered without
   a gap and overlap or touch (``station_gap``); a series or the stitched volume larger than
   :attr:`~cbp_platform.ingest.scans.ScanRules.max_image_bytes` is ``series_too_large``.
4. **Conversion** with dcm2niix (the PyPI wheel's binary). First every slice of the kept series must hold the
   pixel data its rows, columns and bits declare (``truncated_dicom``, naming the series, slice and the file's
   position in the delivery; an enhanced file must hold all its frames', and the first incomplete frame is
   named); files without the preamble or with a deflated transfer syntax are rewritten as standard uncompressed
   files in the work folder. One dcm2niix run per participant (the parts of a series UID that holds several
   contrasts each in a run of their own, dcm2niix grouping by UID, and so is each series of enhanced files:
   dcm2niix misreads the intensity scaling of a second Siemens enhanced file in one run); a failure is
   ``conversion_failed`` with dcm2niix's own error lines, each path replaced by the series and slice number.
   Each output is oriented to the platform's LAS voxel order and its affine must equal the one computed from the
   headers (``conversion_geometry``).
5. **Per-station checks**: fat-water swap (``station_fat_water_swap``) and, where delivered, in-phase close to
   water + fat (``in_phase_inconsistent``).
6. **Stitching** each contrast onto one grid (the first station's in-plane grid, the whole superior-inferior
   extent) with linear ramps over the overlaps. The weights depend on geometry only, so they are identical for
   water and fat and the fat fraction is preserved; stations on the target lattice are copied, others resampled
   trilinearly. The stitched volume must cover :attr:`DicomRules.min_coverage_mm` superior-inferior
   (``fov_too_short``). When the stations are incomplete or have a gap and the composed series is delivered and
   passes the same checks, the composed series is used instead (``source: composed`` in the sidecar).
7. **Outputs** under ``$CBP_DATA_ROOT/derived/dicom/<delivery>/<pseudonym>/`` (never the landing zone): one
   ``.nii.gz`` per contrast and ``<pseudonym>_dixon.json``, a sidecar whose header part is an allow-list: the
   contrast and station (derived, not copied), scanner make and model, field strength, TE, TR, flip angle, slice
   thickness as numbers, and ``ImageType`` tokens of a known set. No free text (series or study description,
   protocol name, comments, operators), name, birth date, institution, UID or date. The sha256 of every DICOM
   file read is returned for provenance.
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
# the only header fields a sidecar may carry (acquisition physics and scanner model; nothing that identifies):
# numbers as numbers (anything else is left out), the scanner's make and model as short printable text
SIDECAR_NUMBERS = ("MagneticFieldStrength", "EchoTime", "RepetitionTime", "FlipAngle", "SliceThickness")
SIDECAR_TEXT = ("Manufacturer", "ManufacturerModelName")
SIDECAR_FIELDS = SIDECAR_TEXT + SIDECAR_NUMBERS
# ImageType values a sidecar may repeat (any other token, typed in by a person or a vendor, is left out)
KNOWN_IMAGE_TYPE = frozenset({"ORIGINAL", "DERIVED", "PRIMARY", "SECONDARY", "M", "P", "R", "I", "MAGNITUDE",
                              "PHASE", "REAL", "IMAGINARY", "DIXON", "WATER", "FAT", "IN_PHASE", "OPP_PHASE",
                              "OUT_PHASE", "COMPOSED", "NORM", "DIS2D", "DIS3D", "ND", "MPR", "MOCO", "FILTERED",
                              "NONE", "OTHER", "MIXED", "VOLUME", "AXIAL"})
# who and what the series belong to: compared between the participant's series, never copied or reported
IDENTITY_FIELDS = ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"           # a DICOMDIR's SOP class
ENHANCED_MR = ("1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4")   # Enhanced / Legacy Converted
DEFLATED = "1.2.840.10008.1.2.1.99"                        # Deflated Explicit VR Little Endian
NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")   # uncompressed pixels


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
# the only tags parsed (the rest of each header is skipped: identifying fields are never even decoded; the
# identity fields are compared, never kept; PixelData's value is not read, only where it starts and its length)
HEADER_TAGS = ["SOPClassUID", "SeriesInstanceUID", "Modality", "ImageType", "SeriesDescription", "ProtocolName",
               "SeriesNumber", "AcquisitionDate", "AcquisitionTime", "SeriesDate", "SeriesTime",
               "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
               "BitsAllocated", "SamplesPerPixel", "NumberOfFrames", "AcquisitionDateTime", *IDENTITY_FIELDS,
               *SIDECAR_FIELDS, "PixelData"]
# an enhanced (multi-frame) MR file's geometry and timing live in its functional groups: read for those files only
FRAME_TAGS = ["SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"]
# where an enhanced file keeps what a classic one has at the top level: (macro sequence, attribute)
FRAME_FIELDS = {"ImagePositionPatient": ("PlanePositionSequence", "ImagePositionPatient"),
                "ImageOrientationPatient": ("PlaneOrientationSequence", "ImageOrientationPatient"),
                "PixelSpacing": ("PixelMeasuresSequence", "PixelSpacing"),
                "SliceThickness": ("PixelMeasuresSequence", "SliceThickness"),
                "EchoTime": ("MREchoSequence", "EffectiveEchoTime"),
                "RepetitionTime": ("MRTimingAndRelatedParametersSequence", "RepetitionTime"),
                "FlipAngle": ("MRTimingAndRelatedParametersSequence", "FlipAngle"),
                "FrameType": ("MRImageFrameTypeSequence", "FrameType")}
STATION_RE = re.compile(r"_S(\d+)$")


@dataclass
class _Slice:
    path: Path
    ipp: np.ndarray
    iop: np.ndarray
    spacing: tuple[float, float]          # PixelSpacing: between rows, between columns
    matrix: tuple[int, int]               # rows, columns
    where: str = ""                       # "<zip's role> member <k>": the file's position in the delivery
    pixel_bytes: int | None = None        # bytes of pixel data in the file (None: compressed, not measured)
    expected_bytes: int = 0               # frames x rows x columns x bytes per pixel (the whole file's)
    rewrite: bool = False                 # no preamble, or deflated: rewritten as a standard file to convert
    syntax: str = ""                      # its transfer syntax UID (a standard one: never identifying)
    frame: int | None = None              # an enhanced file's frame (1-based); None: a classic one-slice file
    frames: int = 1                       # frames in its file (the slices of the series that share ``path``)


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
    ident: dict = field(default_factory=dict, repr=False)   # IDENTITY_FIELDS: compared only, never written
    by_image_type: bool = True            # the contrast came from ImageType (not from the description)

    @property
    def key(self) -> tuple[str, str]:
        """A series is its UID and contrast: some scanners write water and fat under one SeriesInstanceUID."""
        return self.uid, self.contrast

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


def _extract(f: _Listed, work: Path, zip_no: int, state: dict, rules: DicomRules
             ) -> list[tuple[int, Path, str, bool]]:
    """Members of one verified zip, streamed into ``work`` with their sha256: ``[(member index, path, sha, named
    DICOMDIR)]`` (the member's name itself is never kept: it may hold a patient's name)."""
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
                out.append((k, dest, h.hexdigest(), info.filename.rsplit("/", 1)[-1].upper() == "DICOMDIR"))
    return out


# ----------------------------------------------------------------------------------------------------------
# 2. classification


def _contrast(ds) -> tuple[str | None, bool, bool]:
    """(contrast, composed, whether ImageType told the contrast) of one file."""
    tokens = {str(t).upper() for t in (ds.get("ImageType") or [])}
    desc = str(ds.get("SeriesDescription") or "").strip()
    composed = "COMPOSED" in tokens or desc.upper().endswith("_COMPOSED")
    for tok, c in IMAGE_TYPE_TOKENS.items():
        if tok in tokens:
            return c, composed, True
    m = DESCRIPTION_SUFFIX.search(desc)
    return (SUFFIX_CONTRAST[m.group(1).upper()] if m else None), composed, False


def _classify(members: list[tuple[str, int, Path, str, bool]], role_of_zip: dict[str, str]
              ) -> tuple[dict[tuple[str, str], _Series], list[dict], list[str]]:
    """Series by (UID, contrast) from the extracted files; the files ignored (with why); and the positions of the
    files without the DICOM preamble that do not parse as DICOM either."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_file_meta_info

    series: dict[tuple[str, str], _Series] = {}
    ignored: list[dict] = []
    unparsed: list[str] = []
    for zrel, k, path, _sha, named_dicomdir in members:
        where = f"{role_of_zip[zrel]} member {k}"
        if named_dicomdir:
            ignored.append(dict(file=where, why="a DICOMDIR (the export's index)"))
            continue
        with open(path, "rb") as fh:
            head = fh.read(132)
        preamble = len(head) == 132 and head[128:132] == b"DICM"
        if preamble:
            try:
                meta = read_file_meta_info(path)
            except Exception:                    # noqa: BLE001  (any failure: the file is damaged)
                raise ScanProblem(R.unreadable_dicom, f"{where}: has the DICOM preamble but its file meta "
                                                      "information does not parse") from None
            if str(meta.get("MediaStorageSOPClassUID") or "") == MEDIA_STORAGE_DIRECTORY:
                ignored.append(dict(file=where, why="a DICOMDIR (the export's index)"))
                continue
            try:
                ds = pydicom.dcmread(path, defer_size=1024, specific_tags=HEADER_TAGS)
            except (InvalidDicomError, AttributeError, KeyError, TypeError, ValueError, IndexError, OSError,
                    EOFError) as exc:
                raise ScanProblem(R.unreadable_dicom, f"{where}: DICOM header unreadable or incomplete "
                                                      f"({type(exc).__name__})") from None
        else:
            # no preamble: a PACS note, or a DICOM data set written without it (read below when it is an MR image)
            try:
                ds = pydicom.dcmread(path, force=True, defer_size=1024, specific_tags=HEADER_TAGS)
                ok = bool(ds.get("SOPClassUID")) and bool(_raw(ds, "SeriesInstanceUID"))
            except Exception:                    # noqa: BLE001  (whatever a random file makes the parser do)
                ok = False
            if not ok:
                ignored.append(dict(file=where, why="not a DICOM file"))
                unparsed.append(where)
                continue
        try:
            if not ds.get("SOPClassUID") or not _raw(ds, "SeriesInstanceUID"):
                raise ScanProblem(R.unreadable_dicom, f"{where}: has the DICOM preamble but no SOP class or series "
                                                      "UID (a damaged file)")
            modality = str(ds.get("Modality") or "")
            image_type = {str(t).upper() for t in (ds.get("ImageType") or [])}
            if modality != "MR":
                shown = modality if re.fullmatch(r"[A-Z]{2,4}", modality) else "unknown"
                ignored.append(dict(file=where, why=f"a series of modality {shown}"))
                continue
            if "LOCALIZER" in image_type:
                ignored.append(dict(file=where, why="a localizer"))
                continue
            frames = max(1, int(ds.get("NumberOfFrames") or 1))
            enhanced = str(ds.SOPClassUID) in ENHANCED_MR or frames > 1
            if enhanced:
                # an enhanced (multi-frame) MR file: its frames are the slices; their geometry is in the
                # functional groups, read now (and only for such files), never the pixel data
                geometry, frame_contrasts, numbers = _read_frames(path, ds, preamble, frames, where)
            contrast, composed, by_image_type = _contrast(ds)
            if enhanced:
                contrast, by_image_type = _frames_contrast(frame_contrasts, contrast, by_image_type, where)
            if contrast is None:
                ignored.append(dict(file=where, why="an MR series that is not a Dixon contrast"))
                continue
            uid = _raw(ds, "SeriesInstanceUID")
            m = STATION_RE.search(str(ds.get("ProtocolName") or "").strip())
            rows, cols = int(ds.Rows), int(ds.Columns)
            bits, samples = int(ds.get("BitsAllocated", 16)), int(ds.get("SamplesPerPixel", 1))
            if not enhanced:
                geometry, numbers = [(ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing)], None
            syntax = str(ds.file_meta.get("TransferSyntaxUID") or "") if hasattr(ds, "file_meta") else ""
            rewrite = not preamble or syntax == DEFLATED
            pixel_bytes = None if rewrite else _pixel_bytes(ds, path, syntax)
            slices = [_Slice(path, np.array([float(x) for x in ipp]), np.array([float(x) for x in iop]),
                             (float(ps[0]), float(ps[1])), (rows, cols), where=where, pixel_bytes=pixel_bytes,
                             expected_bytes=rows * cols * (bits // 8) * samples * frames, rewrite=rewrite,
                             syntax=syntax, frame=f if enhanced else None, frames=frames)
                      for f, (ipp, iop, ps) in enumerate(geometry, start=1)]
            if bits not in (8, 16) or samples != 1:
                raise ScanProblem(R.unreadable_dicom, f"{where}: {ds.get('BitsAllocated')}-bit, "
                                                      f"{ds.get('SamplesPerPixel')} samples per pixel (want "
                                                      "8- or 16-bit grey levels)")
            ident = {f: _raw(ds, f) for f in IDENTITY_FIELDS}
        except ScanProblem:
            if not preamble:                    # parsed by force only: not taken for a damaged DICOM file
                ignored.append(dict(file=where, why="not a DICOM file"))
                unparsed.append(where)
                continue
            raise
        except (InvalidDicomError, AttributeError, KeyError, TypeError, ValueError, IndexError, OSError,
                EOFError, NotImplementedError) as exc:    # pydicom: NotImplementedError for an unknown VR
            if not preamble:
                ignored.append(dict(file=where, why="not a DICOM file"))
                unparsed.append(where)
                continue
            raise ScanProblem(R.unreadable_dicom, f"{where}: DICOM header unreadable or incomplete "
                                                  f"({type(exc).__name__})") from None
        key = (uid, contrast)
        if key not in series:
            acquired = f"{ds.get('AcquisitionDate') or ds.get('SeriesDate') or ''}" \
                       f"{ds.get('AcquisitionTime') or ds.get('SeriesTime') or ''}"
            if not ds.get("AcquisitionDate") and ds.get("AcquisitionDateTime"):     # an enhanced file's
                acquired = str(ds.AcquisitionDateTime)
            station = None if composed or not m else int(m.group(1))
            series[key] = _Series(uid, contrast, station, composed, acquired, int(ds.get("SeriesNumber") or 0),
                                  _sidecar_header(ds, image_type, contrast, station, composed, numbers),
                                  ident=ident, by_image_type=by_image_type)
        s = series[key]
        s.by_image_type = s.by_image_type and by_image_type
        for f in IDENTITY_FIELDS:
            if ident[f] != s.ident[f]:
                raise ScanProblem(R.participant_mismatch, f"{s.label}: the slices of one series differ in {f}")
        s.slices.extend(slices)
    _check_mixed(series)
    return series, ignored, unparsed


def _raw(ds, keyword: str) -> str:
    """An identifying element's value as stored, never decoded: pydicom's validation of a decoded value warns
    and logs the value itself (a malformed UID, an over-long PatientID)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.datadict import tag_for_keyword

    el = ds.get_item(tag_for_keyword(keyword))
    if el is None:
        return ""
    v = el.value if isinstance(el, RawDataElement) else str(el.value)
    if isinstance(v, (bytes, bytearray)):
        v = bytes(v).decode("latin-1")
    return str(v or "").strip(" \x00")


def _group_value(item, shared, ds, keyword: str):
    """An enhanced file's value of ``keyword`` (a classic file's top-level attribute; see :data:`FRAME_FIELDS`):
    from the frame's functional groups ``item``, else the shared ones, else the top level; None if nowhere."""
    macro, attr = FRAME_FIELDS[keyword]
    for group in (item, shared):
        seq = group.get(macro) if group is not None else None
        if seq and attr in seq[0]:
            return seq[0].get(attr)
    return ds.get(keyword) if ds is not None else None


def _read_frames(path: Path, ds, preamble: bool, frames: int, where: str) -> tuple[list[tuple], set[str], dict]:
    """An enhanced file's functional groups (read for such a file only, up to its pixel data): each frame's
    (ImagePositionPatient, ImageOrientationPatient, PixelSpacing), the Dixon contrasts its frames' FrameType
    name, and the sidecar's numbers (TE, TR, flip angle, slice thickness: shared, else the first frame's). Groups
    that do not parse are ``unreadable_dicom``; so is a frame without a complete position, orientation or
    spacing, or per-frame groups that are not one per frame."""
    import pydicom

    try:
        groups = pydicom.dcmread(path, force=not preamble, stop_before_pixels=True, specific_tags=FRAME_TAGS)
        shared = groups.get("SharedFunctionalGroupsSequence")
        shared = shared[0] if shared else None
        per_frame = list(groups.get("PerFrameFunctionalGroupsSequence") or [])
        if len(per_frame) != frames:
            raise ScanProblem(R.unreadable_dicom, f"{where}: an enhanced MR file of {frames} frames with "
                                                  f"{len(per_frame)} per-frame functional groups")
        geometry, contrasts = [], set()
        for f, item in enumerate(per_frame, start=1):
            values = []
            for k, n in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6), ("PixelSpacing", 2)):
                # a frame's position is its own (or the top level's, for a single frame)
                top = ds if k != "ImagePositionPatient" or frames == 1 else None
                v = _group_value(item, shared, top, k)
                if v is None or len(v) != n:
                    raise ScanProblem(R.unreadable_dicom, f"{where}: frame {f} of {frames} of an enhanced MR file "
                                                          f"has no complete {k} in its functional groups")
                values.append([float(x) for x in v])
            geometry.append(tuple(values))
            tokens = {str(t).upper() for t in (_group_value(item, shared, None, "FrameType") or [])}
            contrasts |= {c for tok, c in IMAGE_TYPE_TOKENS.items() if tok in tokens}
        numbers = {k: _number(_group_value(per_frame[0] if per_frame else None, shared, None, k))
                   for k in SIDECAR_NUMBERS if k in FRAME_FIELDS}
    except ScanProblem:
        raise
    except Exception as exc:                     # noqa: BLE001  (nested sequences can fail in many ways)
        raise ScanProblem(R.unreadable_dicom, f"{where}: an enhanced MR file whose functional groups do not parse "
                                              f"({type(exc).__name__})") from None
    return geometry, contrasts, numbers


def _frames_contrast(frame_contrasts: set[str], contrast: str | None, by_image_type: bool, where: str
                     ) -> tuple[str | None, bool]:
    """An enhanced file's contrast: its ImageType's, checked against its frames' FrameType (each frame's Dixon
    token, where it has one). Frames of several contrasts in one file are ``mixed_series`` (not split)."""
    found = set(frame_contrasts)
    if contrast is not None and by_image_type:
        found.add(contrast)
    if len(found) > 1:
        both = sorted(found, key=CONTRASTS.index)
        raise ScanProblem(R.mixed_series, f"{where}: an enhanced MR file whose frames hold {' and '.join(both)} "
                                          "(its ImageType and frames' FrameType); one contrast per file is read")
    if found:
        return found.pop(), True
    return contrast, by_image_type


def _pixel_bytes(ds, path: Path, syntax: str) -> int | None:
    """Bytes of uncompressed pixel data the file holds (its declared length, cut at the end of the file); None
    for compressed (encapsulated) pixel data."""
    from pydicom.dataelem import RawDataElement

    if syntax and syntax not in NATIVE_SYNTAXES:
        return None
    el = ds.get_item(0x7FE00010, keep_deferred=True)
    if el is None:
        return 0
    if isinstance(el, RawDataElement):
        if el.length == 0xFFFFFFFF:                # encapsulated
            return None
        if el.value is None:                     # deferred: not read, only its position and length
            return max(0, min(int(el.length), path.stat().st_size - int(el.value_tell)))
        return len(el.value)
    v = el.value
    return len(v) if isinstance(v, (bytes, bytearray)) else None


def _check_mixed(series: dict[tuple[str, str], _Series]) -> None:
    """One SeriesInstanceUID holding several contrasts is split by ImageType; told apart by anything else (the
    description) it is refused."""
    by_uid: dict[str, list[_Series]] = {}
    for s in series.values():
        by_uid.setdefault(s.uid, []).append(s)
    for parts in by_uid.values():
        if len(parts) > 1 and not all(p.by_image_type for p in parts):
            parts.sort(key=lambda p: CONTRASTS.index(p.contrast))
            raise ScanProblem(R.mixed_series, f"{parts[0].label}: one series holds "
                                              f"{' and '.join(p.contrast for p in parts)} slices that its ImageType "
                                              "does not tell apart (only the description does)")


def _sidecar_header(ds, image_type: set[str], contrast: str, station: int | None, composed: bool,
                    numbers: dict | None = None) -> dict:
    """The allow-listed header of a series: derived, controlled values and numbers; no free text at all (an
    enhanced file's numbers from its shared functional groups, else its first frame's, where the top level has
    none)."""
    header: dict = {"contrast": contrast, "series": "composed" if composed else
                    (f"station {station}" if station is not None else "a station")}
    for k in SIDECAR_TEXT:
        v = str(ds.get(k) or "").strip()
        if v and re.fullmatch(r"[A-Za-z0-9 ._+-]{1,64}", v):
            header[k] = v
    for k in SIDECAR_NUMBERS:
        v = _number(ds.get(k))
        if v is None and numbers:
            v = numbers.get(k)
        if v is not None:
            header[k] = v
    header["ImageType"] = sorted(image_type & KNOWN_IMAGE_TYPE)
    return header


def _number(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


def _order(s: _Series):
    return (s.composed, s.station if s.station is not None else 0, CONTRASTS.index(s.contrast), s.acquired, s.number)


def _station_key(s: _Series):
    """A station's key: its number, else its position along the body (rounded mean slice z, mm)."""
    return s.station if s.station is not None else f"z{round(float(np.mean([sl.ipp[2] for sl in s.slices])))}"


def _check_identity(series: dict[tuple[str, str], _Series]) -> None:
    """Every Dixon series of the participant (chosen, superseded and composed alike) is the same person's:
    one PatientID. The series of one station share their study and frame of reference; across stations, where
    two or more stations share a value, a station with another value is someone else's (or another
    examination's). Stations that each have their own value (vendors that start a frame of reference per
    table position) are accepted. The values themselves are never reported."""
    from collections import Counter

    def odd_one(group: list[_Series], f: str) -> _Series | None:
        counts = Counter(s.ident[f] for s in group)
        if len(counts) < 2:
            return None
        common = counts.most_common(1)[0][0]
        return next(s for s in group if s.ident[f] != common)

    dixon = sorted(series.values(), key=_order)
    s = odd_one(dixon, "PatientID")
    if s is not None:
        raise ScanProblem(R.participant_mismatch, f"{s.label}: PatientID differs from the participant's other "
                                                  "series (another person's series in the zips?)")
    groups: dict = {}
    for s in dixon:
        groups.setdefault("composed" if s.composed else _station_key(s), []).append(s)
    for f in ("StudyInstanceUID", "FrameOfReferenceUID"):
        for group in groups.values():
            s = odd_one(group, f)
            if s is not None:
                raise ScanProblem(R.participant_mismatch, f"{s.label}: {f} differs from the other series of its "
                                                          "station")
        heads = [group[0] for group in groups.values()]
        counts = Counter(h.ident[f] for h in heads)
        if len(counts) > 1 and counts.most_common(1)[0][1] >= 2:
            s = odd_one(heads, f)
            raise ScanProblem(R.participant_mismatch, f"{s.label}: {f} differs from the other stations' "
                                                      "(another person's or another examination's series?)")


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


def _select(series: dict[tuple[str, str], _Series], composed: bool) -> tuple[dict[str, dict], list[dict]]:
    """contrast -> station key -> newest series (``composed``: the composed series only); superseded ones."""
    chosen: dict[str, dict] = {}
    superseded = []
    for s in sorted(series.values(), key=lambda s: (s.acquired, s.number)):
        if s.composed != composed:
            continue
        key = _station_key(s)
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


def _files(s: _Series) -> list[tuple[int, _Slice]]:
    """The series' files in slice order, each once: (the number of its first slice, 1-based; that slice). A
    classic file is one slice; an enhanced file holds several (its frames, which share its path)."""
    seen, out = set(), []
    for n, sl in enumerate(s.slices, start=1):
        if sl.path not in seen:
            seen.add(sl.path)
            out.append((n, sl))
    return out


def _prepare(chosen: dict[str, dict]) -> None:
    """Before conversion, every file of the chosen series: its pixel data complete (else ``truncated_dicom``,
    naming the slice, or the enhanced file and its first incomplete frame); a file without the preamble or
    deflated rewritten in place (in the private work folder) as a standard DICOM file, uncompressed, so that
    dcm2niix reads it."""
    for by in chosen.values():
        for s in by.values():
            for n, sl in _files(s):
                if sl.frame is None:
                    what, declare = f"{s.label}: slice {n} of {len(s.slices)} ({sl.where})", "rows, columns and bits"
                else:
                    what = f"{s.label}: the enhanced file of {sl.frames} frames ({sl.where})"
                    declare = "frames, rows, columns and bits"
                ds = _rewrite(sl, what) if sl.rewrite else None
                if sl.pixel_bytes is not None and sl.pixel_bytes < sl.expected_bytes:
                    cut = ""
                    if sl.frame is not None:
                        k = sl.pixel_bytes // (sl.expected_bytes // sl.frames) + 1
                        cut = f"; frame {k} of {sl.frames} on incomplete"
                    raise ScanProblem(R.truncated_dicom, f"{what}: the pixel data ends after {sl.pixel_bytes} of "
                                                         f"the {sl.expected_bytes} bytes its {declare} declare "
                                                         f"(a file cut short{cut})")
                if ds is not None:
                    ds.save_as(sl.path, enforce_file_format=True)
                for other in s.slices:           # an enhanced file's other frames: the same file
                    if other.path == sl.path:
                        other.rewrite, other.pixel_bytes, other.syntax = False, sl.pixel_bytes, sl.syntax


def _rewrite(sl: _Slice, what: str):
    """A whole file read (no preamble or deflated) and made a standard one: file meta added, deflated data set
    inflated to explicit VR little endian; sets ``sl.pixel_bytes``. Returns the data set to save."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                             generate_uid)

    try:
        ds = pydicom.dcmread(sl.path, force=True)
        syntax = str(ds.file_meta.get("TransferSyntaxUID") or "") if hasattr(ds, "file_meta") else ""
        pixels = ds.get("PixelData")
    except zlib.error:
        raise ScanProblem(R.truncated_dicom, f"{what}: the deflated data set ends early (a file cut short)") from None
    except Exception as exc:                     # noqa: BLE001  (a forced read can fail in many ways)
        raise ScanProblem(R.unreadable_dicom, f"{what}: cannot be read whole ({type(exc).__name__})") from None
    if syntax == DEFLATED or not syntax:
        implicit, little = ds.original_encoding[:2] if syntax != DEFLATED else (False, True)
        syntax = (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian) if little else ExplicitVRBigEndian
    native = syntax in NATIVE_SYNTAXES
    sl.syntax = str(syntax)
    sl.pixel_bytes = (len(pixels) if isinstance(pixels, (bytes, bytearray)) else 0) if native else None
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or generate_uid()
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    return ds


def _convert(chosen: dict[str, dict], work: Path, rules: DicomRules
             ) -> tuple[dict[tuple[str, str], np.ndarray], str]:
    """dcm2niix on the chosen series: one run for all of them, except that the parts of a series UID holding
    several contrasts (dcm2niix groups by UID) and the series of enhanced files are converted each in a run of
    its own (dcm2niix v1.0.20260724 misreads the intensity scaling of every Siemens enhanced file after the first
    in one run: near-zero floats). Each output in LAS order, its affine checked against the headers'. Returns
    series key -> voxels, and the converter's version line."""
    import dcm2niix
    from collections import Counter

    src, out = work / "series", work / "nifti"
    for d in (src, out):
        d.mkdir()
    todo = [s for by in chosen.values() for s in by.values()]
    per_uid = Counter(s.uid for s in todo)
    runs: dict[str, list[int]] = {}
    for j, s in enumerate(todo):
        own = per_uid[s.uid] > 1 or any(sl.frame is not None for sl in s.slices)
        runs.setdefault(f"part{j:03d}" if own else "all", []).append(j)
    run_of = {}
    for name, js in runs.items():
        (out / name).mkdir()
        for j in js:
            run_of[j] = name
            folder = src / name / f"{j:03d}"
            folder.mkdir(parents=True)
            moved = {}
            for n, (_first, sl) in enumerate(_files(todo[j])):      # an enhanced file once, as it is
                moved[sl.path] = folder / f"{n:05d}.dcm"
                sl.path.rename(moved[sl.path])
            for sl in todo[j].slices:
                sl.path = moved[sl.path]
    version, said_by_run = None, {}
    for name in runs:
        try:
            run = subprocess.run([dcm2niix.bin, "-z", "n", "-b", "n", "-f", "%j", "-o", str(out / name),
                                  str(src / name)], capture_output=True, text=True, encoding="utf-8",
                                 errors="replace", timeout=rules.dcm2niix_timeout_s)   # it echoes header bytes
        except subprocess.TimeoutExpired:
            raise ScanProblem(R.conversion_failed, f"dcm2niix did not finish in {rules.dcm2niix_timeout_s:.0f} s"
                              ) from None
        version = version or next((ln.strip() for ln in run.stdout.splitlines() if "version" in ln), "dcm2niix")
        said = _converter_said(run.stdout + "\n" + run.stderr, todo, work)
        if run.returncode != 0:
            raise ScanProblem(R.conversion_failed, f"dcm2niix exited with status {run.returncode}"
                                                   + (f": {said}" if said else ""))
        said_by_run[name] = said                 # kept for a refusal below
    arrays = {}
    for j, s in enumerate(todo):
        found = sorted((out / run_of[j]).glob(f"{s.uid}*.nii"))
        if len(found) != 1:
            said = said_by_run[run_of[j]]
            raise ScanProblem(R.conversion_failed, f"{s.label}: dcm2niix wrote {len(found)} volumes for the "
                                                   "series (want 1)" + (f"; it said: {said}" if said else ""))
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
        arrays[s.key] = data if data.dtype in (np.uint8, np.uint16, np.int16) else data.astype(np.float32)
        found[0].unlink()
    return arrays, version or "dcm2niix"


_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?(?:[/\\][^\s\"'`,;:()\[\]<>]+)+")
_WORK_FILE = re.compile(r"[/\\](\d{3})[/\\](\d{5})\.dcm$")
_WORK_FOLDER = re.compile(r"[/\\](\d{3})[/\\]?$")
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")
_SAID = re.compile(r"error|warning|unsupported|not supported|unable|corrupt|truncat|no valid", re.IGNORECASE)
_SYNTAX = re.compile(r"\b1\.2\.840\.10008\.1\.2(?:\.\d+)*\b")


def _converter_said(text: str, todo: list[_Series], work: Path, most: int = 3) -> str:
    """dcm2niix's own error and warning lines, each path replaced by the file's position (series label and slice
    number, or "enhanced file": the work files are numbered ``<series>/<file>.dcm``) and any UID that is not a
    standard DICOM one (a transfer syntax) left out: never a path, file name or identifying value. A line naming a
    transfer syntax but no file gets the first slice of that syntax, and how many there are."""

    def named(s: _Series, n: int, sl: _Slice) -> str:
        return f"{s.label} slice {n}" if sl.frame is None else f"{s.label} enhanced file ({sl.frames} frames)"

    def where(m: re.Match) -> str:
        p = m.group(0)
        f = _WORK_FILE.search(p)
        if f and int(f.group(1)) < len(todo):
            s, k = todo[int(f.group(1))], int(f.group(2))
            files = _files(s)
            return named(s, *files[k]) if k < len(files) else f"{s.label} slice {k + 1}"
        d = _WORK_FOLDER.search(p)
        if d and int(d.group(1)) < len(todo):
            return todo[int(d.group(1))].label
        return "<a file>"

    seen: list[str] = []
    text = text.replace(str(work), "")          # the work folder's own path, whatever it holds (then the rest)
    for ln in text.splitlines():
        if not _SAID.search(ln):
            continue
        ln = _PATH.sub(where, ln.strip())
        ln = _UID.sub(lambda m: m.group(0) if m.group(0).startswith("1.2.840.10008.") else "<uid>", ln)
        ln = re.sub(r"\s+", " ", ln)[:200]
        ts = _SYNTAX.search(ln)
        if ts and " slice " not in ln and " enhanced file " not in ln:
            ts = ts.group(0).rstrip(".")
            hits = [(s, n, sl) for s in todo for n, sl in _files(s) if sl.syntax == ts]
            if hits:
                many, unit = len(hits), "slice" if all(h[2].frame is None for h in hits) else "file"
                ln += f" (from {named(*hits[0])}: {many} {unit}{'s' if many > 1 else ''} in all)"
        if ln and ln not in seen:
            seen.append(ln)
    return "; ".join(seen[:most])


# ----------------------------------------------------------------------------------------------------------
# 5-6. per-station checks, stitching


def _station_checks(chosen: dict[str, dict], arrays: dict[tuple[str, str], np.ndarray], rules: DicomRules
                    ) -> list[dict]:
    report = []
    for key, w in chosen["water"].items():
        f = chosen["fat"][key]
        q = fat_water_swap(arrays[w.key], arrays[f.key], tuple(abs(float(x)) for x in np.diag(w.affine)[:3]),
                           max_slices=8)
        entry = dict(station=w.station, swap_reversed_fraction=None if q.n_slices == 0 else round(q.reversed_fraction, 3),
                     _swap=q)
        if q.n_slices >= 3 and q.reversed_fraction >= rules.station_swap_reversed:
            raise ScanProblem(R.station_fat_water_swap, f"{w.label}: water and fat appear exchanged "
                                                        f"({q.reversed_fraction:.0%} of {q.n_slices} slices "
                                                        "reversed)")
        if "in" in chosen:
            s = arrays[w.key].astype(np.float32) + arrays[f.key]
            body = s > 0.25 * float(np.percentile(subsample(s), 99))
            if body.any():
                dev = float(np.median(np.abs(arrays[chosen["in"][key].key][body] - s[body])) / np.median(s[body]))
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
            for k, path, sha, named_dicomdir in _extract(f, work, n, state, rules):
                members.append((f.rel, k, path, sha, named_dicomdir))
                inputs[f"{f.rel}#{k}"] = sha
        series, ignored, unparsed = _classify(members, {f.rel: f.role for f in listed})
        _check_identity(series)
        if unparsed:
            have = {s.contrast for s in series.values()}
            for c in (c for c in REQUIRED_CHANNELS if c not in have):
                raise ScanProblem(R.unreadable_dicom, f"no {c} series, and {len(unparsed)} "
                                                      f"file{'s' if len(unparsed) != 1 else ''} without the DICOM "
                                                      "preamble (no DICM at byte 128) that do not parse as DICOM "
                                                      f"either (the first: {unparsed[0]})")
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
        _prepare(chosen)
        arrays, converter = _convert(chosen, work, rules)
        station_report = _station_checks(chosen, arrays, rules)
        keys = [next(k for k, s in chosen["water"].items() if s is st) for st in stations]
        vols = {}
        for c in contrasts:              # one contrast at a time; the weights are the same for each
            (v,), summary = stitch([(chosen["water"][k].affine, arrays[chosen[c][k].key][None]) for k in keys],
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
