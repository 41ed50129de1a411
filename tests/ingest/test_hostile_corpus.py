"""The regression corpus of hostile deliveries (tests/ingest/hostile.py), through the sensor and Dagster runs.

For every fault: the participant hit is quarantined with the expected reason; every other participant is
processed; no run, step or check fails and no traceback is stored; the landing zone is byte-identical afterwards;
and nothing Dagster stores, nor ``cbp status``, names a pseudonym of the deliveries.
"""

import contextlib
import io
import json
import os
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from cbp_platform.reasons import REASONS, R, emitted_at
from cbp_platform.synth.delivery import synthesize
from tests.ingest import hostile
from tests.support.warehouse import query

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    from orchestration.runner import pipeline_environment, run_pending
    from cbp_platform.cli import main as cbp

    src, root = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("hostile")
    synthesize(participants=48, deliveries=1, seed=14, data_root=src, workers=2)
    corpus = hostile.build(src, root)
    landing = root / "landing"
    out = {"corpus": corpus, "before": hostile.snapshot(landing), "outside_before": hostile.snapshot(corpus.outside)}
    lines: list[str] = []
    err = io.StringIO()            # Dagster's console loggers bind sys.stderr when a context is built
    with contextlib.redirect_stderr(err):
        with pipeline_environment(root):
            inst = dg.DagsterInstance.get()
            out["first"] = run_pending(inst, job_name="ingest_batch", log=lines.append)
            out["after"] = hostile.snapshot(landing)
            out["outside_after"] = hostile.snapshot(corpus.outside)
            out["cov_before_change"] = query(root, "SELECT pseudonym, weight_kg FROM participant_covariates")
            # a corrected covariate file and manifest under the same delivery id, and a late re-send
            d = landing / hostile.HOSTILE
            man = json.loads((d / "manifest.json").read_text())
            text = (d / "covariates.csv").read_bytes().replace(b",Berlin,", b",Essen,")
            (d / "covariates.csv").write_bytes(text)
            entry = next(f for f in man["files"] if f["path"] == "covariates.csv")
            entry.update(size=len(text), sha256=__import__("hashlib").sha256(text).hexdigest())
            (d / "manifest.json").write_text(json.dumps(man, indent=1))
            hostile.add_late_resend(src, corpus)
            hostile.complete_the_copy(corpus)
            out["before2"] = hostile.snapshot(landing)
            out["second"] = run_pending(inst, job_name="ingest_batch", log=lines.append)
            out["after2"] = hostile.snapshot(landing)
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                assert cbp(["status", "--deep", "--explain"]) == 0
            out["status"] = buf.getvalue()
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                cbp(["status", "--json"])
            out["status_json"] = {r["delivery_id"]: r for r in json.loads(buf.getvalue())}
            out["runs"] = inst.get_runs()
            out["checks"] = [e for r in out["runs"] for e in inst.all_logs(r.run_id)
                             if e.dagster_event and e.dagster_event.event_type
                             == dg.DagsterEventType.ASSET_CHECK_EVALUATION]
            out["steps_failed"] = [e for r in out["runs"] for e in inst.all_logs(r.run_id)
                                   if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.STEP_FAILURE]
            inst.dispose()
    out["logs"] = err.getvalue().splitlines() + lines
    out["root"] = root
    yield out


def _quarantine(root: Path) -> pl.DataFrame:
    return query(root, "SELECT delivery_id, pseudonym, stage, reason, message FROM quarantine")


def test_the_hostile_run_is_green(corpus_run):
    assert corpus_run["first"]["failed"] == [] and corpus_run["second"]["failed"] == []
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in corpus_run["runs"])
    assert corpus_run["steps_failed"] == []
    failed = [e.dagster_event.event_specific_data.check_name for e in corpus_run["checks"]
              if not e.dagster_event.event_specific_data.passed
              and e.dagster_event.event_specific_data.severity == dg.AssetCheckSeverity.ERROR]
    assert failed == [], failed                     # no single scan fails the blocking check of the others
    assert {e.dagster_event.event_specific_data.check_name for e in corpus_run["checks"]} >= {
        "scan_facts_expectations", "covariates_expectations", "cohort_one_row_per_participant"}


@pytest.mark.parametrize("kind", list(hostile.SCAN_FAULTS) + list(hostile.COVARIATE_FAULTS))
def test_each_fault_quarantines_its_participant_with_the_expected_reason(corpus_run, kind):
    corpus = corpus_run["corpus"]
    faults = list(hostile.SCAN_FAULTS) + list(hostile.COVARIATE_FAULTS)
    p = corpus.participants[faults.index(kind)]
    stage, reason = corpus.expected[p]
    q = _quarantine(corpus_run["root"]).filter((pl.col("pseudonym") == p) & (pl.col("delivery_id") == hostile.HOSTILE))
    got = set(zip(q["stage"].to_list(), q["reason"].to_list()))
    assert got == {(stage, reason)} | corpus.also.get(p, set()), (kind, got, q["message"].to_list())
    msg = q["message"][0]
    assert p not in msg and "Traceback" not in msg, msg        # named by role and position, never by path


def test_every_quarantine_row_carries_a_reason_registered_for_its_stage(corpus_run):
    q = _quarantine(corpus_run["root"])
    pairs = set(zip(q["stage"].to_list(), q["reason"].to_list()))
    assert len(pairs) >= len(set(hostile.SCAN_FAULTS.values()) | set(hostile.COVARIATE_FAULTS.values()))
    assert sorted(p for p in pairs if not emitted_at(p[1], p[0])) == []


def test_every_other_participant_is_processed(corpus_run):
    corpus, root = corpus_run["corpus"], corpus_run["root"]
    scans = set(query(root, f"SELECT pseudonym FROM raw_mri_scans WHERE delivery_id = '{hostile.HOSTILE}'")
                ["pseudonym"].to_list())
    cov = set(query(root, f"SELECT pseudonym FROM participant_covariates WHERE delivery_id = '{hostile.HOSTILE}'")
              ["pseudonym"].to_list())
    scan_hit = {p for p, (s, _) in corpus.expected.items() if s == "raw_mri_scans"}
    cov_hit = {p for p, (s, _) in corpus.expected.items()
               if s == "participant_covariates" or "participant_covariates" in {t for t, _ in corpus.also.get(p, ())}}
    everyone = set(corpus.participants)
    assert scans == everyone - scan_hit
    assert cov == everyone - cov_hit
    assert len(corpus.good) >= 8 and set(corpus.good) <= scans & cov


def test_one_row_per_pseudonym_whatever_the_delivery_ids_first_registered_wins(corpus_run):
    corpus, root = corpus_run["corpus"], corpus_run["root"]
    for table in ("raw_mri_scans", "participant_covariates"):
        t = query(root, f"SELECT pseudonym, delivery_id FROM {table}")
        assert t.height == t["pseudonym"].n_unique(), table
        assert set(t.filter(pl.col("pseudonym").is_in(corpus.resent))["delivery_id"].to_list()) == {hostile.HOSTILE}
    q = _quarantine(root)
    for did in (hostile.RESEND_SAME_TICK, hostile.RESEND_LATER):
        mine = q.filter(pl.col("delivery_id") == did)
        assert set(zip(mine["pseudonym"].to_list(), mine["stage"].to_list(), mine["reason"].to_list())) == {
            (p, s, "duplicate_pseudonym") for p in corpus.resent for s in ("raw_mri_scans", "participant_covariates")}
        assert all(hostile.HOSTILE in m for m in mine["message"].to_list())


def test_the_landing_zone_is_byte_identical_afterwards(corpus_run):
    assert corpus_run["after"] == corpus_run["before"]
    assert corpus_run["after2"] == corpus_run["before2"]
    assert corpus_run["outside_after"] == corpus_run["outside_before"]


def test_cbp_status_explains_every_delivery(corpus_run):
    st = corpus_run["status_json"]
    for did, (state, reason) in hostile.DELIVERY_CASES.items():
        assert st[did]["state"] == state and reason in st[did]["reason"], (did, st[did])
    assert st[hostile.HOSTILE]["state"] == "changed" and "covariates.csv" in st[hostile.HOSTILE]["reason"]
    for did in (hostile.RESEND_SAME_TICK, hostile.RESEND_LATER):
        assert st[did]["state"] == "registered"
        assert st[did]["quarantine_reasons"] == {"duplicate_pseudonym": len(corpus_run["corpus"].resent)}
        assert st[did]["quarantine_explained"] == {"duplicate_pseudonym": R.duplicate_pseudonym.explanation}
    h = st[hostile.HOSTILE]
    assert h["participants"] == len(corpus_run["corpus"].participants) - 1      # one is not in the list
    assert h["batch_runs"] == {"SUCCESS": 1}
    assert h["quarantined"] == len(corpus_run["corpus"].expected)
    text = corpus_run["status"]
    for did in hostile.DELIVERY_CASES:
        assert did in text
    for code in h["quarantine_reasons"]:                        # --explain: each reason shown, from the registry
        r = REASONS[code]
        assert f"  {code} [{', '.join(r.stages)}]: {r.explanation}" in text.splitlines(), code


def test_a_changed_delivery_is_reported_and_never_reingested(corpus_run):
    root = corpus_run["root"]
    assert any("changed since registration" in x and hostile.HOSTILE in x for x in corpus_run["logs"])
    now = query(root, "SELECT pseudonym, weight_kg FROM participant_covariates")
    before = corpus_run["cov_before_change"]
    assert now.filter(pl.col("pseudonym").is_in(before["pseudonym"])).sort("pseudonym").equals(before.sort("pseudonym"))
    sites = query(root, f"SELECT DISTINCT site FROM participant_covariates WHERE delivery_id = '{hostile.HOSTILE}'")
    assert "Berlin" in [str(s) for s in sites["site"].to_list()]          # the registered version stands


def test_refusals_and_waits_are_observed_on_the_landing_zone_asset(corpus_run):
    root = corpus_run["root"]
    with dg.DagsterInstance.from_config(str(root / "dagster_home")) as inst:
        ev = inst.get_latest_materialization_event(dg.AssetKey("landing_zone"))
        records = inst.fetch_observations(dg.AssetKey("landing_zone"), limit=10).records
    assert ev is None and records
    md = records[0].event_log_entry.asset_observation.metadata
    assert md["deliveries_refused"].value == 6 and md["deliveries_waiting"].value == 1
    assert md["deliveries_changed"].value == 1
    table = md["not_registered_or_changed"].value
    assert "bad-json" in table and "waiting-d01" in table and hostile.HOSTILE in table


def test_no_pseudonym_reaches_logs_events_or_status(corpus_run):
    root, corpus = corpus_run["root"], corpus_run["corpus"]
    stored = b"".join(p.read_bytes() for p in (root / "dagster_home").rglob("*") if p.is_file())
    text = "\n".join(corpus_run["logs"]) + corpus_run["status"]
    leaks = [p for p in corpus.participants if p.encode() in stored or p in text]
    assert leaks == []


# --- round 2 (issue 26) ------------------------------------------------------------------------------------------


def test_harmless_variations_are_stored(corpus_run):
    corpus, root = corpus_run["corpus"], corpus_run["root"]
    scans = set(query(root, "SELECT pseudonym FROM raw_mri_scans")["pseudonym"].to_list())
    assert set(corpus.harmless) == set(hostile.HARMLESS)
    assert {k: p in scans for k, p in corpus.harmless.items()} == {k: True for k in hostile.HARMLESS}


def test_duplicate_content_names_the_other_participants_position(corpus_run):
    corpus = corpus_run["corpus"]
    faults = list(hostile.SCAN_FAULTS)
    a, b = (corpus.participants[faults.index(k)] for k in ("duplicate_content_a", "duplicate_content_b"))
    q = _quarantine(corpus_run["root"]).filter(pl.col("pseudonym").is_in([a, b]))
    assert q.height == 2 and all("as files[" in m and "both quarantined" in m for m in q["message"].to_list())


def test_a_file_completed_after_the_marker_is_reported_by_plain_status(corpus_run):
    h = corpus_run["status_json"][hostile.HOSTILE]               # `cbp status --json`, not --deep
    assert h["state"] == "changed" and "incomplete when the delivery closed" in h["reason"], h["reason"]
    assert "re-run the batch" in h["reason"] and "covariates.csv" in h["reason"]


def test_every_file_and_covariate_row_is_accounted_for(corpus_run):
    root, st = corpus_run["root"], corpus_run["status_json"]
    registered = [d for d, r in st.items() if r["state"] in ("registered", "changed")]
    assert set(registered) >= {hostile.HOSTILE, hostile.RESEND_SAME_TICK, hostile.RESEND_LATER}
    for did in registered:
        acc = st[did]["accounting"]
        folder = root / "landing" / did
        entries = [name for top, dirs, files in os.walk(folder) for name in
                   files + [d for d in dirs if os.path.islink(os.path.join(top, d))]]
        rows = [ln for ln in (folder / "covariates.csv").read_bytes().splitlines()[1:] if ln.strip()]
        assert acc["adds_up"] and acc["files"]["unaccounted"] == 0 and acc["covariate_rows"]["unaccounted"] == 0, acc
        assert acc["files"]["total"] == len(entries) and acc["covariate_rows"]["total"] == len(rows), (did, acc)
        assert acc["files"]["pending"] == 0 and acc["covariate_rows"]["pending"] == 0
    h = st[hostile.HOSTILE]["accounting"]
    assert h["files"]["ignored_reasons"] == {"marker": 1}                                # _SUCCESS
    assert h["files"]["quarantined_reasons"]["not_in_participant_list"] == 2            # water and fat
    assert h["covariate_rows"]["quarantined_reasons"]["not_in_participant_list"] == 1
    assert h["covariate_rows"]["quarantined_reasons"]["duplicate_pseudonym"] == 2        # the repeated row, twice
