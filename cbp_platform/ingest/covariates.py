"""Parsing ``covariates.csv`` into the typed participant schema, quarantining rows that fail.

Rows are read with Python's csv module (so one ragged row cannot sink the file), then typed column-wise with
Polars. The plausibility rules live in :data:`RULES` and are shared with the Great Expectations suite of the
``participant_covariates`` asset check, so the quarantine and the data contract cannot drift apart.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from cbp_platform.landing import COVARIATE_COLUMNS, PSEUDONYM_RE, SITES

BINARY = ("cbp", "diabetes", "dyslipidemia", "osteoporosis", "osteoarthritis")

SCHEMA: dict[str, pl.DataType] = {
    "pseudonym": pl.String,
    "site": pl.Enum(list(SITES)),
    "exam_date": pl.Date,
    "age": pl.Int16,
    "sex": pl.Enum(["F", "M"]),
    "height_cm": pl.Float64,
    "weight_kg": pl.Float64,
    "cbp": pl.Boolean,
    "nrs_pain": pl.Int8,
    "met_min_week": pl.Int32,
    "diabetes": pl.Boolean,
    "dyslipidemia": pl.Boolean,
    "osteoporosis": pl.Boolean,
    "osteoarthritis": pl.Boolean,
}

# Required columns must be present in every row; the others may be empty ("not answered").
REQUIRED = ("pseudonym", "site", "exam_date", "age", "sex", "height_cm", "weight_kg")


@dataclass(frozen=True)
class Range:
    lo: float | None
    hi: float | None


RULES: dict[str, Range] = {
    "age": Range(19, 74),             # NAKO baseline age range in the analysis
    "height_cm": Range(120, 220),
    "weight_kg": Range(30, 250),
    "nrs_pain": Range(0, 10),
    "met_min_week": Range(0, 60000),
}
EXAM_DATE_RANGE = ("2014-01-01", "2030-12-31")


@dataclass
class CovariateResult:
    rows: pl.DataFrame                 # typed, valid rows of this batch's participants
    quarantine: list[dict]             # pseudonym, reason, message


def _reject(out: list[dict], pseudonym: str, reason: str, message: str) -> None:
    out.append(dict(pseudonym=pseudonym, reason=reason, message=message))


def parse_covariates(path: Path, participants: list[str] | set[str],
                     duplicates_elsewhere: set[str] | frozenset[str] = frozenset()) -> CovariateResult:
    """Typed rows of ``path`` for ``participants``; every other outcome is a quarantine entry.

    ``duplicates_elsewhere``: pseudonyms already delivered in an earlier delivery (quarantined here).
    """
    wanted = set(participants)
    quarantine: list[dict] = []
    try:
        fh = path.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        for p in sorted(wanted):
            _reject(quarantine, p, "no_covariates_file", f"{path}: missing")
        return CovariateResult(pl.DataFrame(schema=SCHEMA), quarantine)
    with fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except (StopIteration, csv.Error, UnicodeDecodeError) as exc:
            for p in sorted(wanted):
                _reject(quarantine, p, "unreadable_covariates", f"{path}: no header ({exc})")
            return CovariateResult(pl.DataFrame(schema=SCHEMA), quarantine)
        if tuple(header) != COVARIATE_COLUMNS:
            for p in sorted(wanted):
                _reject(quarantine, p, "unexpected_columns", f"{path}: header {header} is not the contract's")
            return CovariateResult(pl.DataFrame(schema=SCHEMA), quarantine)
        raw: list[list[str]] = []
        seen: dict[str, int] = {}
        try:
            for lineno, cells in enumerate(reader, start=2):
                if not cells:
                    continue
                p = cells[0]
                if p not in wanted:
                    continue
                if len(cells) != len(COVARIATE_COLUMNS):
                    _reject(quarantine, p, "malformed_row",
                            f"{path}:{lineno}: {len(cells)} fields, header has {len(COVARIATE_COLUMNS)}")
                    seen[p] = lineno
                    continue
                if p in seen:
                    _reject(quarantine, p, "duplicate_pseudonym",
                            f"{path}:{lineno}: pseudonym repeated (first on line {seen[p]})")
                    raw = [r for r in raw if r[0] != p]
                    continue
                seen[p] = lineno
                if p in duplicates_elsewhere:
                    _reject(quarantine, p, "duplicate_pseudonym",
                            f"{path}:{lineno}: pseudonym already delivered in an earlier delivery")
                    continue
                raw.append(cells + [str(lineno)])
        except (csv.Error, UnicodeDecodeError) as exc:
            for p in sorted(wanted - set(seen)):
                _reject(quarantine, p, "unreadable_covariates", f"{path}: {exc}")
    for p in sorted(wanted - set(seen)):
        _reject(quarantine, p, "no_covariate_row", f"{path}: no row for this participant")

    cols = list(COVARIATE_COLUMNS) + ["_line"]
    df = pl.DataFrame(raw, schema={c: pl.String for c in cols}, orient="row")
    df = df.with_columns(pl.col(c).str.strip_chars() for c in COVARIATE_COLUMNS)
    df = df.with_columns(pl.when(pl.col(c) == "").then(None).otherwise(pl.col(c)).alias(c) for c in COVARIATE_COLUMNS)

    typed = {
        "pseudonym": pl.col("pseudonym"),
        "site": pl.col("site").cast(SCHEMA["site"], strict=False),
        "exam_date": pl.col("exam_date").str.strptime(pl.Date, "%Y-%m-%d", strict=False),
        "age": pl.col("age").cast(pl.Int16, strict=False),
        "sex": pl.col("sex").cast(SCHEMA["sex"], strict=False),
        "height_cm": pl.col("height_cm").cast(pl.Float64, strict=False),
        "weight_kg": pl.col("weight_kg").cast(pl.Float64, strict=False),
        "nrs_pain": pl.col("nrs_pain").cast(pl.Int8, strict=False),
        "met_min_week": pl.col("met_min_week").cast(pl.Int32, strict=False),
        **{c: pl.col(c).replace_strict({"1": True, "0": False}, default=None, return_dtype=pl.Boolean)
           for c in BINARY},
    }
    t = df.select(pl.col("_line"), *[expr.alias(f"t_{c}") for c, expr in typed.items()],
                  *[pl.col(c).alias(f"r_{c}") for c in COVARIATE_COLUMNS])
    keep = []
    for row in t.iter_rows(named=True):
        p = row["r_pseudonym"]
        where = f"{path}:{row['_line']}"
        problem = None
        if not PSEUDONYM_RE.match(p):
            problem = ("invalid_value", f"{where}: pseudonym {p!r} malformed")
        for c in COVARIATE_COLUMNS:
            if problem:
                break
            rv, tv = row[f"r_{c}"], row[f"t_{c}"]
            if rv is None and c in REQUIRED:
                problem = ("missing_required", f"{where}: {c} is empty")
            elif rv is not None and tv is None:
                problem = ("invalid_value", f"{where}: {c}={rv!r} cannot be read as {SCHEMA[c]}")
        if not problem:
            for c, rng in RULES.items():
                v = row[f"t_{c}"]
                if v is not None and ((rng.lo is not None and v < rng.lo) or (rng.hi is not None and v > rng.hi)):
                    problem = ("out_of_range", f"{where}: {c}={v} outside [{rng.lo}, {rng.hi}]")
                    break
        if not problem:
            d = row["t_exam_date"]
            if not (EXAM_DATE_RANGE[0] <= d.isoformat() <= EXAM_DATE_RANGE[1]):
                problem = ("out_of_range", f"{where}: exam_date={d} outside {EXAM_DATE_RANGE}")
        if problem:
            _reject(quarantine, p, *problem)
        else:
            keep.append(row["_line"])
    good = t.filter(pl.col("_line").is_in(keep)).select(
        [pl.col(f"t_{c}").alias(c) for c in COVARIATE_COLUMNS]).cast(SCHEMA)
    return CovariateResult(good.sort("pseudonym"), quarantine)
