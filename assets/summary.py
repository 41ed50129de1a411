"""``ingestion_summary``: the cohort-level view of what has been ingested, per delivery (counts only)."""


import dagster as dg
import polars as pl

from assets.ingestion import participant_covariates, raw_mri_scans
from cbp_platform.deployment import k8s_step_tags
from cbp_platform.ingest.registry import registered_deliveries
from resources import WAREHOUSE_KIND, DataRootResource, Warehouse

SUMMARY_VERSION = "ingestion_summary/1"


@dg.asset(
    deps=[raw_mri_scans, participant_covariates],
    code_version=SUMMARY_VERSION,
    group_name="ingestion",
    op_tags=k8s_step_tags("cpu"),
    kinds={WAREHOUSE_KIND},
    description="Per delivery: registered participants, valid scans, valid covariate rows, participants with "
                "both, quarantined participants by stage and reason, suspected fat-water swaps.",
)
def ingestion_summary(context: dg.AssetExecutionContext, data_root: DataRootResource,
                      warehouse: Warehouse) -> dg.MaterializeResult:
    recs = registered_deliveries(data_root.path)
    reg = pl.DataFrame({"delivery_id": [r["delivery_id"] for r in recs],
                        "registered": [len(r["participants"]) for r in recs],
                        "batches": [len(r["batches"]) for r in recs]},
                       schema={"delivery_id": pl.String, "registered": pl.Int64, "batches": pl.Int64})
    counts = warehouse.ingestion_counts()
    out = reg
    for t in (counts["scans"], counts["covariates"], counts["both"], counts["quarantined"]):
        if t.height:
            out = out.join(t, on="delivery_id", how="left")
    for c in ("scans_valid", "swap_suspected", "covariates_valid", "ingested", "quarantined"):
        if c not in out.columns:
            out = out.with_columns(pl.lit(0).alias(c))
        out = out.with_columns(pl.col(c).fill_null(0).cast(pl.Int64))
    out = out.sort("delivery_id")
    checksum = warehouse.replace_rows("ingestion_summary", out, {})
    reasons = counts["stage_reasons"]
    totals = {c: int(out[c].sum()) for c in ("registered", "scans_valid", "covariates_valid", "ingested",
                                             "quarantined", "swap_suspected")}
    context.log.info(f"ingestion summary over {out.height} deliveries: {totals}")
    return dg.MaterializeResult(metadata={
        "deliveries": out.height, **totals,
        "quarantine_by_reason": dg.MetadataValue.json(
            {f"{s}/{r}": int(n) for s, r, n in reasons.iter_rows()} if reasons.height else {}),
        "table_checksum": checksum,
    }, data_version=dg.DataVersion(checksum))
