"""The analysis layer (framework-free): analysis cohort and exclusion flow, descriptive tables, the report.

* :mod:`.cohort`: :func:`build_analysis_cohort` (inclusion rules, derived variables, cohort hash) and
  :func:`participant_trace`;
* :mod:`.tables`: Table 1, physical-activity prevalence, stratified comparisons, :func:`publishable`;
* :mod:`.disclosure`: small-cell suppression and the pseudonym guard;
* :mod:`.report`: :func:`paper_vs_run_table` and :func:`render_report` (Markdown, HTML, PNG figures);
* :mod:`.models`: :func:`~.models.fit_analysis`, one analysis of :mod:`cbp_platform.study` as the model assets fit it;
* :mod:`.publish`: the report and its lineage manifest from the analysis assets' tables (``published_results``).

The exposures and analyses are defined in :mod:`cbp_platform.study`; the mixed model lives in
:mod:`cbp_platform.stats`; the report takes its OR tables. See docs/analysis.md.
"""

from cbp_platform.analysis.cohort import (
    AnalysisCohort,
    ParticipantTrace,
    build_analysis_cohort,
    cohort_hash,
    participant_trace,
)
from cbp_platform.analysis.disclosure import PseudonymLeak, assert_no_pseudonyms, suppress_small_cells
from cbp_platform.analysis.tables import physical_activity_prevalence, publishable, stratified_comparisons, table_one

__all__ = ["AnalysisCohort", "ParticipantTrace", "build_analysis_cohort", "cohort_hash", "participant_trace",
           "PseudonymLeak", "assert_no_pseudonyms", "suppress_small_cells", "physical_activity_prevalence",
           "publishable", "stratified_comparisons", "table_one", "paper_vs_run_table", "render_report"]


def __getattr__(name: str):
    # the report pulls in matplotlib: import it only when asked for
    if name in ("paper_vs_run_table", "render_report"):
        from cbp_platform.analysis import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
