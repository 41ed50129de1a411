"""Simulated scanner output: one Dixon contrast of one station as a DICOM series (pydicom), NAKO-like.

A whole-body 3D VIBE Dixon arrives as several overlapping stations; each station is one series per contrast
(water, fat, in-phase, opposed-phase), told apart by ``ImageType`` tokens and ``SeriesDescription``
(``3D_GRE_TRA_W``, ``_F``, ``_in``, ``_opp``), the station number in ``ProtocolName``. This module writes one such
series from a volume in the platform's voxel order (``[i, j, k]`` along left, anterior, superior; the affine maps
to scanner RAS+ mm) with the geometry a scanner writes: DICOM patient coordinates are LPS, each axial slice has its
``ImagePositionPatient``, rows run posterior-to-anterior reversed (anterior first), columns to the left.

Identifying fields (name, birth date, institution) hold **fake** values, so that de-identification can be tested
by looking for them. UIDs are derived deterministically from the seed: the same seed writes the same bytes.
The same series as current scanners export it, one Enhanced MR Image Storage file whose frames are the slices,
comes from :func:`enhanced_series`. ``cbp synth --format dicom`` writes whole participants with
:func:`participant_zips` (classic single-frame files); the reader side is :mod:`cbp_platform.ingest.dicom`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

# contrast -> (SeriesDescription suffix, ImageType tokens after ORIGINAL\PRIMARY\M)
CONTRASTS = {
    "water": ("W", ["DIXON", "WATER"]),
    "fat": ("F", ["DIXON", "FAT"]),
    "in": ("in", ["DIXON", "IN_PHASE"]),
    "opp": ("opp", ["DIXON", "OPP_PHASE"]),
}
SERIES_PREFIX = "3D_GRE_TRA"
UID_ROOT = "1.2.826.0.1.3680043.10.1234."       # a private test root: never a real scanner's


@dataclass(frozen=True)
class FakeIdentity:
    """Identifying header values, all fake: they must never leave the secure environment."""

    patient_name: str = "Mustermann^Erika"
    birth_date: str = "19640812"
    institution: str = "Studienzentrum Musterstadt"
    referring: str = "Dr^Beispiel"


def uid(*parts) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(p) for p in parts])


def lps_geometry(affine_ras: np.ndarray, k: int) -> tuple[list[float], list[float]]:
    """(ImagePositionPatient of slice ``k``, ImageOrientationPatient) for an axial slice ``vol[:, :, k]``
    stored with columns along ``i`` and rows along ``j``."""
    flip = np.diag([-1.0, -1.0, 1.0])                      # RAS -> LPS
    m = flip @ affine_ras[:3, :3]
    pos = flip @ (affine_ras[:3, :3] @ np.array([0.0, 0.0, float(k)]) + affine_ras[:3, 3])
    row_dir = m[:, 0] / np.linalg.norm(m[:, 0])          # along a row: increasing column index (i)
    col_dir = m[:, 1] / np.linalg.norm(m[:, 1])          # down a column: increasing row index (j)
    return [float(x) for x in pos], [float(x) for x in (*row_dir, *col_dir)]


def series_slices(volume: np.ndarray, affine_ras: np.ndarray, *, contrast: str, station: int,
                  k_range: tuple[int, int], pseudonym: str, seed: int, acquired: datetime,
                  identity: FakeIdentity = FakeIdentity(), series_number: int | None = None,
                  composed: bool = False, modality: str = "MR") -> tuple[str, list[bytes]]:
    """Slices ``k_range[0] .. k_range[1] - 1`` of ``volume`` as one station's series of ``contrast`` (or the
    scanner-composed whole-body series): ``(SeriesInstanceUID, [DICOM file bytes, in slice order])``."""
    import io

    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, SecondaryCaptureImageStorage

    suffix, tokens = CONTRASTS[contrast]
    sx, sy, sz = (float(np.linalg.norm(affine_ras[:3, a])) for a in range(3))
    study = uid(seed, pseudonym, "study")
    series = uid(seed, pseudonym, contrast, station, acquired.isoformat(), composed, modality)
    frame = uid(seed, pseudonym, "frame")
    number = series_number if series_number is not None else 10 * station + list(CONTRASTS).index(contrast) + 1
    sop_class = MRImageStorage if modality == "MR" else SecondaryCaptureImageStorage
    out = []
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()                  # one header, the per-slice fields set for each slice
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "Skyra"
    ds.MagneticFieldStrength = 3
    ds.ImageType = ["DERIVED" if composed else "ORIGINAL", "PRIMARY", "M", *tokens,
                    *(["COMPOSED"] if composed else [])]
    ds.SeriesDescription = f"{SERIES_PREFIX}_{suffix}" + ("_COMPOSED" if composed else "")
    ds.ProtocolName = f"{SERIES_PREFIX}" + ("" if composed else f"_S{station}")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.SeriesNumber = number
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = acquired.strftime("%Y%m%d")
    ds.StudyTime = acquired.strftime("%H%M%S")
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = acquired.strftime("%H%M%S.%f")
    ds.PatientID = pseudonym
    ds.PatientName = identity.patient_name
    ds.PatientBirthDate = identity.birth_date
    ds.PatientSex = "O"
    ds.InstitutionName = identity.institution
    ds.ReferringPhysicianName = identity.referring
    ds.PatientPosition = "HFS"
    ds.PixelSpacing = [sy, sx]                          # row spacing (between rows: j), column spacing (i)
    ds.SliceThickness = sz
    ds.SpacingBetweenSlices = sz
    ds.EchoTime, ds.RepetitionTime, ds.FlipAngle = 1.23, 4.06, 9
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for n, k in enumerate(range(*k_range), start=1):
        ipp, iop = lps_geometry(affine_ras, k)
        meta.MediaStorageSOPInstanceUID = uid(series, n)
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.InstanceNumber = n
        ds.ImagePositionPatient = [round(x, 4) for x in ipp]
        ds.ImageOrientationPatient = [round(x, 6) for x in iop]
        ds.SliceLocation = round(ipp[2], 4)
        pixels = np.ascontiguousarray(np.clip(volume[:, :, k], 0, 65535).astype(np.uint16).T)   # [row j, col i]
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return series, out


def enhanced_series(volume: np.ndarray, affine_ras: np.ndarray, *, contrast: str, station: int,
                    k_range: tuple[int, int], pseudonym: str, seed: int, acquired: datetime,
                    identity: FakeIdentity = FakeIdentity(), series_number: int | None = None,
                    composed: bool = False, modality: str = "MR") -> tuple[str, bytes]:
    """The series :func:`series_slices` writes (same arguments, UIDs, identity and geometry), as current scanners
    export it: ONE Enhanced MR Image Storage file whose frames are the slices, in slice order (inferior to
    superior). ``(SeriesInstanceUID, the file's bytes)``.

    What stays at the top level: patient, study, series, frame of reference, equipment, ``ImageType`` (the same
    tokens as the classic series), ``Rows``/``Columns`` and ``NumberOfFrames``. The geometry lives in the
    functional groups: shared ``PixelMeasuresSequence`` (``PixelSpacing``, ``SliceThickness``,
    ``SpacingBetweenSlices``), ``PlaneOrientationSequence``, ``MRImageFrameTypeSequence`` and the timing
    (``MRTimingAndRelatedParametersSequence``, ``MREchoSequence``); per frame ``PlanePositionSequence`` and
    ``FrameContentSequence`` (stack 1, in-stack position and dimension index values along the stack)."""
    import io

    import pydicom
    from pydicom import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedMRImageStorage

    series, slices = series_slices(volume, affine_ras, contrast=contrast, station=station, k_range=k_range,
                                   pseudonym=pseudonym, seed=seed, acquired=acquired, identity=identity,
                                   series_number=series_number, composed=composed, modality=modality)
    frames = [pydicom.dcmread(io.BytesIO(b)) for b in slices]
    ds = frames[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid(series, "enhanced")
    ds.InstanceNumber = 1
    ds.AcquisitionDateTime = ds.AcquisitionDate + ds.AcquisitionTime
    ds.ContentQualification = "PRODUCT"
    ds.ResonantNucleus = "1H"
    ds.ImagedNucleus = "1H"
    ds.VolumetricProperties = "VOLUME"
    ds.BurnedInAnnotation = "NO"
    measures = Dataset()
    measures.PixelSpacing = ds.PixelSpacing
    measures.SliceThickness = ds.SliceThickness
    measures.SpacingBetweenSlices = ds.SpacingBetweenSlices
    orientation = Dataset()
    orientation.ImageOrientationPatient = ds.ImageOrientationPatient
    frame_type = Dataset()
    frame_type.FrameType = ds.ImageType
    frame_type.PixelPresentation = "MONOCHROME"
    frame_type.VolumetricProperties = "VOLUME"
    frame_type.VolumeBasedCalculationTechnique = "NONE"
    frame_type.ComplexImageComponent = "MAGNITUDE"
    frame_type.AcquisitionContrast = "UNKNOWN"
    timing = Dataset()
    timing.RepetitionTime, timing.FlipAngle = ds.RepetitionTime, ds.FlipAngle
    echo = Dataset()
    echo.EffectiveEchoTime = ds.EchoTime
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.MRImageFrameTypeSequence = Sequence([frame_type])
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    shared.MREchoSequence = Sequence([echo])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for n, f in enumerate(frames, start=1):
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = n
        content.DimensionIndexValues = [1, n]
        content.FrameAcquisitionDateTime = ds.AcquisitionDateTime
        position = Dataset()
        position.ImagePositionPatient = f.ImagePositionPatient
        item = Dataset()
        item.FrameContentSequence = Sequence([content])
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    organisation = uid(series, "dimensions")
    ds.DimensionOrganizationSequence = Sequence([Dataset()])
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = organisation
    ds.DimensionOrganizationType = "3D"
    index = []
    for pointer, label in ((0x00209056, "Stack ID"), (0x00209057, "In-Stack Position Number")):
        d = Dataset()
        d.DimensionOrganizationUID = organisation
        d.DimensionIndexPointer = pointer
        d.FunctionalGroupPointer = 0x00209111                # FrameContentSequence
        d.DimensionDescriptionLabel = label
        index.append(d)
    ds.DimensionIndexSequence = Sequence(index)
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
               "SpacingBetweenSlices", "SliceLocation", "EchoTime", "RepetitionTime", "FlipAngle", "AcquisitionDate",
               "AcquisitionTime"):
        delattr(ds, kw)
    ds.NumberOfFrames = len(frames)
    ds.PixelData = b"".join(f.PixelData for f in frames)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return series, buf.getvalue()


def write_series(volume: np.ndarray, affine_ras: np.ndarray, out_dir: Path, *, contrast: str, station: int,
                 k_range: tuple[int, int], pseudonym: str, seed: int, acquired: datetime,
                 identity: FakeIdentity = FakeIdentity(), series_number: int | None = None) -> list[Path]:
    """Write one station's series of ``contrast`` as files ``<out_dir>/<SeriesInstanceUID>/<n>.dcm``."""
    series, slices = series_slices(volume, affine_ras, contrast=contrast, station=station, k_range=k_range,
                                   pseudonym=pseudonym, seed=seed, acquired=acquired, identity=identity,
                                   series_number=series_number)
    folder = Path(out_dir) / series
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for n, payload in enumerate(slices, start=1):
        path = folder / f"{n:04d}.dcm"
        path.write_bytes(payload)
        files.append(path)
    return files


# ----------------------------------------------------------------------------------------------------------
# a whole participant: overlapping stations, one zip per contrast, and the DICOM delivery faults

N_STATIONS = 4
WHOLE_BODY_STATIONS = 4


def station_ranges(nz: int, n: int = N_STATIONS, overlap: int | None = None) -> list[tuple[int, int]]:
    """``n`` equal, overlapping slabs ``[k0, k1)`` covering ``0 .. nz - 1`` (overlap ``overlap`` slices, by default
    about ``nz / 12``, at least 2), as a multi-station table-move acquisition lays them out."""
    overlap = max(2, round(nz / 12)) if overlap is None else overlap
    length = -(-(nz + (n - 1) * overlap) // n)
    starts = [round(s * (nz - length) / (n - 1)) for s in range(n)]
    return [(k0, k0 + length) for k0 in starts]


def stations_for(nz: int, extent: str = "lumbar") -> list[tuple[int, int]]:
    """The stations of a volume of ``nz`` slices: a lumbar slab as 4 stations overlapping by a twelfth
    (:func:`station_ranges`); a whole-body volume (about 1080 mm) as NAKO's 4 stations of about 300 mm,
    overlapping by about 30 mm (a 36th of the volume)."""
    if extent == "whole-body":
        return station_ranges(nz, WHOLE_BODY_STATIONS, overlap=max(2, round(nz / 36)))
    return station_ranges(nz)


@dataclass
class StationPlan:
    """What one participant's DICOM delivery holds, with the fault applied (and described for the truth)."""

    stations: list[tuple[int, int]]
    drop_station: int | None = None              # station number (1-based) not delivered
    drop_slice: tuple[str, int, int] | None = None   # (contrast, station, slice index within the station)
    repeat_station: int | None = None            # acquired twice: an older, motion-degraded series first
    shift_fat_station: int | None = None         # fat of this station on another grid (7 mm shift along x)
    swap_stations: tuple[int, ...] = ()          # water and fat exchanged in these stations
    extra_non_dicom: bool = False
    extra_other_modality: bool = False
    composed: bool = False
    detail: str = ""


def plan_stations(nz: int, fault: str, swap: str, rng: np.random.Generator, *, composed: bool = False,
                  extent: str = "lumbar") -> StationPlan:
    plan = StationPlan(stations_for(nz, extent), composed=composed)
    n = len(plan.stations)
    if swap == "full":
        plan.swap_stations = tuple(range(1, n + 1))
    elif swap == "slab":
        plan.swap_stations = (1,) if rng.random() < 0.5 else (n,)
    if fault == "missing_station":
        plan.drop_station = 2
        plan.detail = f"station 2 of {n} not delivered (all contrasts)"
    elif fault == "missing_slice":
        k0, k1 = plan.stations[2]
        plan.drop_slice = ("water", 3, (k1 - k0) // 2)
        plan.detail = f"water station 3: slice {(k1 - k0) // 2 + 1} of {k1 - k0} not delivered"
    elif fault == "repeated_station":
        plan.repeat_station = 2
        plan.detail = "station 2 acquired twice; the older series is motion-degraded (keep the newer)"
    elif fault == "water_fat_grid":
        plan.shift_fat_station = 3
        plan.detail = "fat station 3 on another grid (origin shifted 7 mm left-right)"
    elif fault == "swapped_station":
        plan.swap_stations = tuple(sorted(set(plan.swap_stations) | {2}))
        plan.detail = "water and fat exchanged in station 2"
    elif fault == "non_dicom_file":
        plan.extra_non_dicom = True
        plan.detail = "a text file inside the water zip"
    elif fault == "other_modality":
        plan.extra_other_modality = True
        plan.detail = "a secondary-capture (OT) series inside the water zip"
    return plan


def _zip_bytes(members: list[tuple[str, bytes]], when: datetime) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, payload in members:
            info = zipfile.ZipInfo(name, date_time=when.timetuple()[:6])
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, payload, compresslevel=1)
    return buf.getvalue()


def participant_zips(volumes: dict[str, np.ndarray], affine: np.ndarray, plan: StationPlan, *, pseudonym: str,
                     seed: int, exam: datetime, identity: FakeIdentity = FakeIdentity()) -> dict[str, bytes]:
    """One zip per contrast (``volumes``: contrast -> the whole-body volume on the phantom's grid), each holding
    that contrast's station series (and the composed series when planned); the plan's fault applied."""
    from datetime import timedelta

    out = {}
    for contrast, vol in volumes.items():
        members: list[tuple[str, bytes]] = []

        def add(series_no: int, desc: str, slices: list[bytes]):
            folder = f"{series_no:04d}_{desc}"
            members.extend((f"{folder}/IM{n:04d}.dcm", b) for n, b in enumerate(slices, start=1))

        for s, (k0, k1) in enumerate(plan.stations, start=1):
            if s == plan.drop_station:
                continue
            src = contrast
            if s in plan.swap_stations and contrast in ("water", "fat"):
                src = "fat" if contrast == "water" else "water"
            v, aff = volumes[src], affine
            if plan.shift_fat_station == s and contrast == "fat":
                aff = affine.copy()
                aff[0, 3] += 7.0
            when = exam + timedelta(seconds=95 * s)
            if plan.repeat_station == s:
                # the first attempt: motion (a 3-voxel shift front-back) and lower signal, then repeated later
                degraded = (np.roll(v, 3, axis=1) * 0.7).astype(v.dtype)
                _, first = series_slices(degraded, aff, contrast=contrast, station=s, k_range=(k0, k1),
                                         pseudonym=pseudonym, seed=seed, acquired=when, identity=identity)
                add(10 * s + list(CONTRASTS).index(contrast) + 1, f"{SERIES_PREFIX}_{CONTRASTS[contrast][0]}", first)
                when = exam + timedelta(seconds=95 * len(plan.stations) + 300)
            number = 10 * s + list(CONTRASTS).index(contrast) + 1 + (100 if plan.repeat_station == s else 0)
            _, slices = series_slices(v, aff, contrast=contrast, station=s, k_range=(k0, k1), pseudonym=pseudonym,
                                      seed=seed, acquired=when, identity=identity, series_number=number)
            if plan.drop_slice and plan.drop_slice[:2] == (contrast, s):
                del slices[plan.drop_slice[2]]
            add(number, f"{SERIES_PREFIX}_{CONTRASTS[contrast][0]}", slices)
        if plan.composed:
            _, slices = series_slices(vol, affine, contrast=contrast, station=0, k_range=(0, vol.shape[2]),
                                      pseudonym=pseudonym, seed=seed, acquired=exam + timedelta(seconds=600),
                                      identity=identity, series_number=900 + list(CONTRASTS).index(contrast),
                                      composed=True)
            add(900 + list(CONTRASTS).index(contrast), f"{SERIES_PREFIX}_{CONTRASTS[contrast][0]}_COMPOSED", slices)
        if contrast == "water" and plan.extra_non_dicom:
            members.append(("README.txt", b"exported by the PACS; questions to the data centre\n"))
        if contrast == "water" and plan.extra_other_modality:
            shot = np.zeros_like(vol[:, :, :1])
            shot[::4, ::4] = 1000
            _, slices = series_slices(shot, affine, contrast=contrast, station=0, k_range=(0, 1), pseudonym=pseudonym,
                                      seed=seed, acquired=exam + timedelta(seconds=700), identity=identity,
                                      series_number=999, modality="OT")
            add(999, "SCREENSHOT", slices)
        out[contrast] = _zip_bytes(members, exam)
    return out
