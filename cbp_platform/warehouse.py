"""Warehouse-side helpers that need no database: table checksums and the provenance/quarantine row shapes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone

import polars as pl

from cbp_platform.landing import COVARIATES, SCAN
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


# One row in force per participant and stage, whatever the delivery ids, the order of processing or concurrent runs:
# the warehouse enforces it with unique indexes on these keys (a duplicate fails its write), beside the per-batch
# and the cohort-wide uniqueness checks. These stage tables are *versioned* (the living cohort, issue 27): a
# participant's rows may exist in several versions, one per delivery that wrote them (``delivery_id``), each
# naming the delivery whose version it replaces (``supersedes``) and, once replaced, the delivery that replaced it
# (``superseded_by``; empty while the version is in force). The warehouse layer (``unique_indexes`` in
# ``resources/warehouse.py``) keeps two indexes per table, the same on DuckDB and PostgreSQL (DuckDB has no partial
# index, so the second emulates one with an expression):
#
# * ``<table>_version``: one version per key and delivery, ``UNIQUE (keys, delivery_id)``;
# * ``<table>_in_force``: at most one version in force per key, ``UNIQUE (keys, <in force ? '' : delivery_id>)``.
#   A superseded version's expression is its delivery id, so any number of superseded versions may share a key
#   (two versions replaced by the same correction included), and at most one version is in force.
UNIQUE_KEYS: dict[str, tuple[str, ...]] = {
    "raw_mri_scans": ("pseudonym",),
    "participant_covariates": ("pseudonym",),
    "muscle_segmentations": ("pseudonym",),
    "segmentation_qc": ("pseudonym",),
    "muscle_metrics": ("pseudonym", "muscle"),
    "comparison_segmentations": ("pseudonym", "model_name"),
    "comparison_metrics": ("pseudonym", "model_name", "muscle"),
}
VERSIONED = tuple(UNIQUE_KEYS)
# What part of a participant each versioned stage holds: a correction of the ``scan`` brings new versions of every
# image stage, one of the ``covariates`` a new covariates row (cbp_platform.landing.CORRECTION_PARTS).
STAGE_PART: dict[str, str] = {
    "raw_mri_scans": SCAN, "participant_covariates": COVARIATES, "muscle_segmentations": SCAN,
    "segmentation_qc": SCAN, "muscle_metrics": SCAN, "comparison_segmentations": SCAN, "comparison_metrics": SCAN,
}
assert set(STAGE_PART) == set(UNIQUE_KEYS)
# The version columns of a versioned table. ``supersedes``: the delivery whose version this one replaces, as the
# correction declared it (``''``: it replaces nothing); ``superseded_by``: the delivery whose version replaced this one
# (``''`` while in force); ``registration_seq``: the registration number of the delivery that wrote the version, which
# orders versions (the later registration wins, whatever the order in which batches run). A writer that leaves them
# out writes a version in force that replaces nothing and is not ordered; a row from before versioning (NULL) counts
# as in force.
VERSION_COLUMNS: dict[str, pl.DataType] = {"supersedes": pl.String, "superseded_by": pl.String,
                                           "registration_seq": pl.Int64}
_VERSION_DEFAULTS = {"supersedes": "", "superseded_by": "", "registration_seq": None}


def with_version_columns(table: str, df: pl.DataFrame) -> pl.DataFrame:
    """``df`` with the version columns its versioned ``table`` needs (their defaults where the writer left them
    out)."""
    if table not in UNIQUE_KEYS:
        return df
    if "delivery_id" not in df.columns:
        raise ValueError(f"rows for the versioned table {table} need a delivery_id column (the delivery that wrote "
                         "the version)")
    return df.with_columns(pl.lit(_VERSION_DEFAULTS[c], dtype=t).alias(c) for c, t in VERSION_COLUMNS.items()
                           if c not in df.columns)


def versioned(table: str, df: pl.DataFrame, seq: int, supersedes: dict[str, str]) -> pl.DataFrame:
    """The rows a batch writes to a versioned ``table``, as versions of the delivery registered ``seq``-th: each
    participant's rows name the delivery whose version they replace (``supersedes``, pseudonym -> delivery id:
    a correction's entries; empty for an ordinary delivery). Other tables are returned unchanged."""
    if table not in UNIQUE_KEYS:
        return df
    sup = pl.DataFrame({"pseudonym": list(supersedes), "supersedes": list(supersedes.values())},
                       schema={"pseudonym": pl.String, "supersedes": pl.String})
    out = df.drop([c for c in ("supersedes", "registration_seq") if c in df.columns])
    out = out.join(sup, on="pseudonym", how="left", maintain_order="left") if supersedes else \
        out.with_columns(pl.lit(None, pl.String).alias("supersedes"))
    return out.with_columns(pl.col("supersedes").fill_null(""), pl.lit(seq, pl.Int64).alias("registration_seq"))


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


# --------------------------------------------------------------------------------------------------------------
# Every warehouse table, and what of a participant it holds: the warehouse's entry in the erasure data map
# (cbp_platform/erasure/datamap.py). An erasure refuses to run while the warehouse holds a table that is not declared
# here, so a new table cannot be forgotten silently (tests/lifecycle/test_erasure.py lists a whole pipeline's tables).
#
# ``holds``: ``images``: rows of the participant's images or what is derived from them (erased for every scope);
# ``covariates``: rows of their covariates, or of the participant as a whole (erased when the scope is ``all``);
# ``by_stage``: rows of several stages (the ``stage`` column): covariate stages' rows like ``covariates``, every
# other stage's like ``images``; ``link``: what ties the participant to a release's commitment (the Merkle salt:
# erased for every scope); ``none``: no row of any participant (counts, releases' own rows, leaves without a key).
HOLDS = ("images", "covariates", "by_stage", "link", "none")
COVARIATE_STAGES = frozenset(s for s, part in STAGE_PART.items() if part == COVARIATES)


@dataclass(frozen=True)
class TableSpec:
    holds: str
    what: str


TABLES: dict[str, TableSpec] = {
    "raw_mri_scans": TableSpec("images", "validated scans: files, checksums, geometry (every version)"),
    "participant_covariates": TableSpec("covariates", "validated covariates (every version)"),
    "muscle_segmentations": TableSpec("images", "label maps of the primary model: path, checksum (every version)"),
    "segmentation_qc": TableSpec("images", "QC features, triage and the QC image's path (every version)"),
    "muscle_metrics": TableSpec("images", "LMM and InterMAT per muscle (every version)"),
    "comparison_segmentations": TableSpec("images", "label maps of comparison models (every version)"),
    "comparison_metrics": TableSpec("images", "metrics of comparison models (every version)"),
    "qc_reviews": TableSpec("images", "reviewers' decisions (append-only; erasure is its one exception)"),
    "quarantine": TableSpec("by_stage", "why a participant's data was not ingested, per stage"),
    "provenance": TableSpec("by_stage", "checksums of each stage's inputs and outputs, per participant"),
    "release_versions": TableSpec("by_stage", "which version of each participant a release froze"),
    "release_quarantine": TableSpec("by_stage", "the quarantine a release froze"),
    "release_participants": TableSpec("covariates", "a release's participants: retired, rejected, withdrawn"),
    "release_salts": TableSpec("link", "each participant's salt of a release's Merkle tree"),
    "release_leaves": TableSpec("none", "a release's Merkle leaves: salted hashes, no participant key"),
    "releases": TableSpec("none", "one row per release: counts, content hash, Merkle root"),
    "analysis_cohort": TableSpec("images", "the analysed cohort: covariates beside image measures (rebuilt by the "
                                           "next cohort refresh)"),
    "analysis_exclusions": TableSpec("images", "why each excluded participant left the analysis"),
    "analysis_imputation": TableSpec("images", "the multiple-imputation population: the analysed participants and "
                                               "those missing only covariate answers (rebuilt with the cohort)"),
    "missingness": TableSpec("none", "missing covariate answers per variable and site: counts"),
    "analysis_cohort_meta": TableSpec("none", "the cohort's hash, counts and settings"),
    "exclusion_flow": TableSpec("none", "the exclusion flow: counts per step"),
    "asset_lineage": TableSpec("none", "which run made which analysis asset"),
    "model_fits": TableSpec("none", "the fitted models' summaries"),
    "model_results": TableSpec("none", "estimates, CIs and tests"),
    "table_one": TableSpec("none", "descriptive statistics (cells under 5 suppressed when published)"),
    "stratified_comparisons": TableSpec("none", "estimates per stratum"),
    "physical_activity_prevalence": TableSpec("none", "prevalences per group"),
    "ingestion_summary": TableSpec("none", "counts per delivery and stage"),
    "erasure_marks": TableSpec("none", "the certificates of the erasures applied to this warehouse (no participant): "
                                       "a warehouse restored from before an erasure lacks its mark"),
    "model_comparisons": TableSpec("none", "agreement between models per class (means over participants)"),
}
assert {t.holds for t in TABLES.values()} <= set(HOLDS)
assert set(UNIQUE_KEYS) <= set(TABLES)


def erased_stages(table: str, scope: str) -> str | None:
    """What of ``table`` an erasure of ``scope`` (``all`` or ``imaging``) removes for the participant: ``"all"``
    (every row), ``"images"`` (the rows whose ``stage`` is not a covariate stage) or None (nothing)."""
    holds = TABLES[table].holds
    if holds == "none":
        return None
    if holds in ("images", "link") or scope == "all":
        return "all"
    return "images" if holds == "by_stage" else None
