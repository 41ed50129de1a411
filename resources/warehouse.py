"""The warehouse: one interface, two backends, chosen by the deployment profile (never by editing code).

* :class:`DuckDBWarehouse`: an embedded DuckDB file under the data root (``DataLayout.warehouse_file``), through
  dagster-duckdb. The local profile's default. DuckDB lets one process at a time open the file, so a write holds
  the connection only for its transaction and waits its turn with jittered backoff for up to ``lock_timeout_s``.
* :class:`PostgresWarehouse`: a PostgreSQL schema (``cbp`` by default) on the server the Dagster instance already
  uses. The production and kubernetes profiles' warehouse: many step pods write at once, each batch's transaction
  touches only its own rows (row locks, MVCC), readers never wait for writers. Frames travel as Arrow (ADBC,
  ``COPY`` binary), not row by row. ``docs/warehouse.md`` compares it with a lakehouse (DuckLake, Iceberg).

The warehouse layer owns the SQL. Assets, checks and the CLI call named operations: :meth:`Warehouse.table`,
:meth:`~Warehouse.replace_many` (a stage's rows, quarantine rows and provenance rows in **one** transaction),
:meth:`~Warehouse.append_rows`, :meth:`~Warehouse.duplicate_keys`, :meth:`~Warehouse.has_table`. A table that
does not exist yet is an explicit state (:class:`MissingTable`, or ``None`` with ``missing_ok=True``), never an
empty frame that would also hide a misspelt name. Re-materialising a partition replaces its rows; a second row for
a key in :data:`~cbp_platform.warehouse.UNIQUE_KEYS` in force fails the write (:class:`DuplicateRows`) on both
backends.
"""

from __future__ import annotations

import abc
import logging
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Iterator
from urllib.parse import quote

import dagster as dg
import duckdb
import polars as pl
from dagster_duckdb import DuckDBResource

from cbp_platform.warehouse import (COVARIATE_STAGES, TABLES, UNIQUE_KEYS, VERSION_COLUMNS, erased_stages,
                                    table_checksum, with_version_columns)
from resources.data_root import DataRootResource

# (table, rows, where): ``where`` None appends (deletes nothing); {} replaces the whole table; otherwise the rows
# matching every column = value (a list or tuple value: column IN values) are replaced.
Write = tuple[str, pl.DataFrame, "dict[str, Any] | None"]


IN_FORCE, ALL_VERSIONS = "in_force", "all"      # what a read of a versioned table gives (Warehouse.table)
_VERSIONED_SEEN: set[tuple[str, str]] = set()    # (location, table) known to have the version columns
IN_FORCE_SQL = "COALESCE(superseded_by, '') = ''"      # a version in force (NULL: a row from before versioning)


def _owner(table: str) -> list[str]:
    """The key of one version of a versioned table: a participant's rows (per model for the comparison tables;
    every muscle of the metrics tables together)."""
    return [k for k in UNIQUE_KEYS[table] if k != "muscle"]


def close_superseded_sql(table: str, incoming: str) -> str | None:
    """The ``UPDATE`` that closes the versions the ``incoming`` rows of a versioned ``table`` replace: for each
    incoming row that names a delivery in ``supersedes`` (a correction) and is itself not replaced already, the
    participant's version in force (every muscle; per model for the comparison tables) gets ``superseded_by`` = the
    incoming delivery when it was written by that delivery, or by any delivery registered before the incoming one
    (``registration_seq``: of two corrections of one participant the later registration wins, whichever batch runs
    first). Run in the write's transaction after its ``DELETE`` and before its ``INSERT`` (:func:`insert_sql`).
    The one update of the warehouse: values are never changed, a version is only closed, once (on PostgreSQL a
    trigger refuses anything else)."""
    if table not in UNIQUE_KEYS:
        return None
    owner = _owner(table)
    t = _ident(table)
    sel = ", ".join(_ident(k) for k in owner)
    match = " AND ".join(f"{t}.{_ident(k)} = i.{_ident(k)}" for k in owner)
    return (f"UPDATE {t} SET superseded_by = i.delivery_id FROM (SELECT DISTINCT {sel}, supersedes, delivery_id, "
            f"registration_seq FROM {incoming} WHERE COALESCE(supersedes, '') <> '' "
            f"AND COALESCE(superseded_by, '') = '') AS i WHERE {match} AND COALESCE({t}.superseded_by, '') = '' "
            f"AND {t}.delivery_id <> i.delivery_id AND ({t}.delivery_id = i.supersedes "
            f"OR COALESCE({t}.registration_seq, 0) < COALESCE(i.registration_seq, 0))")


def insert_sql(table: str, incoming: str, columns: list[str]) -> str:
    """The ``INSERT`` of a write's ``incoming`` rows into ``table``. Into a versioned table, a row whose participant
    already has a version in force written by a delivery registered later (a correction whose batch ran first) is
    inserted as replaced by that version, so the later registration stays in force; every other row as given."""
    t = _ident(table)
    cols = ", ".join(_ident(c) for c in columns)
    if table not in UNIQUE_KEYS:
        return f"INSERT INTO {t} ({cols}) SELECT {cols} FROM {incoming}"
    owner = _owner(table)
    sel = ", ".join(_ident(k) for k in owner)
    match = " AND ".join(f"l.{_ident(k)} = i.{_ident(k)}" for k in owner)
    values = ", ".join("CASE WHEN COALESCE(i.superseded_by, '') <> '' THEN i.superseded_by "
                       "ELSE COALESCE(l.delivery_id, '') END" if c == "superseded_by" else f"i.{_ident(c)}"
                       for c in columns)
    return (f"INSERT INTO {t} ({cols}) SELECT {values} FROM {incoming} AS i LEFT JOIN (SELECT DISTINCT {sel}, "
            f"delivery_id, registration_seq FROM {t} WHERE {IN_FORCE_SQL}) AS l ON {match} "
            "AND i.registration_seq IS NOT NULL AND COALESCE(l.registration_seq, 0) > i.registration_seq")


# PostgreSQL: the version columns are written once. An UPDATE may only close a version in force; it changes no
# other column, and a closed version stays closed.
PG_WRITE_ONCE = """CREATE OR REPLACE FUNCTION cbp_write_once() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  IF COALESCE(OLD.superseded_by, '') <> '' OR COALESCE(NEW.superseded_by, '') = ''
     OR (to_jsonb(NEW) - 'superseded_by') IS DISTINCT FROM (to_jsonb(OLD) - 'superseded_by') THEN
    RAISE EXCEPTION 'versioned rows are written once: a version in force may only be closed (table %)', TG_TABLE_NAME
      USING ERRCODE = 'P0001';
  END IF;
  RETURN NEW;
END $f$"""


def unique_indexes(table: str) -> dict[str, str]:
    """The unique indexes of a versioned ``table`` (:data:`~cbp_platform.warehouse.UNIQUE_KEYS`): name -> the
    column list of ``CREATE UNIQUE INDEX``, the same SQL on both backends; ``{}`` for a table that is not
    versioned. ``<table>_version``: one version per key and delivery; ``<table>_in_force``: at most one version in
    force per key (a replaced version's expression is its delivery id, so replaced versions never collide)."""
    keys = UNIQUE_KEYS.get(table)
    if not keys:
        return {}
    cols = ", ".join(_ident(k) for k in keys)
    return {f"{table}_version": f'{cols}, "delivery_id"',
            f"{table}_in_force": f"{cols}, (CASE WHEN {IN_FORCE_SQL} THEN '' ELSE delivery_id END)"}


class UndeclaredTable(RuntimeError):
    """The warehouse holds a table that the erasure data map does not declare (cbp_platform.warehouse.TABLES)."""


class MissingTable(LookupError):
    """The table does not exist in the warehouse: not materialised yet, or a misspelt name."""


class DuplicateRows(RuntimeError):
    """A write would have put a second row for the same participant (and key) into a stage table."""


def _ident(name: str) -> str:
    if '"' in name or "\x00" in name or "?" in name:
        raise ValueError(f"not a table or column name: {name!r}")
    return f'"{name}"'


def _where(where: dict[str, Any] | None) -> tuple[str, list]:
    """``WHERE`` clause (with ``?`` placeholders) and its parameters."""
    if not where:
        return "", []
    conds, params = [], []
    for col, val in where.items():
        if val is None:
            conds.append(f"{_ident(col)} IS NULL")
        elif isinstance(val, (list, tuple, set, frozenset)):
            vals = sorted(val)
            if not vals:
                conds.append("FALSE")
            else:
                conds.append(f"{_ident(col)} IN ({', '.join('?' for _ in vals)})")
                params.extend(vals)
        else:
            conds.append(f"{_ident(col)} = ?")
            params.append(val)
    return " WHERE " + " AND ".join(conds), params


def storable(df: pl.DataFrame) -> pl.DataFrame:
    """The frame as both backends store it: categories as text, unsigned and 8-bit integers widened, a column
    that holds only nulls (no type to infer) as text."""
    casts = []
    for name, dtype in df.schema.items():
        if isinstance(dtype, (pl.Enum, pl.Categorical)) or dtype == pl.Null:
            casts.append(pl.col(name).cast(pl.String))
        elif dtype in (pl.UInt8, pl.Int8):
            casts.append(pl.col(name).cast(pl.Int16))
        elif dtype in (pl.UInt16,):
            casts.append(pl.col(name).cast(pl.Int32))
        elif dtype in (pl.UInt32, pl.UInt64):
            casts.append(pl.col(name).cast(pl.Int64))
    return df.with_columns(casts) if casts else df


def _normalised(df: pl.DataFrame) -> pl.DataFrame:
    """Read frames alike from both backends: time zones as ``UTC``."""
    casts = [pl.col(n).dt.convert_time_zone("UTC") for n, t in df.schema.items()
             if isinstance(t, pl.Datetime) and t.time_zone is not None and t.time_zone != "UTC"]
    return df.with_columns(casts) if casts else df


def _arrow(df: pl.DataFrame):
    return storable(df).to_arrow(compat_level=pl.CompatLevel.oldest())


# The kind an asset that writes the warehouse declares (``kinds={WAREHOUSE_KIND, ...}``). The code location shows
# it as the deployment's backend, duckdb or postgres (:func:`orchestration.profiles.show_warehouse_kind`).
WAREHOUSE_KIND = "warehouse"


class Warehouse(dg.ConfigurableResource):
    """The warehouse interface and its named operations (the backends implement ``_read``, ``_write``,
    ``tables``). Assets take a ``warehouse: Warehouse`` resource; which backend it is is the profile's choice."""

    backend: ClassVar[str] = ""

    # --- what a backend implements (abstract: the interface itself cannot be instantiated) ---------------------
    @property
    @abc.abstractmethod
    def location(self) -> str:
        """Where the warehouse is, for messages (never a password)."""

    @abc.abstractmethod
    def _read(self, sql: str, params: list) -> pl.DataFrame:
        """Rows of ``sql`` (``?`` placeholders); :class:`MissingTable` when a table in it does not exist."""

    @abc.abstractmethod
    def _write(self, writes: list[Write], guard) -> None:
        """Every write in one transaction; ``guard`` runs just before the commit."""

    @abc.abstractmethod
    def tables(self) -> list[str]:
        """The warehouse's tables, sorted."""

    @abc.abstractmethod
    def _erase(self, deletes: list[tuple[str, str, list]]) -> dict[str, int]:
        """Every ``(table, WHERE clause, parameters)`` delete in one transaction; rows deleted per table."""

    @abc.abstractmethod
    def compact(self, tables: list[str]) -> dict:
        """Make deleted rows leave the database's files (``tables``: those an erasure touched); what was done."""

    def database_files(self) -> list[Path]:
        """The files that hold the warehouse's bytes, when this process can read them (the erasure's byte scan)."""
        return []

    # --- named operations --------------------------------------------------------------------------------------
    def has_table(self, table: str) -> bool:
        return table in self.tables()

    def table(self, name: str, *, columns: list[str] | tuple[str, ...] | None = None,
              where: dict[str, Any] | None = None, order_by: list[str] | tuple[str, ...] | None = None,
              distinct: bool = False, missing_ok: bool = False, versions: str = IN_FORCE) -> pl.DataFrame | None:
        """Rows of ``name`` (``columns``, matching ``where``: column = value, a list value = IN, None = IS NULL),
        ordered by ``order_by``. A missing table raises :class:`MissingTable`, or returns None with
        ``missing_ok`` (the caller says what absence means); a misspelt column raises the backend's error.
        A versioned table (:data:`~cbp_platform.warehouse.UNIQUE_KEYS`) gives its versions in force, without the
        version columns; ``versions="all"``: every version, with them."""
        try:
            cond, params, drop = self._versions(name, where, versions)
        except MissingTable:
            if missing_ok:
                return None
            raise MissingTable(f"{self.location}: table {name!r} does not exist (not materialised yet, or a "
                               "misspelt name)") from None
        cols = ", ".join(_ident(c) for c in columns) if columns else "*"
        order = f" ORDER BY {', '.join(_ident(c) for c in order_by)}" if order_by else ""
        sql = f"SELECT {'DISTINCT ' if distinct else ''}{cols} FROM {_ident(name)}{cond}{order}"
        try:
            df = _normalised(self._read(sql, params))
        except MissingTable:
            if missing_ok:
                return None
            raise MissingTable(f"{self.location}: table {name!r} does not exist (not materialised yet, or a "
                               "misspelt name)") from None
        return df.drop([c for c in drop if c in df.columns and not (columns and c in columns)])

    def _versions(self, table: str, where: dict[str, Any] | None, versions: str) -> tuple[str, list, tuple]:
        """(``WHERE`` clause, parameters, columns to leave out) of a read of ``table``: for a versioned table read
        ``in_force``, only the versions in force (a table from before versioning has no version columns yet: all
        its rows are in force). :class:`MissingTable` when the table does not exist."""
        if versions not in (IN_FORCE, ALL_VERSIONS):
            raise ValueError(f"versions={versions!r}: {IN_FORCE!r} or {ALL_VERSIONS!r}")
        cond, params = _where(where)
        if table not in UNIQUE_KEYS or versions == ALL_VERSIONS:
            return cond, params, ()
        if (self.location, table) not in _VERSIONED_SEEN:
            if "superseded_by" not in self._read(f"SELECT * FROM {_ident(table)} LIMIT 0", []).columns:
                return cond, params, ()
            _VERSIONED_SEEN.add((self.location, table))
        cond = f"{cond} AND {IN_FORCE_SQL}" if cond else f" WHERE {IN_FORCE_SQL}"
        return cond, params, tuple(VERSION_COLUMNS)

    def count_rows(self, table: str, where: dict[str, Any] | None = None) -> int:
        """Rows of ``table`` matching ``where`` (of a versioned table: its versions in force)."""
        try:
            cond, params, _ = self._versions(table, where, IN_FORCE)
            return int(self._read(f"SELECT count(*) AS n FROM {_ident(table)}{cond}", params)["n"][0])
        except MissingTable:
            raise MissingTable(f"{self.location}: table {table!r} does not exist") from None

    def duplicate_keys(self, table: str, keys: tuple[str, ...] | list[str]) -> int:
        """How many key values occur in more than one row of ``table`` (of a versioned table: in more than one
        version in force, which its unique index already refuses)."""
        cols = ", ".join(_ident(c) for c in keys)
        try:
            cond, params, _ = self._versions(table, None, IN_FORCE)
            sql = (f"SELECT count(*) AS n FROM (SELECT {cols} FROM {_ident(table)}{cond} GROUP BY {cols} "
                   "HAVING count(*) > 1) AS d")
            return int(self._read(sql, params)["n"][0])
        except MissingTable:
            raise MissingTable(f"{self.location}: table {table!r} does not exist") from None

    # --- the platform's reads that need more than one table (portable SQL: DuckDB and PostgreSQL) -------------
    def segmented_scans(self, batch_key: str) -> pl.DataFrame:
        """The batch's primary segmentations with their scans' files and checksums, by pseudonym (the versions this
        batch wrote, in force or not: a batch's own stages read what the batch wrote)."""
        return _normalised(self._read(
            "SELECT s.pseudonym, s.label_path, s.label_sha256, r.water_path, r.fat_path, r.water_sha256, "
            "r.fat_sha256, r.source_format FROM muscle_segmentations s "
            "JOIN raw_mri_scans r USING (batch_key, pseudonym) WHERE s.batch_key = ? ORDER BY s.pseudonym",
            [batch_key]))

    def release_rows(self, table: str, release_id: int, *, order_by: list[str] | tuple[str, ...] | None = None
                     ) -> pl.DataFrame | None:
        """The rows of the versioned ``table`` that release ``release_id`` froze (the version it names of each
        participant: by pseudonym and delivery, and model for the comparison tables), without the version columns;
        None when the table does not exist (nothing of that stage was ever written)."""
        if table not in UNIQUE_KEYS:
            raise ValueError(f"{table} is not a versioned table")
        model = " AND v.model_name = t.model_name" if "model_name" in UNIQUE_KEYS[table] else ""
        order = f" ORDER BY {', '.join(f't.{_ident(c)}' for c in order_by)}" if order_by else ""
        try:
            df = self._read(f"SELECT t.* FROM {_ident(table)} AS t JOIN release_versions AS v ON "
                            f"v.pseudonym = t.pseudonym AND v.delivery_id = t.delivery_id{model} "
                            f"WHERE v.release_id = ? AND v.stage = ?{order}", [int(release_id), table])
        except MissingTable:
            if self.has_table("release_versions"):
                return None
            raise MissingTable(f"{self.location}: no release has been cut (cbp release cut)") from None
        return _normalised(df).drop([c for c in VERSION_COLUMNS if c in df.columns])

    def ingestion_counts(self, stages: tuple[str, ...] | None = None) -> dict[str, pl.DataFrame]:
        """Per delivery: valid scans (and suspected swaps), valid covariate rows, participants with both,
        quarantined participants, and per reason the quarantined participants (``reasons``); per stage and reason
        the quarantine rows (``stage_reasons``). ``stages``: only those stages' quarantine. A table not created
        yet counts nothing (no batch reached that stage). Per delivery, every version it wrote counts, in force or
        not (what the delivery brought; the cohort reads the versions in force through :meth:`table`)."""
        have = set(self.tables())
        qcond, qparams = _where({"stage": list(stages)} if stages else None)
        queries = {
            "scans": ("raw_mri_scans", "SELECT delivery_id, count(*) AS scans_valid, sum(CASE WHEN swap_suspected "
                      "THEN 1 ELSE 0 END) AS swap_suspected FROM raw_mri_scans GROUP BY delivery_id", []),
            "covariates": ("participant_covariates", "SELECT delivery_id, count(*) AS covariates_valid "
                           "FROM participant_covariates GROUP BY delivery_id", []),
            "both": ("participant_covariates", "SELECT s.delivery_id, count(*) AS ingested FROM raw_mri_scans s "
                     "JOIN participant_covariates c USING (batch_key, pseudonym) GROUP BY s.delivery_id", []),
            "quarantined": ("quarantine", "SELECT delivery_id, count(DISTINCT pseudonym) AS quarantined "
                            f"FROM quarantine{qcond} GROUP BY delivery_id", qparams),
            "reasons": ("quarantine", "SELECT delivery_id, reason, count(DISTINCT pseudonym) AS n "
                        f"FROM quarantine{qcond} GROUP BY delivery_id, reason ORDER BY delivery_id, reason", qparams),
            "stage_reasons": ("quarantine", "SELECT stage, reason, count(*) AS n "
                              f"FROM quarantine{qcond} GROUP BY stage, reason ORDER BY stage, reason", qparams),
        }
        out = {}
        for name, (table, sql, params) in queries.items():
            if table in have and (name != "both" or "raw_mri_scans" in have):
                out[name] = self._read(sql, params).with_columns(pl.col(pl.Decimal, pl.Int32).cast(pl.Int64))
            else:
                out[name] = pl.DataFrame()
        return out

    def ingestion_outcomes(self, delivery_id: str) -> pl.DataFrame:
        """Every participant of a delivery that an ingestion stage has ruled on: ``stage``, ``batch_key``,
        ``pseudonym`` and ``reason`` (null: stored in the stage's table; else the quarantine reason). For the
        accounting of ``cbp status --json`` (:mod:`cbp_platform.ingest.accounting`); never printed."""
        have = set(self.tables())
        parts = []
        for stage in ("raw_mri_scans", "participant_covariates"):
            if stage in have:
                parts.append(self._read(f"SELECT '{stage}' AS stage, batch_key, pseudonym, CAST(NULL AS VARCHAR) AS "
                                        f"reason FROM {stage} WHERE delivery_id = ?", [delivery_id]))
        if "quarantine" in have:
            parts.append(self._read("SELECT stage, batch_key, pseudonym, reason FROM quarantine WHERE delivery_id = ? "
                                    "AND stage IN ('raw_mri_scans', 'participant_covariates')", [delivery_id]))
        schema = {"stage": pl.String, "batch_key": pl.String, "pseudonym": pl.String, "reason": pl.String}
        return pl.concat([p.cast(schema) for p in parts]) if parts else pl.DataFrame(schema=schema)

    # --- erasure (withdrawal of consent: cbp_platform/erasure) ----------------------------------------------------
    def _erasable(self) -> list[str]:
        tables = self.tables()
        undeclared = [t for t in tables if t not in TABLES]
        if undeclared:
            raise UndeclaredTable(f"{self.location}: table(s) {', '.join(undeclared)} not in the erasure data map "
                                  "(cbp_platform.warehouse.TABLES): declare what of a participant they hold first")
        return tables

    def _participant_deletes(self, pseudonym: str, scope: str) -> list[tuple[str, str, list]]:
        out = []
        for t in self._erasable():
            what = erased_stages(t, scope)
            if what == "all":
                out.append((t, "WHERE pseudonym = ?", [pseudonym]))
            elif what == "images":
                marks = ", ".join("?" for _ in COVARIATE_STAGES)
                out.append((t, f"WHERE pseudonym = ? AND stage NOT IN ({marks})",
                            [pseudonym, *sorted(COVARIATE_STAGES)]))
        return out

    def _counts(self, queries: list[tuple[str, str, list]]) -> dict[str, int]:
        """``count(*)`` of each ``(table, WHERE clause, parameters)`` in one round trip (UNION ALL)."""
        if not queries:
            return {}
        sql = " UNION ALL ".join(f"SELECT {i} AS i, count(*) AS n FROM {_ident(t)} {cond}"
                                 for i, (t, cond, _) in enumerate(queries))
        rows = self._read(sql, [p for _, _, params in queries for p in params])
        got = {int(i): int(n) for i, n in zip(rows["i"], rows["n"])}
        return {t: got.get(i, 0) for i, (t, _, _) in enumerate(queries)}

    def participant_rows(self, pseudonym: str, scope: str = "all") -> dict[str, int]:
        """Rows of the participant an erasure of ``scope`` would remove, per table (every version)."""
        return self._counts(self._participant_deletes(pseudonym, scope))

    def participant_files(self, pseudonym: str) -> list[str]:
        """The files the warehouse names for the participant (label maps, QC images; every version)."""
        have, out = set(self.tables()), []
        for table, col in (("muscle_segmentations", "label_path"), ("segmentation_qc", "qc_image"),
                           ("comparison_segmentations", "label_path")):
            if table in have:
                df = self._read(f"SELECT {_ident(col)} AS p FROM {_ident(table)} WHERE pseudonym = ?", [pseudonym])
                out += [p for p in df["p"].to_list() if p]
        return sorted(set(out))

    def pseudonyms(self) -> set[str]:
        """Every pseudonym any declared table holds (every version): whom an erasure can find here."""
        tables = [t for t in self._erasable() if TABLES[t].holds != "none"]
        if not tables:
            return set()
        sql = " UNION ".join(f"SELECT DISTINCT pseudonym FROM {_ident(t)}" for t in tables)
        return set(self._read(sql, [])["pseudonym"].drop_nulls().to_list())

    def participant_releases(self, pseudonym: str) -> list[int]:
        """The releases the participant is part of (every release that froze a row of theirs)."""
        if "release_participants" not in self.tables():
            return []
        df = self._read("SELECT DISTINCT release_id FROM release_participants WHERE pseudonym = ? "
                        "ORDER BY release_id", [pseudonym])
        return [int(r) for r in df["release_id"].to_list()]

    def text_occurrences(self, text: str) -> dict[str, int]:
        """Rows per table in which any text column contains ``text`` (the erasure's check in SQL, beside the byte
        scan: it reads the values decompressed). Tables where it occurs only."""
        queries = []
        for t, cols in self._text_columns().items():
            queries.append((t, "WHERE " + " OR ".join(f"{_ident(c)} LIKE ?" for c in cols), [f"%{text}%"] * len(cols)))
        return {t: n for t, n in self._counts(queries).items() if n}

    def _text_columns(self) -> dict[str, list[str]]:
        """Each table's text columns (one catalogue query)."""
        rows = self._read("SELECT table_name, column_name, data_type FROM information_schema.columns "
                          "WHERE table_schema = ? ORDER BY table_name, ordinal_position", [self._schema])
        out: dict[str, list[str]] = {}
        for t, c, typ in rows.iter_rows():
            if str(typ).lower() in ("varchar", "text", "character varying"):
                out.setdefault(t, []).append(c)
        return out

    def erase_participant(self, pseudonym: str, scope: str) -> dict[str, int]:
        """Delete the participant's rows from every table that holds them (:data:`cbp_platform.warehouse.TABLES`:
        every version, the review decisions included: ``qc_reviews`` is append-only, erasure is its one
        exception), in one transaction; ``imaging`` keeps the covariates. Rows deleted per table. Raises
        :class:`UndeclaredTable` (deleting nothing) when a table is not in the data map. Run :meth:`compact` after,
        so that the bytes leave the database's files."""
        return self._erase(self._participant_deletes(pseudonym, scope))

    # --- writes ------------------------------------------------------------------------------------------------
    def replace_rows(self, table: str, df: pl.DataFrame, where: dict[str, Any], *, guard=None) -> str:
        """Atomically replace the rows of ``table`` matching ``where`` by ``df``; return df's checksum."""
        return self.replace_many([(table, df, where)], guard=guard)[0]

    def replace_many(self, writes: list[Write], *, guard=None) -> list[str]:
        """Replace several tables' rows in **one** transaction (a stage's rows, its quarantine and its provenance):
        a crash leaves all of them or none. A table is created on first write and gains the columns a newer code
        version adds (older rows get NULL). The versioned tables (:data:`~cbp_platform.warehouse.UNIQUE_KEYS`) get
        their version columns (``''`` where the writer left them out: a version in force that replaces nothing) and
        their unique indexes (:func:`~cbp_platform.warehouse.unique_indexes`), so a second version in force for the
        same participant fails the write instead of landing. ``guard`` (no argument) runs inside the transaction
        just before the commit; raising there discards every write (a step whose run was marked failed meanwhile
        never commits). Returns each frame's checksum (of the frame as given: the version columns are not in it)."""
        checksums = [table_checksum(df.drop([c for c in VERSION_COLUMNS if c in df.columns])
                                    if t in UNIQUE_KEYS else df) for t, df, _ in writes]
        self._write([(t, with_version_columns(t, df), where) for t, df, where in writes], guard)
        return checksums

    def append_rows(self, table: str, df: pl.DataFrame) -> str:
        """Insert ``df`` into ``table`` (created on first use) in one transaction, deleting nothing: the write of
        an append-only table (``qc_reviews``). Returns df's checksum."""
        self._write([(table, df, None)], None)
        return table_checksum(df)


# --------------------------------------------------------------------------------------------------------------
# DuckDB: the embedded default (local profile)

def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "lock" in text or "conflicting" in text or "being used" in text


def _is_missing_table(exc: BaseException) -> bool:
    return isinstance(exc, duckdb.CatalogException) and "Table with name" in str(exc)


class DuckDBWarehouse(Warehouse, DuckDBResource):
    """DuckDB file: ``database`` if set, else the data root's ``warehouse/cbp.duckdb`` (:class:`DataLayout`)."""

    backend: ClassVar[str] = "duckdb"
    _schema: ClassVar[str] = "main"
    database: str = ""
    data_root: DataRootResource | None = None
    lock_timeout_s: float = 300.0

    @property
    def path(self) -> Path:
        if self.database:
            return Path(self.database)
        return (self.data_root or DataRootResource()).layout.warehouse_file

    @property
    def location(self) -> str:
        return str(self.path)

    @contextmanager
    def connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
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

    def tables(self) -> list[str]:
        if not self.path.exists():
            return []
        with self.connection() as conn:
            return sorted(r[0] for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall())

    def _read(self, sql: str, params: list) -> pl.DataFrame:
        if not self.path.exists():
            raise MissingTable(self.location)
        with self.connection() as conn:
            try:
                return pl.from_arrow(conn.sql(sql, params=params or None).to_arrow_table())
            except duckdb.CatalogException as exc:
                if _is_missing_table(exc):
                    raise MissingTable(str(exc)) from None
                raise

    def database_files(self) -> list[Path]:
        return [p for p in (self.path, Path(f"{self.path}.wal")) if p.exists()]

    def _erase(self, deletes: list[tuple[str, str, list]]) -> dict[str, int]:
        out = {}
        with self.connection() as conn:
            conn.execute("BEGIN TRANSACTION")
            try:
                for table, cond, params in deletes:
                    out[table] = int(conn.execute(f"SELECT count(*) FROM {_ident(table)} {cond}", params).fetchone()[0])
                    if out[table]:
                        conn.execute(f"DELETE FROM {_ident(table)} {cond}", params)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return out

    def compact(self, tables: list[str]) -> dict:
        """DuckDB keeps deleted rows' bytes in free blocks of its file: the whole database is copied into a fresh
        file (``COPY FROM DATABASE``: tables, indexes, data), which replaces the old one atomically while the old
        one is still open (no other process can open it meanwhile: DuckDB's file lock). The copy is written
        *uncompressed* (``force_compression``), so that a byte scan of the new file reads every string as it is:
        DuckDB's usual dictionary and FSST compression would hide a pseudonym from a byte scan, erased or not.
        Later writes compress their own row groups again."""
        if not self.path.exists():
            return {"method": "nothing to rewrite (no database file)"}
        before = self.path.stat().st_size
        fresh = self.path.with_name(self.path.name + ".rewrite")
        for p in (fresh, Path(f"{fresh}.wal")):
            p.unlink(missing_ok=True)
        with self.connection() as conn:
            conn.execute("CHECKPOINT")
            conn.execute("SET force_compression = 'uncompressed'")
            name = conn.execute("SELECT current_database()").fetchone()[0]
            conn.execute(f"ATTACH '{fresh}' AS cbp_rewrite")
            try:
                conn.execute(f"COPY FROM DATABASE {_ident(name)} TO cbp_rewrite")
            finally:
                conn.execute("DETACH cbp_rewrite")
            fd = os.open(fresh, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            # while the old file's lock is still held: its WAL (none after the CHECKPOINT) would otherwise be
            # replayed into the new file, and a process that opens the new file next may start its own
            Path(f"{self.path}.wal").unlink(missing_ok=True)
            os.replace(fresh, self.path)
        return {"method": "rewritten into a fresh, uncompressed file (COPY FROM DATABASE), replacing the old one",
                "bytes_before": before, "bytes_after": self.path.stat().st_size}

    def _ensure(self, conn, table: str, name: str) -> None:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {_ident(table)} AS SELECT * FROM {name} LIMIT 0")
        have = {r[0] for r in conn.execute(f"DESCRIBE {_ident(table)}").fetchall()}
        for col, typ, *_ in conn.execute(f"DESCRIBE {name}").fetchall():
            if col not in have:       # a column added by a newer code version: older rows get NULL
                conn.execute(f"ALTER TABLE {_ident(table)} ADD COLUMN {_ident(col)} {typ}")
        indexes = unique_indexes(table)
        if indexes:
            try:
                for index, on in indexes.items():
                    conn.execute(f'CREATE UNIQUE INDEX IF NOT EXISTS "{index}" ON {_ident(table)} ({on})')
            except duckdb.ConstraintException:       # the message names the key's value: a pseudonym
                raise DuplicateRows(f"{self.path}: table {table} already holds more than one row in force per "
                                    f"({', '.join(UNIQUE_KEYS[table])}); remove the duplicates") from None
            conn.execute(f'DROP INDEX IF EXISTS "{table}_unique"')     # before versioning: one row per key

    def _duplicate(self, writes: list[Write]) -> DuplicateRows:
        return DuplicateRows(f"{self.path}: refused a second row for the same key of "
                             f"{', '.join(sorted({t for t, _, _ in writes if t in UNIQUE_KEYS}))}; "
                             "nothing of this write was kept")

    def _write(self, writes: list[Write], guard) -> None:
        with self.connection() as conn:
            names = []
            try:
                for i, (_, df, _) in enumerate(writes):
                    names.append(f"incoming_{i}")
                    conn.register(names[-1], _arrow(df))
                conn.execute("BEGIN TRANSACTION")       # the DDL too: a failed first write leaves no table
                try:
                    for (table, _, _), name in zip(writes, names):
                        self._ensure(conn, table, name)
                    for (table, df, where), name in zip(writes, names):
                        if where is not None:
                            cond, params = _where(where)
                            conn.execute(f"DELETE FROM {_ident(table)}{cond}", params)
                        close = close_superseded_sql(table, name)
                        if close and df.height and (df["supersedes"] != "").any():
                            conn.execute(close)
                        if df.height:
                            conn.execute(insert_sql(table, name, df.columns))
                    if guard is not None:
                        guard()
                    conn.execute("COMMIT")
                except duckdb.ConstraintException:     # the message names the key's value: a pseudonym
                    conn.execute("ROLLBACK")
                    raise self._duplicate(writes) from None
                except duckdb.TransactionException as exc:
                    # a writer on another connection committed the same key first: the commit fails, and its
                    # message names the key's value too
                    if "constraint" not in str(exc).lower():
                        raise
                    raise self._duplicate(writes) from None
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            finally:
                for name in names:
                    conn.unregister(name)


# --------------------------------------------------------------------------------------------------------------
# PostgreSQL: the production warehouse (many concurrent writers)

_UNIQUE_VIOLATION = "23505"
_UNDEFINED_TABLE = "42P01"
_RETRY_STATES = ("40001", "40P01")      # serialization failure, deadlock detected: the transaction is retried
_SCHEMAS_READY: set[tuple] = set()
RETRIES: dict[str, int] = {}            # retried transactions in this process, by SQLSTATE (tests, benchmark)
log = logging.getLogger("cbp.warehouse")


def _sqlstate(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", "") or "")


def _pg_params(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, ...`` (no statement here has a ``?`` in a literal)."""
    out, n = [], 0
    for part in sql.split("?"):
        out.append(part)
        n += 1
        out.append(f"${n}")
    return "".join(out[:-1])


class PostgresWarehouse(Warehouse):
    """The warehouse in a PostgreSQL schema. The profiles fill the connection from ``CBP_PG_HOST``,
    ``CBP_PG_PORT``, ``CBP_PG_USER``, ``CBP_PG_PASSWORD``, ``CBP_PG_DB`` (the Dagster instance's server) and
    ``CBP_WAREHOUSE_SCHEMA`` through :class:`dagster.EnvVar`."""

    backend: ClassVar[str] = "postgres"

    @property
    def _schema(self) -> str:
        return self.schema_name
    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "dagster"
    password: str = ""
    database: str = "dagster"
    schema_name: str = "cbp"
    connect_timeout_s: int = 30
    retries: int = 5

    @property
    def location(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database} schema {self.schema_name}"

    def _uri(self) -> str:
        auth = quote(self.user, safe="") + (f":{quote(self.password, safe='')}" if self.password else "")
        return (f"postgresql://{auth}@{self.host}:{int(self.port)}/{quote(self.database, safe='')}"
                f"?connect_timeout={int(self.connect_timeout_s)}&application_name=cbp-platform")

    @contextmanager
    def connection(self):
        """An ADBC connection (autocommit off) with ``search_path`` set to the warehouse schema."""
        import adbc_driver_postgresql.dbapi as pg

        conn = pg.connect(self._uri())
        try:
            cur = conn.cursor()
            key = (self.host, int(self.port), self.database, self.schema_name)
            if key not in _SCHEMAS_READY:        # created on first use; a reader without CREATE never tries
                cur.execute("SELECT count(*) FROM information_schema.schemata WHERE schema_name = $1",
                            parameters=(self.schema_name,))
                exists = cur.fetchall()[0][0] > 0
                conn.rollback()
                if not exists:
                    try:
                        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {_ident(self.schema_name)}")
                        conn.commit()
                    except pg.Error as exc:       # another process created it at the same moment
                        conn.rollback()
                        if _sqlstate(exc) not in (_UNIQUE_VIOLATION, "42P06"):
                            raise
                _SCHEMAS_READY.add(key)
            cur.execute(f"SET search_path TO {_ident(self.schema_name)}")
            conn.commit()
            cur.close()
            yield conn
        finally:
            conn.close()

    def tables(self) -> list[str]:
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
                        parameters=(self.schema_name,))
            out = sorted(r[0] for r in cur.fetchall())
            conn.rollback()
            return out

    def _read(self, sql: str, params: list) -> pl.DataFrame:
        import adbc_driver_postgresql.dbapi as pg

        with self.connection() as conn, conn.cursor() as cur:
            try:
                cur.execute(_pg_params(sql), parameters=tuple(params) if params else None)
                table = cur.fetch_arrow_table()
            except pg.Error as exc:
                if _sqlstate(exc) == _UNDEFINED_TABLE:
                    raise MissingTable(str(exc).splitlines()[0]) from None
                raise
            finally:
                conn.rollback()
        return pl.from_arrow(table.replace_schema_metadata(None))

    def _erase(self, deletes: list[tuple[str, str, list]]) -> dict[str, int]:
        out = {}
        with self.connection() as conn:
            try:
                with conn.cursor() as cur:
                    for table, cond, params in deletes:
                        cur.execute(_pg_params(f"SELECT count(*) FROM {_ident(table)} {cond}"),
                                    parameters=tuple(params))
                        out[table] = int(cur.fetchall()[0][0])
                        if out[table]:
                            cur.execute(_pg_params(f"DELETE FROM {_ident(table)} {cond}"), parameters=tuple(params))
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        return out

    def compact(self, tables: list[str]) -> dict:
        """PostgreSQL keeps deleted rows as dead tuples until a vacuum, and a plain VACUUM only marks their space
        free: ``VACUUM FULL`` rewrites each touched table (and its indexes, its TOAST) into new files and drops the
        old ones, then a ``CHECKPOINT`` (when the role may) flushes it. The WAL still holds the rows' bytes until
        its segments are recycled, and so do base backups and WAL archives for their retention
        (docs/lifecycle.md)."""
        import adbc_driver_postgresql.dbapi as pg

        done = []
        conn = pg.connect(self._uri(), autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(f"SET search_path TO {_ident(self.schema_name)}")
                for t in tables:          # ANALYZE: the column statistics sample values (pg_statistic)
                    cur.execute(f"VACUUM (FULL, ANALYZE) {_ident(t)}")
                    done.append(t)
                extra = []
                for sql, what in (("VACUUM FULL pg_catalog.pg_statistic", "pg_statistic rewritten"),
                                  ("CHECKPOINT", "CHECKPOINT")):
                    try:                  # both need a superuser (CHECKPOINT: or pg_checkpoint)
                        cur.execute(sql)
                        extra.append(what)
                    except pg.Error:
                        pass
        finally:
            conn.close()
        return {"method": "VACUUM (FULL, ANALYZE) of the touched tables" + "".join(f", {e}" for e in extra),
                "tables": done}

    def _ensure(self, cur, writes: list[Write], names: list[str]) -> None:
        """Create missing tables, add new columns, create unique indexes. Only when something is missing, and
        then under a transaction-scoped advisory lock, so concurrent first writers do not race on the DDL."""
        def state():
            cur.execute("SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = $1",
                        parameters=(self.schema_name,))
            cols: dict[str, set] = {}
            for t, c in cur.fetchall():
                cols.setdefault(t, set()).add(c)
            cur.execute("SELECT indexname FROM pg_indexes WHERE schemaname = $1", parameters=(self.schema_name,))
            return cols, {r[0] for r in cur.fetchall()}

        def missing(cols, idx) -> bool:
            return any(t not in cols or set(df.columns) - cols[t] or set(unique_indexes(t)) - idx
                       or f"{t}_unique" in idx for t, df, _ in writes)

        cols, idx = state()
        if not missing(cols, idx):
            return
        cur.execute("SELECT pg_advisory_xact_lock(hashtext($1))", parameters=(f"cbp-ddl:{self.schema_name}",))
        cols, idx = state()
        for (table, df, _), name in zip(writes, names):
            if table not in cols:
                cur.execute(f"CREATE TABLE {_ident(table)} AS SELECT * FROM {name} WITH NO DATA")
                cols[table] = set(df.columns)
            new = [c for c in df.columns if c not in cols[table]]
            if new:
                cur.execute("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                            f"WHERE attrelid = '{name}'::regclass AND attnum > 0 AND NOT attisdropped")
                types = dict(cur.fetchall())
                for c in new:
                    cur.execute(f"ALTER TABLE {_ident(table)} ADD COLUMN {_ident(c)} {types[c]}")
                cols[table] |= set(new)
            for index, on in unique_indexes(table).items():
                if index not in idx:
                    cur.execute(f'CREATE UNIQUE INDEX "{index}" ON {_ident(table)} ({on})')
                    idx.add(index)
                    if index.endswith("_in_force"):      # created with the index: the DDL lock is held
                        cur.execute(PG_WRITE_ONCE)
                        cur.execute(f'DROP TRIGGER IF EXISTS "{table}_write_once" ON {_ident(table)}')
                        cur.execute(f'CREATE TRIGGER "{table}_write_once" BEFORE UPDATE ON {_ident(table)} '
                                    "FOR EACH ROW EXECUTE FUNCTION cbp_write_once()")
            if f"{table}_unique" in idx:                 # before versioning: one row per key
                cur.execute(f'DROP INDEX "{table}_unique"')
                idx.discard(f"{table}_unique")

    def _write_once(self, conn, writes: list[Write], guard) -> None:
        with conn.cursor() as cur:
            names = []
            for i, (_, df, _) in enumerate(writes):
                name = f"cbp_incoming_{i}"
                cur.adbc_ingest(name, _arrow(df), mode="create", temporary=True)
                names.append(name)
            self._ensure(cur, writes, names)
            for (table, df, where), name in zip(writes, names):
                if where is not None:
                    cond, params = _where(where)
                    cur.execute(_pg_params(f"DELETE FROM {_ident(table)}{cond}"),
                                parameters=tuple(params) if params else None)
                close = close_superseded_sql(table, name)
                if close and df.height and (df["supersedes"] != "").any():
                    cur.execute(close)
                if df.height:
                    cur.execute(insert_sql(table, name, df.columns))
                cur.execute(f"DROP TABLE {name}")
            if guard is not None:
                guard()
        conn.commit()

    def _write(self, writes: list[Write], guard) -> None:
        import adbc_driver_postgresql.dbapi as pg

        delay = 0.05
        ordered = any(t in UNIQUE_KEYS and "registration_seq" in df.columns and df["registration_seq"].null_count() <
                      df.height for t, df, _ in writes)
        for attempt in range(self.retries + 1):
            with self.connection() as conn:
                try:
                    self._write_once(conn, writes, guard)
                    return
                except pg.Error as exc:
                    conn.rollback()
                    state = _sqlstate(exc)
                    if state == _UNIQUE_VIOLATION and ordered and attempt < self.retries:
                        # two ordered versions of one participant committed side by side (a correction and the
                        # version it replaces, or two corrections): the retry sees the other and orders itself
                        RETRIES[state] = RETRIES.get(state, 0) + 1
                    elif state == _UNIQUE_VIOLATION:       # the server's detail names the key's value
                        raise DuplicateRows(f"{self.location}: refused a second row for the same key of "
                                            f"{', '.join(sorted({t for t, _, _ in writes if t in UNIQUE_KEYS}))}; "
                                            "nothing of this write was kept") from None
                    elif state not in _RETRY_STATES or attempt == self.retries:
                        raise
                    else:
                        RETRIES[state] = RETRIES.get(state, 0) + 1
                    log.warning("warehouse write retried after SQLSTATE %s (attempt %d of %d)", state,
                                attempt + 1, self.retries)
                except BaseException:
                    conn.rollback()
                    raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
