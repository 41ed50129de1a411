"""Reviewers' decisions on segmentations: the append-only ``qc_reviews`` table and how decisions take effect.

A review names the label map it was made on (its sha256) and the model that made it. The table is never updated
or deleted from: a new decision is a new row, and the history stays. What counts for a participant:

- only reviews of the participant's **current** label map (``muscle_segmentations.label_sha256``). A review of a
  map that has since been replaced (a new model, a re-run) is *outdated*: it is shown as such and never applied to
  the new map, which goes back to the queue;
- among those, the latest (``reviewed_at``, then the row's sequence number) wins.

The analysis excludes the participants whose effective decision is ``reject`` (exclusion step ``qc_rejected``,
:mod:`cbp_platform.analysis.cohort`). Framework-free: the warehouse access is the caller's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import polars as pl

TABLE = "qc_reviews"
DECISIONS = ("accept", "reject")


@dataclass(frozen=True)
class RejectReason:
    code: str
    description: str
    key: str                       # the review app's keyboard shortcut


# The one registry of rejection reasons (the app's buttons and keys, the CLI's choices, the docs' table).
REJECT_REASONS: tuple[RejectReason, ...] = (
    RejectReason("segmentation_error", "labels miss or overrun a muscle", "1"),
    RejectReason("misregistered", "labels shifted or off the anatomy", "2"),
    RejectReason("fov_truncated", "a muscle is cut by the field of view", "3"),
    RejectReason("image_quality", "low signal, noise, motion or artefact", "4"),
    RejectReason("fat_water_swap", "fat and water exchanged (all or part of the volume)", "5"),
    RejectReason("other", "another problem (say which in the note)", "6"),
)
REASON_CODES = tuple(r.code for r in REJECT_REASONS)

SCHEMA = {
    "review_id": pl.String, "pseudonym": pl.String, "batch_key": pl.String, "delivery_id": pl.String,
    "decision": pl.String, "reason": pl.String, "note": pl.String, "reviewer": pl.String,
    "reviewed_at": pl.Datetime("us", "UTC"), "label_sha256": pl.String, "model_sha256": pl.String,
    "source": pl.String,
}


class ReviewError(ValueError):
    """A decision that cannot be recorded (unknown participant, missing reviewer or reason ...)."""


def validate(decision: str, reason: str | None, reviewer: str) -> None:
    if decision not in DECISIONS:
        raise ReviewError(f"decision must be one of {DECISIONS}, not {decision!r}")
    if not (reviewer or "").strip():
        raise ReviewError("every decision names its reviewer (--reviewer, or the app's reviewer field)")
    if decision == "reject" and reason not in REASON_CODES:
        raise ReviewError(f"a rejection needs a reason, one of {', '.join(REASON_CODES)} (got {reason!r})")


def _empty() -> pl.DataFrame:
    return pl.DataFrame(schema=SCHEMA)


def _normal(reviews: pl.DataFrame | None) -> pl.DataFrame:
    if reviews is None or reviews.height == 0:
        return _empty()
    return reviews.select([pl.col(c).cast(t) if c in reviews.columns else pl.lit(None, t).alias(c)
                           for c, t in SCHEMA.items()])


def effective_reviews(reviews: pl.DataFrame | None, segmentations: pl.DataFrame | None) -> pl.DataFrame:
    """Every reviewed participant: the decision in force on their current label map, and the outdated history.

    ``segmentations``: ``pseudonym, label_sha256`` of the current label maps. Returns pseudonym, decision, reason,
    note, reviewer, reviewed_at, label_sha256, model_sha256 (the latest current review; null when there is none),
    ``n_reviews`` and ``n_outdated`` (reviews of a replaced map or of a participant no longer segmented),
    ``outdated`` (the latest review of the participant is of another map than the current one).
    """
    r = _normal(reviews).with_row_index("_seq")
    cur = (segmentations.select(pl.col("pseudonym").cast(pl.String), pl.col("label_sha256").cast(pl.String)
                                .alias("_current"))
           if segmentations is not None and segmentations.height else
           pl.DataFrame(schema={"pseudonym": pl.String, "_current": pl.String}))
    r = r.join(cur, on="pseudonym", how="left").with_columns(
        (pl.col("_current").is_not_null() & (pl.col("label_sha256") == pl.col("_current"))).alias("_is_current"))
    order = ["reviewed_at", "_seq"]
    latest_any = r.sort(order).group_by("pseudonym").agg(
        pl.len().alias("n_reviews"), (~pl.col("_is_current")).sum().cast(pl.Int64).alias("n_outdated"),
        (~pl.col("_is_current").last()).alias("outdated"))
    in_force = (r.filter(pl.col("_is_current")).sort(order).group_by("pseudonym")
                .agg(pl.all().exclude("_seq", "_current", "_is_current").last()))
    out = latest_any.join(in_force, on="pseudonym", how="left")
    cols = ["pseudonym", "decision", "reason", "note", "reviewer", "reviewed_at", "label_sha256", "model_sha256",
            "batch_key", "delivery_id", "n_reviews", "n_outdated", "outdated"]
    return out.select(cols).sort("pseudonym")


def analysed_maps(segmentations: pl.DataFrame | None, metrics_provenance: pl.DataFrame | None) -> pl.DataFrame:
    """pseudonym, label_sha256 of the label map behind each participant's analysed numbers: the map
    ``muscle_metrics`` measured (its provenance's ``inputs.labels``), else the current segmentation. When a batch
    was segmented again but not yet measured, the metrics still come from the old map, and so does the decision
    that counts: a rejection of that map stays in force until the numbers come from a new map."""
    segs = (segmentations.select(pl.col("pseudonym").cast(pl.String), pl.col("label_sha256").cast(pl.String))
            if segmentations is not None and segmentations.height else
            pl.DataFrame(schema={"pseudonym": pl.String, "label_sha256": pl.String}))
    if metrics_provenance is None or metrics_provenance.height == 0:
        return segs
    measured = metrics_provenance.select(
        pl.col("pseudonym").cast(pl.String),
        pl.col("input_checksums").str.json_path_match("$.labels").alias("_measured")).unique("pseudonym", keep="last")
    both = segs.join(measured, on="pseudonym", how="full", coalesce=True)
    return both.select("pseudonym", pl.coalesce("_measured", "label_sha256").alias("label_sha256"))


def rejected(reviews: pl.DataFrame | None, segmentations: pl.DataFrame | None) -> pl.DataFrame:
    """pseudonym, reason of the participants whose decision in force is ``reject``."""
    eff = effective_reviews(reviews, segmentations)
    return eff.filter(pl.col("decision") == "reject").select("pseudonym", "reason")


def digest(reviews: pl.DataFrame | None) -> tuple[int, str]:
    """(count, sha256) of the review history: every row, sorted by review id (a canonical order, independent of
    how the table returns its rows; the lineage's anchor for the decisions a cohort was built with)."""
    r = _normal(reviews)
    h = hashlib.sha256(b"cbp-qc-reviews/1\n")
    for row in r.sort("review_id").iter_rows():
        h.update(("\t".join("" if v is None else (v.isoformat() if hasattr(v, "isoformat") else str(v))
                            for v in row) + "\n").encode())
    return r.height, h.hexdigest()
