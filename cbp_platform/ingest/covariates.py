"""Parsing ``covariates.csv`` into the typed participant schema, quarantining rows that fail.

The file is streamed with bounded memory, whatever it holds: a file over :data:`MAX_COVARIATES_BYTES` is refused
before it is read (``covariates_too_large``); the size and sha256 against the manifest are checked in one streamed
pass; then the rows are read one line at a time, at most :data:`MAX_LINE_BYTES` of a line (a longer line is never
held whole: it is skipped to the next newline). Each line is parsed with Python's csv module (so one ragged row
cannot sink the file), then the rows of the batch's participants are typed column-wise with Polars. The
plausibility rules live in :data:`RULES` and are shared with the Great Expectations suite of the
``participant_covariates`` asset check, so the quarantine and the data contract cannot drift apart.
"""

from __future__ import annotations

import codecs
import csv
import errno
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import polars as pl

from cbp_platform.landing import COVARIATE_COLUMNS, PSEUDONYM_RE, SITES
from cbp_platform.reasons import R, Reason, code_of

MAX_COVARIATES_BYTES = 256 << 20      # a larger covariates.csv is refused before it is read (covariates_too_large)
MAX_LINE_BYTES = 64 << 10             # at most this much of a line is held; a longer line is skipped, not read
CHUNK = 1 << 20                       # the sha256 pass reads this much at a time

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


def _too_large(label: str, size: int, *, grew: bool = False) -> tuple[Reason, str]:
    what = f"grew past {MAX_COVARIATES_BYTES} bytes while it was read" if grew else f"{size} bytes"
    return (R.covariates_too_large, f"{label}: {what}, over the limit of {MAX_COVARIATES_BYTES} bytes "
                                     f"({MAX_COVARIATES_BYTES >> 20} MiB); refused, not parsed")


class _TooLarge(Exception):
    """The file grew past :data:`MAX_COVARIATES_BYTES` while it was read."""


def _manifest_problem(fh, size: int, entry: dict | None, label: str) -> tuple[Reason, str] | None:
    """The open file against its manifest entry (listed, size, sha256), as (reason, message), or None: the size
    from ``fstat``, then the sha256 streamed in chunks (one pass, never more than ``CHUNK`` bytes held)."""
    if entry is None:
        return (R.not_in_manifest, f"{label}: present but not listed in the manifest")
    if size != entry["size"]:
        return (R.size_mismatch, f"{label}: {size} bytes, the manifest says {entry['size']}")
    h = hashlib.sha256()
    buf = memoryview(bytearray(CHUNK))
    n = 0
    while k := fh.readinto(buf):
        h.update(buf[:k])
        n += k
        if n > size:                     # grew while read: stop at once
            break
    if n != size:
        return (R.size_mismatch, f"{label}: {n}{'+' if n > size else ''} bytes read, the manifest says "
                                 f"{entry['size']}")
    digest = h.hexdigest()
    if digest != entry["sha256"]:
        return (R.checksum_mismatch, f"{label}: sha256 {digest[:12]}... differs from the manifest's "
                                     f"{entry['sha256'][:12]}...")
    return None


def _lines(fh):
    """``(line number, bytes without the newline, overlong, blank)`` for each line of ``fh``, holding at most
    :data:`MAX_LINE_BYTES` of a line: a longer line (``overlong``) yields its first :data:`MAX_LINE_BYTES` bytes
    and is skipped to the next newline in bounded reads; ``blank``: an overlong line of ASCII whitespace only.
    Raises :class:`_TooLarge` once more than :data:`MAX_COVARIATES_BYTES` have been read."""
    lineno = total = 0
    while data := fh.readline(MAX_LINE_BYTES + 1):
        lineno += 1
        total += len(data)
        if data.endswith(b"\n"):
            yield lineno, data[:-1], False, False
        elif len(data) <= MAX_LINE_BYTES:            # the last line, without a newline
            yield lineno, data, False, False
        else:
            blank = not data.strip()
            while more := fh.readline(CHUNK):
                total += len(more)
                if total > MAX_COVARIATES_BYTES:
                    raise _TooLarge
                blank = blank and not more.strip()
                if more.endswith(b"\n"):
                    break
            yield lineno, data[:MAX_LINE_BYTES], True, blank
        if total > MAX_COVARIATES_BYTES:
            raise _TooLarge


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def _first_field(data: bytes) -> str:
    """The first field of a line that is not parsed whole (an overlong line), for attribution only."""
    first = _text(data.split(b",", 1)[0]).strip()
    if len(first) >= 2 and first[0] == first[-1] == '"':
        first = first[1:-1].strip()
    return first


def parse_covariates(path: Path, participants: list[str] | set[str],
                     duplicates_elsewhere: set[str] | frozenset[str] | dict[str, str] = frozenset(), *,
                     delivery_dir: Path | None = None, entry: dict | None = None, verify: bool = False,
                     label: str | None = None) -> CovariateResult:
    """Typed rows of ``path`` for ``participants``; every other outcome is a quarantine entry.

    Every participant of ``participants`` ends up exactly once: in the rows, or in the quarantine. The file is
    streamed with bounded memory: over :data:`MAX_COVARIATES_BYTES` it is refused before it is read
    (``covariates_too_large``); with ``verify`` its size and sha256 are checked against the manifest ``entry`` in
    one streamed pass before it is parsed; then it is read line by line, at most :data:`MAX_LINE_BYTES` of a line
    (a longer line is skipped unread: ``malformed_row`` when its first field is one of ``participants``, else an
    unattributed line). A row that cannot be decoded (bytes outside UTF-8) or parsed is quarantined with its line
    number, and the other rows are kept. A UTF-8 byte-order mark is accepted. A pseudonym with several rows is
    quarantined once, as ``duplicate_pseudonym``, whatever its rows hold.
    ``duplicates_elsewhere``: pseudonyms registered by another delivery (quarantined here).
    ``delivery_dir``: refuse a link or a non-file without opening it. ``label``: how messages name the file
    (default: its path).
    """
    wanted = set(participants)
    label = label or str(path)

    def everyone(reason: Reason | str, message: str) -> CovariateResult:
        quarantine: list[dict] = []
        for p in sorted(wanted):
            _reject(quarantine, p, reason, message)
        return CovariateResult(pl.DataFrame(schema=SCHEMA), quarantine)

    problem = _path_problem(path, delivery_dir, label) if delivery_dir is not None else None
    if problem:
        return everyone(*problem)
    try:
        size = os.lstat(path).st_size                 # refused before anything is read
    except FileNotFoundError:
        return everyone(R.no_covariates_file, f"{label}: missing")
    except OSError as exc:
        return everyone(R.unreadable_covariates, f"{label}: cannot be read ({exc.strerror})")
    if size > MAX_COVARIATES_BYTES:
        return everyone(*_too_large(label, size))
    nofollow = getattr(os, "O_NOFOLLOW", 0) if delivery_dir is not None else 0
    try:
        fd = os.open(path, os.O_RDONLY | nofollow)
    except FileNotFoundError:
        return everyone(R.no_covariates_file, f"{label}: missing")
    except OSError as exc:
        return everyone(R.unreadable_covariates, f"{label}: cannot be read ({exc.strerror})")
    try:
        st = os.fstat(fd)                             # what was opened (a link's target, without delivery_dir)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        fh = os.fdopen(fd, "rb", buffering=1 << 16)
    except OSError as exc:
        os.close(fd)
        return everyone(R.unreadable_covariates, f"{label}: cannot be read ({exc.strerror})")
    try:
        with fh:
            if st.st_size > MAX_COVARIATES_BYTES:
                return everyone(*_too_large(label, st.st_size))
            if verify:                                # pass 1: size and sha256; pass 2: the rows
                problem = _manifest_problem(fh, st.st_size, entry, label)
                if problem:
                    return everyone(*problem)
                fh.seek(0)
            return _parse(_lines(fh), wanted, duplicates_elsewhere, label, everyone)
    except _TooLarge:
        return everyone(*_too_large(label, MAX_COVARIATES_BYTES + 1, grew=True))
    except OSError as exc:
        return everyone(R.unreadable_covariates, f"{label}: cannot be read ({exc.strerror})")


def _parse(lines, wanted: set[str], duplicates_elsewhere, label: str, everyone) -> CovariateResult:
    first = next(lines, None)
    if first is not None and first[1].startswith(codecs.BOM_UTF8):
        first = (first[0], first[1][len(codecs.BOM_UTF8):], *first[2:])
    if first is None or (first[3] if first[2] else not first[1].strip()):
        # line 1 is blank: an empty file unless another line is not (then the header is not the contract's)
        if first is None or all((blank if overlong else not data.strip()) for _, data, overlong, blank in lines):
            return everyone(R.unreadable_covariates, f"{label}: empty file, no header")
    if first[2]:
        return everyone(R.unexpected_columns, f"{label} line 1: header longer than {MAX_LINE_BYTES} bytes, "
                                              "not the contract's")
    header_text = _text(first[1]).rstrip("\r")
    if _undecodable(header_text) is not None:
        return everyone(R.unreadable_covariates, f"{label} line 1: the header holds bytes that are not UTF-8")
    try:
        header = next(csv.reader([header_text]))
    except (StopIteration, csv.Error) as exc:
        return everyone(R.unreadable_covariates, f"{label} line 1: header cannot be parsed ({exc})")
    if tuple(h.strip() for h in header) != COVARIATE_COLUMNS:
        return everyone(R.unexpected_columns, f"{label}: header {header} is not the contract's")

    quarantine: list[dict] = []
    flagged: dict[str, int] = {}            # participant -> its entry in quarantine (one per participant)
    raw: dict[str, list[str]] = {}          # participant -> its row's cells and line number, while it stands
    seen: dict[str, int] = {}               # participant -> the first line that named it
    unattributed: list[int] = []            # the first lines that could not be attributed (a few: bounded)
    n_unattributed = 0

    def flag(p: str, reason: Reason, message: str) -> None:
        entry = dict(pseudonym=p, reason=code_of(reason), message=message)
        if p in flagged:
            quarantine[flagged[p]] = entry
        else:
            flagged[p] = len(quarantine)
            quarantine.append(entry)

    for lineno, data, overlong, blank in lines:
        where = f"{label} line {lineno}"
        problem: tuple[Reason, str] | None = None
        cells: list[str] = []
        if overlong:
            if blank:
                continue
            p = _first_field(data)
            if p in wanted:
                problem = (R.malformed_row, f"{where}: longer than {MAX_LINE_BYTES} bytes, not read")
        else:
            line = _text(data).rstrip("\r")
            if not line.strip():
                continue
            try:
                cells = next(csv.reader([line]))
            except (StopIteration, csv.Error) as exc:
                p = line.split(",", 1)[0].strip()
                if p in wanted:
                    problem = (R.malformed_row, f"{where}: cannot be parsed ({exc})")
            else:
                p = cells[0].strip() if cells else ""
                if p in wanted:
                    bad = next((c for c, v in zip(COVARIATE_COLUMNS, cells) if _undecodable(v) is not None), None)
                    if bad is not None or _undecodable(line) is not None:
                        problem = (R.undecodable_row, f"{where}: bytes that are not UTF-8"
                                                      f"{f' in {bad}' if bad else ''}; the other rows are kept")
                    elif len(cells) != len(COVARIATE_COLUMNS):
                        problem = (R.malformed_row,
                                   f"{where}: {len(cells)} fields, header has {len(COVARIATE_COLUMNS)}")
        if p not in wanted:
            if _undecodable(p) is not None or not PSEUDONYM_RE.match(p):
                n_unattributed += 1
                if len(unattributed) < 5:
                    unattributed.append(lineno)
            continue
        if p in seen:                       # a repeated pseudonym: quarantined once, whatever its rows hold
            if p not in flagged or quarantine[flagged[p]]["reason"] != R.duplicate_pseudonym.code:
                flag(p, R.duplicate_pseudonym, f"{where}: pseudonym repeated (first on line {seen[p]})")
            raw.pop(p, None)
            continue
        seen[p] = lineno
        if problem:
            flag(p, *problem)
            continue
        if p in duplicates_elsewhere:
            owner = duplicates_elsewhere[p] if isinstance(duplicates_elsewhere, dict) else ""
            by = f"by delivery {owner}" if owner else "by an earlier delivery"
            flag(p, R.duplicate_pseudonym, f"{where}: participant already registered {by} (first registered wins)")
            continue
        raw[p] = [p, *cells[1:], str(lineno)]
    hint = (f" (line{'s' if n_unattributed > 1 else ''} {', '.join(map(str, unattributed))}"
            f"{' ...' if n_unattributed > 5 else ''} could not be read or attributed)") if n_unattributed else ""
    for p in sorted(wanted - set(seen)):
        _reject(quarantine, p, R.no_covariate_row, f"{label}: no row for this participant{hint}")
    return CovariateResult(_typed(list(raw.values()), label, quarantine), quarantine)


def _typed(raw: list[list[str]], label: str, quarantine: list[dict]) -> pl.DataFrame:
    """The rows typed with Polars and checked against the contract; a failing row is quarantined."""
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
    # the date range is checked in Polars: a date Python's datetime cannot hold (year 20160) never leaves it
    lo_date, hi_date = (date.fromisoformat(d) for d in EXAM_DATE_RANGE)
    checks = t.with_columns(pl.col("t_exam_date").is_between(lo_date, hi_date).alias("_date_ok"),
                            pl.col("t_exam_date").dt.to_string("%Y-%m-%d"))
    keep = []
    for row in checks.iter_rows(named=True):
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
                # written so that NaN (a float column reading "nan") is out of range too
                if v is not None and not ((rng.lo is None or v >= rng.lo) and (rng.hi is None or v <= rng.hi)):
                    problem = (R.out_of_range, f"{where}: {c}={v} outside [{rng.lo}, {rng.hi}]")
                    break
        if not problem and not row["_date_ok"]:
            problem = (R.out_of_range, f"{where}: exam_date={row['t_exam_date']} outside {EXAM_DATE_RANGE}")
        if problem:
            _reject(quarantine, p, *problem)
        else:
            keep.append(row["_line"])
    good = t.filter(pl.col("_line").is_in(keep)).select(
        [pl.col(f"t_{c}").alias(c) for c in COVARIATE_COLUMNS]).cast(SCHEMA)
    return good.sort("pseudonym")
