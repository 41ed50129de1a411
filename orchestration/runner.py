"""Run the pipeline once, through Dagster, against the persistent local instance (what ``make demo`` calls).

The same steps the daemon takes, done in the foreground: evaluate ``delivery_sensor``, add the batch
partitions it requests, train (or load) the segmentation model if there is none yet, execute ``process_batch``
for every requested batch that has no successful run yet (runs are recorded in ``$DAGSTER_HOME``, so
``make dev`` shows them afterwards), cut the next data release when the data in force changed since the latest
(``orchestration.releases``), then refresh the cohort-level assets from it (analysis cohort, models, tables,
published report). ``python -m orchestration.runner``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import dagster as dg
import polars as pl

from assets.partitions import BATCHES
from assets.schedules import COHORT_LEVEL  # noqa: F401  (documents what the refresh covers)
from assets.sensors import INGEST_JOB, PROCESS_JOB, batch_already_ingested, batch_assets, delivery_sensor
from cbp_platform.definitions import build_definitions
from cbp_platform.paths import DataLayout
from cbp_platform.progress import bar
from orchestration.instance import pipeline_environment  # noqa: F401  (the runner's environment, re-exported)
from orchestration.profiles import runtime, warehouse
from orchestration.reaper import host_tag, reap
from orchestration.releases import ReleaseError, cut_release, next_release
from resources import DataRootResource

CURSOR_FILE = "demo_sensor_cursor.json"


def run_pending(instance: dg.DagsterInstance, data_root: DataRootResource | None = None, *,
                refresh: bool = True, log=print, log_level: str = "WARNING", job_name: str = PROCESS_JOB,
                model_config: dict | None = None, progress: bool | None = False) -> dict:
    defs = build_definitions()
    data_root = data_root or DataRootResource()
    reap(instance, log=lambda m: log(f"  {m}"), own_host_only=True)   # an earlier, killed demo's runs: failed first
    cursor_path = data_root.layout.registry / CURSOR_FILE
    cursor = cursor_path.read_text() if cursor_path.exists() else None
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"data_root": data_root}) as ctx:
        result = delivery_sensor(ctx)
    for req in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(BATCHES, list(req.partition_keys))
    for event in result.asset_events or []:          # the landing_zone observation, as the daemon records it
        instance.report_runless_asset_event(event)
    if result.cursor:
        cursor_path.parent.mkdir(parents=True, exist_ok=True)
        cursor_path.write_text(result.cursor)
    # every registered batch without a successful run (includes batches of earlier, interrupted demos)
    keys = sorted(set(instance.get_dynamic_partitions(BATCHES)))
    pending = [k for k in keys if not batch_already_ingested(instance, k, job_name)]
    job = defs.resolve_job_def(job_name)
    quiet = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    if job_name == PROCESS_JOB and pending and not runtime().current_pointer.exists():
        # the per-batch job needs the model: train (or load) it once, with its Dice check. Training is the longest
        # single step (minutes, an hour on a loaded machine): its console logger shows INFO, so its progress lines
        # (iterations, rate, ETA, loss: every 15 s) reach the console, not only the Dagster event log
        t = time.perf_counter()
        log("  segmentation model: training (progress every 15 s below)")
        cfg = {"loggers": {"console": {"config": {"log_level": "DEBUG" if log_level.upper() == "DEBUG" else "INFO"}}},
               "ops": {"segmentation_model": {"config": model_config or {}}}}
        res = defs.resolve_job_def("train_segmentation_model").execute_in_process(
            instance=instance, raise_on_error=False, run_config=cfg, tags=host_tag())
        log(f"  segmentation model: {'ok' if res.success else 'FAILED'} in {time.perf_counter() - t:.0f} s "
            f"(run {res.run_id[:8]})")
        if not res.success:
            return {"batches": len(keys), "ran": 0, "failed": ["segmentation_model"], "seconds": 0.0}
    summary = {"batches": len(keys), "ran": 0, "failed": []}
    t0 = time.perf_counter()
    pbar = bar(total=len(pending), desc="batches", unit="batch", enabled=progress)
    for i, key in enumerate(pending, start=1):
        t = time.perf_counter()
        batch = data_root.registry.read(key)        # a correction's batch: only the stages of what it corrects
        res = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False, run_config=quiet,
                                     asset_selection=batch_assets(batch, job_name) if batch.parts else None,
                                     tags={"cbp/batch": key, "cbp/delivery": batch.delivery_id, **host_tag()})
        status = "ok" if res.success else "FAILED"
        with pbar.external_write_mode():
            log(f"  [{i}/{len(pending)}] batch {key}: {status} in {time.perf_counter() - t:.1f} s "
                f"(run {res.run_id[:8]})")
        pbar.update(1)
        summary["ran"] += 1
        if not res.success:
            summary["failed"].append(key)
    pbar.close()
    if refresh and keys and job_name != INGEST_JOB and next_release(warehouse()) == 1:
        # the analysis reads a data release: the first is cut here; later ones are the operator's decision
        # (`cbp impact`, then `cbp release cut`; docs/lifecycle.md)
        try:
            row = cut_release(instance, data_root=data_root, log=log)
            summary["release"] = {"id": int(row["release_id"]), "content_hash": row["content_hash"][:16],
                                  "cut": row["cut"]}
        except ReleaseError as exc:
            log(f"  data release: FAILED ({exc})")
            summary["failed"].append("data_release")
            refresh = False
    if refresh and keys:
        # after ingestion-only runs there is nothing to analyse yet: refresh the ingestion summary alone
        only = [dg.AssetKey("ingestion_summary")] if job_name == INGEST_JOB else None
        res = defs.resolve_job_def("cohort_refresh").execute_in_process(instance=instance, raise_on_error=False,
                                                                        run_config=quiet, asset_selection=only,
                                                                        tags=host_tag())
        log(f"  cohort-level refresh: {'ok' if res.success else 'FAILED'} (run {res.run_id[:8]})")
        if not res.success:
            summary["failed"].append("cohort_refresh")
        _pending_hint(data_root, log)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def _pending_hint(data_root: DataRootResource, log) -> None:
    """After a refresh: say when the data in force changed since the published release (release_impact)."""
    path = data_root.layout.release_impact
    if not path.exists():
        return
    doc = json.loads(path.read_text())
    if doc.get("pending"):
        log(f"  data changed since release {doc['release']} ({doc.get('changed_participants')} participants): "
            "see what it would change with `cbp impact`, publish it with `cbp release cut` and a refresh "
            "(docs/lifecycle.md)")


def compare_with(instance: dg.DagsterInstance, model: str, *, log=print, log_level: str = "INFO",
                 refresh: bool = True) -> dict:
    """Compare the registered ``model`` with the primary: ``compare_model_batch`` for every batch the primary
    segmented, then ``compare_models``, then the report (``published_results``) so the comparison shows in it.
    The runs log at INFO on the console, so each batch's progress (scans, rate, ETA) shows while it runs."""
    from cbp_platform.segmentation.manifest import load_manifest

    defs = build_definitions()
    done = warehouse().table("muscle_segmentations", columns=["batch_key"], distinct=True, order_by=["batch_key"],
                             missing_ok=True)
    keys = done["batch_key"].to_list() if done is not None else []
    summary = {"model": model, "batches": len(keys), "failed": []}
    if not keys:
        log("  no segmented batches yet: run the pipeline (make demo) first")
        summary["failed"].append("no batches")
        return summary
    quiet = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    job = defs.resolve_job_def("compare_model_batch")
    sha = load_manifest(runtime().registry_path, model).sha256
    tags = {"cbp/compared_model": model, "cbp/compared_sha256": sha}
    todo = [k for k in keys if not _compared_since_segmented(instance, k, tags)]
    if len(todo) < len(keys):
        log(f"  {len(keys) - len(todo)} of {len(keys)} batches already compared with these weights "
            f"({sha[:12]}) since their segmentation: skipped")
    t0 = time.perf_counter()
    for i, key in enumerate(todo, start=1):
        t = time.perf_counter()
        res = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False,
                                     run_config={**quiet, "ops": {"comparison_metrics": {"config": {"model": model}}}},
                                     tags={"cbp/batch": key, **tags, **host_tag()})
        log(f"  [{i}/{len(todo)}] batch {key}: {model} {'ok' if res.success else 'FAILED'} in "
            f"{time.perf_counter() - t:.1f} s (run {res.run_id[:8]})")
        if not res.success:
            summary["failed"].append(key)
    if summary["failed"]:
        return summary
    res = defs.resolve_job_def("compare_models").execute_in_process(
        instance=instance, raise_on_error=False, tags=host_tag(),
        run_config={**quiet, "ops": {"model_comparison": {"config": {"model": model}}}})
    log(f"  model comparison: {'ok' if res.success else 'FAILED'} (run {res.run_id[:8]})")
    if not res.success:
        summary["failed"].append("model_comparison")
        return summary
    if refresh:
        res = defs.resolve_job_def("cohort_refresh").execute_in_process(
            instance=instance, raise_on_error=False, run_config=quiet, tags=host_tag(),
            asset_selection=[dg.AssetKey("published_results")])
        log(f"  report: {'ok' if res.success else 'FAILED'} (run {res.run_id[:8]})")
        if not res.success:
            summary["failed"].append("published_results")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def compare_models(name: str, log=print) -> dict:
    """``cbp model compare``: :func:`compare_with` against ``$DAGSTER_HOME``'s instance."""
    with dg.DagsterInstance.get() as instance:
        return compare_with(instance, name, log=log)


def _latest_success(instance: dg.DagsterInstance, job_name: str, tags: dict):
    runs = instance.get_run_records(filters=dg.RunsFilter(job_name=job_name, tags=tags,
                                                          statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1)
    return runs[0] if runs else None


def _compared_since_segmented(instance: dg.DagsterInstance, key: str, tags: dict) -> bool:
    """A successful ``compare_model_batch`` run of this batch with these weights, later than the batch's latest
    successful processing (a re-segmented batch is compared again)."""
    cmp = _latest_success(instance, "compare_model_batch", {"cbp/batch": key, **tags})
    if cmp is None:
        return False
    seg = _latest_success(instance, PROCESS_JOB, {"cbp/batch": key})
    return seg is None or cmp.create_timestamp > seg.create_timestamp


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orchestration.runner", description=__doc__.splitlines()[0])
    ap.add_argument("--no-refresh", action="store_true", help="skip the cohort-level refresh")
    ap.add_argument("--log-level", default="WARNING", help="Dagster console log level of the runs (INFO, DEBUG)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar over the batches (default: on a terminal only)")
    args = ap.parse_args(argv)
    instance = dg.DagsterInstance.get()
    print(f"Dagster instance: {instance.root_directory}")
    summary = run_pending(instance, refresh=not args.no_refresh, log_level=args.log_level, progress=args.progress)
    print(json.dumps(summary))
    layout = DataRootResource().layout
    latest = layout.latest_report
    if latest.exists():
        out = layout.resolve(json.loads(latest.read_text())["path"])
        print(f"Published report: {out / 'report.html'} (Markdown: {out / 'report.md'}; lineage: {out / 'lineage.json'})")
    _qc_summary()
    return 1 if summary["failed"] else 0


def _qc_summary() -> None:
    """Counts of the segmentation QC (images, maps flagged for review, reviews): no pseudonym on the console."""
    from cbp_platform.qc import app_url

    rows = warehouse().table("segmentation_qc", columns=["batch_key", "triage_flags"], missing_ok=True)
    if rows is None:            # nothing segmented yet
        return
    qc = {"n": rows.height, "batches": rows["batch_key"].n_unique(),
          "flagged": rows.filter(pl.col("triage_flags").fill_null("") != "").height}
    print(f"Segmentation QC: {qc['n']} QC images and triage scores in {qc['batches']} batches, {qc['flagged']} maps "
          f"flagged for review. Review them: .venv/bin/cbp qc serve --reviewer NAME ({app_url()})")


if __name__ == "__main__":
    sys.exit(main())
