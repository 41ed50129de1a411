"""The Dagster code location: each area's definitions, merged with the deployment profile's.

:data:`AREAS` lists, per area (ingestion, segmentation, analysis, model comparison), its assets, checks, jobs,
sensors and schedules, all defined in ``assets/`` and ``checks/``; the deployment profile adds the resources, the
executor and the run reaper (:func:`orchestration.profiles.profile_definitions`), and shows the warehouse assets
under the profile's backend (:func:`orchestration.profiles.show_warehouse_kind`). This module only merges them
(:meth:`dagster.Definitions.merge`, as Dagster's reference projects do).

This file is the only code under :mod:`cbp_platform` that imports Dagster: the science stays framework-free (the
``cbp`` command line reaches it only through :mod:`orchestration`). Heavy libraries (torch, Great Expectations) are
imported inside the functions that use them, so the location loads in seconds.
"""

from __future__ import annotations

import dagster as dg

from assets.analysis import (analysis_cohort, cbp_association_model, pain_intensity_model,
                             physical_activity_prevalence, published_results, stratified_comparisons, table_one)
from assets.comparison import comparison_metrics, model_comparison
from assets.ingestion import landing_zone, participant_covariates, raw_mri_scans
from assets.releases import data_release, release_impact
from assets.withdrawals import erase_withdrawn, withdrawal_register, withdrawals_applied_in_time
from assets.schedules import (cohort_refresh_job, compare_batch_job, cut_release_job, daily_cohort_refresh,
                              ingest_batch_job, model_comparison_job, model_job, process_batch_job)
from assets.segmentation import muscle_metrics, muscle_segmentations, segmentation_model, segmentation_model_dice
from assets.sensors import delivery_sensor
from assets.summary import ingestion_summary
from checks.analysis import analysis_cohort_expectations, cbp_model_checks, pain_model_checks
from checks.ingestion import (cohort_one_row_per_participant, covariates_expectations, fat_water_swap_qc,
                              scan_facts_expectations)
from checks.segmentation import segmentation_plausibility
from cbp_platform import deployment
from orchestration.erasure import reapply_on_start
from orchestration.profiles import profile_definitions, show_warehouse_kind
from resources.reviews import reviews_spec

AREAS: dict[str, dg.Definitions] = {
    # the landing zone, the per-batch scans and covariates with their checks, the delivery sensor
    "ingestion": dg.Definitions(
        assets=[landing_zone, raw_mri_scans, participant_covariates, ingestion_summary],
        asset_checks=[covariates_expectations, scan_facts_expectations, fat_water_swap_qc,
                      cohort_one_row_per_participant],
        jobs=[ingest_batch_job],
        sensors=[delivery_sensor]),
    # the model, the per-batch label maps and metrics with their checks, the per-batch job
    "segmentation": dg.Definitions(
        assets=[segmentation_model, muscle_segmentations, muscle_metrics],
        asset_checks=[segmentation_model_dice, segmentation_plausibility],
        jobs=[process_batch_job, model_job]),
    # the data releases, the cohort, the models and tables, the published report, the reviewers' decisions, the
    # refresh
    "analysis": dg.Definitions(
        assets=[data_release, release_impact, analysis_cohort, cbp_association_model, pain_intensity_model,
                table_one, stratified_comparisons, physical_activity_prevalence, published_results, reviews_spec(),
                withdrawal_register],
        asset_checks=[analysis_cohort_expectations, cbp_model_checks, pain_model_checks, withdrawals_applied_in_time],
        jobs=[cohort_refresh_job, cut_release_job, erase_withdrawn],
        schedules=[daily_cohort_refresh]),
    # a registered model beside the primary, per batch, then over the cohort
    "comparison": dg.Definitions(
        assets=[comparison_metrics, model_comparison],
        jobs=[compare_batch_job, model_comparison_job]),
}


def build_definitions(profile: str | None = None) -> dg.Definitions:
    """The code location's definitions. Before them, withdrawals already applied whose participant is back (a
    restore) are erased again (:func:`orchestration.erasure.reapply_on_start`): no run starts on such data."""
    reapply_on_start()
    profile = profile or deployment.profile()
    return show_warehouse_kind(dg.Definitions.merge(*AREAS.values(), profile_definitions(profile)), profile)


defs = build_definitions()
