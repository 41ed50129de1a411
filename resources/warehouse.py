"""The embedded DuckDB warehouse, through dagster-duckdb.

DuckDB lets one process at a time open a database file. Batch runs therefore hold a connection only for a
short write (one transaction: delete the partition's rows, insert the new ones) and
:class:`dagster_duckdb.DuckDBResource` retries the connection with exponential backoff while another process
holds the lock; on top of that, :meth:`Warehouse.connection` retries with jitter for up to ``lock_timeout_s``.
Re-materialising a partition replaces its rows; it never duplicates them.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from pathlib import Path

import duckdb
import polars as pl
from dagster_duckdb import DuckDBResource

from cbp_platform.paths import data_root
from cbp_platform.warehouse import UNIQUE_KEYS, table_checksum


def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "lock" in text or "conflicting" in text or "being used" in text


class DuplicateRows(RuntimeError):
    """A write would have put a second row for the same participant (and key) into a stage table."""


class Warehouse(DuckDBResource):
    """DuckDB file under the data root; ``database`` empty = ``$CBP_DATA_ROOT/warehouse/cbp.duckdb``."""

    database: str = ""
    lock_timeout_s: float = 300.0

    @property
    def path(self) -> Path:
        return Path(self.database) if self.database else data_root() / "warehouse" / "cbp.duckdb"

    @contextmanager
    def connection(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.05
        while True:
            try:
                conn = duckdb.connect(str(self.path), config={"custom_user_agent": "cbp-platform"})
                break
            except (duckdb.IOException, RuntimeError) as exc:
                if not _is_lock_error(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 1.6, 2.0)
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def get_connection(self):  # keep dagster-duckdb's API, with the warehouse path and the lock policy
        with self.connection() as conn:
            yield conn

    def replace_rows(self, table: str, df: pl.DataFrame, where: dict[str, str], *, guard=None) -> str:
        """Atomically replace the rows of ``table`` matching ``where`` by ``df``; return df's checksum."""
        return self.replace_many([(table, df, where)], guard=guard)[0]

    def replace_many(self, writes: list[tuple[str, pl.DataFrame, dict[str, str]]], *, guard=None) -> list[str]:
        """Replace several tables' rows in **one** transaction (a stage's rows, its quarantine and its provenance):
        a crash leaves all of them or none. Tables with a key in :data:`~cbp_platform.warehouse.UNIQUE_KEYS` get a
        unique index, so a second row for the same participant fails the write instead of landing. ``guard``
        (no argument) runs inside the transaction just before the commit; raising there discards every write
        (a step whose run was marked failed meanwhile never commits). Returns each frame's checksum."""
        checksums = [table_checksum(df) for _, df, _ in writes]
        with self.connection() as conn:
            names = []
            try:
                for i, (table, df, _) in enumerate(writes):
                    name = f"incoming_{i}"
                    conn.register(name, df.to_arrow())
                    names.append(name)
                    conn.execute(f'CREATE TABLE IF NOT EXISTS "{table}" AS SELECT * FROM {name} LIMIT 0')
                    have = {r[0] for r in conn.execute(f'DESCRIBE "{table}"').fetchall()}
                    for col, typ, *_ in conn.execute(f"DESCRIBE {name}").fetchall():
                        if col not in have:       # a column added by a newer code version: older rows get NULL
                            conn.execute(f'ALTER TABLE "{table}" ADD COLUMN "{col}" {typ}')
                    keys = UNIQUE_KEYS.get(table)
                    if keys:
                        cols = ", ".join(f'"{c}"' for c in keys)
                        try:
                            conn.execute(f'CREATE UNIQUE INDEX IF NOT EXISTS "{table}_unique" ON "{table}" ({cols})')
                        except duckdb.ConstraintException as exc:
                            raise DuplicateRows(f"{self.path}: table {table} already holds more than one row per "
                                                f"({', '.join(keys)}); remove the duplicates ({exc})") from None
                conn.execute("BEGIN TRANSACTION")
                try:
                    for (table, df, where), name in zip(writes, names):
                        cond = " AND ".join(f'"{k}" = ?' for k in where) or "TRUE"
                        conn.execute(f'DELETE FROM "{table}" WHERE {cond}', list(where.values()))
                        if df.height:
                            conn.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM {name}')
                    if guard is not None:
                        guard()
                    conn.execute("COMMIT")
                except duckdb.ConstraintException as exc:
                    conn.execute("ROLLBACK")
                    raise DuplicateRows(f"{self.path}: refused a second row for the same key ({exc}); nothing of "
                                        "this write was kept") from None
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            finally:
                for name in names:
                    conn.unregister(name)
        return checksums

    def append_rows(self, table: str, df: pl.DataFrame) -> str:
        """Insert ``df`` into ``table`` (created on first use) in one transaction, deleting nothing: the write of
        an append-only table (``qc_reviews``). Returns df's checksum."""
        with self.connection() as conn:
            conn.register("incoming", df.to_arrow())
            try:
                conn.execute(f'CREATE TABLE IF NOT EXISTS "{table}" AS SELECT * FROM incoming LIMIT 0')
                conn.execute("BEGIN TRANSACTION")
                try:
                    conn.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM incoming')
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            finally:
                conn.unregister("incoming")
        return table_checksum(df)

    def query(self, sql: str, params: list | None = None) -> pl.DataFrame:
        with self.connection() as conn:
            try:
                return pl.from_arrow(conn.sql(sql, params=params or None).to_arrow_table())
            except duckdb.CatalogException:
                return pl.DataFrame()

    def has_table(self, table: str) -> bool:
        with self.connection() as conn:
            return bool(conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]).fetchone()[0])
