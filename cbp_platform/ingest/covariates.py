"""Parsing ``covariates.csv`` into the typed participant schema, quarantining rows that fail.

Rows are read with Python's csv module (so one ragged row cannot sink the file), then typed column-wise with
Polars. The plausibility rules live in :data:`RULES` and are shared with the Great Expectations suite of the
``participant_covariates`` asset check, so the quarantine and the data contract cannot drift apart.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from cbp_platform.landing import COVARIATE_COLUMNS, PSEUDONYM_RE, SITES
from cbp_platform.reasons import R, Reason, code_of

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


def _reject(out: list[dict], pseudonym: str, reason: Reason | str, message: str) -> None:
    out.append(dict(pseudonym=pseudonym, reason=code_of(reason), message=message))


def _undecodable(text: str) -> int | None:
    """Position of the first byte that was not UTF-8 (decoded with ``surrogateescape``), or None."""
    m = _SURROGATE.search(text)
    return None if m is None else m.start()


_SURROGATE = re.compile("[\udc80-\udcff]")


def _path_problem(path: Path, delivery_dir: Path, label: str) -> tuple[Reason | str, str] | None:
    """A link or non-file (never opened), or a missing file, as (reason, message); None for a regular file."""
    from cbp_platform.ingest.scans import ScanProblem, check_regular_file

    try:
        check_regular_file(delivery_dir, path.name, label)
    except ScanProblem as exc:
        if exc.reason == R.missing_file.code:
            return (R.no_covariates_file, f"{label}: missing")
        return (exc.reason, exc.message)
    return None


def _manifest_problem(payload: bytes, entry: dict | None, label: str) -> tuple[Reason, str] | None:
    """The file's bytes against its manifest entry (listed, size, sha256), as (reason, message), or None."""
    if entry is None:
        return (R.not_in_manifest, f"{label}: present but not listed in the manifest")
    if len(payload) != entry["size"]:
        return (R.size_mismatch, f"{label}: {len(payload)} bytes, the manifest says {entry['size']}")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != entry["sha256"]:
        return (R.checksum_mismatch, f"{label}: sha256 {digest[:12]}... differs from the manifest's "
                                     f"{entry['sha256'][:12]}...")
    return None


def parse_covariates(path: Path, participants: list[str] | set[str],
                     duplicates_elsewhere: set[str] | frozenset[str] | dict[str, str] = frozenset(), *,
                     delivery_dir: Path | None = None, entry: dict | None = None, verify: bool = False,
                     label: str | None = None) -> CovariateResult:
    """Typed rows of ``path`` for ``participants``; every other outcome is a quarantine entry.

    The file is read row by row: a row that cannot be decoded (bytes outside UTF-8) or parsed is quarantined
    with its line number, and the other rows are kept. A UTF-8 byte-order mark is accepted.
    ``duplicates_elsewhere``: pseudonyms registered by another delivery (quarantined here).
    ``delivery_dir``: refuse a link or a non-file without opening it; ``verify``: check the size and sha256
    against the manifest ``entry``. ``label``: how messages name the file (default: its path).
    """
    wanted = set(participants)
    quarantine: list[dict] = []
    label = label or str(path)
    empty = CovariateResult(pl.DataFrame(schema=SCHEMA), quarantine)

    def everyone(reason: Reason | str, message: str) -> CovariateResult:
        for p in sorted(wanted):
            _reject(quarantine, p, reason, message)
        return empty

    problem = _path_problem(path, delivery_dir, label) if delivery_dir is not None else None
    if problem:
        return everyone(*problem)
    try:
        payload = path.read_bytes()                  # read once: checked against the manifest, then parsed
    except FileNotFoundError:
        return everyone(R.no_covariates_file, f"{label}: missing")
    except OSError as exc:
        return everyone(R.unreadable_covariates, f"{label}: cannot be read ({exc.strerror})")
    problem = _manifest_problem(payload, entry, label) if verify else None
    if problem:
        return everyone(*problem)
    if payload.startswith(codecs.BOM_UTF8):
        payload = payload[len(codecs.BOM_UTF8):]
    lines = payload.decode("utf-8", errors="surrogateescape").split("\n")
    if not payload.strip():
        return everyone(R.unreadable_covariates, f"{label}: empty file, no header")
    header_text = lines[0].rstrip("\r")
    if _undecodable(header_text) is not None:
        return everyone(R.unreadable_covariates, f"{label} line 1: the header holds bytes that are not UTF-8")
    try:
        header = next(csv.reader([header_text]))
    except (StopIteration, csv.Error) as exc:
        return everyone(R.unreadable_covariates, f"{label} line 1: header cannot be parsed ({exc})")
    if tuple(h.strip() for h in header) != COVARIATE_COLUMNS:
        return everyone(R.unexpected_columns, f"{label}: header {header} is not the contract's")
    raw: list[list[str]] = []
    seen: dict[str, int] = {}
    unattributed: list[int] = []
    for lineno, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{label} line {lineno}"
        try:
            cells = next(csv.reader([line]))
        except (StopIteration, csv.Error) as exc:
            first = line.split(",", 1)[0].strip()
            if first in wanted:
                _reject(quarantine, first, R.malformed_row, f"{where}: cannot be parsed ({exc})")
                seen[first] = lineno
            else:
                unattributed.append(lineno)
            continue
        p = cells[0].strip() if cells else ""
        if p not in wanted:
            if _undecodable(p) is not None or not PSEUDONYM_RE.match(p):
                unattributed.append(lineno)
            continue
        bad = next((c for c, v in zip(COVARIATE_COLUMNS, cells) if _undecodable(v) is not None), None)
        if bad is not None or _undecodable(line) is not None:
            _reject(quarantine, p, R.undecodable_row,
                    f"{where}: bytes that are not UTF-8{f' in {bad}' if bad else ''}; the other rows are kept")
            seen[p] = lineno
            continue
        if len(cells) != len(COVARIATE_COLUMNS):
            _reject(quarantine, p, R.malformed_row,
                    f"{where}: {len(cells)} fields, header has {len(COVARIATE_COLUMNS)}")
            seen[p] = lineno
            continue
        if p in seen:
            _reject(quarantine, p, R.duplicate_pseudonym, f"{where}: pseudonym repeated (first on line {seen[p]})")
            raw = [r for r in raw if r[0] != p]
            continue
        seen[p] = lineno
        if p in duplicates_elsewhere:
            owner = duplicates_elsewhere[p] if isinstance(duplicates_elsewhere, dict) else ""
            by = f"by delivery {owner}" if owner else "by an earlier delivery"
            _reject(quarantine, p, R.duplicate_pseudonym,
                    f"{where}: participant already registered {by} (first registered wins)")
            continue
        raw.append(cells + [str(lineno)])
    hint = (f" (line{'s' if len(unattributed) > 1 else ''} {', '.join(map(str, unattributed[:5]))}"
            f"{' ...' if len(unattributed) > 5 else ''} could not be read or attributed)") if unattributed else ""
    for p in sorted(wanted - set(seen)):
        _reject(quarantine, p, R.no_covariate_row, f"{label}: no row for this participant{hint}")

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
        where = f"{label} line {row['_line']}"
        problem = None
        if not PSEUDONYM_RE.match(p):
            problem = (R.invalid_value, f"{where}: pseudonym {p!r} malformed")
        for c in COVARIATE_COLUMNS:
            if problem:
                break
            rv, tv = row[f"r_{c}"], row[f"t_{c}"]
            if rv is None and c in REQUIRED:
                problem = (R.missing_required, f"{where}: {c} is empty")
            elif rv is not None and tv is None:
                problem = (R.invalid_value, f"{where}: {c}={rv!r} cannot be read as {SCHEMA[c]}")
        if not problem:
            for c, rng in RULES.items():
                v = row[f"t_{c}"]
                if v is not None and ((rng.lo is not None and v < rng.lo) or (rng.hi is not None and v > rng.hi)):
                    problem = (R.out_of_range, f"{where}: {c}={v} outside [{rng.lo}, {rng.hi}]")
                    break
        if not problem:
            d = row["t_exam_date"]
            if not (EXAM_DATE_RANGE[0] <= d.isoformat() <= EXAM_DATE_RANGE[1]):
                problem = (R.out_of_range, f"{where}: exam_date={d} outside {EXAM_DATE_RANGE}")
        if problem:
            _reject(quarantine, p, *problem)
        else:
            keep.append(row["_line"])
    good = t.filter(pl.col("_line").is_in(keep)).select(
        [pl.col(f"t_{c}").alias(c) for c in COVARIATE_COLUMNS]).cast(SCHEMA)
    return CovariateResult(good.sort("pseudonym"), quarantine)
