"""Shared fixtures: small simulated cohorts written once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """24 participants in 2 deliveries, no faults (fast preset)."""
    from cbp_platform.synth.delivery import synthesize

    root = tmp_path_factory.mktemp("small")
    res = synthesize(participants=24, deliveries=2, seed=7, data_root=root, workers=2)
    return root, res


@pytest.fixture(scope="session")
def faulty_cohort(tmp_path_factory):
    """40 participants in 2 deliveries, half of them with a delivery fault (each kind twice)."""
    from cbp_platform.synth.delivery import synthesize

    root = tmp_path_factory.mktemp("faulty")
    res = synthesize(participants=40, deliveries=2, seed=11, data_root=root, fault_rate=0.5, workers=2)
    return root, res
