"""The one registry of quarantine reasons: every code a stage may write to the ``quarantine`` table.

A participant that fails a check is quarantined at one stage with a machine-readable reason code and a message
naming the problem (never the pseudonym or a path). The codes are defined here, once, each with the stages that
may emit it, the check it belongs to (the docs' tables are grouped by check) and a one-line explanation::

    from cbp_platform.reasons import R, reason

    raise ScanProblem(R.checksum_mismatch, "water image (files[3]): sha256 ... differs")   # stored as its code
    rows.append(dict(pseudonym=p, reason=R.duplicate_pseudonym.code, message=...))
    reason("checksum_mismatch").explanation        # a code read back (a table, the CLI): checked

``R.<code>`` is the only way code spells a reason: a misspelt attribute raises ``AttributeError`` naming the
nearest codes, and ``tests/ingest/test_reasons.py`` reads every ``R.<code>`` of the code base without running it.
:func:`reason` raises :class:`UnknownReason` for a code that is not registered.

Adding a reason: one :class:`Reason` entry in :data:`_ALL` (code, stages, check, explanation), then emit it as
``R.<code>``; ``python tools/reasons_doc.py`` rewrites the docs' tables (a test fails while they disagree). A
reason no code path emits any more is kept with ``reserved=True`` (tables written before keep their meaning).

Not here: delivery-level outcomes (``waiting``, ``refused``, ``changed``, ``gone``; see
:data:`cbp_platform.ingest.deliveries.STATES`) are states with a free-text message, not quarantine reasons; QC
reviewers' rejection reasons have their own registry, :data:`cbp_platform.qc.reviews.REJECT_REASONS`; the analysis'
exclusion codes are :data:`cbp_platform.analysis.cohort.EXCLUSION_RULES` (``fat_water_swap_suspected`` is both a
quarantine reason and the exclusion step that counts it).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

# The stages that write quarantine rows (the ``stage`` column; a model comparison writes
# ``comparison_metrics:<model>``, see :func:`stage_key`).
RAW_MRI_SCANS = "raw_mri_scans"
PARTICIPANT_COVARIATES = "participant_covariates"
MUSCLE_SEGMENTATIONS = "muscle_segmentations"
MUSCLE_METRICS = "muscle_metrics"
COMPARISON_METRICS = "comparison_metrics"
STAGES = (RAW_MRI_SCANS, PARTICIPANT_COVARIATES, MUSCLE_SEGMENTATIONS, MUSCLE_METRICS, COMPARISON_METRICS)

# The checks, in the order a participant meets them (the docs' tables follow this order): key -> label.
CHECKS: dict[str, str] = {
    "path": "the path (`lstat` of every component; links never followed)",
    "manifest": "size and sha256 against the registered manifest (streamed)",
    "nifti_header": "the NIfTI-1 header, from the first bytes only",
    "nifti_geometry": "water against fat (and in/opp), from the headers",
    "nifti_data": "the data, streamed into a buffer of exactly the declared size",
    "nifti_values": "the values",
    "participant": "the participant",
    "dicom_zips": "DICOM: the zips",
    "dicom_headers": "DICOM: classification by header",
    "dicom_geometry": "DICOM: geometry from the headers",
    "dicom_conversion": "DICOM: conversion (dcm2niix)",
    "dicom_stations": "DICOM: per-station checks",
    "dicom_stitching": "DICOM: stitching",
    "covariates_file": "covariates.csv, the whole file",
    "covariates_row": "covariates.csv, one row",
    "segmentation": "segmentation",
    "metrics": "muscle metrics",
}

SCANS = (RAW_MRI_SCANS,)
COVARIATES = (PARTICIPANT_COVARIATES,)
FILES = (RAW_MRI_SCANS, PARTICIPANT_COVARIATES)      # checks of any listed file (a scan, a zip, covariates.csv)


class UnknownReason(KeyError):
    """A reason code that is not registered in :mod:`cbp_platform.reasons`."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown reason"


@dataclass(frozen=True)
class Reason:
    code: str                      # what the quarantine table stores
    stages: tuple[str, ...]        # the stages that may emit it
    check: str                     # a key of CHECKS
    explanation: str               # one line, for operators (the docs' tables, `cbp status --explain`)
    reserved: bool = False         # registered, emitted by no code path any more

    def __str__(self) -> str:
        return self.code


_ALL: tuple[Reason, ...] = (
    # --- raw_mri_scans (and covariates.csv, for the checks every listed file goes through)
    Reason("missing_water", SCANS, "path", "no water image delivered (DICOM: no water series)"),
    Reason("missing_fat", SCANS, "path", "no fat image delivered (DICOM: no fat series)"),
    Reason("missing_file", SCANS, "path", "a file listed in the manifest is absent"),
    Reason("not_in_manifest", FILES, "path", "a file is present but not listed in the manifest"),
    Reason("outside_delivery", FILES, "path",
           "the file, or a folder on its path, is a symbolic link (never followed out of the delivery)"),
    Reason("not_a_file", FILES, "path", "not a regular file (a FIFO, a device, a folder): never opened"),
    Reason("empty_file", SCANS, "manifest", "the file has 0 bytes"),
    Reason("size_mismatch", FILES, "manifest", "the file's size differs from the manifest's"),
    Reason("checksum_mismatch", FILES, "manifest", "the file's sha256 differs from the manifest's"),
    Reason("not_nifti", SCANS, "nifti_header",
           "no NIfTI-1 header (a NIfTI-2 file, a header/image pair, or another format)"),
    Reason("invalid_header", SCANS, "nifti_header", "a NIfTI-1 header nibabel cannot read"),
    Reason("invalid_dimensions", SCANS, "nifti_header", "not one 3D volume (a 4D series, a zero dimension)"),
    Reason("absurd_size", SCANS, "nifti_header",
           "the header declares more than 128 MiB per image: refused before decompressing"),
    Reason("implausible_shape", SCANS, "nifti_header", "a dimension outside 16-1024 voxels"),
    Reason("unsupported_dtype", SCANS, "nifti_header", "a data type outside the accepted integer and float types"),
    Reason("invalid_data_offset", SCANS, "nifti_header",
           "the image data would start inside the header (or after a header extension over 1 MiB)"),
    Reason("invalid_spacing", SCANS, "nifti_header",
           "a voxel size that is zero, negative, not finite or outside 0.2-20 mm"),
    Reason("invalid_affine", SCANS, "nifti_header", "no usable affine (singular, not finite, or no clear orientation)"),
    Reason("shape_mismatch", SCANS, "nifti_geometry", "an image's shape differs from the water image's"),
    Reason("affine_mismatch", SCANS, "nifti_geometry", "an image's affine differs from the water image's"),
    Reason("corrupt_gzip", SCANS, "nifti_data", "the gzip stream is corrupt"),
    Reason("truncated_gzip", SCANS, "nifti_data",
           "the gzip stream ends early (inside the header or before the declared image size)"),
    Reason("truncated_file", SCANS, "nifti_data", "an uncompressed file ends before the declared image size"),
    Reason("trailing_data", SCANS, "nifti_data",
           "anything after the image (another gzip member, gigabytes of zeros; at most 64 KiB past it decompressed)"),
    Reason("nan_values", SCANS, "nifti_values", "voxels that are NaN or infinite"),
    Reason("negative_signal", SCANS, "nifti_values", "negative voxels (magnitude images have no negative signal)"),
    Reason("empty_image", SCANS, "nifti_values", "an image with no signal"),
    Reason("constant_image", SCANS, "nifti_values", "every voxel has the same value"),
    Reason("duplicate_pseudonym", FILES, "participant",
           "the pseudonym was registered first by another delivery, or repeats in covariates.csv "
           "(first registered wins)"),
    Reason("not_in_participant_list", FILES, "participant",
           "files are listed under the participant's folder, but the manifest's participant list lacks the "
           "pseudonym (nothing of a delivery disappears unreported)"),
    Reason("duplicate_content", SCANS, "participant",
           "the same image content is delivered under another pseudonym of the delivery (both are quarantined; "
           "the message names the other's position in the manifest)"),
    Reason("unreadable", FILES, "participant",
           "a file that cannot be examined or opened, or an unforeseen error (the message names its type, "
           "never a path)"),
    # --- raw_mri_scans, DICOM deliveries
    Reason("zip_too_large", SCANS, "dicom_zips",
           "a zip holds more than 20,000 files, declares one over 64 MiB or, with the participant's other zips, "
           "over 2 GiB uncompressed: refused before extracting"),
    Reason("corrupt_zip", SCANS, "dicom_zips",
           "not a zip, an encrypted member, or a member that cannot be extracted (a CRC error)"),
    Reason("unreadable_dicom", SCANS, "dicom_headers",
           "a file with the DICOM preamble whose header does not parse or lacks its SOP class or series UID; "
           "other than 8- or 16-bit grey levels; an enhanced (multi-frame) file whose functional groups lack a "
           "frame's geometry; no water or fat left and files that are not DICOM (how many, named)"),
    Reason("participant_mismatch", SCANS, "dicom_headers",
           "the participant's series disagree on PatientID, study or frame of reference: another person's station "
           "(the message names the station and the field, never the values)"),
    Reason("mixed_series", SCANS, "dicom_headers",
           "one series holds several Dixon contrasts that its ImageType does not tell apart"),
    Reason("truncated_dicom", SCANS, "dicom_headers",
           "a slice (or an enhanced file's frames) whose pixel data ends before rows x columns x bits (x frames) "
           "declare"),
    Reason("station_incomplete", SCANS, "dicom_geometry",
           "a series whose slices differ in orientation, matrix or pixel spacing, or are not evenly spaced "
           "(a missing or doubled slice)"),
    Reason("station_gap", SCANS, "dicom_geometry",
           "a station number missing, a station delivered for one contrast only, or stations that leave a gap "
           "between them"),
    Reason("station_geometry", SCANS, "dicom_geometry", "stations with different orientation or voxel size"),
    Reason("water_fat_geometry", SCANS, "dicom_geometry",
           "a station's fat series on another grid than its water series"),
    Reason("in_opp_geometry", SCANS, "dicom_geometry",
           "a station's in-/opposed-phase series on another grid than its water series"),
    Reason("series_too_large", SCANS, "dicom_geometry",
           "a series, or the stitched volume, over 128 MiB per contrast (from the headers, before any pixel is "
           "decoded)"),
    Reason("conversion_failed", SCANS, "dicom_conversion", "dcm2niix fails, times out or writes an unexpected volume"),
    Reason("conversion_geometry", SCANS, "dicom_conversion",
           "the converted volume's geometry differs from the headers'"),
    Reason("station_fat_water_swap", SCANS, "dicom_stations",
           "water and fat exchanged in a station (half or more of its slices reversed by the swap QC)"),
    Reason("in_phase_inconsistent", SCANS, "dicom_stations",
           "in-phase differs from water + fat by more than 20 % (median, inside the body)"),
    Reason("fov_too_short", SCANS, "dicom_stitching",
           "the stitched volume covers less than 280 mm superior-inferior (the T10-S1 slab the study measures)"),
    # --- participant_covariates
    Reason("no_covariates_file", COVARIATES, "covariates_file", "covariates.csv is missing"),
    Reason("unreadable_covariates", COVARIATES, "covariates_file",
           "covariates.csv cannot be read: empty, or a header that is not UTF-8 or not parseable"),
    Reason("covariates_too_large", COVARIATES, "covariates_file",
           "covariates.csv is larger than the limit (256 MiB): refused before it is parsed"),
    Reason("unexpected_columns", COVARIATES, "covariates_file", "the header is not the contract's columns"),
    Reason("undecodable_row", COVARIATES, "covariates_row", "the participant's row holds bytes that are not UTF-8"),
    Reason("malformed_row", COVARIATES, "covariates_row",
           "the row has the wrong number of fields or cannot be parsed as CSV"),
    Reason("invalid_value", COVARIATES, "covariates_row",
           "a value that does not parse as its type (e.g. `167.6 cm`, a non-ISO date), an unknown site or a "
           "malformed pseudonym"),
    Reason("missing_required", COVARIATES, "covariates_row", "a required column is empty"),
    Reason("out_of_range", COVARIATES, "covariates_row", "a value outside its plausible range (age 19-74, ...)"),
    Reason("no_covariate_row", COVARIATES, "covariates_row", "covariates.csv has no row for the participant"),
    # --- segmentation and metrics
    Reason("unreadable_scan", (MUSCLE_SEGMENTATIONS, COMPARISON_METRICS), "segmentation",
           "the ingested scan cannot be loaded or prepared for the model"),
    Reason("fat_water_swap_suspected", (MUSCLE_SEGMENTATIONS,), "segmentation",
           "ingestion's QC flagged a fat-water swap: excluded from segmentation by the swap policy"),
    Reason("muscle_at_fov_edge", (MUSCLE_METRICS, COMPARISON_METRICS), "metrics",
           "a muscle reaches the in-plane edge of the image: cut by the field of view, it would be measured short"),
    Reason("metrics_failed", (MUSCLE_METRICS, COMPARISON_METRICS), "metrics",
           "the muscle metrics of a label map could not be computed (the message names the error type)"),
)

REASONS: dict[str, Reason] = {}
for _r in _ALL:
    if _r.code in REASONS:
        raise ValueError(f"quarantine reason {_r.code!r} registered twice")
    if _r.check not in CHECKS or not _r.stages or set(_r.stages) - set(STAGES):
        raise ValueError(f"quarantine reason {_r.code!r}: unknown check {_r.check!r} or stages {_r.stages}")
    REASONS[_r.code] = _r
del _r


def _unknown(code: object) -> str:
    near = difflib.get_close_matches(str(code), REASONS, n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    return (f"{code!r} is not a registered quarantine reason{hint} (the registry is cbp_platform/reasons.py; "
            f"{len(REASONS)} codes)")


class _Namespace:
    """``R.<code>`` -> its :class:`Reason`; an unknown attribute raises naming the nearest codes."""

    def __init__(self, reasons: dict[str, Reason]):
        self.__dict__.update(reasons)

    def __getattr__(self, name: str) -> Reason:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(_unknown(name))


R = _Namespace(REASONS)


def reason(code: str | Reason) -> Reason:
    """The registered reason of ``code``; :class:`UnknownReason` (a ``KeyError``) if there is none."""
    if isinstance(code, Reason):
        code = code.code
    try:
        return REASONS[code]
    except (KeyError, TypeError):
        raise UnknownReason(_unknown(code)) from None


def code_of(r: str | Reason) -> str:
    """The code of a reason given as a :class:`Reason` or a code string, checked against the registry."""
    return reason(r).code


def stage_key(stage: str) -> str:
    """The registry's stage of a quarantine ``stage`` value: ``comparison_metrics:<model>`` is
    ``comparison_metrics``."""
    return stage.split(":", 1)[0]


def emitted_at(code: str, stage: str) -> bool:
    """Whether ``code`` is registered and may be emitted by ``stage`` (a quarantine row's two columns)."""
    r = REASONS.get(code)
    return r is not None and stage_key(stage) in r.stages


def explain(code: str) -> str:
    """``code``'s one-line explanation; for a code that is not registered (a row written by another version of
    the platform, or a mistake) a sentence that says so instead of failing."""
    r = REASONS.get(code)
    if r is None:
        return "not a registered quarantine reason (written by another version of the platform?)"
    return r.explanation


# --------------------------------------------------------------------------------------------------------
# the docs' tables (tools/reasons_doc.py writes them between markers; a test checks they are current)

DOC_TABLES: dict[str, tuple[str, ...]] = {
    # block name -> the checks it lists, in order
    "nifti": ("path", "manifest", "nifti_header", "nifti_geometry", "nifti_data", "nifti_values", "participant"),
    "dicom": ("dicom_zips", "dicom_headers", "dicom_geometry", "dicom_conversion", "dicom_stations",
              "dicom_stitching"),
    "covariates-segmentation": ("covariates_file", "covariates_row", "segmentation", "metrics"),
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(block: str) -> str:
    """The Markdown table of a :data:`DOC_TABLES` block: one row per reason, grouped by check."""
    checks = DOC_TABLES[block]
    def when(r: Reason) -> str:
        return _cell(r.explanation) + (" (reserved: no longer emitted)" if r.reserved else "")

    if block == "dicom":                       # one stage, one format: the landing-zone contract's table
        rows = ["| reason | when |", "|---|---|"]
        rows += [f"| `{r.code}` | {when(r)} |" for c in checks for r in REASONS.values() if r.check == c]
        return "\n".join(rows)
    rows = ["| check | reason | stages | when |", "|---|---|---|---|"]
    for c in checks:
        for i, r in enumerate(r for r in REASONS.values() if r.check == c):
            stages = ", ".join(f"`{s}`" for s in r.stages)
            rows.append(f"| {_cell(CHECKS[c]) if i == 0 else ''} | `{r.code}` | {stages} | {when(r)} |")
    return "\n".join(rows)
