"""The cohort-level half of the graph at paper scale: 30,868 simulated participants through Dagster.

The per-batch warehouse tables (covariates, scan index, muscle metrics, quarantine) are built from the
simulator's truth with exact metrics, in 124 batches of ~250 as the sensor would cut them; then the
``cohort_refresh`` job runs every cohort-level asset (analysis cohort, both GLMMs with sensitivity fits, the
descriptive tables, the published report with its lineage manifest) through Dagster. Prints the wall time per
asset and the "paper vs this run" table of the report. The imaging half at paper scale is measured separately
(``bench_segmentation``: participants/s), so this figure plus N / rate gives a whole-graph estimate.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run as a script: the repo root (tests/)


def refresh_at_scale(root: Path, n: int, seed: int, batches: int, warehouse=None) -> tuple:
    """Write the per-batch tables of ``n`` simulated participants into ``warehouse`` (default: the data root's
    DuckDB file), cut data release 1, then run ``cohort_refresh`` through Dagster. Returns (write s, refresh s,
    result, step seconds); the cut's seconds are in the steps, as ``data_release (cut)``."""
    import dagster as dg

    from orchestration.releases import cut_release
    from orchestration.runner import pipeline_environment
    from cbp_platform.definitions import build_definitions
    from tests.support.synthetic import write_warehouse

    with pipeline_environment(root):
        t0 = time.perf_counter()
        write_warehouse(root, n, seed=seed, batches=batches, warehouse=warehouse)
        prep = time.perf_counter() - t0
        inst = dg.DagsterInstance.get()
        t1 = time.perf_counter()
        cut_release(inst, log=lambda *_: None)
        cut = time.perf_counter() - t1
        job = build_definitions().resolve_job_def("cohort_refresh")
        t1 = time.perf_counter()
        res = job.execute_in_process(instance=inst, raise_on_error=False)
        wall = time.perf_counter() - t1
        steps = {s.step_key: round(s.end_time - s.start_time, 2)
                 for s in inst.get_run_step_stats(res.run_id) if s.end_time and s.start_time}
        steps["data_release (cut)"] = round(cut, 2)
    return prep, wall, res, steps


def run(n: int = 30868, seed: int = 1, batches: int = 124) -> dict:
    from cbp_platform.paths import DataLayout

    root = Path(tempfile.mkdtemp(prefix="cbp-bench-analysis-"))
    prep, wall, res, steps = refresh_at_scale(root, n, seed, batches)
    latest = json.loads(DataLayout(root).latest_report.read_text()) if res.success else None
    out = {"participants": n, "batches": batches, "prepare_tables_s": round(prep, 1), "refresh_wall_s": round(wall, 1),
           "success": res.success, "steps_s": steps}
    print(f"cohort-level refresh at paper scale: {n} participants in {batches} batches")
    print(f"  building the per-batch tables from the simulator's truth: {prep:.1f} s (not part of the graph)")
    print(f"  cohort_refresh run through Dagster: {wall:.1f} s, {'ok' if res.success else 'FAILED'}")
    for k, v in sorted(steps.items(), key=lambda kv: -kv[1]):
        print(f"    {k:<32} {v:>7.2f} s")
    if latest:
        from cbp_platform.paths import DataLayout
        latest["path"] = str(DataLayout(root).resolve(latest["path"]))    # stored relative to the data root
        pvr = Path(latest["path"]) / "tables" / "paper_vs_run.csv"
        rows = list(csv.reader(pvr.open()))
        out["paper_vs_run"] = rows
        out["report"] = latest["path"]
        print("\n| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
        for r in rows[1:]:
            print("| " + " | ".join(r) + " |")
    return out


if __name__ == "__main__":
    run()
