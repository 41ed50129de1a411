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
def nnunet_model(tmp_path_factory):
    """A small nnU-Net v2 model folder trained here by nnU-Net itself (cbp_platform.segmentation.backends.
    nnunet_phantom), in a fresh interpreter: nnU-Net fixes its paths at import and plans with process pools.
    Returns (trained-model folder, the builder's report). ``CBP_TEST_NNUNET_OUT``: build into (and reuse from) that
    folder instead, to iterate on the tests without retraining; CI never sets it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    reuse = os.environ.get("CBP_TEST_NNUNET_OUT")
    report_path = Path(reuse) / "report.json" if reuse else None
    if report_path is not None and report_path.exists():
        report = json.loads(report_path.read_text())
        return Path(report["folder"]), report
    out = Path(reuse) if reuse else tmp_path_factory.mktemp("nnunet-model")
    proc = subprocess.run([sys.executable, "-m", "cbp_platform.segmentation.backends.nnunet_phantom", "--out",
                           str(out / "results")], capture_output=True, text=True, timeout=1500)
    if proc.returncode != 0:
        raise RuntimeError(f"building the test nnU-Net model failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if report_path is not None:
        report_path.write_text(json.dumps(report))
    return Path(report["folder"]), report


@pytest.fixture(scope="session")
def faulty_cohort(tmp_path_factory):
    """40 participants in 2 deliveries, half of them with a delivery fault (each kind twice)."""
    from cbp_platform.synth.delivery import synthesize

    root = tmp_path_factory.mktemp("faulty")
    res = synthesize(participants=40, deliveries=2, seed=11, data_root=root, fault_rate=0.5, workers=2)
    return root, res


@pytest.fixture(scope="session")
def postgres_server():
    """One throw-away PostgreSQL server on loopback for the session (tests/system.py); each test that writes a
    warehouse takes its own schema."""
    from tests.system import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()
