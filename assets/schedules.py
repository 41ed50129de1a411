"""Jobs and schedules.

``process_batch``: the per-batch job the sensor launches (ingestion, segmentation, metrics, their checks).
``ingest_batch``: ingestion only (for re-ingesting a batch after a landing-zone fix).
``daily_cohort_refresh``: refreshes the cohort-level assets (``COHORT_LEVEL``: ingestion summary, analysis
cohort, models, tables, published report) once a day (05:00 UTC), from the latest data release.
``cut_release``: cuts a data release (one ``data_release`` partition; ``cbp release cut``).
"""

import dagster as dg

from assets.comparison import comparison_metrics, model_comparison
from assets.analysis import (analysis_cohort, cbp_association_model, pain_intensity_model,
                             physical_activity_prevalence, published_results, stratified_comparisons, table_one)
from assets.releases import data_release, release_impact
from assets.segmentation import segmentation_model
from assets.sensors import INGEST_ASSETS, INGEST_JOB, PROCESS_ASSETS, PROCESS_JOB
from assets.summary import ingestion_summary
from cbp_platform.deployment import automation_running

ingest_batch_job = dg.define_asset_job(
    INGEST_JOB, selection=dg.AssetSelection.assets(*(dg.AssetKey(a) for a in INGEST_ASSETS)),
    description="Validate and load one batch: scans and covariates, with their checks.")

process_batch_job = dg.define_asset_job(
    PROCESS_JOB, selection=dg.AssetSelection.assets(*(dg.AssetKey(a) for a in PROCESS_ASSETS)),
    description="One batch end to end: ingestion, segmentation (pool gpu) and metrics, with their checks. "
                "Needs a materialised segmentation_model.")

model_job = dg.define_asset_job("train_segmentation_model", selection=dg.AssetSelection.assets(segmentation_model),
                                description="Train (or load) the segmentation model and check its Dice.")

compare_batch_job = dg.define_asset_job(
    "compare_model_batch", selection=dg.AssetSelection.assets(comparison_metrics),
    description="A second registered model (run config: ops.comparison_metrics.config.model) segments and measures "
                "one batch beside the primary model (`cbp model compare` runs it for every batch).")

model_comparison_job = dg.define_asset_job(
    "compare_models", selection=dg.AssetSelection.assets(model_comparison),
    description="Compare the primary model with a registered model over the batches both measured (run config: "
                "ops.model_comparison.config.model); the next report publishes it.")

# Cohort-level assets: recomputed from all materialised batches. Nothing per batch is in this selection, so a
# refresh never recomputes a batch; new batches are computed by the sensor's per-batch runs.
COHORT_LEVEL = dg.AssetSelection.assets(ingestion_summary, analysis_cohort, cbp_association_model,
                                        pain_intensity_model, table_one, stratified_comparisons,
                                        physical_activity_prevalence, published_results, release_impact)

cohort_refresh_job = dg.define_asset_job("cohort_refresh", selection=COHORT_LEVEL,
                                         description="Recompute the cohort-level assets from the latest data "
                                                     "release.")

CUT_RELEASE_JOB = "cut_release"
cut_release_job = dg.define_asset_job(
    CUT_RELEASE_JOB, selection=dg.AssetSelection.assets(data_release),
    description="Cut the data release of this partition (the next number): freeze which version of which "
                "participant the analysis uses (`cbp release cut` runs it).")

daily_cohort_refresh = dg.ScheduleDefinition(
    name="daily_cohort_refresh", job=cohort_refresh_job, cron_schedule="0 5 * * *", execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING if automation_running() else dg.DefaultScheduleStatus.STOPPED)
