"""What the CLI asks of the Dagster instance (``$DAGSTER_HOME``): pool limits, batch run states, and the review
store that reports decisions to it. None of it loads an asset."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import dagster as dg

from cbp_platform.paths import DataLayout
from cbp_platform.processes import environment

from orchestration.profiles import warehouse


@contextlib.contextmanager
def pipeline_environment(root: Path):
    """Point ``CBP_DATA_ROOT`` and ``DAGSTER_HOME`` at ``root`` (a fresh local instance) for a with-block."""
    home = DataLayout(Path(root)).dagster_home
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with environment({"CBP_DATA_ROOT": str(root), "DAGSTER_HOME": str(home)}):
        yield home


@contextlib.contextmanager
def shell_instance(data_root: str | None = None):
    """The Dagster instance a ``cbp`` command records its runs in: ``$DAGSTER_HOME``'s when it is set and no data
    root is named (as under ``make dev``), else the data root's local instance (as ``make demo`` made it)."""
    if os.environ.get("DAGSTER_HOME") and data_root is None:
        with dg.DagsterInstance.get() as inst:
            yield inst
        return
    with pipeline_environment(DataLayout.from_env(data_root).root):
        with dg.DagsterInstance.get() as inst:
            yield inst


def set_pool_limit(home, pool: str, limit: int) -> str:
    """Set a concurrency pool's limit in the instance at ``home`` (``cbp instance init``); returns the run
    storage's class name. Opening the instance creates its schema (Postgres) on first use."""
    with dg.DagsterInstance.from_config(str(home)) as inst:
        inst.event_log_storage.set_concurrency_slots(pool, int(limit))
        return type(inst.run_storage).__name__


def batch_run_states(job_names: tuple[str, ...] = ("process_batch", "ingest_batch")) -> dict[str, str]:
    """``cbp status``: batch key -> status of its latest run of ``job_names`` (``$DAGSTER_HOME``'s instance)."""
    out: dict[str, str] = {}
    with dg.DagsterInstance.get() as inst:
        for rec in inst.get_run_records(order_by="create_timestamp", ascending=True):
            run = rec.dagster_run
            key = run.tags.get("cbp/batch")
            if key and run.job_name in job_names:
                out[key] = run.status.value
    return out


def review_store(data_root: str | None = None):
    """``cbp qc``'s review store: the warehouse under the data root, and ``$DAGSTER_HOME``'s instance (when set) so
    that every decision is reported as a materialisation of ``qc_reviews``. The caller disposes of
    ``store.instance`` when it is not None (``cbp_platform.cli.qc``)."""
    from resources.reviews import ReviewStore

    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else None
    return ReviewStore(warehouse(data_root), instance=instance, data_root=DataLayout.from_env(data_root).root)
