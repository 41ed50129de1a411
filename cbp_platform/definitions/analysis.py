"""Analysis: the cohort, the models and tables, the published report, the reviewers' decisions they read, the
cohort refresh and its schedule."""

import dagster as dg

from assets.analysis import (analysis_cohort, cbp_association_model, pain_intensity_model,
                             physical_activity_prevalence, published_results, stratified_comparisons, table_one)
from assets.schedules import cohort_refresh_job, daily_cohort_refresh
from checks.analysis import analysis_cohort_expectations, cbp_model_checks, pain_model_checks
from resources.reviews import reviews_spec

defs = dg.Definitions(
    assets=[analysis_cohort, cbp_association_model, pain_intensity_model, table_one, stratified_comparisons,
            physical_activity_prevalence, published_results, reviews_spec()],
    asset_checks=[analysis_cohort_expectations, cbp_model_checks, pain_model_checks],
    jobs=[cohort_refresh_job],
    schedules=[daily_cohort_refresh],
)
