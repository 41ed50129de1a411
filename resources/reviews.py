"""The review store: the QC queue and reviewers' decisions, on the warehouse (``cbp qc`` and the review app).

Reads ``segmentation_qc`` (the triage score and QC image of every segmented participant, written by
``muscle_segmentations``), ``muscle_segmentations`` (the current label maps), ``participant_covariates`` (the
site) and ``qc_reviews``; appends to ``qc_reviews`` only (:mod:`cbp_platform.qc.reviews`). After each decision it
reports a materialisation of the external asset ``qc_reviews`` (count and hash, never a pseudonym) to the Dagster
instance, so that ``analysis_cohort``, which reads the reviews, shows as stale until the next cohort refresh.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import polars as pl

from cbp_platform.paths import DataLayout
from cbp_platform.qc import reviews as rv
from cbp_platform.warehouse import now_utc
from resources.warehouse import WAREHOUSE_KIND, Warehouse

REVIEWS_ASSET = dg.AssetKey(rv.TABLE)
QC_TABLE = "segmentation_qc"
QUEUE_STATUSES = ("todo", "reviewed", "rejected", "accepted", "outdated", "all")


def reviews_spec() -> dg.AssetSpec:
    """The external asset the reviews are in Dagster (written by reviewers, not by a run)."""
    return dg.AssetSpec(REVIEWS_ASSET, group_name="segmentation", kinds={WAREHOUSE_KIND},
                        description="Reviewers' decisions on segmentations (append-only warehouse table "
                                    "qc_reviews, written by `cbp qc` and the review app). Each decision is "
                                    "reported here with the reviews' count and hash; analysis_cohort reads them.")


@dataclass
class ReviewStore:
    warehouse: Warehouse
    instance: dg.DagsterInstance | None = None     # where decisions are reported (None: not reported)
    data_root: Path | None = None                  # resolves the QC images' stored paths (relative to it)

    def _table(self, name: str, **kw) -> pl.DataFrame:
        """A table the queue reads; one not created yet (nothing segmented, or nobody reviewed yet) is empty."""
        df = self.warehouse.table(name, missing_ok=True, **kw)
        return pl.DataFrame() if df is None else df

    def reviews(self) -> pl.DataFrame:
        return self._table(rv.TABLE, order_by=["reviewed_at", "review_id"])

    def current_maps(self) -> pl.DataFrame:
        return self._table("muscle_segmentations", columns=["pseudonym", "batch_key", "delivery_id", "label_sha256",
                                                            "model_sha256"], order_by=["pseudonym"])

    def queue(self, *, batch: str | None = None, site: str | None = None, model: str | None = None,
              status: str = "all") -> pl.DataFrame:
        """Every segmented participant with a QC row, in triage order (highest risk first), with the decision in
        force and whether the latest review is outdated. ``model``: a model name or a weights sha256 prefix."""
        if status not in QUEUE_STATUSES:
            raise rv.ReviewError(f"status must be one of {QUEUE_STATUSES}, not {status!r}")
        qc = self._table(QC_TABLE, order_by=["pseudonym"])
        if qc.height == 0:
            return qc
        if self.data_root is not None:
            qc = DataLayout(Path(self.data_root)).resolved_paths(qc, "qc_image")
        maps = self.current_maps()
        qc = qc.join(maps.select("pseudonym", pl.col("label_sha256").alias("_cur")), on="pseudonym", how="inner")
        qc = qc.filter(pl.col("label_sha256") == pl.col("_cur")).drop("_cur")
        cov = self._table("participant_covariates", columns=["pseudonym", "site"])
        if cov.height:           # a batch segmented before its covariates were ingested: the site from them now
            qc = (qc.join(cov.unique("pseudonym").rename({"site": "_cov_site"}), on="pseudonym", how="left")
                  .with_columns(pl.coalesce("site", "_cov_site").alias("site")).drop("_cov_site"))
        eff = rv.effective_reviews(self.reviews(), maps)
        q = qc.join(eff.select("pseudonym", "decision", "reason", "note", "reviewer", "reviewed_at", "n_reviews",
                               "outdated"), on="pseudonym", how="left")
        q = q.with_columns(pl.col("outdated").fill_null(False), pl.col("n_reviews").fill_null(0))
        if batch:
            q = q.filter(pl.col("batch_key") == batch)
        if site:
            q = q.filter(pl.col("site") == site)
        if model:
            q = q.filter((pl.col("model_name") == model) | pl.col("model_sha256").str.starts_with(model))
        pick = {"todo": pl.col("decision").is_null(), "reviewed": pl.col("decision").is_not_null(),
                "rejected": pl.col("decision") == "reject", "accepted": pl.col("decision") == "accept",
                "outdated": pl.col("outdated"), "all": pl.lit(True)}[status]
        return q.filter(pick).sort(["triage_score", "pseudonym"], descending=[True, False])

    def record(self, pseudonym: str, decision: str, *, reviewer: str, reason: str | None = None, note: str = "",
               source: str = "cli", label_sha256: str | None = None) -> dict:
        """Append one decision on the participant's current label map; returns the row written.
        ``label_sha256``: the map the reviewer saw (the app sends it; the CLI may, as a prefix). If the map was
        replaced meanwhile (a re-run), the decision is refused instead of landing on a map nobody saw."""
        rv.validate(decision, reason, reviewer)
        cur = self.current_maps().filter(pl.col("pseudonym") == pseudonym)
        if cur.height != 1:
            raise rv.ReviewError(f"{pseudonym}: no current segmentation in the warehouse "
                                 "(only a segmented participant can be reviewed)")
        c = cur.row(0, named=True)
        if label_sha256 and not c["label_sha256"].startswith(label_sha256):
            raise rv.ReviewError(f"{pseudonym}: the label map was replaced since it was shown "
                                 f"({label_sha256[:12]} -> {c['label_sha256'][:12]}); reload and review the new map")
        row = {"review_id": uuid.uuid4().hex, "pseudonym": pseudonym, "batch_key": c["batch_key"],
               "delivery_id": c["delivery_id"], "decision": decision,
               "reason": reason if decision == "reject" else (reason or None), "note": note or "",
               "reviewer": reviewer.strip(), "reviewed_at": now_utc(), "label_sha256": c["label_sha256"],
               "model_sha256": c["model_sha256"], "source": source}
        self.warehouse.append_rows(rv.TABLE, pl.DataFrame([row], schema=rv.SCHEMA))
        self.report()
        return row

    def report(self) -> tuple[int, str]:
        """Report the reviews' count and hash to the Dagster instance as a materialisation of ``qc_reviews``
        (its data version is the hash). Returns (count, hash)."""
        n, sha = rv.digest(self.reviews())
        if self.instance is not None:
            self.instance.report_runless_asset_event(dg.AssetMaterialization(
                asset_key=REVIEWS_ASSET, metadata={"reviews": n, "reviews_sha256": sha},
                tags={"dagster/data_version": sha}))
        return n, sha
