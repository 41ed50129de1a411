"""What every ``cbp`` command shares: the parser class, the progress flags, opening the warehouse."""

from __future__ import annotations

import argparse
import sys

class Parser(argparse.ArgumentParser):
    """argparse with a one-line error message and exit code 2."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def progress_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                   help="always show the progress bar (default: only on a terminal)")
    g.add_argument("--quiet", "-q", dest="progress", action="store_const", const=False, help="no progress bar")


def progress_flag(args: argparse.Namespace) -> bool | None:
    return getattr(args, "progress", None)


def open_warehouse(cmd: str, data_root: str | None):
    """The deployment profile's warehouse (DuckDB under the data root, or PostgreSQL), or None with the reason
    on stderr when it holds nothing yet or cannot be reached."""
    from orchestration.profiles import warehouse

    try:
        wh = warehouse(data_root)
        if wh.tables():
            return wh
        print(f"cbp {cmd}: error: the warehouse {wh.location} holds no tables yet (run the pipeline first: "
              "make demo)", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001  (a server down or a wrong setting: reported, not a traceback)
        print(f"cbp {cmd}: error: cannot open the warehouse: {type(exc).__name__}: {str(exc).splitlines()[0]}",
              file=sys.stderr)
    return None


def warehouse_tables(wh, reads: dict[str, tuple[str, dict]]) -> dict:
    """Several reads for display (name -> (table, ``Warehouse.table`` arguments)); a table not created yet
    shows as empty here, on purpose: an operator command lists what exists."""
    import polars as pl

    out = {}
    for name, (table, kw) in reads.items():
        df = wh.table(table, missing_ok=True, **kw)
        out[name] = pl.DataFrame() if df is None else df
    return out
