"""A run whose process is killed (``kill -9``) is marked failed, its orphaned steps write nothing, Dagster's run
retries would re-run it, and re-running the batch gives the rows of a clean run.

The run is launched the way ``dagster dev`` launches one: a separate process (``dagster job execute``) with the
multiprocess executor, so its steps run in child processes that outlive the killed run worker."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from cbp_platform.processes import alive
from cbp_platform.synth.delivery import synthesize
from cbp_platform.warehouse import table_checksum
from tests.support.registration import register_batches
from tests.support.warehouse import query
from cbp_platform.paths import DataLayout

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"raw_mri_scans": "*", "participant_covariates": "*",
          "quarantine": "delivery_id, batch_key, pseudonym, stage, reason, message",
          "provenance": "pseudonym, delivery_id, batch_key, stage, input_checksums, output_checksum, code_version"}


def _rows(root: Path) -> dict:
    return {t: table_checksum(query(root, f"SELECT {cols} FROM {t}")) for t, cols in TABLES.items()}


def _count(root: Path, table: str) -> int:
    import duckdb

    if not (DataLayout(root).warehouse_file).exists():
        return 0
    try:
        return int(query(root, f"SELECT count(*) AS n FROM {table}")["n"][0])
    except duckdb.CatalogException:
        return 0


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A clean run of one batch, and the same batch in another root: killed at its first step, reaped, re-run."""
    from orchestration.reaper import reap
    from orchestration.runner import pipeline_environment, run_pending

    clean, root = tmp_path_factory.mktemp("clean"), tmp_path_factory.mktemp("killed")
    for r in (clean, root):
        synthesize(participants=60, deliveries=1, seed=8, data_root=r, workers=2, fault_rate=0.1)
    with pipeline_environment(clean):
        with dg.DagsterInstance.get() as inst:
            assert not run_pending(inst, refresh=False, log=lambda *_: None, job_name="ingest_batch")["failed"]
    from cbp_platform.deployment import write_instance_config

    write_instance_config(root / "dagster_home", "local")     # the local profile's instance: run retries on
    (key,) = register_batches(root)
    env = {**os.environ, "CBP_DATA_ROOT": str(root), "DAGSTER_HOME": str(root / "dagster_home"),
           "CBP_DEPLOYMENT": "local", "CBP_AUTOMATION": "stopped", "GX_ANALYTICS_ENABLED": "False"}
    out = {"root": root, "clean": clean, "key": key}
    with pipeline_environment(root):
        inst = dg.DagsterInstance.get()
        proc = subprocess.Popen([str(Path(sys.executable).with_name("dagster")), "job", "execute", "-m",
                                 "cbp_platform.definitions", "-j", "ingest_batch", "--tags",
                                 json.dumps({"dagster/partition": key, "cbp/batch": key})],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, run = time.monotonic() + 180, None
        while time.monotonic() < deadline:
            runs = inst.get_runs(limit=1)
            if runs and inst.get_records_for_run(runs[0].run_id, of_type=dg.DagsterEventType.STEP_START).records:
                run = runs[0]
                break
            time.sleep(0.1)
        assert run is not None, "the run never started a step"
        os.kill(proc.pid, signal.SIGKILL)                  # the run worker, mid-way
        proc.wait()
        out["killed_at"] = time.time()
        out["run_id"] = run.run_id
        from orchestration.reaper import run_processes

        _, steps = run_processes(inst, run.run_id)
        out["status_before"] = inst.get_run_by_id(run.run_id).status
        out["reaped"] = reap(inst, log=lambda *_: None, grace_s=30)
        deadline = time.monotonic() + 60                   # orphaned steps: stopped, or failed on their guard
        while time.monotonic() < deadline and any(alive(p, t) for p, t in steps):
            time.sleep(0.2)
        out["orphans_alive"] = [p for p, t in steps if alive(p, t)]
        out["run"] = inst.get_run_by_id(run.run_id)
        out["events"] = [e for e in inst.all_logs(run.run_id) if e.dagster_event]
        out["after_kill"] = {t: _count(root, t) for t in ("raw_mri_scans", "participant_covariates")}
        out["rerun"] = run_pending(inst, refresh=False, log=lambda *_: None, job_name="ingest_batch")
        inst.dispose()
    yield out


def test_the_killed_run_is_marked_failed_as_a_crash(killed):
    assert killed["status_before"] == dg.DagsterRunStatus.STARTED       # nothing else would ever change it
    assert killed["reaped"] == [killed["run_id"]]
    run = killed["run"]
    assert run.status == dg.DagsterRunStatus.FAILURE
    fail = [e for e in killed["events"] if e.dagster_event.event_type == dg.DagsterEventType.RUN_FAILURE]
    assert len(fail) == 1 and "run worker (pid" in fail[0].dagster_event.message
    from dagster._core.events import RunFailureReason

    assert fail[0].dagster_event.event_specific_data.failure_reason == RunFailureReason.UNEXPECTED_TERMINATION


def test_orphaned_steps_stop_and_commit_nothing_after_the_kill(killed):
    assert killed["orphans_alive"] == []
    late = [e for e in killed["events"] if e.timestamp > killed["killed_at"]
            and e.dagster_event.event_type in (dg.DagsterEventType.ASSET_MATERIALIZATION,
                                               dg.DagsterEventType.STEP_SUCCESS)]
    assert late == [], [(e.step_key, e.dagster_event.event_type_value) for e in late]
    done = {e.step_key for e in killed["events"] if e.dagster_event.event_type == dg.DagsterEventType.STEP_SUCCESS}
    for table, n in killed["after_kill"].items():     # rows only from a step that succeeded before the kill
        assert (n > 0) == (table in done), (table, n, done)
    failures = [e for e in killed["events"] if e.dagster_event.event_type == dg.DagsterEventType.STEP_FAILURE]
    for e in failures:          # stopped by the reaper's SIGTERM, or refused by its guard at commit time
        err = e.dagster_event.event_specific_data.error
        causes = [err] + ([err.cause] if err.cause else [])
        assert {c.cls_name for c in causes} & {"DagsterExecutionInterruptedError", "RunNotLive"}, e.step_key


def test_dagster_run_retries_would_retry_the_crashed_run_in_the_local_profile(killed):
    from dagster._core.events import RunFailureReason
    from dagster._core.execution.retries import auto_reexecution_should_retry_run

    with dg.DagsterInstance.from_config(str(killed["root"] / "dagster_home")) as inst:
        assert inst.run_retries_enabled and inst.run_retries_max_retries == 2
        run = inst.get_run_by_id(killed["run_id"])
        assert auto_reexecution_should_retry_run(inst, run, RunFailureReason.UNEXPECTED_TERMINATION)
        assert not auto_reexecution_should_retry_run(inst, run, RunFailureReason.STEP_FAILURE)


def test_rerunning_the_batch_gives_the_rows_of_a_clean_run(killed):
    assert killed["rerun"]["ran"] == 1 and not killed["rerun"]["failed"], killed["rerun"]
    assert _rows(killed["root"]) == _rows(killed["clean"])


def test_a_reused_pid_is_not_the_recorded_process():
    me = os.getpid()
    assert alive(me) and alive(me, recorded_at=time.time())
    assert not alive(me, recorded_at=time.time() - 10 * 24 * 3600)   # "recorded" long before this process began
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not alive(child.pid)
