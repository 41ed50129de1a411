"""Jobs and schedules.

``ingest_batch``: the per-batch job the sensor launches (ingestion assets and their checks).
``daily_cohort_refresh``: refreshes the cohort-level assets once a day (05:00 UTC), after the night's
deliveries; later stages add their cohort-level assets to ``COHORT_LEVEL``.
"""

import dagster as dg

from assets.ingestion import participant_covariates, raw_mri_scans
from assets.sensors import INGEST_JOB
from assets.summary import ingestion_summary

ingest_batch_job = dg.define_asset_job(
    INGEST_JOB, selection=dg.AssetSelection.assets(raw_mri_scans, participant_covariates),
    description="Validate and load one batch: scans and covariates, with their checks.")

COHORT_LEVEL = dg.AssetSelection.assets(ingestion_summary)

cohort_refresh_job = dg.define_asset_job("cohort_refresh", selection=COHORT_LEVEL,
                                         description="Recompute the cohort-level assets from all batches.")

daily_cohort_refresh = dg.ScheduleDefinition(
    name="daily_cohort_refresh", job=cohort_refresh_job, cron_schedule="0 5 * * *", execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING)
