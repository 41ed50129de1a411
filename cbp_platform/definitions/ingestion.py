"""Ingestion: the landing zone, the per-batch scans and covariates with their checks, the delivery sensor."""

import dagster as dg

from assets.ingestion import landing_zone, participant_covariates, raw_mri_scans
from assets.schedules import ingest_batch_job
from assets.sensors import delivery_sensor
from assets.summary import ingestion_summary
from checks.ingestion import (cohort_one_row_per_participant, covariates_expectations, fat_water_swap_qc,
                              scan_facts_expectations)

defs = dg.Definitions(
    assets=[landing_zone, raw_mri_scans, participant_covariates, ingestion_summary],
    asset_checks=[covariates_expectations, scan_facts_expectations, fat_water_swap_qc, cohort_one_row_per_participant],
    jobs=[ingest_batch_job],
    sensors=[delivery_sensor],
)
