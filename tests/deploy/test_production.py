"""The production profile against a real PostgreSQL server (Debian's postgresql, on loopback, in a temp dir):
instance rendered by ``cbp instance init``, sensor tick and one batch materialised with that instance, and the
runs, partitions, materialisations and check results found in the database itself."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from cbp_platform.synth.delivery import synthesize

pytestmark = [pytest.mark.postgres, pytest.mark.pipeline]
CBP = str(Path(sys.executable).with_name("cbp"))


@pytest.fixture(scope="module")
def pg(postgres_server):
    return postgres_server


@pytest.fixture(scope="module")
def production(pg, tmp_path_factory):
    """A data root with one delivery and a production DAGSTER_HOME pointing at the server (2 GPUs declared)."""
    root = tmp_path_factory.mktemp("prod")
    synthesize(participants=12, deliveries=1, seed=31, data_root=root, workers=2)
    home = root / "dagster_home"
    env = {**os.environ, **pg.env(), "CBP_DEPLOYMENT": "production", "DAGSTER_HOME": str(home),
           "CBP_DATA_ROOT": str(root), "CBP_GPU_COUNT": "2"}
    init = subprocess.run([CBP, "instance", "init"], env=env, capture_output=True, text=True, timeout=300)
    with pytest.MonkeyPatch.context() as mp:        # the tests below open the instance in this process too
        for k in (*pg.env(), "CBP_DEPLOYMENT", "DAGSTER_HOME", "CBP_DATA_ROOT", "CBP_GPU_COUNT"):
            mp.setenv(k, env[k])
        yield root, home, init


def test_instance_init_renders_postgres_queue_and_gpu_pool(production, pg):
    root, home, init = production
    assert init.returncode == 0, init.stderr
    assert "profile production" in init.stdout and "PostgresRunStorage" in init.stdout, init.stdout
    with dg.DagsterInstance.from_config(str(home)) as inst:
        assert type(inst.run_storage).__name__ == "PostgresRunStorage"
        assert type(inst.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(inst.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert type(inst.run_coordinator).__name__ == "QueuedRunCoordinator"
        conc = inst.get_concurrency_config()
        assert conc.run_queue_config.max_concurrent_runs == 4
        assert conc.pool_config.default_pool_limit == 2          # CBP_GPU_COUNT=2
        assert inst.event_log_storage.get_concurrency_info("gpu").slot_count == 2
        assert inst.run_monitoring_settings["free_slots_after_run_end_seconds"] == 300
    # the pool limit lives in Postgres itself
    assert pg.query("SELECT count(*) FROM concurrency_limits WHERE concurrency_key = 'gpu' AND \"limit\" = 2")[0][0] == 1


def test_sensor_and_batch_run_are_recorded_in_postgres(production, pg):
    from orchestration.runner import run_pending

    root, home, _ = production
    with dg.DagsterInstance.from_config(str(home)) as inst:
        summary = run_pending(inst, log=lambda *_: None, job_name="ingest_batch", refresh=False)
        assert summary["failed"] == [] and summary["ran"] == summary["batches"] >= 1, summary
        keys = sorted(inst.get_dynamic_partitions("batches"))
    # straight from the database: the partitions the sensor added, the successful runs, their materialisations
    # and check evaluations
    assert sorted(r[0] for r in pg.query("SELECT partition FROM dynamic_partitions WHERE partitions_def_name = "
                                         "'batches'")) == keys
    runs = pg.query("SELECT pipeline_name, status FROM runs")
    assert runs and all(r == ("ingest_batch", "SUCCESS") for r in runs), runs
    mats = pg.query("SELECT asset_key, partition FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
    assert {(k, p) for k, p in mats} >= {('["raw_mri_scans"]', keys[0]), ('["participant_covariates"]', keys[0])}
    checks = pg.query("SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_CHECK_EVALUATION'")[0][0]
    assert checks >= 3 * len(keys)          # scan facts, fat-water swap QC, covariates
    # the asset's steady progress lines are in the run's event log (counts, no pseudonyms)
    progress = pg.query("SELECT count(*) FROM event_logs WHERE event LIKE %s",
                        (f"%batch {keys[0]}: validated 12/12 scans%",))
    assert progress[0][0] >= 1
    # nothing was written to a SQLite instance beside it
    assert not list(home.rglob("*.db"))
    # the production profile's warehouse is PostgreSQL too: the batch's rows, quarantine and provenance are in the
    # server's cbp schema, and no DuckDB file was created under the data root
    scans = pg.query("SELECT count(*), count(DISTINCT pseudonym) FROM cbp.raw_mri_scans")[0]
    assert scans[0] == scans[1] == 12, scans
    stages = {r[0] for r in pg.query("SELECT DISTINCT stage FROM cbp.provenance")}
    assert {"raw_mri_scans", "participant_covariates"} <= stages
    assert not (root / "warehouse").exists()
