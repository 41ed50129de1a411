"""Warehouse-side helpers that need no database: table checksums and the provenance/quarantine row shapes."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import polars as pl

from cbp_platform.reasons import UnknownReason, emitted_at

QUARANTINE_SCHEMA = {
    "delivery_id": pl.String, "batch_key": pl.String, "pseudonym": pl.String, "stage": pl.String,
    "reason": pl.String, "message": pl.String, "run_id": pl.String, "recorded_at": pl.Datetime("us", "UTC"),
}
PROVENANCE_SCHEMA = {
    "pseudonym": pl.String, "delivery_id": pl.String, "batch_key": pl.String, "stage": pl.String,
    "input_checksums": pl.String, "output_checksum": pl.String, "code_version": pl.String, "run_id": pl.String,
    "recorded_at": pl.Datetime("us", "UTC"),
}


# One row per participant and stage, whatever the delivery ids, the order of processing or concurrent runs: the
# warehouse holds a unique index on these keys (a duplicate fails its write), beside the per-batch and the
# cohort-wide uniqueness checks.
UNIQUE_KEYS: dict[str, tuple[str, ...]] = {
    "raw_mri_scans": ("pseudonym",),
    "participant_covariates": ("pseudonym",),
    "muscle_segmentations": ("pseudonym",),
    "segmentation_qc": ("pseudonym",),
    "muscle_metrics": ("pseudonym", "muscle"),
    "comparison_segmentations": ("pseudonym", "model_name"),
    "comparison_metrics": ("pseudonym", "model_name", "muscle"),
}


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def table_checksum(df: pl.DataFrame) -> str:
    """sha256 of a table's content, independent of row order (rows sorted, CSV-serialised)."""
    if df.height == 0:
        return hashlib.sha256(("|".join(df.columns)).encode()).hexdigest()
    canon = df.sort(df.columns, nulls_last=True)
    return hashlib.sha256(canon.write_csv().encode()).hexdigest()


def quarantine_frame(rows: list[dict], *, delivery_id: str, batch_key: str, stage: str, run_id: str) -> pl.DataFrame:
    """The quarantine rows of a stage, each reason checked against the registry: a code that is not registered for
    ``stage`` (:func:`cbp_platform.reasons.emitted_at`) raises before anything is written."""
    bad = sorted({str(r["reason"]) for r in rows if not emitted_at(str(r["reason"]), stage)})
    if bad:
        raise UnknownReason(f"quarantine reasons {bad} are not registered for stage {stage!r} "
                            "(cbp_platform/reasons.py)")
    t = now_utc()
    data = [dict(delivery_id=delivery_id, batch_key=batch_key, pseudonym=r["pseudonym"], stage=stage,
                 reason=r["reason"], message=r["message"], run_id=run_id, recorded_at=t) for r in rows]
    return pl.DataFrame(data, schema=QUARANTINE_SCHEMA)


def provenance_frame(rows: list[dict], *, delivery_id: str, batch_key: str, stage: str, code_version: str,
                     run_id: str) -> pl.DataFrame:
    """rows: pseudonym, inputs (dict name -> sha256), output (checksum or '')."""
    t = now_utc()
    data = [dict(pseudonym=r["pseudonym"], delivery_id=delivery_id, batch_key=batch_key, stage=stage,
                 input_checksums=json.dumps(r["inputs"], sort_keys=True), output_checksum=r.get("output", ""),
                 code_version=code_version, run_id=run_id, recorded_at=t) for r in rows]
    return pl.DataFrame(data, schema=PROVENANCE_SCHEMA)
