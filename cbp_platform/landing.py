"""The landing-zone contract (see ``docs/landing-zone.md``).

A delivery is a folder ``landing/<delivery_id>/`` holding

* ``manifest.json``: schema version, delivery id, creation time, participants and every file with its
  relative path, size and sha256,
* ``covariates.csv``: one row per participant (columns :data:`COVARIATE_COLUMNS`),
* ``mri/<pseudonym>/<pseudonym>_<channel>.nii.gz`` for the Dixon channels (``water`` and ``fat`` required,
  ``in`` and ``opp`` optional),
* ``_SUCCESS``: written last; a delivery without it is still being transferred.

A DICOM delivery (manifest ``"scan_format": "dicom"``) holds zips of DICOM series under
``dicom/<pseudonym>/`` instead of ``mri/``; see :mod:`cbp_platform.ingest.dicom`.
"""

from __future__ import annotations

import re

SCHEMA_VERSION = "1.0"
MANIFEST_NAME = "manifest.json"
COVARIATES_NAME = "covariates.csv"
SUCCESS_MARKER = "_SUCCESS"
MRI_DIR = "mri"
DICOM_DIR = "dicom"
SCAN_FORMATS = ("nifti", "dicom")      # the manifest's optional ``scan_format`` (default nifti)

# A delivery's optional ``kind``: a ``delivery`` (the default) brings participants; a ``correction`` brings new
# versions of participants an earlier delivery brought, one ``corrections`` entry each (docs/lifecycle.md).
DELIVERY, CORRECTION = "delivery", "correction"
DELIVERY_KINDS = (DELIVERY, CORRECTION)
# What a correction replaces of a participant: the scan (and so every image stage), the covariates row, or both.
SCAN, COVARIATES = "scan", "covariates"
CORRECTION_PARTS = (SCAN, COVARIATES)
# The reason codes a correction entry may give (``corrections[i].reason``), with what each means.
CORRECTION_REASONS: dict[str, tuple[tuple[str, ...], str]] = {
    # code: (parts it may correct, meaning)
    "covariate_error": ((COVARIATES,), "a covariate was wrong (a typo, a unit, a transcription error)"),
    "covariate_recoded": ((COVARIATES,), "a questionnaire item was re-coded (a revised scoring or definition)"),
    "site_reassigned": ((COVARIATES,), "the participant's study site was reassigned"),
    "rescan": ((SCAN,), "the participant was re-scanned (motion artefact, incomplete coverage)"),
    "wrong_series": ((SCAN,), "the delivered scan was the wrong series or another examination's"),
    "resent": ((SCAN, COVARIATES), "the data centre re-sent the participant's data after fixing an export"),
}
REQUIRED_CHANNELS = ("water", "fat")
OPTIONAL_CHANNELS = ("in", "opp")

# Pseudonyms: 10 characters of an unambiguous alphabet (no 0/O, 1/I/L), opaque and unordered.
PSEUDONYM_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
PSEUDONYM_LENGTH = 10
PSEUDONYM_RE = re.compile(rf"^[{PSEUDONYM_ALPHABET}]{{{PSEUDONYM_LENGTH}}}\Z")
# Delivery ids: a letter or digit, then letters, digits, '_' or '-'; at most 64. No '.': the registry names its files
# ``<id>.json``, ``<id>.manifest.json``, ``<id>.files.json`` and batches ``<id>.b<NNN>``, so an id with a dot could
# collide with another delivery's file or batch (``x.manifest`` did). ``\Z``, not ``$``: no trailing newline.
DELIVERY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
DELIVERY_ID_RULE = "a letter or digit, then letters, digits, '_' or '-'; at most 64 characters; no '.'"

COVARIATE_COLUMNS = (
    "pseudonym",      # participant pseudonym
    "site",           # MRI study site (one of SITES)
    "exam_date",      # ISO date of the MRI examination
    "age",            # years at examination, integer
    "sex",            # F or M
    "height_cm",      # body height, cm
    "weight_kg",      # body weight, kg
    "cbp",            # chronic back pain (> 3 months): 1 yes, 0 no, empty = not answered
    "nrs_pain",       # back pain intensity, numeric rating scale 0-10, empty = not answered
    "met_min_week",   # self-reported physical activity, MET-minutes per week, empty = not answered
    "diabetes",       # 1/0/empty (self-reported physician diagnosis)
    "dyslipidemia",   # 1/0/empty
    "osteoporosis",   # 1/0/empty
    "osteoarthritis", # 1/0/empty
)

SITES = ("Augsburg", "Berlin", "Essen", "Mannheim", "Neubrandenburg")


def scan_relpath(pseudonym: str, channel: str) -> str:
    return f"{MRI_DIR}/{pseudonym}/{pseudonym}_{channel}.nii.gz"


def dicom_relpath(pseudonym: str, contrast: str) -> str:
    """Where ``cbp synth --format dicom`` puts a contrast's zip; ingestion reads every zip listed under
    ``dicom/<pseudonym>/`` and tells the series apart by their headers, never by the zip's name."""
    return f"{DICOM_DIR}/{pseudonym}/{pseudonym}_dixon_{contrast}.zip"
