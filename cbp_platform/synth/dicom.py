"""Simulated scanner output: one Dixon contrast of one station as a DICOM series (pydicom), NAKO-like.

A whole-body 3D VIBE Dixon arrives as several overlapping stations; each station is one series per contrast
(water, fat, in-phase, opposed-phase), told apart by ``ImageType`` tokens and ``SeriesDescription``
(``3D_GRE_TRA_W``, ``_F``, ``_in``, ``_opp``), the station number in ``ProtocolName``. This module writes one such
series from a volume in the platform's voxel order (``[i, j, k]`` along left, anterior, superior; the affine maps
to scanner RAS+ mm) with the geometry a scanner writes: DICOM patient coordinates are LPS, each axial slice has its
``ImagePositionPatient``, rows run posterior-to-anterior reversed (anterior first), columns to the left.

Identifying fields (name, birth date, institution) hold **fake** values, so that de-identification can be tested
by looking for them. UIDs are derived deterministically from the seed: the same seed writes the same bytes.
This is the first part of ``cbp synth --format dicom`` (issue 15); its reader side is the DICOM ingestion.
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


def write_series(volume: np.ndarray, affine_ras: np.ndarray, out_dir: Path, *, contrast: str, station: int,
                 k_range: tuple[int, int], pseudonym: str, seed: int, acquired: datetime,
                 identity: FakeIdentity = FakeIdentity(), series_number: int | None = None) -> list[Path]:
    """Write slices ``k_range[0] .. k_range[1] - 1`` of ``volume`` as one station's series of ``contrast``;
    returns the files (``<out_dir>/<SeriesInstanceUID>/<n>.dcm``)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
    from pydicom import Dataset

    suffix, tokens = CONTRASTS[contrast]
    sx, sy, sz = (float(np.linalg.norm(affine_ras[:3, a])) for a in range(3))
    study = uid(seed, pseudonym, "study")
    series = uid(seed, pseudonym, contrast, station, acquired.isoformat())
    frame = uid(seed, pseudonym, "frame")
    folder = Path(out_dir) / series
    folder.mkdir(parents=True, exist_ok=True)
    number = series_number if series_number is not None else 10 * station + list(CONTRASTS).index(contrast) + 1
    files = []
    for n, k in enumerate(range(*k_range), start=1):
        ipp, iop = lps_geometry(affine_ras, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = uid(series, n)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.Manufacturer = "SIEMENS"
        ds.MagneticFieldStrength = 3
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", *tokens]
        ds.SeriesDescription = f"{SERIES_PREFIX}_{suffix}"
        ds.ProtocolName = f"{SERIES_PREFIX}_S{station}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesNumber, ds.InstanceNumber = number, n
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = acquired.strftime("%Y%m%d")
        ds.StudyTime = acquired.strftime("%H%M%S")
        ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = acquired.strftime("%H%M%S.%f")
        ds.PatientID = pseudonym
        ds.PatientName = identity.patient_name
        ds.PatientBirthDate = identity.birth_date
        ds.InstitutionName = identity.institution
        ds.ReferringPhysicianName = identity.referring
        ds.ImagePositionPatient = [round(x, 4) for x in ipp]
        ds.ImageOrientationPatient = [round(x, 6) for x in iop]
        ds.PixelSpacing = [sy, sx]                          # row spacing (between rows: j), column spacing (i)
        ds.SliceThickness = sz
        ds.SpacingBetweenSlices = sz
        ds.SliceLocation = round(ipp[2], 4)
        ds.EchoTime, ds.RepetitionTime, ds.FlipAngle = 1.23, 4.06, 9
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        pixels = np.ascontiguousarray(np.clip(volume[:, :, k], 0, 65535).astype(np.uint16).T)   # [row j, col i]
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels.tobytes()
        path = folder / f"{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files
