"""16 batch writers at once, each a separate process as a step pod would be, each writing its batch twice (a run
and a re-run), against the production warehouse on a real PostgreSQL server. Expected: no write fails (no lock
failure, no deadlock), no row lost, none duplicated, and every batch holds exactly its last version. (The embedded
DuckDB warehouse's writers queue on its file lock: tests/assets/test_ingestion.py runs parallel batch runs against
it, and ``make bench BENCH=warehouse`` runs these 16 writers against both.)"""

from __future__ import annotations

import polars as pl
import pytest

from tests.support.writers import batch_frames, run_writers

WRITERS = 16
PARTICIPANTS = 200          # per batch: 192 measured x 4 muscles = 768 stage rows, 8 quarantined, 192 provenance
VERSIONS = 2


@pytest.mark.postgres
def test_sixteen_concurrent_batch_writers_lose_and_duplicate_nothing(postgres_server):
    wh = postgres_server.warehouse()
    out = run_writers(wh, writers=WRITERS, n=PARTICIPANTS, versions=VERSIONS)
    errors = [(i, e) for i, fails, _, e, _ in out if fails]
    assert errors == [], errors                       # 0 lock failures, 0 deadlocks, 0 refused writes
    assert sum(r for *_, r in out) == 0               # and none needed a retry (no serialisation failure)

    want = [batch_frames(i, PARTICIPANTS, VERSIONS) for i in range(WRITERS)]
    got = wh.table("muscle_metrics", order_by=["pseudonym", "muscle"])
    expect = pl.concat([f["rows"] for f in want]).sort("pseudonym", "muscle")
    assert got.height == expect.height                # nothing lost ...
    assert wh.duplicate_keys("muscle_metrics", ("pseudonym", "muscle")) == 0     # ... nothing duplicated
    assert got.select(expect.columns).equals(expect)  # every batch holds its last version, value for value
    for table, frame in (("quarantine", "quarantine"), ("provenance", "provenance")):
        rows = wh.table(table, columns=["batch_key", "pseudonym", "run_id"], order_by=["batch_key", "pseudonym"])
        ref = pl.concat([f[frame].select("batch_key", "pseudonym", "run_id") for f in want]).sort(
            "batch_key", "pseudonym")
        assert rows.equals(ref), table


@pytest.mark.postgres
def test_concurrent_corrections_of_one_participant_leave_exactly_one_version_in_force(postgres_server):
    """Eight writers at once, each a correction replacing the same version (issue 27): exactly one wins, the others
    fail as DuplicateRows and keep nothing, and one version is in force."""
    import threading

    from resources import DuplicateRows

    wh = postgres_server.warehouse()

    def rows(d: str, sup: str = "") -> pl.DataFrame:
        return pl.DataFrame({"pseudonym": ["P1", "P1"], "muscle": ["a", "b"], "batch_key": f"{d}.b001",
                             "delivery_id": d, "lean_ml": float(len(d)), "supersedes": sup})

    wh.replace_rows("muscle_metrics", rows("d1"), {"batch_key": "d1.b001"})
    start, outcome = threading.Barrier(8), {}

    def correct(i: int) -> None:
        start.wait()
        try:
            wh.replace_rows("muscle_metrics", rows(f"c{i}", "d1"), {"batch_key": f"c{i}.b001"})
            outcome[i] = "written"
        except DuplicateRows:
            outcome[i] = "refused"

    threads = [threading.Thread(target=correct, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(outcome.values()) == ["refused"] * 7 + ["written"], outcome
    (winner,) = [f"c{i}" for i, o in outcome.items() if o == "written"]
    every = wh.table("muscle_metrics", versions="all")
    assert sorted(set(zip(every["delivery_id"], every["superseded_by"]))) == sorted([("d1", winner), (winner, "")])
    assert wh.table("muscle_metrics")["delivery_id"].unique().to_list() == [winner]


@pytest.mark.postgres
def test_ordered_corrections_written_at_once_leave_the_last_registered_in_force(postgres_server):
    """The original delivery and eight corrections of one participant, as the assets write them (ordered by their
    registration numbers, assets/writes.py), all at once, four times over: every write lands (a conflict between
    two versions committed side by side is retried, never refused), the last registered correction is in force,
    and every other version is closed."""
    import threading

    from cbp_platform.warehouse import versioned
    from resources import warehouse as wmod

    wh = postgres_server.warehouse()

    def rows(d: str, seq: int, sup: str = "") -> pl.DataFrame:
        df = pl.DataFrame({"pseudonym": ["P1", "P1"], "muscle": ["a", "b"], "batch_key": f"{d}.b001",
                           "delivery_id": d, "lean_ml": float(seq)})
        return versioned("muscle_metrics", df, seq, {"P1": sup} if sup else {})

    before = dict(wmod.RETRIES)
    for _ in range(4):
        writes = [("d1", rows("d1", 1))] + [(f"c{i}", rows(f"c{i}", i + 1, "d1")) for i in range(1, 9)]
        start, outcome = threading.Barrier(len(writes)), {}

        def write(d: str, df: pl.DataFrame) -> None:
            start.wait()
            try:
                wh.replace_rows("muscle_metrics", df, {"batch_key": f"{d}.b001"})
                outcome[d] = "written"
            except Exception as exc:  # noqa: BLE001
                outcome[d] = type(exc).__name__

        threads = [threading.Thread(target=write, args=w) for w in writes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert set(outcome.values()) == {"written"} and len(outcome) == 9, outcome
        assert wh.table("muscle_metrics")["delivery_id"].unique().to_list() == ["c8"]
        every = wh.table("muscle_metrics", versions="all")
        assert every.height == 18 and (every["superseded_by"] == "").sum() == 2
    print(f"retried unique violations: {wmod.RETRIES.get('23505', 0) - before.get('23505', 0)}")
