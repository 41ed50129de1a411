"""The Dagster code location: assembles ``Definitions`` from ``assets/``, ``resources/`` and ``checks/``.

This is the only module of :mod:`cbp_platform` that imports Dagster. Heavy libraries (torch, Great
Expectations) are imported inside the functions that use them, so the location loads in seconds.
"""

from __future__ import annotations

import dagster as dg

from assets.analysis import (analysis_cohort, cbp_association_model, pain_intensity_model,
                             physical_activity_prevalence, published_results, stratified_comparisons, table_one)
from assets.ingestion import participant_covariates, raw_mri_scans
from assets.schedules import (cohort_refresh_job, daily_cohort_refresh, ingest_batch_job, model_job,
                              process_batch_job)
from assets.segmentation import muscle_metrics, muscle_segmentations, segmentation_model, segmentation_model_dice
from assets.sensors import delivery_sensor
from assets.summary import ingestion_summary
from checks.analysis import analysis_cohort_expectations, cbp_model_checks, pain_model_checks
from checks.ingestion import covariates_expectations, fat_water_swap_qc, scan_facts_expectations
from checks.segmentation import segmentation_plausibility
from resources import DataRootResource, SegmentationRuntime, Warehouse


def build_definitions() -> dg.Definitions:
    return dg.Definitions(
        assets=[raw_mri_scans, participant_covariates, ingestion_summary, segmentation_model,
                muscle_segmentations, muscle_metrics, analysis_cohort, cbp_association_model, pain_intensity_model,
                table_one, stratified_comparisons, physical_activity_prevalence, published_results],
        asset_checks=[covariates_expectations, scan_facts_expectations, fat_water_swap_qc, segmentation_model_dice,
                      segmentation_plausibility, analysis_cohort_expectations, cbp_model_checks, pain_model_checks],
        jobs=[ingest_batch_job, process_batch_job, model_job, cohort_refresh_job],
        sensors=[delivery_sensor],
        schedules=[daily_cohort_refresh],
        resources={"data_root": DataRootResource(), "warehouse": Warehouse(), "runtime": SegmentationRuntime()},
    )


defs = build_definitions()
