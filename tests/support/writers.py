"""Batch writers for the warehouse tests and the benchmark: a stage's rows, quarantine rows and provenance rows of
one batch, written the way ``assets.writes.write_stage`` writes them (one ``replace_many``), from any process.

Importable by spawned worker processes (no fixtures here): a warehouse travels between processes as its config.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import numpy as np
import polars as pl

from cbp_platform.warehouse import provenance_frame, quarantine_frame

MUSCLES = ("back_left", "back_right", "psoas_left", "psoas_right")


def config(wh) -> dict:
    """A warehouse's constructor arguments and class, picklable."""
    from resources import DuckDBWarehouse

    if isinstance(wh, DuckDBWarehouse):
        return {"kind": "duckdb", "database": str(wh.path)}
    return {"kind": "postgres", "host": wh.host, "port": int(wh.port), "user": wh.user, "password": wh.password,
            "database": wh.database, "schema_name": wh.schema_name}


def from_config(cfg: dict):
    from resources import DuckDBWarehouse, PostgresWarehouse

    kw = {k: v for k, v in cfg.items() if k != "kind"}
    return DuckDBWarehouse(**kw) if cfg["kind"] == "duckdb" else PostgresWarehouse(**kw)


def batch_frames(i: int, n: int, version: int = 1) -> dict[str, pl.DataFrame]:
    """Batch ``i`` of ``n`` participants: one muscle_metrics row per participant and muscle (the stage rows),
    every 25th participant quarantined, one provenance row per measured participant. ``version`` changes the
    values (a re-materialisation)."""
    rng = np.random.default_rng(1000 * i + version)
    key, delivery = f"d{i // 8:02d}-b{i:03d}", f"d{i // 8:02d}"
    pseudos = [f"P{i:03d}{j:06d}" for j in range(n)]
    bad = set(pseudos[::25])
    good = [p for p in pseudos if p not in bad]
    rows = pl.DataFrame({
        "pseudonym": np.repeat(good, len(MUSCLES)),
        "muscle": np.tile(MUSCLES, len(good)),
        "voxels": rng.integers(1000, 90000, len(good) * len(MUSCLES)),
        "lean_ml": rng.normal(200.0, 30.0, len(good) * len(MUSCLES)),
        "imat_pct": rng.uniform(1.0, 30.0, len(good) * len(MUSCLES)),
    }).with_columns(pl.lit(key).alias("batch_key"), pl.lit(delivery).alias("delivery_id"),
                    pl.lit(version).alias("version"))
    q = quarantine_frame([{"pseudonym": p, "reason": "metrics_failed", "message": "crafted"} for p in sorted(bad)],
                         delivery_id=delivery, batch_key=key, stage="muscle_metrics", run_id=f"run-{i}-{version}")
    pv = provenance_frame([{"pseudonym": p, "inputs": {"labels": f"{i:04d}{version}"}, "output": ""} for p in good],
                          delivery_id=delivery, batch_key=key, stage="muscle_metrics", code_version="bench/1",
                          run_id=f"run-{i}-{version}")
    return {"key": key, "rows": rows, "quarantine": q, "provenance": pv}


def write_batch(wh, frames: dict, guard=None) -> list[str]:
    key = {"batch_key": frames["key"], "stage": "muscle_metrics"}
    return wh.replace_many([("muscle_metrics", frames["rows"], {"batch_key": frames["key"]}),
                            ("quarantine", frames["quarantine"], key), ("provenance", frames["provenance"], key)],
                           guard=guard)


def concurrent_writer(cfg: dict, i: int, n: int, versions: int, barrier, results) -> None:
    """Worker process: wait for every writer, then write batch ``i`` ``versions`` times (each a re-run that
    replaces the last); report (i, failures, seconds, error text, transactions retried)."""
    from resources.warehouse import RETRIES

    wh = from_config(cfg)
    frames = [batch_frames(i, n, v) for v in range(1, versions + 1)]
    barrier.wait()
    failures, err, t0 = 0, "", time.perf_counter()
    for f in frames:
        try:
            write_batch(wh, f)
        except Exception as exc:  # noqa: BLE001  (counted and reported: the test expects none)
            failures += 1
            err = f"{type(exc).__name__}: {exc}"[:300]
    results.put((i, failures, time.perf_counter() - t0, err, sum(RETRIES.values())))


def crash_before_commit(cfg_json: str) -> None:
    """``python -c`` target: write batch 0 and die (``os._exit``) inside the transaction, after every table's
    rows were sent and before the commit: a process killed between the stage's writes."""
    wh = from_config(json.loads(cfg_json))
    write_batch(wh, batch_frames(0, 50), guard=lambda: os._exit(17))


def run_writers(wh, *, writers: int, n: int, versions: int, first: int = 0) -> list[tuple]:
    """``writers`` processes (spawned, as separate pods would be), batches ``first`` .. ``first + writers - 1``,
    released together by a barrier; returns each writer's (i, failures, seconds, error, retries), sorted."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(writers), ctx.Queue()
    procs = [ctx.Process(target=concurrent_writer, args=(config(wh), first + i, n, versions, barrier, results))
             for i in range(writers)]
    for p in procs:
        p.start()
    out = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"writer processes exited with {[p.exitcode for p in procs]}")
    return sorted(out)
