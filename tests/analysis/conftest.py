"""Fixtures of the analysis tests: one simulated cohort's warehouse tables and its analysis cohort."""

from __future__ import annotations

import pytest

from .synthetic import warehouse_tables


@pytest.fixture(scope="session")
def tables():
    return warehouse_tables(3000, seed=5)


@pytest.fixture(scope="session")
def cohort(tables):
    from cbp_platform.analysis.cohort import build_analysis_cohort

    return build_analysis_cohort(tables["covariates"], tables["scans"], tables["metrics"], tables["quarantine"])
