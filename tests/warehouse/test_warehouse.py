"""The warehouse suite: every test runs against both backends, the embedded DuckDB file and PostgreSQL on a real
server (Debian's postgresql on loopback, one schema per test). Same operations, same answers."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date, datetime, timezone

import polars as pl
import pytest

from resources import DuplicateRows, MissingTable
from tests.support.writers import batch_frames, config, write_batch

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def wh(request, tmp_path):
    from resources import DuckDBWarehouse

    if request.param == "duckdb":
        return DuckDBWarehouse(database=str(tmp_path / "warehouse" / "cbp.duckdb"))
    return request.getfixturevalue("postgres_server").warehouse()


def _rows(wh, table: str, **kw) -> int:
    """Rows in ``table``; 0 when the table does not exist (a first write that was rolled back)."""
    df = wh.table(table, missing_ok=True, **kw)
    return 0 if df is None else df.height


TYPED = pl.DataFrame({
    "pseudonym": ["A0000001", "A0000002", "A0000003"],
    "batch_key": ["b1", "b1", "b2"],
    "delivery_id": ["d1", "d1", "d1"],
    "site": pl.Series(["Berlin", "Essen", None], dtype=pl.Enum(["Berlin", "Essen"])),
    "voxels": pl.Series([1, 2, 3], dtype=pl.UInt32),
    "nrs": pl.Series([0, 10, None], dtype=pl.Int8),
    "lean_ml": [201.25, float("nan"), None],
    "swap": [True, False, None],
    "exam_date": [date(2014, 5, 1), date(2019, 1, 31), None],
    "recorded_at": [datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)] * 3,
    "note": ["", "ünïcødé; 'quoted' \"x\"", None],
})


def test_round_trip_keeps_values_and_types(wh):
    wh.replace_rows("raw_mri_scans", TYPED, {"batch_key": ["b1", "b2"]})
    got = wh.table("raw_mri_scans", order_by=["pseudonym"])
    want = TYPED.with_columns(pl.col("site").cast(pl.String), pl.col("voxels").cast(pl.Int64),
                              pl.col("nrs").cast(pl.Int16))
    assert got.schema == want.schema
    assert got.equals(want, null_equal=True)
    assert wh.table("raw_mri_scans", columns=["pseudonym"], where={"site": None})["pseudonym"].to_list() == ["A0000003"]
    assert wh.table("raw_mri_scans", where={"batch_key": []}).height == 0
    assert wh.count_rows("raw_mri_scans", {"batch_key": "b1"}) == 2


def test_replacing_a_partition_keeps_the_others_and_never_duplicates(wh):
    b1, b2 = batch_frames(1, 40), batch_frames(2, 40)
    write_batch(wh, b1)
    write_batch(wh, b2)
    again = batch_frames(1, 40, version=2)
    write_batch(wh, again)            # a re-materialisation of batch 1
    got = wh.table("muscle_metrics", order_by=["pseudonym", "muscle"])
    want = pl.concat([again["rows"], b2["rows"]]).sort("pseudonym", "muscle")
    assert got.select(want.columns).equals(want)
    assert wh.duplicate_keys("muscle_metrics", ("pseudonym", "muscle")) == 0
    assert _rows(wh, "provenance") == again["provenance"].height + b2["provenance"].height
    assert _rows(wh, "quarantine", where={"batch_key": again["key"]}) == again["quarantine"].height


def test_a_failed_guard_keeps_nothing_of_the_stage(wh):
    """Rows, quarantine and provenance are one transaction: the guard (the run is no longer live) raises after
    every table's rows were sent, and none of them lands, on a first write and on a re-run."""
    def stop():
        raise RuntimeError("run is FAILURE")

    f = batch_frames(3, 30)
    with pytest.raises(RuntimeError, match="FAILURE"):
        write_batch(wh, f, guard=stop)
    assert wh.tables() == []                   # not even the tables the first write would have created
    write_batch(wh, f)
    with pytest.raises(RuntimeError, match="FAILURE"):
        write_batch(wh, batch_frames(3, 30, version=2), guard=stop)
    assert wh.table("muscle_metrics")["version"].unique().to_list() == [1]
    assert _rows(wh, "provenance") == f["provenance"].height


def test_a_process_killed_inside_the_write_leaves_nothing(wh):
    """A real crash between the stage's writes (os._exit inside the transaction): no rows, no quarantine, no
    provenance; the next writer is not blocked by it."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from tests.support.writers import "
                           "crash_before_commit as c; c(sys.argv[1])", json.dumps(config(wh))],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert wh.tables() == []
    write_batch(wh, batch_frames(0, 50))
    assert _rows(wh, "muscle_metrics") == batch_frames(0, 50)["rows"].height


def test_a_second_row_for_a_participant_fails_the_whole_write(wh):
    from cbp_platform.warehouse import provenance_frame

    first = TYPED.filter(pl.col("batch_key") == "b1")
    wh.replace_rows("raw_mri_scans", first, {"batch_key": "b1"})
    other = first.head(1).with_columns(pl.lit("b9").alias("batch_key"))     # same pseudonym, another batch
    pv = provenance_frame([{"pseudonym": "A0000001", "inputs": {}}], delivery_id="d", batch_key="b9",
                          stage="raw_mri_scans", code_version="x", run_id="r")
    with pytest.raises(DuplicateRows, match="nothing of this write was kept") as err:
        wh.replace_many([("provenance", pv, {"batch_key": "b9"}), ("raw_mri_scans", other, {"batch_key": "b9"})])
    assert "A0000001" not in str(err.value)     # the message names the table, never the participant
    assert _rows(wh, "provenance") == 0
    assert sorted(wh.table("raw_mri_scans")["batch_key"].to_list()) == ["b1", "b1"]


def test_a_missing_table_is_explicit_and_a_misspelt_column_is_an_error(wh):
    with pytest.raises(MissingTable, match="'muscle_metrcs' does not exist"):
        wh.table("muscle_metrcs")
    assert wh.table("muscle_metrcs", missing_ok=True) is None
    assert not wh.has_table("muscle_metrcs") and wh.tables() == []
    wh.replace_rows("raw_mri_scans", TYPED, {})
    with pytest.raises(Exception) as err:          # the backend's own error, never an empty frame
        wh.table("raw_mri_scans", columns=["pseudonymm"])
    assert not isinstance(err.value, MissingTable) and "pseudonymm" in str(err.value)
    assert wh.tables() == ["raw_mri_scans"]


def test_a_column_of_nulls_only_is_stored_as_text(wh):
    df = pl.DataFrame({"pseudonym": ["A1", "A2"], "batch_key": ["b1", "b1"], "note": [None, None]})
    assert df.schema["note"] == pl.Null
    wh.replace_rows("qc_notes", df, {"batch_key": "b1"})
    got = wh.table("qc_notes", order_by=["pseudonym"])
    assert got.schema["note"] == pl.String and got["note"].to_list() == [None, None]


def test_a_column_added_by_a_newer_code_version_reads_null_in_older_rows(wh):
    old = TYPED.select("pseudonym", "batch_key", "delivery_id", "lean_ml")
    wh.replace_rows("muscle_segmentations", old, {"batch_key": ["b1", "b2"]})
    new = pl.DataFrame({"pseudonym": ["B0000001"], "batch_key": ["b3"], "delivery_id": ["d2"], "lean_ml": [1.5],
                        "uncertainty": [0.25]})
    wh.replace_rows("muscle_segmentations", new, {"batch_key": "b3"})
    got = wh.table("muscle_segmentations", order_by=["pseudonym"])
    assert got.columns == ["pseudonym", "batch_key", "delivery_id", "lean_ml", "uncertainty"]
    assert got["uncertainty"].to_list() == [None, None, None, 0.25]


def test_append_only_tables_never_lose_a_row(wh):
    rows = pl.DataFrame({"review_id": ["r1"], "pseudonym": ["A0000001"], "decision": ["reject"]})
    for i in range(3):
        wh.append_rows("qc_reviews", rows.with_columns(pl.lit(f"r{i}").alias("review_id")))
    assert wh.table("qc_reviews", order_by=["review_id"])["review_id"].to_list() == ["r0", "r1", "r2"]


def test_the_platform_reads_that_join_tables(wh):
    scans = pl.DataFrame({"pseudonym": ["A1", "A2", "A3"], "batch_key": ["b1", "b1", "b2"], "delivery_id": "d1",
                          "water_path": ["w1", "w2", "w3"], "fat_path": ["f1", "f2", "f3"], "water_sha256": "ws",
                          "fat_sha256": "fs", "source_format": "nifti", "swap_suspected": [False, True, False]})
    segs = pl.DataFrame({"pseudonym": ["A2", "A1", "A3"], "batch_key": ["b1", "b1", "b2"], "delivery_id": "d1",
                         "label_path": ["l2", "l1", "l3"], "label_sha256": ["s2", "s1", "s3"]})
    cov = scans.select("pseudonym", "batch_key", "delivery_id").head(2)
    from cbp_platform.warehouse import quarantine_frame

    q = quarantine_frame([{"pseudonym": "A3", "reason": "invalid_header", "message": "m"},
                          {"pseudonym": "A9", "reason": "invalid_header", "message": "m"}],
                         delivery_id="d1", batch_key="b2", stage="raw_mri_scans", run_id="r")
    for t, df in (("raw_mri_scans", scans), ("muscle_segmentations", segs), ("participant_covariates", cov),
                  ("quarantine", q)):
        wh.replace_rows(t, df, {})
    got = wh.segmented_scans("b1")
    assert got["pseudonym"].to_list() == ["A1", "A2"] and got["label_path"].to_list() == ["l1", "l2"]
    assert got.columns == ["pseudonym", "label_path", "label_sha256", "water_path", "fat_path", "water_sha256",
                           "fat_sha256", "source_format"]
    c = wh.ingestion_counts()
    assert c["scans"].sort("delivery_id").rows() == [("d1", 3, 1)]
    assert c["covariates"].rows() == [("d1", 2)] and c["both"].rows() == [("d1", 2)]
    assert c["quarantined"].rows() == [("d1", 2)]
    assert c["reasons"].rows() == [("d1", "invalid_header", 2)]
    assert c["stage_reasons"].rows() == [("raw_mri_scans", "invalid_header", 2)]
    assert wh.ingestion_counts(stages=("participant_covariates",))["quarantined"].height == 0


@pytest.mark.postgres
def test_the_cli_reads_the_production_warehouse_by_configuration(postgres_server, monkeypatch, tmp_path, capsys):
    """``cbp`` commands follow CBP_WAREHOUSE too: clear errors for an empty schema, a half-written one and a
    wrong password (which never appears in the message)."""
    from cbp_platform.cli import main

    schema = "cli_check"
    for k, v in {**postgres_server.warehouse_env(schema), "CBP_DATA_ROOT": str(tmp_path)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert main(["qc", "list"]) == 2
    assert f"schema {schema} holds no tables yet" in capsys.readouterr().err
    write_batch(postgres_server.warehouse(schema), batch_frames(1, 20))          # metrics without segmentations
    assert main(["accuracy"]) == 2
    assert "no segmentations in the warehouse yet" in capsys.readouterr().err
    monkeypatch.setenv("CBP_PG_PASSWORD", "not-the-password")
    assert main(["qc", "list"]) == 2
    err = capsys.readouterr().err
    assert "cannot open the warehouse" in err and "not-the-password" not in err


def test_the_interface_is_abstract():
    from resources import Warehouse

    with pytest.raises(TypeError, match="abstract"):
        Warehouse()


def test_a_quarantine_row_with_a_reason_not_registered_for_its_stage_is_never_written():
    from cbp_platform.reasons import UnknownReason
    from cbp_platform.warehouse import quarantine_frame

    for reason, stage in (("bad_header", "raw_mri_scans"), ("no_covariate_row", "raw_mri_scans")):
        with pytest.raises(UnknownReason, match=f"{reason}.*not registered for stage"):
            quarantine_frame([{"pseudonym": "A1", "reason": reason, "message": "m"}], delivery_id="d1",
                             batch_key="b1", stage=stage, run_id="r")
    ok = quarantine_frame([{"pseudonym": "A1", "reason": "metrics_failed", "message": "m"}], delivery_id="d1",
                          batch_key="b1", stage="comparison_metrics:some-model", run_id="r")
    assert ok["reason"].to_list() == ["metrics_failed"]


def test_a_key_committed_first_by_another_connection_fails_the_write_without_naming_the_key(tmp_path):
    """DuckDB: two connections of one process write the same key; the second commit fails with a message that names
    the key's value (a pseudonym). The warehouse raises DuplicateRows without it, and keeps nothing of the write."""
    import traceback

    from resources import DuckDBWarehouse

    wh = DuckDBWarehouse(database=str(tmp_path / "cbp.duckdb"))
    row = pl.DataFrame({"pseudonym": ["ABCDEFGHJK"], "batch_key": ["b1"], "delivery_id": ["d1"]})
    wh.replace_rows("raw_mri_scans", row.head(0), {"batch_key": "b0"})          # the table and its unique index

    def another_writer_first():
        wh.replace_rows("raw_mri_scans", row.with_columns(pl.lit("b2").alias("batch_key")), {"batch_key": "b2"})

    with pytest.raises(DuplicateRows) as exc:
        wh.replace_rows("raw_mri_scans", row, {"batch_key": "b1"}, guard=another_writer_first)
    shown = "".join(traceback.format_exception(exc.value))          # what a log or Dagster's event shows
    assert "ABCDEFGHJK" not in shown and "DuplicateRows" in shown
    assert wh.table("raw_mri_scans")["batch_key"].to_list() == ["b2"]


# --- versioned rows (issue 27: the living cohort) ------------------------------------------------------------------

def _version(p: str, delivery: str, supersedes: str = "", superseded_by: str = "", weight: float = 70.0):
    return pl.DataFrame({"pseudonym": [p], "batch_key": [f"{delivery}.b001"], "delivery_id": [delivery],
                         "weight_kg": [weight], "supersedes": [supersedes], "superseded_by": [superseded_by]})


def test_exactly_one_version_in_force_per_participant_is_enforced_by_the_warehouse(wh):
    t = "participant_covariates"
    put = lambda df: wh.replace_rows(t, df, {"batch_key": df["batch_key"][0]})       # noqa: E731
    put(_version("P1", "d1"))
    with pytest.raises(DuplicateRows):                      # a second version in force: refused, nothing kept
        put(_version("P1", "d2", weight=71.0))
    put(_version("P1", "c1", supersedes="d1", weight=71.0))  # a correction: d1's version closed in the same write
    put(_version("P1", "d0", superseded_by="c1", weight=69.0))   # two versions replaced by one correction: allowed
    with pytest.raises(DuplicateRows):                      # one version per participant and delivery
        put(_version("P1", "c1", supersedes="d1").with_columns(pl.lit("c1.b002").alias("batch_key")))
    assert wh.table(t)["delivery_id"].to_list() == ["c1"]                 # a read gives the version in force
    assert wh.count_rows(t) == 1 and wh.duplicate_keys(t, ("pseudonym",)) == 0
    rows = wh.table(t, versions="all").sort("delivery_id")
    assert rows.select("delivery_id", "supersedes", "superseded_by", "weight_kg").rows() == [
        ("c1", "d1", "", 71.0), ("d0", "", "c1", 69.0), ("d1", "", "c1", 70.0)]


def test_a_writer_that_knows_nothing_of_versions_writes_a_version_in_force(wh):
    cs = wh.replace_rows("muscle_metrics", pl.DataFrame({"pseudonym": ["P1", "P1"], "muscle": ["a", "b"],
                                                          "batch_key": "b1", "delivery_id": "d1", "lean_ml": 1.0}),
                         {"batch_key": "b1"})
    got = wh.table("muscle_metrics", versions="all")
    assert got["supersedes"].to_list() == ["", ""] and got["superseded_by"].to_list() == ["", ""]
    assert got["registration_seq"].null_count() == 2                  # not ordered
    from cbp_platform.warehouse import VERSION_COLUMNS, table_checksum
    assert cs == table_checksum(got.drop(*VERSION_COLUMNS).sort("muscle"))   # the data's checksum


def test_a_warehouse_from_before_versions_gains_them_and_keeps_one_row_per_participant(wh, tmp_path):
    """Tables written before versioning (one unique index on the key, no version columns) are migrated on the
    next write: the columns are added (old rows count as in force) and the old index gives way to the two new."""
    old = pl.DataFrame({"pseudonym": ["P1", "P2"], "batch_key": "b1", "delivery_id": "d1", "weight_kg": 70.0})
    if hasattr(wh, "path"):
        import duckdb

        wh.path.parent.mkdir(parents=True, exist_ok=True)
        with duckdb.connect(str(wh.path)) as conn:
            conn.register("old", old.to_arrow())
            conn.execute("CREATE TABLE participant_covariates AS SELECT * FROM old")
            conn.execute('CREATE UNIQUE INDEX "participant_covariates_unique" ON participant_covariates (pseudonym)')
            names = lambda: {r[0] for r in conn.execute("SELECT index_name FROM duckdb_indexes()").fetchall()}  # noqa
            assert names() == {"participant_covariates_unique"}
    else:
        wh.replace_rows("participant_covariates", old, {})        # then take it back to the old shape
        with wh.connection() as conn, conn.cursor() as cur:
            cur.execute("DROP INDEX participant_covariates_version")
            cur.execute("DROP INDEX participant_covariates_in_force")
            cur.execute("ALTER TABLE participant_covariates DROP COLUMN supersedes")
            cur.execute("ALTER TABLE participant_covariates DROP COLUMN superseded_by")
            cur.execute('CREATE UNIQUE INDEX "participant_covariates_unique" ON participant_covariates (pseudonym)')
            conn.commit()
    wh.replace_rows("participant_covariates", old.head(0).with_columns(pl.lit("x").alias("batch_key")),
                    {"batch_key": "x"})
    got = wh.table("participant_covariates", versions="all")
    assert {"supersedes", "superseded_by"} <= set(got.columns) and got["superseded_by"].null_count() == 2
    with pytest.raises(DuplicateRows):                          # an old row is in force
        wh.replace_rows("participant_covariates", _version("P1", "d2"), {"batch_key": "d2.b001"})
    wh.replace_rows("participant_covariates", _version("P1", "d2", superseded_by="d3"), {"batch_key": "d2.b001"})
    assert wh.table("participant_covariates", versions="all").height == 3
    assert wh.table("participant_covariates").columns == old.columns and wh.count_rows("participant_covariates") == 2


def test_a_correction_closes_the_version_it_replaces_in_the_same_write(wh):
    t = "muscle_metrics"
    rows = lambda d, ps, sup="", lean=1.0: pl.DataFrame(                                   # noqa: E731
        {"pseudonym": [p for p in ps for _ in (0, 1)], "muscle": ["a", "b"] * len(ps), "batch_key": f"{d}.b001",
         "delivery_id": d, "lean_ml": lean, "supersedes": sup})
    wh.replace_rows(t, rows("d1", ["P1", "P2"]), {"batch_key": "d1.b001"})
    wh.replace_rows(t, rows("c1", ["P1"], "d1", 2.0), {"batch_key": "c1.b001"})
    now = wh.table(t).sort("pseudonym", "muscle")
    assert now.select("pseudonym", "delivery_id", "lean_ml").rows() == [
        ("P1", "c1", 2.0), ("P1", "c1", 2.0), ("P2", "d1", 1.0), ("P2", "d1", 1.0)]
    closed = wh.table(t, versions="all").filter(pl.col("superseded_by") != "")
    assert closed.select("pseudonym", "delivery_id", "superseded_by").unique().rows() == [("P1", "d1", "c1")]
    assert closed.height == 2                                       # every muscle of the replaced version
    wh.replace_rows(t, rows("c1", ["P1"], "d1", 2.0), {"batch_key": "c1.b001"})     # a re-run: the same state
    assert wh.table(t, versions="all").height == 6 and wh.count_rows(t) == 4
    with pytest.raises(DuplicateRows):            # a stale correction (its version is closed already): refused
        wh.replace_rows(t, rows("c2", ["P1"], "d1", 3.0), {"batch_key": "c2.b001"})
    assert wh.table(t, versions="all").height == 6                  # and nothing of it was kept


def _ordered(p: str, delivery: str, seq: int, supersedes: str = "", weight: float = 70.0):
    """A version as the assets write it (assets/writes.py): ordered by its delivery's registration number."""
    from cbp_platform.warehouse import versioned

    rows = pl.DataFrame({"pseudonym": [p], "batch_key": [f"{delivery}.b001"], "delivery_id": [delivery],
                         "weight_kg": [weight]})
    return versioned("participant_covariates", rows, seq, {p: supersedes} if supersedes else {})


def _state(wh) -> list[tuple]:
    got = wh.table("participant_covariates", versions="all").sort("registration_seq")
    return got.select("delivery_id", "supersedes", "superseded_by", "weight_kg").rows()


@pytest.mark.parametrize("order", ["d1 c1 c2", "d1 c2 c1", "c2 c1 d1", "c1 d1 c2", "c2 d1 c1"])
def test_the_later_registration_is_in_force_whatever_order_batches_run(wh, order):
    """d1 (registered 1st) brings P1; corrections c1 (2nd) and c2 (3rd) both name d1 as what they supersede.
    In whatever order their batches write, and after re-running any of them, c2 is in force, c1 replaced d1 and
    c2 replaced c1."""
    versions = {"d1": _ordered("P1", "d1", 1, weight=70.0), "c1": _ordered("P1", "c1", 2, "d1", 71.0),
                "c2": _ordered("P1", "c2", 3, "d1", 72.0)}
    put = lambda d: wh.replace_rows("participant_covariates", versions[d], {"batch_key": f"{d}.b001"})  # noqa: E731
    for d in order.split():
        put(d)
    assert wh.table("participant_covariates")["weight_kg"].to_list() == [72.0]
    got = {r[0]: r for r in _state(wh)}
    assert got["c2"][2] == "" and got["d1"][2] != "" and got["c1"][2] == "c2"
    for d in ("d1", "c1", "c2", "c1"):                                # re-runs change nothing in force
        put(d)
        assert wh.table("participant_covariates")["weight_kg"].to_list() == [72.0]
        assert wh.count_rows("participant_covariates") == 1 and wh.table("participant_covariates",
                                                                          versions="all").height == 3


def test_a_correction_of_data_from_before_registration_numbers_replaces_it(wh):
    wh.replace_rows("participant_covariates", _version("P1", "d1"), {"batch_key": "d1.b001"})     # not ordered
    wh.replace_rows("participant_covariates", _ordered("P1", "c1", 5, "d1", 71.0), {"batch_key": "c1.b001"})
    assert ("d1", "", "c1", 70.0) in _state(wh)
    assert wh.table("participant_covariates")["delivery_id"].to_list() == ["c1"]


@pytest.mark.postgres
def test_postgres_refuses_any_other_update_of_a_version(postgres_server):
    wh = postgres_server.warehouse()
    wh.replace_rows("participant_covariates", _version("P1", "d1"), {"batch_key": "d1.b001"})
    wh.replace_rows("participant_covariates", _version("P1", "c1", supersedes="d1"), {"batch_key": "c1.b001"})
    for sql in ("UPDATE participant_covariates SET weight_kg = 1 WHERE delivery_id = 'c1'",
                "UPDATE participant_covariates SET superseded_by = 'x' WHERE delivery_id = 'd1'",
                "UPDATE participant_covariates SET superseded_by = '' WHERE delivery_id = 'd1'"):
        with wh.connection() as conn, conn.cursor() as cur:
            with pytest.raises(Exception, match="written once"):
                cur.execute(sql)
            conn.rollback()
    got = wh.table("participant_covariates", versions="all").sort("delivery_id")
    assert got.select("delivery_id", "superseded_by", "weight_kg").rows() == [("c1", "", 70.0), ("d1", "c1", 70.0)]
