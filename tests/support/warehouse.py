"""Reading the warehouse of a test's data root, read-only (one helper for every test module)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl

from cbp_platform.paths import DataLayout


def warehouse_path(root: Path) -> Path:
    return DataLayout(Path(root)).warehouse_file


def query(root: Path, sql: str, params: list | None = None) -> pl.DataFrame:
    """``sql`` against ``<root>/warehouse/cbp.duckdb``, opened read-only and closed again (never holds the lock)."""
    con = duckdb.connect(str(warehouse_path(root)), read_only=True)
    try:
        return pl.from_arrow(con.sql(sql, params=params or None).to_arrow_table())
    finally:
        con.close()
