"""Realistic delivery faults for ``cbp synth --faults RATE``.

Each faulty participant gets exactly one fault kind; every fault is recorded in the truth folder
(``truth/<delivery>/faults.csv``) with the file or field it touched, so the ingestion stage can be checked
for catching each one without losing the good participants around it.

Faults that happen at the data centre before the manifest is written (a corrupt or truncated gzip, a missing
fat image, a mismatched shape or affine, NaNs) are consistent with the manifest: their size and sha256 are
those of the broken file. ``checksum_mismatch`` is the reverse: a good file whose manifest checksum is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from cbp_platform.reasons import R, Reason


@dataclass(frozen=True)
class Fault:
    """A fault kind and what ingestion must make of it: quarantine the participant with one of ``reasons`` (from
    :mod:`cbp_platform.reasons`), or, with no reasons, handle it (the participant is measured)."""

    kind: str
    reasons: tuple[Reason, ...]
    what: str

    @property
    def handled(self) -> bool:
        return not self.reasons


_CHECKSUM = Fault("checksum_mismatch", (R.checksum_mismatch,), "manifest sha256 of the water image is wrong")
_MALFORMED = Fault("malformed_covariate_row", (R.malformed_row, R.invalid_value),
                   "covariates.csv row cannot be parsed (extra field, unit in a number, bad date)")
_OUT_OF_RANGE = Fault("out_of_range_covariate", (R.out_of_range,),
                      "a parseable but impossible value (age, height, weight, NRS, MET)")
_DUPLICATE = Fault("duplicate_pseudonym", (R.duplicate_pseudonym,),
                   "pseudonym already delivered in an earlier delivery of this cohort")

# ``cbp synth --faults``: NIfTI deliveries (the order is part of the simulator's seeded assignment)
NIFTI_FAULTS: tuple[Fault, ...] = (
    Fault("corrupt_gzip", (R.corrupt_gzip,), "bytes in the middle of the water image's gzip stream are garbage"),
    Fault("truncated_gzip", (R.truncated_gzip,), "the fat image's gzip stream ends early"),
    Fault("missing_fat", (R.missing_fat,), "no fat image (and none listed in the manifest)"),
    Fault("shape_mismatch", (R.shape_mismatch,), "fat image has one slice fewer than water"),
    Fault("affine_mismatch", (R.affine_mismatch,), "fat image's affine is shifted 15 mm along z"),
    Fault("nan_values", (R.nan_values,), "water image stored as float32 with a slab of NaNs"),
    _CHECKSUM, _MALFORMED, _OUT_OF_RANGE, _DUPLICATE,
)

# ``cbp synth --format dicom``: the image faults of DICOM deliveries (with the manifest and covariate ones)
DICOM_FAULTS: tuple[Fault, ...] = (
    Fault("missing_station", (R.station_gap,), "station 2 of 4 not delivered (a gap in coverage)"),
    Fault("missing_slice", (R.station_incomplete,), "one slice missing from a water station"),
    Fault("repeated_station", (), "a station acquired twice, the older series motion-degraded: keep the newer"),
    Fault("water_fat_grid", (R.water_fat_geometry,), "the fat series of one station on another grid"),
    Fault("non_dicom_file", (), "a text file inside a zip (ignored, like the PACS's own notes)"),
    Fault("other_modality", (), "a secondary-capture (OT) series inside a zip (ignored)"),
    Fault("swapped_station", (R.station_fat_water_swap,), "water and fat exchanged in one station"),
    _CHECKSUM, _MALFORMED, _OUT_OF_RANGE, _DUPLICATE,
)

FAULTS: dict[str, Fault] = {f.kind: f for f in NIFTI_FAULTS + DICOM_FAULTS}
FAULT_KINDS = tuple(f.kind for f in NIFTI_FAULTS)
DICOM_FAULT_KINDS = tuple(f.kind for f in DICOM_FAULTS)
# fault kind -> the quarantine reason codes that catch it (any one of them); the one map the tests use
EXPECTED_REASONS: dict[str, frozenset[str]] = {k: frozenset(r.code for r in f.reasons) for k, f in FAULTS.items()}
# faults the platform is expected to handle (the participant is measured), not to quarantine
HANDLED_FAULTS = {k for k, f in FAULTS.items() if f.handled}

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
