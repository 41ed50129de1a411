"""Erasure in the deployment: ``cbp erase``, the start-up re-application, and the settings from the environment.

Part of the environment the code location is deployed with (like :mod:`orchestration.profiles`): it imports no
asset. :func:`run_erasure` applies every pending withdrawal against the active profile's warehouse
(:func:`cbp_platform.erasure.erase_pending`). :func:`reapply_on_start` is called by the runner, the code location
(``cbp_platform.definitions``) and ``cbp`` before anything runs: a withdrawal already applied whose participant is
back (a data root or warehouse restored from a backup taken before the erasure) is erased again, with a new
certificate, before any run can use the data. It costs one read of the register when nothing was ever erased, and
a look at the delivery registry otherwise; every table is read only when the warehouse lacks the mark of an applied
erasure (a warehouse restored on its own).
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


def run_erasure(data_root: str | None = None, *, log=print, only_reapply: bool = False,
                supplied: list[str] = ()) -> list:
    """Apply every pending withdrawal (``only_reapply``: only those a restore brought back; ``supplied``: the
    request file's pseudonyms, to finish an interrupted erasure); the outcomes."""
    from cbp_platform.erasure import erase_pending
    from orchestration.profiles import warehouse

    layout = DataLayout.from_env(data_root)
    return erase_pending(layout, warehouse(data_root), log=log, only_reapply=only_reapply, supplied=supplied,
                         **settings())


def reapply_on_start(data_root: str | None = None, *, log=print) -> list:
    """Erase again, before anything runs, every participant whose withdrawal was applied but whose data is back."""
    from cbp_platform.withdrawals import Register

    layout = DataLayout.from_env(data_root)
    reg = Register(layout.withdrawals)
    if not reg.path.exists() or not reg.applied():
        return []
    from cbp_platform.erasure import marks, plan
    from orchestration.profiles import warehouse

    wh = warehouse(data_root)
    # cheap: the delivery registry (a restored data root brings it back); thorough (every table) only when the
    # warehouse lacks the mark of an applied erasure (a warehouse restored on its own, e.g. PostgreSQL)
    lacking = {r["certificate"] for r in reg.applied() if r.get("type") == "applied"} - marks(wh)
    _, _, again = plan(layout, wh, reg, registry_only=not lacking, strict=False)
    out = []
    if again:
        log(f"cbp: {len(again)} participant(s) whose withdrawal was applied are back in {layout.root} (a restore "
            "from a backup?); erasing them again before anything runs")
        out = run_erasure(data_root, log=log, only_reapply=True)
        for o in out:
            log(f"  {o.summary}: {o.certificate}")
    if lacking and all(o.verified for o in out):     # checked thoroughly: the next start is cheap again
        import polars as pl

        from cbp_platform.erasure import MARKS
        wh.append_rows(MARKS, pl.DataFrame({"certificate": sorted(lacking),
                                            "at": ["(checked on start)"] * len(lacking)}))
    return out
