"""How batch assets write: one transaction per stage, committed only while the run is live.

When a run worker dies (killed, out of memory, node lost), run monitoring marks the run FAILURE, but a step
process it had started may still be running. Every batch asset writes its rows, quarantine and provenance in one
transaction (:meth:`resources.warehouse.Warehouse.replace_many`) and calls this guard just before the commit: if
the run is no longer STARTED, or (outside Kubernetes) its run worker process is gone, the transaction is rolled
back, so a killed run's orphaned step never adds rows to a batch after the run failed.
"""

import dagster as dg
import polars as pl

from cbp_platform.deployment import profile
from cbp_platform.processes import alive
from cbp_platform.ingest.registry import corrections_of, registration_seq
from cbp_platform.warehouse import STAGE_PART, provenance_frame, quarantine_frame, versioned
from resources import DataRootResource, Warehouse

LIVE = {dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED}


class RunNotLive(Exception):
    pass


def run_is_live(context: dg.AssetExecutionContext):
    """A guard for :meth:`~resources.warehouse.Warehouse.replace_many` bound to this step's run."""
    instance, run_id = context.instance, context.run.run_id

    def guard() -> None:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status not in LIVE:
            raise RunNotLive(f"run {run_id[:8]} is {run.status.value}: this step's writes were discarded "
                             "(re-run the batch)")
        if profile() != "kubernetes":            # step pods live in other pid namespaces
            pid = worker_gone(instance, run_id)
            if pid is not None:
                raise RunNotLive(f"run {run_id[:8]}: its run worker (pid {pid}) is gone; this orphaned step's "
                                 "writes were discarded (re-run the batch)")

    return guard


def run_processes(instance: dg.DagsterInstance, run_id: str) -> tuple[tuple[int, float] | None,
                                                                       list[tuple[int, float]]]:
    """(run worker (pid, time recorded), step processes [(pid, time recorded)]) from the run's event log."""
    conn = instance.get_records_for_run(run_id, of_type={dg.DagsterEventType.RUN_START,
                                                         dg.DagsterEventType.STEP_START})
    worker, steps = None, {}
    for rec in conn.records:
        ev = rec.event_log_entry.dagster_event
        if ev is None or not ev.pid:
            continue
        if ev.event_type == dg.DagsterEventType.RUN_START and worker is None:
            worker = (int(ev.pid), rec.event_log_entry.timestamp)
        elif ev.event_type == dg.DagsterEventType.STEP_START:
            steps.setdefault(int(ev.pid), rec.event_log_entry.timestamp)
    if worker is not None:
        steps.pop(worker[0], None)
    return worker, sorted(steps.items())


def worker_gone(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The run worker's pid when that process is gone from this host, else None."""
    worker, _ = run_processes(instance, run_id)
    if worker is None or alive(*worker):
        return None
    return worker[0]


def write_stage(warehouse: Warehouse, context: dg.AssetExecutionContext, stage: str, rows: pl.DataFrame, batch,
                quarantine: list[dict], provenance: list[dict], code_version: str, *, data_root: DataRootResource,
                table: str | None = None, where: dict | None = None,
                extra: tuple[tuple[str, pl.DataFrame, dict], ...] = ()) -> str:
    """A batch stage's rows, quarantine rows and provenance rows (and ``extra`` tables' rows, each replacing
    its ``where``) in one transaction, committed only while the run is live; returns the rows' checksum.

    Rows of a versioned table are written as versions of the batch's delivery (:func:`version_of`): ordered by its
    registration, and, for a correction, naming the delivery each participant's version supersedes."""
    run_id = context.run.run_id
    key = {"batch_key": batch.key, "stage": stage}
    q = quarantine_frame(quarantine, delivery_id=batch.delivery_id, batch_key=batch.key, stage=stage, run_id=run_id)
    pv = provenance_frame(provenance, delivery_id=batch.delivery_id, batch_key=batch.key, stage=stage,
                          code_version=code_version, run_id=run_id)
    seq, corrections = version_of(data_root, batch)

    def version(t: str, df: pl.DataFrame) -> pl.DataFrame:
        part = STAGE_PART.get(t)
        return versioned(t, df, seq, {p: e["supersedes"] for p, e in corrections.items() if part in e["parts"]})

    return warehouse.replace_many([(table or stage, version(table or stage, rows), where or {"batch_key": batch.key}),
                                   ("quarantine", q, key), ("provenance", pv, key),
                                   *((t, version(t, df), w) for t, df, w in extra)],
                                  guard=run_is_live(context))[0]


def version_of(data_root: DataRootResource, batch) -> tuple[int | None, dict[str, dict]]:
    """(registration number of the batch's delivery, its ``corrections`` entries by pseudonym: {} for a delivery)."""
    seq = registration_seq(data_root.path, batch.delivery_id)
    return seq, (corrections_of(data_root.path, batch.delivery_id, data_root.landing) if batch.parts else {})
