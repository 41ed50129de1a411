"""Segmentation: the model, the per-batch label maps and metrics with their checks, the per-batch job."""

import dagster as dg

from assets.schedules import model_job, process_batch_job
from assets.segmentation import muscle_metrics, muscle_segmentations, segmentation_model, segmentation_model_dice
from checks.segmentation import segmentation_plausibility

defs = dg.Definitions(
    assets=[segmentation_model, muscle_segmentations, muscle_metrics],
    asset_checks=[segmentation_model_dice, segmentation_plausibility],
    jobs=[process_batch_job, model_job],
)
