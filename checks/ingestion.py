"""Per-batch checks of the ingestion assets: GX suites (blocking) and the fat-water swap image QC."""


import warnings

import dagster as dg

# Partitioned asset checks are a preview feature of Dagster 1.13; they are what per-batch checks need.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=Warning)

from assets.ingestion import participant_covariates, raw_mri_scans
from assets.summary import ingestion_summary
from assets.partitions import batches_partitions
from cbp_platform.ingest.covariates import REQUIRED, RULES
from cbp_platform.ingest.scans import RULES as SCAN_RULES
from cbp_platform.landing import SITES
from cbp_platform.warehouse import UNIQUE_KEYS
from checks.gx import outcomes_metadata, run_suite
from resources import Warehouse

# the share of suspected swaps in one batch above which the batch is flagged (expected: ~1.8 %)
SWAP_SHARE_ALERT = 0.05


def covariate_expectations() -> list:
    exp = [("ExpectColumnValuesToNotBeNull", {"column": c}) for c in REQUIRED]
    exp.append(("ExpectColumnValuesToBeUnique", {"column": "pseudonym"}))
    exp.append(("ExpectColumnValuesToBeInSet", {"column": "site", "value_set": list(SITES)}))
    exp.append(("ExpectColumnValuesToBeInSet", {"column": "sex", "value_set": ["F", "M"]}))
    for col, rng in RULES.items():
        exp.append(("ExpectColumnValuesToBeBetween", {"column": col, "min_value": rng.lo, "max_value": rng.hi}))
    return exp


def scan_expectations() -> list:
    """The scan rules (:data:`cbp_platform.ingest.scans.RULES`) that ingestion applies per participant, as a GX
    suite: a failure here means a batch-level breakage (the facts table, the code), never one bad scan."""
    exp = [("ExpectColumnValuesToNotBeNull", {"column": c})
           for c in ("pseudonym", "water_sha256", "fat_sha256", "affine", "orientation")]
    exp.append(("ExpectColumnValuesToBeUnique", {"column": "pseudonym"}))
    for c in ("spacing_x", "spacing_y", "spacing_z"):
        exp.append(("ExpectColumnValuesToBeBetween", {"column": c, "min_value": SCAN_RULES.spacing_mm[0],
                                                      "max_value": SCAN_RULES.spacing_mm[1]}))
    for c in ("shape_x", "shape_y", "shape_z"):
        exp.append(("ExpectColumnValuesToBeBetween", {"column": c, "min_value": SCAN_RULES.shape[0],
                                                      "max_value": SCAN_RULES.shape[1]}))
    exp.append(("ExpectColumnValuesToBeInSet", {"column": "dtype", "value_set": list(SCAN_RULES.dtypes)}))
    exp.append(("ExpectColumnValuesToBeBetween", {"column": "water_min", "min_value": SCAN_RULES.min_signal}))
    exp.append(("ExpectColumnValuesToBeBetween", {"column": "fat_min", "min_value": SCAN_RULES.min_signal}))
    return exp


def _rows(warehouse: Warehouse, table: str, key: str):
    return warehouse.table(table, where={"batch_key": key}, order_by=["pseudonym"])


def _gx_result(name: str, df, expectations) -> dg.AssetCheckResult:
    if df.height == 0:
        return dg.AssetCheckResult(passed=True, metadata={"rows": 0, "note": "no valid rows in this batch"})
    outcomes = run_suite(name, df, expectations)
    md = outcomes_metadata(outcomes)
    return dg.AssetCheckResult(
        passed=md["failed_expectations"] == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"rows": df.height, "expectations": md["expectations"],
                  "failed_expectations": md["failed_expectations"],
                  "failures": dg.MetadataValue.json(md["failures"]),
                  "results": dg.MetadataValue.md(md["results"])})


@dg.asset_check(asset=participant_covariates, blocking=True, partitions_def=batches_partitions,
                description="Great Expectations suite: required columns, unique pseudonyms, site and sex sets, "
                            "plausible age (19-74), height, weight, NRS (0-10) and MET (>= 0).")
def covariates_expectations(context: dg.AssetCheckExecutionContext, warehouse: Warehouse) -> dg.AssetCheckResult:
    df = _rows(warehouse, "participant_covariates", context.partition_key)
    df = df.with_columns(df["site"].cast(str), df["sex"].cast(str)) if df.height else df
    return _gx_result("participant_covariates", df, covariate_expectations())


@dg.asset_check(asset=raw_mri_scans, blocking=True, partitions_def=batches_partitions,
                description="Great Expectations suite on scan facts: checksums and affine present, unique "
                            "participants, voxel spacing and shape within bounds, known dtype, no negative signal.")
def scan_facts_expectations(context: dg.AssetCheckExecutionContext, warehouse: Warehouse) -> dg.AssetCheckResult:
    return _gx_result("raw_mri_scans", _rows(warehouse, "raw_mri_scans", context.partition_key), scan_expectations())


@dg.asset_check(asset=raw_mri_scans, partitions_def=batches_partitions,
                description="Image QC: scans with a suspected fat-water swap (full or one station). Warns when "
                            f"more than {SWAP_SHARE_ALERT:.0%} of a batch is affected (expected ~1.8 %).")
def fat_water_swap_qc(context: dg.AssetCheckExecutionContext, warehouse: Warehouse) -> dg.AssetCheckResult:
    df = _rows(warehouse, "raw_mri_scans", context.partition_key)
    n = df.height
    k = int(df["swap_suspected"].sum()) if n else 0
    share = k / n if n else 0.0
    return dg.AssetCheckResult(
        passed=share <= SWAP_SHARE_ALERT, severity=dg.AssetCheckSeverity.WARN,
        metadata={"scans": n, "swap_suspected": k, "share": round(share, 4),
                  "alert_above": SWAP_SHARE_ALERT})


@dg.asset_check(asset=ingestion_summary, blocking=True,
                description="Cohort-wide, beside the per-batch uniqueness expectations: one row per participant "
                            "(and muscle, or model) in every stage table, whatever the delivery ids, the order "
                            "of processing or concurrent runs (the warehouse's unique keys make a second row "
                            "fail its write; this check catches a warehouse written before them).")
def cohort_one_row_per_participant(warehouse: Warehouse) -> dg.AssetCheckResult:
    dup = {}
    for table, keys in UNIQUE_KEYS.items():
        if not warehouse.has_table(table):
            continue
        dup[table] = warehouse.duplicate_keys(table, keys)
    return dg.AssetCheckResult(passed=not any(dup.values()), severity=dg.AssetCheckSeverity.ERROR,
                               metadata={"duplicated_keys": dg.MetadataValue.json(dup)})
