"""Erasure in the deployment: ``cbp erase``, the start-up re-application, and the settings from the environment.

Part of the environment the code location is deployed with (like :mod:`orchestration.profiles`): it imports no
asset. :func:`run_erasure` applies every pending withdrawal against the active profile's warehouse
(:func:`cbp_platform.erasure.erase_pending`). :func:`reapply_on_start` is called by the runner, the code location
(``cbp_platform.definitions``) and ``cbp`` before anything runs: a withdrawal already applied whose participant is
back (a data root or warehouse restored from a backup taken before the erasure) is erased again, with a new
certificate, before any run can use the data. It costs one read of the register when nothing was ever erased.
"""

from __future__ import annotations

import os
from pathlib import Path

from cbp_platform.paths import DataLayout


def settings() -> dict:
    """The erasure's settings from the environment: the PostgreSQL data directory to scan (``CBP_PG_DATA_DIR``,
    when this host can read it), the Dagster home, the backups' retention (``CBP_BACKUP_RETENTION_DAYS``)."""
    from cbp_platform.erasure import backup_days_from_env, pg_data_dirs_from_env

    home = os.environ.get("DAGSTER_HOME")
    return {"extra_db_dirs": pg_data_dirs_from_env(), "dagster_home": Path(home) if home else None,
            "backup_days": backup_days_from_env()}


def run_erasure(data_root: str | None = None, *, log=print, only_reapply: bool = False) -> list:
    """Apply every pending withdrawal (``only_reapply``: only those a restore brought back); the outcomes."""
    from cbp_platform.erasure import erase_pending
    from orchestration.profiles import warehouse

    layout = DataLayout.from_env(data_root)
    return erase_pending(layout, warehouse(data_root), log=log, only_reapply=only_reapply, **settings())


def reapply_on_start(data_root: str | None = None, *, log=print) -> list:
    """Erase again, before anything runs, every participant whose withdrawal was applied but whose data is back."""
    from cbp_platform.withdrawals import Register

    layout = DataLayout.from_env(data_root)
    reg = Register(layout.withdrawals)
    if not reg.path.exists() or not reg.applied():
        return []
    from cbp_platform.erasure import plan
    from orchestration.profiles import warehouse

    _, _, again = plan(layout, warehouse(data_root), reg, registry_only=True)
    if not again:
        return []
    log(f"cbp: {len(again)} participant(s) whose withdrawal was applied are back in {layout.root} (a restore from "
        "a backup?); erasing them again before anything runs")
    out = run_erasure(data_root, log=log, only_reapply=True)
    for o in out:
        log(f"  {o.summary}: {o.certificate}")
    return out
