"""The ingestion half of the asset graph, end to end through Dagster, on simulated deliveries."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from cbp_platform.synth.delivery import synthesize
from cbp_platform.synth.faults import EXPECTED_REASONS
from tests.support.warehouse import query as _q

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A data root with two faulty deliveries and a persistent Dagster home; env vars point at them."""
    from orchestration.runner import pipeline_environment

    root = tmp_path_factory.mktemp("ingest")
    synthesize(participants=50, deliveries=2, seed=21, data_root=root, fault_rate=0.4, workers=2)
    with pipeline_environment(root):
        yield root


@pytest.fixture(scope="module")
def ingested(env):
    from orchestration.runner import run_pending

    instance = dg.DagsterInstance.get()
    summary = run_pending(instance, log=lambda *_: None, job_name="ingest_batch")
    return env, instance, summary



def test_code_location_validates_and_loads_light(tmp_path):
    env = {**os.environ, "CBP_DATA_ROOT": str(tmp_path), "DAGSTER_HOME": str(tmp_path)}
    proc = subprocess.run([str(Path(sys.executable).with_name("dagster")), "definitions", "validate", "-w",
                           "workspace.yaml"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Validation successful for code location cbp_platform" in proc.stderr + proc.stdout
    # heavy libraries stay out of import time
    code = "import sys, cbp_platform.definitions; print(sorted(m for m in ('torch', 'great_expectations', 'monai') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def test_graph_has_the_ingestion_assets_and_checks():
    from cbp_platform.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"raw_mri_scans", "participant_covariates", "ingestion_summary"} <= keys
    checks = {c.name for c in graph.asset_check_keys}
    assert {"covariates_expectations", "scan_facts_expectations", "fat_water_swap_qc"} <= checks
    for key in ("raw_mri_scans", "participant_covariates", "ingestion_summary"):
        assert graph.get(dg.AssetKey(key)).code_version
    assert defs.resolve_schedule_def("daily_cohort_refresh").cron_schedule == "0 5 * * *"


def test_sensor_registers_each_delivery_exactly_once(env, tmp_path):
    from assets.partitions import BATCHES
    from assets.sensors import delivery_sensor
    from resources import DataRootResource

    # a private copy of the landing zone so this test controls completeness
    root = tmp_path / "root"
    shutil.copytree(env / "landing", root / "landing")
    (root / "landing" / "sim21-d02" / "_SUCCESS").unlink()                  # still in transfer
    bad = root / "landing" / "broken-d01"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    (bad / "_SUCCESS").write_text("")
    dr = DataRootResource(root=str(root), batch_size=10)
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, resources={"data_root": dr}) as ctx:
            r1 = delivery_sensor(ctx)
        keys = [r.partition_key for r in r1.run_requests]
        assert keys == [f"sim21-d01.b{i:03d}" for i in (1, 2, 3)]                # 25 participants, batches of 10
        assert [r.run_key for r in r1.run_requests] == keys
        assert list(r1.dynamic_partitions_requests[0].partition_keys) == keys
        cur = json.loads(r1.cursor)
        assert cur["registered"] == ["sim21-d01"]
        assert "not valid JSON" in cur["refused"]["broken-d01"]["reason"]
        assert not (root / "registry" / "deliveries" / "broken-d01.json").exists()
        instance.add_dynamic_partitions(BATCHES, keys)
        # same cursor: nothing new
        with dg.build_sensor_context(instance=instance, cursor=r1.cursor, resources={"data_root": dr}) as ctx:
            r2 = delivery_sensor(ctx)
        assert not r2.run_requests and "1 waiting" in r2.skip_reason.skip_message
        # the transfer completes: only the new delivery is registered
        (root / "landing" / "sim21-d02" / "_SUCCESS").write_text("")
        with dg.build_sensor_context(instance=instance, cursor=r2.cursor, resources={"data_root": dr}) as ctx:
            r3 = delivery_sensor(ctx)
        assert [r.partition_key for r in r3.run_requests] == [f"sim21-d02.b{i:03d}" for i in (1, 2, 3)]
        # a lost cursor (daemon restart without state) re-derives the same batches and run keys:
        # membership comes from the registry, so Dagster's run-key dedupe prevents a second run
        with dg.build_sensor_context(instance=instance, resources={"data_root": DataRootResource(
                root=str(root), batch_size=4)}) as ctx:
            r4 = delivery_sensor(ctx)
        assert sorted(r.run_key for r in r4.run_requests) == sorted(keys + [r.run_key for r in r3.run_requests])


def test_every_batch_materialises_and_faults_end_in_quarantine(ingested):
    root, instance, summary = ingested
    assert summary["failed"] == [] and summary["batches"] == 2 and summary["ran"] == 2
    faults = pl.concat([pl.read_csv(p, infer_schema=False) for p in sorted((root / "truth").glob("*/faults.csv"))])
    q = _q(root, "SELECT delivery_id, pseudonym, stage, reason FROM quarantine")
    for row in faults.iter_rows(named=True):
        got = q.filter((pl.col("delivery_id") == row["delivery_id"]) & (pl.col("pseudonym") == row["pseudonym"]))
        assert set(got["reason"].to_list()) & EXPECTED_REASONS[row["fault"]], (row, got)
    # nobody else is quarantined, and every good participant has both scan facts and covariates
    bad = set(zip(faults["delivery_id"], faults["pseudonym"]))
    assert set(zip(q["delivery_id"], q["pseudonym"])) <= bad
    truth = pl.concat([pl.read_csv(p) for p in sorted((root / "truth").glob("*/participants.csv"))])
    good = {(d, p) for d, p, f in zip(truth["delivery_id"], truth["pseudonym"], truth["fault"]) if not f}
    scans = _q(root, "SELECT delivery_id, pseudonym FROM raw_mri_scans")
    cov = _q(root, "SELECT delivery_id, pseudonym FROM participant_covariates")
    assert good <= set(zip(scans["delivery_id"], scans["pseudonym"]))
    assert good <= set(zip(cov["delivery_id"], cov["pseudonym"]))


def test_provenance_and_metadata(ingested):
    root, instance, _ = ingested
    prov = _q(root, "SELECT * FROM provenance")
    scans = _q(root, "SELECT pseudonym, batch_key, water_sha256, fat_sha256 FROM raw_mri_scans")
    p = prov.filter(pl.col("stage") == "raw_mri_scans").join(scans, on=["pseudonym", "batch_key"])
    assert p.height == scans.height
    for row in p.iter_rows(named=True):
        inputs = json.loads(row["input_checksums"])
        assert inputs == {"water": row["water_sha256"], "fat": row["fat_sha256"]}
        assert row["code_version"] == "raw_mri_scans/4" and row["run_id"]
    ev = instance.get_latest_materialization_event(dg.AssetKey("raw_mri_scans"))
    md = ev.asset_materialization.metadata
    assert {"dagster/row_count", "quarantined", "quarantine_reasons", "table_checksum", "preview"} <= set(md)
    # no pseudonym leaks into materialisation metadata or the run logs
    pseudos = set(_q(root, "SELECT pseudonym FROM provenance")["pseudonym"].to_list())
    text = json.dumps({k: str(v) for k, v in md.items()})
    for run in instance.get_runs():
        text += " ".join(str(e.user_message) for e in instance.all_logs(run.run_id))
    assert not [p for p in pseudos if p in text]


def test_checks_ran_per_partition(ingested):
    root, instance, _ = ingested
    key = dg.AssetCheckKey(dg.AssetKey("participant_covariates"), "covariates_expectations")
    recs = instance.event_log_storage.get_asset_check_execution_history(key, limit=10)
    assert len(recs) >= 2
    evals = [r.event.dagster_event.event_specific_data for r in recs if r.event and r.event.dagster_event]
    assert all(e.passed for e in evals)
    assert {"failed_expectations", "results"} <= set(evals[0].metadata)


def test_rematerialisation_replaces_rows(ingested):
    root, instance, _ = ingested
    from cbp_platform.definitions import defs

    before = _q(root, "SELECT * EXCLUDE (recorded_at, run_id) FROM quarantine ORDER BY ALL")
    n_scans = _q(root, "SELECT count(*) AS n FROM raw_mri_scans")["n"][0]
    key = "sim21-d01.b001"
    res = defs.resolve_job_def("ingest_batch").execute_in_process(partition_key=key, instance=instance)
    assert res.success
    after = _q(root, "SELECT * EXCLUDE (recorded_at, run_id) FROM quarantine ORDER BY ALL")
    assert before.equals(after)
    assert _q(root, "SELECT count(*) AS n FROM raw_mri_scans")["n"][0] == n_scans
    assert _q(root, "SELECT count(*) AS n, count(DISTINCT pseudonym || batch_key) AS d FROM provenance "
                    "WHERE stage = 'raw_mri_scans'").row(0) == (n_scans, n_scans)
    mats = list(instance.fetch_materializations(dg.AssetKey("raw_mri_scans"), limit=10).records)
    d01 = [m for m in mats if m.partition_key == key]
    assert len(d01) == 2
    v = [m.asset_materialization.metadata["table_checksum"].value for m in d01]
    assert v[0] == v[1]


def test_parallel_batches_never_fail_on_the_duckdb_lock(env, tmp_path):
    """Four batches in four processes at once against one warehouse file (each run also writes in two steps)."""
    from resources import DataRootResource

    root = tmp_path / "par"
    home = root / "dagster_home"
    home.mkdir(parents=True)
    synthesize(participants=40, deliveries=2, seed=33, data_root=root, workers=2)
    instance = dg.DagsterInstance.from_config(str(home))
    from assets.partitions import BATCHES
    from assets.sensors import delivery_sensor

    dr = DataRootResource(root=str(root), batch_size=10)
    with dg.build_sensor_context(instance=instance, resources={"data_root": dr}) as ctx:
        res = delivery_sensor(ctx)
    keys = [r.partition_key for r in res.run_requests]
    assert len(keys) == 4
    instance.add_dynamic_partitions(BATCHES, keys)
    script = textwrap.dedent("""
        import sys, dagster as dg
        from cbp_platform.definitions import defs
        inst = dg.DagsterInstance.from_config(sys.argv[1])
        r = defs.resolve_job_def("ingest_batch").execute_in_process(partition_key=sys.argv[2], instance=inst,
                                                                      raise_on_error=False)
        sys.exit(0 if r.success else 1)
    """)
    env_vars = {**os.environ, "CBP_DATA_ROOT": str(root), "DAGSTER_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(home), k], env=env_vars, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in keys]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], "\n".join(o[-1500:] for o in outs)
    n = _q(root, "SELECT batch_key, count(*) AS n FROM raw_mri_scans GROUP BY 1 ORDER BY 1")
    assert n["batch_key"].to_list() == sorted(keys) and n["n"].to_list() == [10, 10, 10, 10]
    assert _q(root, "SELECT count(*) AS n FROM participant_covariates")["n"][0] == 40


def test_sensor_does_not_relaunch_batches_already_processed(ingested):
    """`make demo` processes batches before the daemon ever ticks; the daemon must not run them again.

    Here the batches were only ingested (`ingest_batch`), so the sensor still requests `process_batch` for them;
    once a successful `process_batch` run of a batch exists, it is not requested again."""
    from assets.sensors import PROCESS_JOB, batch_already_ingested, delivery_sensor
    from resources import DataRootResource

    root, instance, _ = ingested
    keys = ["sim21-d01.b001", "sim21-d02.b001"]
    assert all(batch_already_ingested(instance, k, "ingest_batch") for k in keys)
    with dg.build_sensor_context(instance=instance, resources={"data_root": DataRootResource()}) as ctx:
        res = delivery_sensor(ctx)
    assert sorted(r.partition_key for r in res.run_requests) == keys
    assert sorted(res.dynamic_partitions_requests[0].partition_keys) == keys
    # a successful process_batch run of the first batch (recorded as the daemon would) removes it from the requests
    instance.add_run(dg.DagsterRun(job_name=PROCESS_JOB, run_id="0" * 8 + "-0000-0000-0000-" + "0" * 12,
                                   status=dg.DagsterRunStatus.SUCCESS, tags={"cbp/batch": keys[0]}))
    with dg.build_sensor_context(instance=instance, resources={"data_root": DataRootResource()}) as ctx:
        res = delivery_sensor(ctx)
    assert [r.partition_key for r in res.run_requests] == keys[1:]
