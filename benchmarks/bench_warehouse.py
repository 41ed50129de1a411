"""The two warehouse backends on the platform's workload (docs/warehouse.md).

* **Batch writes**: a stage's rows, quarantine rows and provenance rows of one batch of 250 participants (960
  metric rows, 10 quarantined, 240 provenance rows) in one transaction, the way every per-batch asset writes.
  16 batches one after another (one writer), then 16 writer processes at once (as 16 step pods would), released
  together by a barrier: write throughput, the slowest writer, failures.
* **Cohort refresh at paper scale**: 30,868 participants in 124 batches written into the warehouse, then the
  ``cohort_refresh`` job through Dagster (analysis cohort, both GLMMs, the tables, the report): its wall time,
  the cohort hash (the same on both), and the warehouse's size on disk.

PostgreSQL runs on loopback in a temp directory (Debian's postgresql, ``tests/support/system.py``), ``fsync=off``
like the test server: the figures compare the warehouses' own work on this machine, not a production disk.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run as a script: the repo root (tests/)

WRITERS = 16
PARTICIPANTS = 250


def _writes(wh) -> dict:
    from tests.support.writers import batch_frames, run_writers, write_batch

    frames = [batch_frames(i, PARTICIPANTS) for i in range(WRITERS)]
    rows = sum(f["rows"].height + f["quarantine"].height + f["provenance"].height for f in frames)
    t0 = time.perf_counter()
    lat = []
    for f in frames:
        t = time.perf_counter()
        write_batch(wh, f)
        lat.append(time.perf_counter() - t)
    serial = time.perf_counter() - t0
    out = run_writers(wh, writers=WRITERS, n=PARTICIPANTS, versions=1, first=100)
    wall = max(s for _, _, s, _, _ in out)
    fails = sum(f for _, f, _, _, _ in out)
    retries = sum(r for *_, r in out)
    return {"rows_per_batch": rows // WRITERS, "serial_s": round(serial, 2),
            "serial_batch_ms_median": round(1000 * statistics.median(lat), 1),
            "serial_rows_per_s": round(rows / serial), "concurrent_wall_s": round(wall, 2),
            "concurrent_rows_per_s": round(rows / wall), "concurrent_batches_per_s": round(WRITERS / wall, 2),
            "concurrent_failures": fails, "concurrent_retries": retries}


def _refresh(wh, root: Path, n: int, batches: int, env: dict[str, str]) -> dict:
    from benchmarks.bench_analysis import refresh_at_scale
    from cbp_platform.processes import environment

    with environment(env):
        prep, wall, res, steps = refresh_at_scale(root, n, 1, batches, warehouse=wh)
    meta = wh.table("analysis_cohort_meta").row(0, named=True) if res.success else {}
    return {"participants": n, "batches": batches, "write_tables_s": round(prep, 1), "refresh_wall_s": round(wall, 1),
            "success": res.success, "cohort_hash": meta.get("cohort_hash"), "n_analysed": meta.get("n_analysed"),
            "read_cohort_inputs_s": steps.get("analysis_cohort"), "steps_s": steps}


def run(n: int = 30868, batches: int = 124) -> dict:
    from cbp_platform.paths import DataLayout
    from resources import DuckDBWarehouse
    from tests.support.system import PostgresServer

    server = PostgresServer().start()
    out: dict = {}
    try:
        for backend in ("duckdb", "postgres"):
            tmp = Path(tempfile.mkdtemp(prefix=f"cbp-bench-wh-{backend}-"))
            if backend == "duckdb":
                writes_wh = DuckDBWarehouse(database=str(tmp / "writes.duckdb"))
                cohort_wh = DuckDBWarehouse(database=str(DataLayout(tmp / "root").warehouse_file))
                env = {"CBP_WAREHOUSE": "duckdb"}
            else:
                writes_wh, cohort_wh = server.warehouse("bench_writes"), server.warehouse("bench_cohort")
                env = server.warehouse_env("bench_cohort")
            print(f"warehouse {backend}: {WRITERS} batch writes of {PARTICIPANTS} participants, serial then "
                  f"{WRITERS} writers at once", flush=True)
            w = _writes(writes_wh)
            print(f"  serial: {w['serial_s']} s ({w['serial_batch_ms_median']} ms per batch, "
                  f"{w['serial_rows_per_s']:,} rows/s); concurrent: {w['concurrent_wall_s']} s "
                  f"({w['concurrent_rows_per_s']:,} rows/s, {w['concurrent_batches_per_s']} batches/s), "
                  f"{w['concurrent_failures']} failed", flush=True)
            print(f"warehouse {backend}: cohort refresh at {n:,} participants in {batches} batches", flush=True)
            r = _refresh(cohort_wh, tmp / "root", n, batches, env)
            if backend == "duckdb":
                r["warehouse_bytes"] = cohort_wh.path.stat().st_size
            else:
                r["warehouse_bytes"] = int(server.query(
                    "SELECT coalesce(sum(pg_total_relation_size(quote_ident(schemaname) || '.' || "
                    "quote_ident(tablename))), 0) FROM pg_tables WHERE schemaname = %s", ("bench_cohort",))[0][0])
            print(f"  writing the per-batch tables: {r['write_tables_s']} s; cohort_refresh: {r['refresh_wall_s']} s "
                  f"({'ok' if r['success'] else 'FAILED'}; analysis_cohort step {r['read_cohort_inputs_s']} s); "
                  f"warehouse {r['warehouse_bytes'] / 1e6:.1f} MB; cohort hash {str(r['cohort_hash'])[:16]}",
                  flush=True)
            out[backend] = {"writes": w, "refresh": r}
    finally:
        server.stop()
    d, p = out["duckdb"], out["postgres"]
    out["ratios_postgres_over_duckdb"] = {
        "concurrent_rows_per_s": round(p["writes"]["concurrent_rows_per_s"] / d["writes"]["concurrent_rows_per_s"], 2),
        "serial_rows_per_s": round(p["writes"]["serial_rows_per_s"] / d["writes"]["serial_rows_per_s"], 2),
        "refresh_wall_s": round(p["refresh"]["refresh_wall_s"] / d["refresh"]["refresh_wall_s"], 2)}
    out["same_cohort_hash"] = d["refresh"]["cohort_hash"] == p["refresh"]["cohort_hash"]
    print("\n| figure | DuckDB | PostgreSQL | PostgreSQL / DuckDB |\n|---|---|---|---|")
    for label, key, sub in (("batch writes, one writer (rows/s)", "serial_rows_per_s", "writes"),
                            (f"batch writes, {WRITERS} writers at once (rows/s)", "concurrent_rows_per_s", "writes"),
                            (f"slowest of {WRITERS} concurrent writers (s)", "concurrent_wall_s", "writes"),
                            (f"cohort refresh at {n:,} (s)", "refresh_wall_s", "refresh")):
        a, b = d[sub][key], p[sub][key]
        print(f"| {label} | {a:,} | {b:,} | {b / a:.2f} |")
    print(f"| failed writes | {d['writes']['concurrent_failures']} | {p['writes']['concurrent_failures']} | |")
    print(f"| retried transactions | {d['writes']['concurrent_retries']} | {p['writes']['concurrent_retries']} | |")
    print(f"| same cohort hash | {out['same_cohort_hash']} | | |")
    return out


if __name__ == "__main__":
    run()
