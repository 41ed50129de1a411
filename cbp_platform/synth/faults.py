"""Realistic delivery faults for ``cbp synth --faults RATE``.

Each faulty participant gets exactly one fault kind; every fault is recorded in the truth folder
(``truth/<delivery>/faults.csv``) with the file or field it touched, so the ingestion stage can be checked
for catching each one without losing the good participants around it.

Faults that happen at the data centre before the manifest is written (a corrupt or truncated gzip, a missing
fat image, a mismatched shape or affine, NaNs) are consistent with the manifest: their size and sha256 are
those of the broken file. ``checksum_mismatch`` is the reverse: a good file whose manifest checksum is wrong.
"""

from __future__ import annotations

FAULT_KINDS = (
    "corrupt_gzip",            # bytes in the middle of the water image's gzip stream are garbage
    "truncated_gzip",          # the fat image's gzip stream ends early
    "missing_fat",             # no fat image (and none listed in the manifest)
    "shape_mismatch",          # fat image has one slice fewer than water
    "affine_mismatch",         # fat image's affine is shifted 15 mm along z
    "nan_values",              # water image stored as float32 with a slab of NaNs
    "checksum_mismatch",       # manifest sha256 of the water image is wrong
    "malformed_covariate_row", # covariates.csv row cannot be parsed (extra field, unit in a number, bad date)
    "out_of_range_covariate",  # a parseable but impossible value (age, height, weight, NRS, MET)
    "duplicate_pseudonym",     # pseudonym already delivered in an earlier delivery of this cohort
)

# ``cbp synth --format dicom``: the image faults of DICOM deliveries (with the manifest and covariate ones)
DICOM_FAULT_KINDS = (
    "missing_station",         # station 2 of 4 not delivered (a gap in coverage)
    "missing_slice",           # one slice missing from a water station
    "repeated_station",        # a station acquired twice, the older series motion-degraded: keep the newer
    "water_fat_grid",          # the fat series of one station on another grid
    "non_dicom_file",          # a text file inside a zip (ignored, like the PACS's own notes)
    "other_modality",          # a secondary-capture (OT) series inside a zip (ignored)
    "swapped_station",         # water and fat exchanged in one station
    "checksum_mismatch",
    "malformed_covariate_row",
    "out_of_range_covariate",
    "duplicate_pseudonym",
)
# faults the platform is expected to handle (the participant is measured), not to quarantine
HANDLED_FAULTS = {"repeated_station", "non_dicom_file", "other_modality"}

IMAGE_FAULTS = {"corrupt_gzip", "truncated_gzip", "missing_fat", "shape_mismatch", "affine_mismatch", "nan_values"}
MANIFEST_FAULTS = {"checksum_mismatch"}
COVARIATE_FAULTS = {"malformed_covariate_row", "out_of_range_covariate"}


def corrupt_gzip(payload: bytes) -> bytes:
    """Overwrite 256 bytes in the middle of the compressed stream (keeps the length)."""
    mid = len(payload) // 2
    n = min(256, max(len(payload) - mid - 16, 1))
    garbage = bytes((b ^ 0x5A) for b in payload[mid:mid + n])
    return payload[:mid] + garbage + payload[mid + n:]


def truncate_gzip(payload: bytes, keep: float = 0.6) -> bytes:
    return payload[: max(int(len(payload) * keep), 32)]


MALFORMED_VARIANTS = ("extra_field", "unit_in_number", "bad_date")
OUT_OF_RANGE_VARIANTS = ("age_low", "age_high", "height_in_m", "weight_in_g", "nrs_too_high", "met_negative")
