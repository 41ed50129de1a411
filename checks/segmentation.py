"""Per-batch plausibility checks of the segmentations and metrics (blocking for the analysis)."""

import dagster as dg
import polars as pl

from cbp_platform.classes import BACK_TOTAL, LR_PAIRS, NAMES

from assets.partitions import batches_partitions
from assets.segmentation import muscle_metrics
from resources import Warehouse

LR_RATIO = (0.6, 1.0 / 0.6)        # left / right compartment volume
BACK_TOTAL_ML = (250.0, 4000.0)    # the four compartments together over the imaged trunk
IMAT_PCT = (0.2, 60.0)


def evaluate(df: pl.DataFrame) -> dict:
    """Counts of participants failing each rule, from the long muscle_metrics table of one batch."""
    if df.height == 0:
        return {"participants": 0, "empty_masks": 0, "lr_ratio_out_of_bounds": 0, "volume_out_of_range": 0}
    wide = df.pivot(on="muscle", index="pseudonym", values=["compartment_ml", "imat_pct"])
    c = lambda m: pl.col(f"compartment_ml_{m}")  # noqa: E731
    empty = wide.filter(pl.any_horizontal([c(m) <= 0 for m in NAMES.values()]))
    ratio = wide.filter(pl.any_horizontal([~(c(left.name) / c(right.name)).is_between(*LR_RATIO)
                                           for left, right in LR_PAIRS]))
    vol = wide.filter(~c(BACK_TOTAL).is_between(*BACK_TOTAL_ML)
                      | ~pl.col(f"imat_pct_{BACK_TOTAL}").is_between(*IMAT_PCT))
    return {"participants": wide.height, "empty_masks": empty.height, "lr_ratio_out_of_bounds": ratio.height,
            "volume_out_of_range": vol.height}


@dg.asset_check(asset=muscle_metrics, blocking=True, partitions_def=batches_partitions,
                description=f"No empty compartment; left/right volume ratio within {LR_RATIO[0]:.2f}-{LR_RATIO[1]:.2f}; "
                            f"back total {BACK_TOTAL_ML[0]:.0f}-{BACK_TOTAL_ML[1]:.0f} cm3; InterMAT "
                            f"{IMAT_PCT[0]}-{IMAT_PCT[1]} %.")
def segmentation_plausibility(context: dg.AssetCheckExecutionContext, warehouse: Warehouse) -> dg.AssetCheckResult:
    df = warehouse.table("muscle_metrics", where={"batch_key": context.partition_key}, order_by=["pseudonym", "muscle"])
    r = evaluate(df)
    bad = r["empty_masks"] + r["lr_ratio_out_of_bounds"] + r["volume_out_of_range"]
    return dg.AssetCheckResult(passed=bad == 0, severity=dg.AssetCheckSeverity.ERROR, metadata=r)
