"""Model comparison: a registered model beside the primary, per batch, then over the cohort."""

import dagster as dg

from assets.comparison import comparison_metrics, model_comparison
from assets.schedules import compare_batch_job, model_comparison_job

defs = dg.Definitions(
    assets=[comparison_metrics, model_comparison],
    jobs=[compare_batch_job, model_comparison_job],
)
