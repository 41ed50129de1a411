"""Withdrawal of consent as a proven erasure (issue 28), through the whole pipeline, on DuckDB and PostgreSQL.

One data root: a NIfTI delivery and a DICOM delivery (3 participants each) go through Dagster's batch job with the
registered nnU-Net test model (conversion and stitching for DICOM, segmentation, QC images, metrics), then a
comparison with a second registered model; a reviewer accepts one map and rejects another; 1,000 simulated
participants' rows sit beside them (``tests/support/synthetic.py``) so that release 1's report can fit its models.
Release 1 is cut and published. Then:

* one NIfTI participant and one DICOM participant withdraw completely, a second NIfTI participant for imaging only,
  and a request names a participant the platform never held. ``cbp erase`` erases and certifies;
* an independent byte scan (this file's own, not the platform's) over the whole data root (``truth/`` aside: it
  stands for the data centre) finds neither pseudonym, in any file, gzip stream, zip member or name, nor any copy
  or sha256 of a file they had; the other participants' delivered files are byte-identical;
* the certificates verify (``cbp erase --verify``), a tampered one does not; release 1's Merkle root still verifies
  and ``cbp reproduce`` reports "N − 3 reproduced, 3 erased since"; a second ``cbp erase`` changes nothing;
* a copy of the data root taken before the erasure, put back, is erased again before ``cbp`` runs anything;
* on PostgreSQL (the same pipeline rows copied into a schema), the erasure's ``VACUUM FULL`` leaves neither
  pseudonym in the server's data directory (its WAL aside: docs/lifecycle.md).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from cbp_platform.paths import DataLayout
from tests.support.nnunet import register_phantom_model

pytestmark = pytest.mark.pipeline

NIFTI, DICOM = "sim57-d01", "sim58-d01"


def _cli(*argv: str) -> tuple[int, str, str]:
    from cbp_platform.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def _streams(path: Path):
    """A file's bytes, and decompressed its gzip stream or each zip member."""
    data = path.read_bytes()
    yield data
    if data[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError):
            yield gzip.decompress(data)
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for name in zf.namelist():
                yield zf.read(name)


def traces(roots: list[Path], pseudonyms: list[str], digests: set[str], skip: tuple[Path, ...] = ()) -> list[str]:
    """Where any of ``pseudonyms`` (either case, in bytes or names) or any file of ``digests`` (a copy, or its
    sha256 written down) lies under ``roots``."""
    needles = [p.encode() for p in pseudonyms] + [p.lower().encode() for p in pseudonyms] + \
        [d.encode() for d in digests]
    found = []
    for root in roots:
        for p in sorted(root.rglob("*")):
            if any(p.is_relative_to(s) for s in skip):
                continue
            if any(x in str(p.relative_to(root)) for x in pseudonyms):
                found.append(f"{p}: name")
            if not p.is_file() or p.is_symlink():
                continue
            if hashlib.sha256(p.read_bytes()).hexdigest() in digests:
                found.append(f"{p}: a copy of a file the participant had")
            for blob in _streams(p):
                if any(n in blob for n in needles):
                    found.append(f"{p}: bytes")
                    break
    return found


def _digests_of(root: Path, pseudonym: str) -> set[str]:
    """sha256 of every file the participant has: delivered (landing) and derived."""
    layout = DataLayout(root)
    out = set()
    for base in (layout.landing, layout.derived):
        for p in base.rglob("*"):
            if p.is_file() and pseudonym in str(p):
                out.add(hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _landing_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in (root / "landing").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def world(nnunet_model, tmp_path_factory):
    from cbp_platform.definitions import build_definitions
    from cbp_platform.synth.delivery import synthesize
    from orchestration.profiles import warehouse
    from orchestration.releases import cut_release
    from orchestration.runner import compare_with, pipeline_environment, run_pending
    from resources import DuckDBWarehouse
    from tests.support.synthetic import write_warehouse

    folder, _ = nnunet_model
    base = tmp_path_factory.mktemp("erasure")
    root = base / "data"
    with pipeline_environment(root):
        synthesize(participants=3, deliveries=1, seed=57, data_root=root, workers=2)
        synthesize(participants=3, deliveries=1, seed=58, data_root=root, workers=2, scan_format="dicom")
        two = base / "models-in" / "ensemble" / folder.name
        shutil.copytree(folder, two)
        register_phantom_model(root / "models" / "registry", folder)
        register_phantom_model(root / "models" / "registry", two, name="phantom-ensemble")
        inst = dg.DagsterInstance.get()
        run_pending(inst, log=lambda *_: None, refresh=False, model_config={"model": "phantom-nnunet", "n_val": 2})
        compared = compare_with(inst, "phantom-ensemble", log=lambda *_: None, refresh=False)
        assert compared["failed"] == [], compared
        wh = warehouse()
        # 1,000 simulated participants' rows beside them, for the report's models (written in another file first:
        # write_warehouse writes whole tables)
        other = DuckDBWarehouse(database=str(base / "simulated.duckdb"))
        write_warehouse(root, 1000, seed=11, warehouse=other)
        for t in other.tables():
            df = other.table(t, versions="all")
            wh.replace_rows(t, df, {"batch_key": sorted(set(df["batch_key"].drop_nulls().to_list()))})
        qc = wh.table("segmentation_qc", columns=["pseudonym", "delivery_id"], order_by=["pseudonym"])
        cmp = set(wh.table("comparison_segmentations", columns=["pseudonym"])["pseudonym"].to_list())
        nifti = [p for p, d in qc.iter_rows() if d == NIFTI and p in cmp]
        dicom = [p for p, d in qc.iter_rows() if d == DICOM and p in cmp]
        assert len(nifti) >= 2 and dicom, (qc, cmp)
        a, c, b = nifti[0], nifti[1], dicom[0]
        assert _cli("qc", "reject", a, "--reason", "other", "--reviewer", "rev1", "--note", "test")[0] == 0
        assert _cli("qc", "accept", b, "--reviewer", "rev1")[0] == 0
        cut_release(inst, log=lambda *_: None)
        res = build_definitions().resolve_job_def("cohort_refresh").execute_in_process(instance=inst,
                                                                                      raise_on_error=False)
        assert res.success
        backup = base / "backup"
        shutil.copytree(root, backup, symlinks=True)            # a backup taken before the erasure
        yield {"root": root, "base": base, "backup": backup, "a": a, "b": b, "c": c, "inst": inst,
               "digests": {p: _digests_of(root, p) for p in (a, b, c)}, "landing": _landing_files(root)}


def test_every_table_of_a_whole_pipeline_is_in_the_data_map(world):
    from cbp_platform.warehouse import TABLES
    from orchestration.profiles import warehouse

    with _env(world["root"]):
        tables = set(warehouse().tables())
    assert {"qc_reviews", "comparison_segmentations", "release_salts", "release_leaves", "analysis_cohort"} <= tables
    assert tables <= set(TABLES), sorted(tables - set(TABLES))


@contextlib.contextmanager
def _env(root: Path):
    from orchestration.runner import pipeline_environment

    with pipeline_environment(root):
        yield


def test_withdrawn_participants_are_erased_everywhere_with_proof(world):
    from orchestration.profiles import warehouse

    root, a, b, c = world["root"], world["a"], world["b"], world["c"]
    layout = DataLayout(root)
    skip = (layout.truth,)
    # before: the participants are there to be found (so that the scan below can fail)
    before = traces([root], [a, b], world["digests"][a] | world["digests"][b], skip)
    assert any("/landing/" in t for t in before) and any("/derived/" in t for t in before)
    assert any("/registry/" in t for t in before)
    with _env(root):
        wh = warehouse()
        assert wh.table("qc_reviews", where={"pseudonym": a}).height == 1
        assert wh.table("release_participants", where={"pseudonym": b}).height == 1
        assert wh.table("comparison_segmentations", where={"pseudonym": b}).height == 1
    request = world["base"] / "request.csv"
    request.write_text("request_id,pseudonym,scope,effective_date\n"
                       f"TTP-101,{a},all,2026-12-01\nTTP-102,{b},all,2026-12-01\nTTP-103,{c},imaging,2026-12-02\n"
                       "TTP-104,ZZ9ZZ9ZZ9Z,all,2026-12-02\n")
    with _env(root):
        assert _cli("withdraw", "--request", str(request))[0] == 0
        rc, out, err = _cli("erase")
    assert rc == 0, (out, err)
    assert out.count("erased and verified") == 3 and "holds no data of this participant" in out
    assert a not in out + err and b not in out + err
    certs = sorted((layout.withdrawals / "certificates").glob("*.json"))
    assert len(certs) == 4
    # the independent scan: nothing of a or b anywhere in the data root, nor in the register's folder
    assert traces([root, layout.withdrawals], [a, b], world["digests"][a] | world["digests"][b], skip) == []
    # c withdrew from imaging only: no image file, no image row, the covariates kept
    assert traces([root], [], world["digests"][c], skip) == []
    with _env(root):
        wh = warehouse()
        assert wh.table("participant_covariates", where={"pseudonym": c}).height == 1
        assert wh.table("raw_mri_scans", where={"pseudonym": c}, versions="all").height == 0
        assert wh.table("segmentation_qc", where={"pseudonym": c}, versions="all").height == 0
        assert not (set(wh.pseudonyms()) & {a, b})
    assert c.encode() in (layout.landing / NIFTI / "covariates.csv").read_bytes()
    # every other participant's delivered files are byte-identical
    now = _landing_files(root)
    for path, digest in world["landing"].items():
        if any(p in path for p in (a, b, c)) or path.endswith(("manifest.json", "covariates.csv")):
            continue
        assert now.get(path) == digest, path
    # the deliveries are redacted, not changed
    with _env(root):
        rc, out, _ = _cli("status")
    states = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("sim5")}
    assert states == {NIFTI: "redacted", DICOM: "redacted"}, out
    cert = json.loads(certs[0].read_text())
    assert cert["verified"] and cert["releases"] == [1] and cert["published_results"][0]["release"] == 1
    assert cert["stores"]["warehouse"]["removed"]["rows"]["qc_reviews"] == 1
    assert "VACUUM" not in json.dumps(cert["stores"]["warehouse"]["compaction"])      # DuckDB: the rewrite
    assert cert["backups_hold_data_until"] > cert["erased_at"][:10]
    assert a not in certs[0].read_text() and b not in certs[1].read_text()


def test_certificates_verify_and_a_tampered_one_does_not(world):
    layout = DataLayout(world["root"])
    certs = sorted((layout.withdrawals / "certificates").glob("*.json"))
    with _env(world["root"]):
        for cert in certs:
            rc, out, err = _cli("erase", "--verify", str(cert))
            assert rc == 0 and "holds" in out, (out, err)
        original = certs[1].read_bytes()
        certs[1].write_bytes(original.replace(b'"verified": true', b'"verified": false'))
        rc, out, err = _cli("erase", "--verify", str(certs[1]))
        assert rc == 1 and "signature does not match" in err
        certs[1].write_bytes(original)
        assert _cli("erase", "--verify", str(certs[1]))[0] == 0


def test_the_old_release_still_verifies_and_reproduces_without_the_erased(world):
    from assets.releases import release_commitment
    from orchestration.profiles import warehouse

    with _env(world["root"]):
        commitment = release_commitment(warehouse(), 1)
        rc, out, err = _cli("reproduce", "--release", "1")
    assert commitment["root_ok"] and commitment["erased"] == 3 and commitment["mismatched"] == 0
    n = commitment["participants"]
    assert rc == 0 and out.strip().splitlines()[-1] == f"{n} \u2212 3 reproduced, 3 erased since", (out, err)
    latest = json.loads((world["root"] / "published" / "latest.json").read_text())["path"]
    manifest = json.loads((DataLayout(world["root"]).resolve(latest) / "lineage.json").read_text())
    assert manifest["release"]["merkle_root"] == commitment["root"]


def test_erasing_again_changes_nothing(world):
    root = world["root"]
    before = {str(p): p.read_bytes() for p in (root / "landing").rglob("*") if p.is_file()}
    register = (DataLayout(root).withdrawals / "register.jsonl").read_bytes()
    with _env(root):
        rc, out, _ = _cli("erase")
    assert rc == 0 and "no pending withdrawal" in out
    assert {str(p): p.read_bytes() for p in (root / "landing").rglob("*") if p.is_file()} == before
    assert (DataLayout(root).withdrawals / "register.jsonl").read_bytes() == register


def test_a_restored_backup_is_erased_again_before_anything_runs(world):
    root, a, b = world["root"], world["a"], world["b"]
    layout = DataLayout(root)
    shutil.rmtree(root)
    shutil.copytree(world["backup"], root, symlinks=True)          # the restore (the register is outside it)
    assert traces([layout.landing], [a], set())
    n = len(list((layout.withdrawals / "certificates").glob("*.json")))
    with _env(root):
        rc, out, err = _cli("status")
    assert rc == 0 and "erasing them again before anything runs" in err
    assert traces([root], [a, b], world["digests"][a] | world["digests"][b], (layout.truth,)) == []
    new = sorted((layout.withdrawals / "certificates").glob("*.json"))[n:]
    assert len(new) == 3 and all(json.loads(p.read_text())["reapplied_after_restore"] for p in new)


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def test_a_data_root_copied_elsewhere_works_there_and_touches_nothing_at_the_old_place(world):
    """Nothing the platform stores holds the data root's absolute path (warehouse rows, pointers, manifests,
    reports; the Dagster instance's own storage aside): a copy elsewhere, with its register, erases there."""
    from orchestration.profiles import warehouse

    old, c = world["root"], world["c"]
    new = world["base"] / "moved" / "data"
    shutil.copytree(old, new, symlinks=True)
    shutil.copytree(DataLayout(old).withdrawals, DataLayout(new).withdrawals)
    before = _tree(old)
    needle = str(old).encode()
    held = [str(p.relative_to(new)) for p in new.rglob("*")
            if p.is_file() and not p.is_relative_to(new / "dagster_home") and needle in p.read_bytes()]
    assert held == []
    request = world["base"] / "moved-request.csv"
    request.write_text(f"request_id,pseudonym,scope,effective_date\nTTP-105,{c},all,2026-12-03\n")
    with _env(new):
        assert warehouse().text_occurrences(str(old)) == {}
        assert _cli("withdraw", "--request", str(request))[0] == 0
        # this time through Dagster: the job the UI launches
        from cbp_platform.definitions import build_definitions
        res = build_definitions().resolve_job_def("erase_withdrawn").execute_in_process(
            instance=dg.DagsterInstance.get(), raise_on_error=False)
        assert res.success
        rc, out, err = _cli("qc", "list", "--status", "all", "--limit", "0", "--json")
    assert rc == 0 and json.loads(out)                                    # the QC queue reads the new place
    assert traces([new], [c], world["digests"][c], (DataLayout(new).truth,)) == []     # the event log included
    assert _tree(old) == before                                           # the old place untouched
    cert = json.loads(sorted((DataLayout(new).withdrawals / "certificates").glob("*.json"))[-1].read_text())
    assert cert["request_ids"] == ["TTP-105"] and cert["verified"] and cert["scope"] == "all"


def _checkpoint(server) -> None:
    import psycopg2

    con = psycopg2.connect(host="127.0.0.1", port=server.port, user=server.user, password=server.password,
                           dbname=server.db)
    try:
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute("CHECKPOINT")
    finally:
        con.close()


@pytest.fixture
def own_postgres_server():
    """A server of this test's own (the session's holds every other test's schemas: its files would only make the
    byte scans longer)."""
    from tests.support.system import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


def test_postgres_erasure_leaves_no_trace_in_the_server_files(world, own_postgres_server, tmp_path, monkeypatch):
    postgres_server = own_postgres_server
    from cbp_platform.erasure import erase_pending
    from cbp_platform.withdrawals import Register, read_request
    from resources import DuckDBWarehouse

    a, b = world["a"], world["b"]
    root = tmp_path / "data"
    shutil.copytree(world["backup"], root, symlinks=True)
    monkeypatch.setenv("CBP_WITHDRAWALS_DIR", str(tmp_path / "withdrawals"))
    src = DuckDBWarehouse(database=str(DataLayout(root).warehouse_file))
    # every table, with the rows of a, b and 30 other participants (the whole cohort would only cost time)
    keep = [a, b] + sorted(src.pseudonyms() - {a, b})[:30]
    src_tables = {t: (df.filter(pl.col("pseudonym").is_in(keep)) if "pseudonym" in df.columns else df)
                  for t in src.tables() for df in [src.table(t, versions="all")]}
    pg = postgres_server.warehouse()
    pg.replace_many([(t, df, {}) for t, df in src_tables.items()])           # one transaction
    shutil.rmtree(DataLayout(root).warehouse_file.parent)          # this root's warehouse is PostgreSQL now
    pgdata = postgres_server.data
    pg_skip = (pgdata / "pg_wal",)
    _checkpoint(postgres_server)                            # the rows reach the table files
    assert traces([pgdata], [a], set(), pg_skip)            # the rows are in the server's files before
    request = tmp_path / "request.csv"
    request.write_text(f"request_id,pseudonym,scope,effective_date\nP-1,{a},all,2026-12-01\nP-2,{b},all,2026-12-01\n")
    Register(DataLayout(root).withdrawals).add(read_request(request))
    out = erase_pending(DataLayout(root), pg, extra_db_dirs=[pgdata], log=lambda *_: None)
    assert [o.verified for o in out] == [True, True], [o.summary for o in out]
    cert = json.loads(out[0].certificate.read_text())
    assert "VACUUM (FULL, ANALYZE)" in cert["stores"]["warehouse"]["compaction"]["method"]
    assert cert["scan"]["warehouse"]["files"] > 100                   # the server's files were read
    assert traces([pgdata], [a, b], set(), pg_skip) == []
    assert pg.text_occurrences(a) == {} and pg.count_rows("release_salts") > 0
    # the warehouse alone restored from before the erasure (the data root is not): it lacks the erasures' marks, so
    # the start-up check reads every table, finds a and b, and erases them again before anything runs
    from cbp_platform.processes import environment
    from orchestration.erasure import reapply_on_start

    restored = postgres_server.warehouse()
    restored.replace_many([(t, df, {}) for t, df in src_tables.items()])
    assert restored.text_occurrences(a)
    with environment({**postgres_server.warehouse_env(restored.schema_name), "CBP_DATA_ROOT": str(root)}):
        again = reapply_on_start(str(root), log=lambda *_: None)
    assert [o.verified for o in again] == [True, True] and all(o.reapplied for o in again)
    assert restored.text_occurrences(a) == {} and restored.text_occurrences(b) == {}
