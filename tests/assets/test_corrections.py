"""Correction deliveries through the real sensor and runs (issue 27), on DuckDB and on PostgreSQL.

A simulated delivery is ingested; ``cbp synth --correct`` then writes a correction of it (covariates re-coded or
fixed, one re-scan) and three bad corrections are dropped beside it (an unknown delivery, an unknown participant,
a malformed entry). One sensor tick registers the good one and refuses the others; the correction's run requests
select only the stages of what each batch corrects; its runs write new versions that are in force, and the
versions they replace stay in the warehouse, closed. A second scenario lands the delivery and its correction
together, so the correction's batch runs before the batch whose versions it replaces.

The image stages need the segmentation model; they run in ``tests/segmentation`` (a re-scan re-segments its
participant alone). Here the runs are the ingestion job's (``ingest_batch``).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from cbp_platform.synth.correction import synthesize_correction
from cbp_platform.synth.delivery import synthesize

P_UNKNOWN = "22222AAAAA"


def _bad_corrections(landing, of: str, someone: str) -> None:
    """Three corrections the platform must refuse, each well-formed enough to reach the registry or the parser."""
    cases = {
        "bad-unknown-delivery": {"pseudonym": someone, "supersedes": "never-registered", "parts": ["covariates"],
                                 "reason": "covariate_error"},
        "bad-unknown-participant": {"pseudonym": P_UNKNOWN, "supersedes": of, "parts": ["covariates"],
                                    "reason": "covariate_error"},
        "bad-malformed": {"pseudonym": someone, "supersedes": of, "parts": ["covariates"], "reason": "oops"},
    }
    for did, entry in cases.items():
        d = landing / did
        d.mkdir()
        cov = b"pseudonym\n"
        (d / "covariates.csv").write_bytes(cov)
        man = {"schema_version": "1.0", "delivery_id": did, "created_at": "2031-01-01T00:00:00Z",
               "kind": "correction", "participants": [entry["pseudonym"]], "corrections": [entry],
               "files": [{"path": "covariates.csv", "size": len(cov), "sha256": hashlib.sha256(cov).hexdigest()}]}
        (d / "manifest.json").write_text(json.dumps(man))
        (d / "_SUCCESS").write_bytes(b"")


def _covariates(path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {r["pseudonym"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module", params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def corrected(request, tmp_path_factory):
    from orchestration.profiles import warehouse
    from orchestration.runner import pipeline_environment, run_pending
    from assets.sensors import delivery_sensor
    from cbp_platform.processes import environment
    from resources import DataRootResource

    root = tmp_path_factory.mktemp(f"corr-{request.param}")
    env = {}
    if request.param == "postgres":
        import uuid
        env = request.getfixturevalue("postgres_server").warehouse_env(f"c_{uuid.uuid4().hex[:10]}")
    from orchestration.releases import cut_release

    synthesize(participants=30, deliveries=1, seed=41, data_root=root, workers=2)
    with environment(env), pipeline_environment(root):
        inst = dg.DagsterInstance.get()
        first = run_pending(inst, log=lambda *_: None, job_name="ingest_batch", refresh=False)
        before = warehouse().table("participant_covariates")
        cut_release(inst, log=lambda *_: None)                        # release 1: the delivery as it came
        synthesize_correction(of="sim41-d01", seed=5, data_root=root, covariates=6, rescans=1)
        _bad_corrections(root / "landing", "sim41-d01", before["pseudonym"][0])
        with dg.build_sensor_context(instance=inst, resources={"data_root": DataRootResource()}) as ctx:
            tick = delivery_sensor(ctx)
        second = run_pending(inst, log=lambda *_: None, job_name="ingest_batch", refresh=False)
        cut_release(inst, log=lambda *_: None)                        # release 2: with the correction
        yield {"root": root, "tick": tick, "before": before, "first": first, "second": second,
               "wh": warehouse(), "inst": inst}


def test_the_sensor_requests_only_the_stages_each_correction_batch_corrects(corrected):
    tick = corrected["tick"]
    reqs = {r.partition_key: r for r in tick.run_requests if r.partition_key.startswith("sim41-d01-c01")}
    batches = json.loads((corrected["root"] / "registry" / "deliveries" / "sim41-d01-c01.json").read_text())
    assert sorted(reqs) == batches["batches"] == ["sim41-d01-c01.b001", "sim41-d01-c01.b002"]
    scan, cov = reqs["sim41-d01-c01.b001"], reqs["sim41-d01-c01.b002"]
    # the re-scan: its image stages, for its one participant; the covariates: participant_covariates alone
    assert [k.to_user_string() for k in scan.asset_selection] == ["raw_mri_scans", "muscle_segmentations",
                                                                  "muscle_metrics"]
    assert [k.to_user_string() for k in cov.asset_selection] == ["participant_covariates"]
    members = {k: json.loads((corrected["root"] / "registry" / "batches" / f"{k}.json").read_text())
               for k in reqs}
    assert [len(members[k]["participants"]) for k in sorted(members)] == [1, 6]
    assert corrected["second"]["failed"] == [] and corrected["second"]["ran"] == 2


def test_bad_corrections_are_refused_naming_the_entry_and_change_nothing(corrected):
    from cbp_platform.ingest.status import landing_report

    root = corrected["root"]
    reports = {r.delivery_id: r for r in landing_report(root, root / "landing")}
    for did, text in (("bad-unknown-delivery", "corrections[0] supersedes delivery 'never-registered', which this "
                                               "platform did not register"),
                      ("bad-unknown-participant", "corrections[0] names a participant this platform does not hold"),
                      ("bad-malformed", "corrections[0]: reason 'oops' is not a registered correction reason")):
        assert reports[did].state == "refused" and text in reports[did].reason, reports[did]
        assert not (root / "registry" / "deliveries" / f"{did}.json").exists()
    obs = corrected["tick"].asset_events[0].metadata["not_registered_or_changed"].value
    assert "bad-unknown-participant" in obs and P_UNKNOWN not in obs
    assert reports["sim41-d01-c01"].state == "registered"


def test_corrected_covariates_are_in_force_and_the_old_versions_stay_closed(corrected):
    root, wh, before = corrected["root"], corrected["wh"], corrected["before"]
    new = _covariates(root / "landing" / "sim41-d01-c01" / "covariates.csv")
    now = wh.table("participant_covariates")
    assert now.height == before.height == 30                    # one version in force per participant
    for p, row in new.items():
        got = now.filter(pl.col("pseudonym") == p).row(0, named=True)
        assert got["delivery_id"] == "sim41-d01-c01"
        assert (got["site"], f"{got['weight_kg']:.1f}", "" if got["cbp"] is None else str(int(got["cbp"]))) == (
            row["site"], row["weight_kg"], row["cbp"])
    untouched = before.filter(~pl.col("pseudonym").is_in(list(new)))
    assert now.filter(~pl.col("pseudonym").is_in(list(new))).sort("pseudonym").equals(untouched.sort("pseudonym"))
    every = wh.table("participant_covariates", versions="all")
    closed = every.filter(pl.col("superseded_by") != "")
    assert sorted(closed["pseudonym"]) == sorted(new) and set(closed["delivery_id"]) == {"sim41-d01"}
    assert set(closed["superseded_by"]) == {"sim41-d01-c01"}
    assert set(every.filter(pl.col("delivery_id") == "sim41-d01-c01")["supersedes"]) == {"sim41-d01"}
    # the old values are kept, unchanged
    assert closed.drop("supersedes", "superseded_by", "registration_seq").sort("pseudonym").equals(
        before.filter(pl.col("pseudonym").is_in(list(new))).sort("pseudonym"))


def test_a_rescan_is_ingested_as_the_participants_scan_in_force(corrected):
    wh = corrected["wh"]
    man = json.loads((corrected["root"] / "landing" / "sim41-d01-c01" / "manifest.json").read_text())
    (p,) = [e["pseudonym"] for e in man["corrections"] if e["parts"] == ["scan"]]
    scans = wh.table("raw_mri_scans", versions="all").filter(pl.col("pseudonym") == p).sort("registration_seq")
    assert scans.select("delivery_id", "superseded_by").rows() == [("sim41-d01", "sim41-d01-c01"),
                                                                   ("sim41-d01-c01", "")]
    assert scans["water_sha256"][0] != scans["water_sha256"][1]
    assert wh.count_rows("raw_mri_scans") == 30
    # the covariate corrections wrote no scan, and nobody's covariates came from the re-scan's batch
    assert wh.count_rows("raw_mri_scans", {"delivery_id": "sim41-d01-c01"}) == 1
    assert wh.count_rows("participant_covariates", {"batch_key": "sim41-d01-c01.b001"}) == 0


def test_cbp_status_accounts_for_every_file_and_row_of_the_correction(corrected):
    from cbp_platform.cli import main

    root = corrected["root"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["status", "--data-root", str(root), "--json"]) == 0
    doc = json.loads(out.getvalue())
    rep = {d["delivery_id"]: d for d in doc}["sim41-d01-c01"]
    acc = rep["accounting"]
    assert acc["adds_up"], acc
    assert acc["covariate_rows"]["stored"] == 6 and acc["files"]["unaccounted"] == 0


def test_the_next_release_counts_the_correction_and_the_old_one_stays_as_it_was(corrected):
    root, wh = corrected["root"], corrected["wh"]
    s1 = json.loads((root / "published" / "releases" / "1" / "release.json").read_text())
    s2 = json.loads((root / "published" / "releases" / "2" / "release.json").read_text())
    assert s1["participants"] == s2["participants"] == 30 and s2["previous"] == 1
    since = s2["since_previous"]
    assert since["corrected_participants"] == 7 and since["new_participants"] == 0
    assert since["correction_deliveries"] == ["sim41-d01-c01"]
    # counts under 5 are not published as such
    assert since["corrections_by_reason"]["rescan"] == "<5" and set(since["corrections_by_reason"]) <= {
        "covariate_recoded", "covariate_error", "site_reassigned", "rescan"}
    # release 1 still reads the original covariates, release 2 the corrected ones
    new = _covariates(root / "landing" / "sim41-d01-c01" / "covariates.csv")
    r1 = wh.release_rows("participant_covariates", 1).filter(pl.col("pseudonym").is_in(list(new)))
    r2 = wh.release_rows("participant_covariates", 2).filter(pl.col("pseudonym").is_in(list(new)))
    assert set(r1["delivery_id"]) == {"sim41-d01"} and set(r2["delivery_id"]) == {"sim41-d01-c01"}
    assert r1.sort("pseudonym").equals(corrected["before"].filter(pl.col("pseudonym").is_in(list(new)))
                                       .sort("pseudonym"))


def test_lineage_of_a_participant_shows_old_and_new_values_with_both_manifests_and_the_reason(corrected, capsys):
    from cbp_platform.cli import main

    root = corrected["root"]
    man = json.loads((root / "landing" / "sim41-d01-c01" / "manifest.json").read_text())
    entry = next(e for e in man["corrections"] if e["reason"] == "covariate_error")
    p = entry["pseudonym"]
    old = _covariates(root / "landing" / "sim41-d01" / "covariates.csv")[p]
    new = _covariates(root / "landing" / "sim41-d01-c01" / "covariates.csv")[p]
    assert main(["lineage", "--data-root", str(root), "--participant", p]) in (0, 1)
    out = capsys.readouterr().out
    recs = {d: json.loads((root / "registry" / "deliveries" / f"{d}.json").read_text())
            for d in ("sim41-d01", "sim41-d01-c01")}
    assert "versions (old -> new" in out and "participant_covariates:" in out
    for d, rec in recs.items():
        assert f"{d}: manifest sha256 {rec['manifest_sha256'][:16]}" in out
    assert "correction covariate_error (declared to supersede sim41-d01); in force, entered release 2" in out
    assert "replaced by sim41-d01-c01, entered release 1" in out          # which release each version entered
    assert f"weight_kg: {float(old['weight_kg']):.6g} -> {float(new['weight_kg']):.6g}" in out


def test_a_retired_delivery_is_shown_and_leaves_the_next_release_at_its_step(corrected):
    from assets.releases import release_cohort, release_info
    from cbp_platform.cli import main
    from cbp_platform.ingest.status import landing_report
    from orchestration.releases import cut_release

    root, wh, inst = corrected["root"], corrected["wh"], corrected["inst"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["delivery", "retire", "sim41-d01", "--reason", "scanner software fault",
                     "--data-root", str(root)]) == 0
    assert "sim41-d01: retired" in out.getvalue()
    reports = {r.delivery_id: r for r in landing_report(root, root / "landing")}
    assert reports["sim41-d01"].state == "retired" and "scanner software fault" in reports["sim41-d01"].reason
    from assets.sensors import delivery_sensor
    from resources import DataRootResource

    with dg.build_sensor_context(instance=inst, resources={"data_root": DataRootResource(root=str(root))},
                                 cursor=None) as ctx:
        tick = delivery_sensor(ctx)
    obs = [e for e in tick.asset_events]
    assert obs and obs[0].metadata["deliveries_retired"].value == 1
    from cbp_platform.processes import environment
    from orchestration.runner import pipeline_environment

    env = {"CBP_WAREHOUSE": "postgres"} if type(wh).__name__ == "PostgresWarehouse" else {}
    with environment(env), pipeline_environment(root):
        row = cut_release(inst, log=lambda *_: None)
    summary = json.loads(row["summary"])
    assert row["release_id"] == 3 and summary["excluded_as_retired"] == 30
    assert summary["since_previous"]["retirements"] == [{"delivery_id": "sim41-d01",
                                                         "reason": "scanner software fault"}]
    cohort, _ = release_cohort(wh, release_info(wh, 3))
    flow = dict(zip(cohort.flow["criterion"], cohort.flow["excluded"]))
    assert flow["delivery_retired"] == 30 and cohort.n == 0
    # nothing was deleted: every version is still there
    assert wh.table("participant_covariates", versions="all").height == 30 + 6


def test_a_correction_whose_batch_runs_before_the_original_still_wins(tmp_path, request):
    """The delivery and its correction land together: one tick registers both (the delivery first, by its
    manifest's creation time), and the correction's batches (``sim42-d01-c01.b...``) sort, and run, before the
    delivery's (``sim42-d01.b001``). The original's versions are written already closed by the correction."""
    from cbp_platform.processes import environment
    from orchestration.profiles import warehouse
    from orchestration.runner import pipeline_environment, run_pending

    synthesize(participants=12, deliveries=1, seed=42, data_root=tmp_path, workers=2)
    synthesize_correction(of="sim42-d01", seed=6, data_root=tmp_path, covariates=3, rescans=1)
    # (the module's PostgreSQL fixture may still be set up around this test: this one runs on DuckDB)
    with environment({"CBP_WAREHOUSE": "duckdb"}), pipeline_environment(tmp_path):
        res = run_pending(dg.DagsterInstance.get(), log=lambda *_: None, job_name="ingest_batch", refresh=False)
        assert res["failed"] == [] and res["ran"] == 3
        wh = warehouse()
        new = _covariates(tmp_path / "landing" / "sim42-d01-c01" / "covariates.csv")
        now = wh.table("participant_covariates")
        assert set(now.filter(pl.col("delivery_id") == "sim42-d01-c01")["pseudonym"]) == set(new)
        assert now.height == 12 and wh.count_rows("raw_mri_scans") == 12
        old = wh.table("participant_covariates", versions="all").filter(pl.col("delivery_id") == "sim42-d01")
        assert set(old.filter(pl.col("superseded_by") != "")["pseudonym"]) == set(new)


@pytest.mark.parametrize("backend", ["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_correction_registered_while_the_original_batch_is_being_written(tmp_path, request, backend):
    """The original delivery's batch runs in another process (as a run worker would); once its run has started,
    the correction lands, one sensor tick registers it and its batches run here, while the original may still be
    reading or writing. Whatever the interleaving, every run succeeds and the correction's versions are in force."""
    import os
    import subprocess
    import sys
    import time
    import uuid

    from assets.partitions import BATCHES
    from assets.sensors import delivery_sensor
    from cbp_platform.definitions import build_definitions
    from cbp_platform.processes import environment
    from orchestration.profiles import warehouse
    from orchestration.runner import pipeline_environment
    from resources import DataRootResource

    env = {"CBP_WAREHOUSE": "duckdb"}
    if backend == "postgres":
        env = request.getfixturevalue("postgres_server").warehouse_env(f"r_{uuid.uuid4().hex[:10]}")
    synthesize(participants=40, deliveries=1, seed=43, data_root=tmp_path, workers=2)
    with environment(env), pipeline_environment(tmp_path) as home:
        inst = dg.DagsterInstance.get()
        dr = DataRootResource(root=str(tmp_path))
        with dg.build_sensor_context(instance=inst, resources={"data_root": dr}) as ctx:
            first = delivery_sensor(ctx)
        inst.add_dynamic_partitions(BATCHES, ["sim43-d01.b001"])
        script = ("import sys, dagster as dg\nfrom cbp_platform.definitions import defs\n"
                  "inst = dg.DagsterInstance.from_config(sys.argv[1])\n"
                  "r = defs.resolve_job_def('ingest_batch').execute_in_process(partition_key='sim43-d01.b001', "
                  "instance=inst, raise_on_error=False, tags={'cbp/batch': 'sim43-d01.b001'})\n"
                  "sys.exit(0 if r.success else 1)\n")
        proc = subprocess.Popen([sys.executable, "-c", script, str(home)], env={**os.environ},
                                cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while not inst.get_runs(filters=dg.RunsFilter(tags={"cbp/batch": "sim43-d01.b001"})):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-2000:]
            time.sleep(0.1)
        synthesize_correction(of="sim43-d01", seed=8, data_root=tmp_path, covariates=5, rescans=0)
        with dg.build_sensor_context(instance=inst, resources={"data_root": dr}, cursor=first.cursor) as ctx:
            tick = delivery_sensor(ctx)
        for req in tick.dynamic_partitions_requests or []:
            inst.add_dynamic_partitions(BATCHES, list(req.partition_keys))
        job = build_definitions().resolve_job_def("ingest_batch")
        mine = [r for r in tick.run_requests if r.partition_key.startswith("sim43-d01-c01")]
        assert len(mine) == 1
        ok = [job.execute_in_process(partition_key=r.partition_key, instance=inst, raise_on_error=False,
                                     asset_selection=r.asset_selection).success for r in mine]
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0 and ok == [True], out[-2000:]
        wh = warehouse()
        new = _covariates(tmp_path / "landing" / "sim43-d01-c01" / "covariates.csv")
        now = wh.table("participant_covariates")
        assert now.height == 40 and set(now.filter(pl.col("delivery_id") == "sim43-d01-c01")["pseudonym"]) == set(new)
        assert wh.table("participant_covariates", versions="all").height == 45
