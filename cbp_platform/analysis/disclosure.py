"""Disclosure control for published outputs: small-cell suppression and the pseudonym guard.

NAKO results leave the secure environment only as aggregates (docs/study.md, data protection). Two rules follow:

* :func:`suppress_small_cells`: a count under ``min_count`` (default 5) is replaced by ``"<5"`` (``"<10"`` under
  a limit of 10: :func:`suppressed_marker`), and so is every statistic computed from that cell (its %, median,
  CI ...). Secondary suppression then stops the hidden count from being recovered by subtraction: within a
  row, cells that add up to a published margin (CBP + no CBP = all) and, down a column, the levels of one
  variable (the MET categories add up to the group n) are suppressed in pairs: when exactly one cell of such
  a set is hidden, the smallest other one is hidden too.
* :func:`assert_no_pseudonyms`: every text written for publication is scanned for pseudonym-shaped tokens
  (:data:`cbp_platform.landing.PSEUDONYM_RE` without its anchors) and for the cohort's own pseudonyms;
  a hit raises before anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import polars as pl

from cbp_platform.landing import PSEUDONYM_ALPHABET, PSEUDONYM_LENGTH, PSEUDONYM_RE

MIN_COUNT = 5


def suppressed_marker(min_count: int = MIN_COUNT) -> str:
    """What a suppressed cell shows: ``"<5"`` under the default limit, ``"<10"`` under a limit of 10. The marker
    states the limit in force, so a published table never claims a smaller bound than the one applied."""
    return f"<{int(min_count)}"


SUPPRESSED = suppressed_marker(MIN_COUNT)      # the marker under the default limit

# A pseudonym-shaped token: exactly 10 characters of the pseudonym alphabet, not part of a longer word.
PSEUDONYM_TOKEN_RE = re.compile(
    rf"(?<![A-Za-z0-9])[{PSEUDONYM_ALPHABET}]{{{PSEUDONYM_LENGTH}}}(?![A-Za-z0-9])")


class PseudonymLeak(RuntimeError):
    """A text meant for publication contains a pseudonym (or something shaped like one)."""


# Every 10-character window of pseudonym characters (overlapping), to find known pseudonyms inside longer words.
_WINDOW_RE = re.compile(rf"(?=([{PSEUDONYM_ALPHABET}]{{{PSEUDONYM_LENGTH}}}))")


def find_pseudonyms(text: str, known: Iterable[str] = ()) -> list[str]:
    """Pseudonym-shaped tokens in ``text`` plus any of the ``known`` pseudonyms occurring in it, even inside a
    longer word (sorted). Linear in the text, whatever the number of known pseudonyms."""
    hits = set(PSEUDONYM_TOKEN_RE.findall(text))
    known = set(known)
    if known:
        hits.update(set(_WINDOW_RE.findall(text)) & known)
        hits.update(p for p in known if p and not PSEUDONYM_RE.match(p) and p in text)   # off-contract ones
    return sorted(hits)


def assert_no_pseudonyms(text: str, known: Iterable[str] = (), *, where: str = "output") -> None:
    """Raise :class:`PseudonymLeak` if ``text`` contains a pseudonym; the message does not repeat it."""
    hits = find_pseudonyms(text, known)
    if hits:
        raise PseudonymLeak(f"{where}: {len(hits)} pseudonym-like token(s) in text meant for publication; "
                            "nothing was written")


# --------------------------------------------------------------------------------------------------------
# small-cell suppression


def _derived_default(columns: Sequence[str], count_columns: Sequence[str]) -> dict[str, list[str]]:
    """``X_n`` guards every other column named ``X_...`` (its %, CI, median, quartiles, mean)."""
    out = {}
    for c in count_columns:
        prefix = c[:-1] if c.endswith("_n") else c + "_"
        out[c] = [d for d in columns if d != c and d.startswith(prefix) and d not in count_columns]
    return out


def suppression_mask(df: pl.DataFrame, min_count: int = MIN_COUNT, count_columns: Sequence[str] | None = None,
                     *, row_links: Sequence[Sequence[str]] = (),
                     row_groups: Sequence[Sequence[int]] = ()) -> dict[str, list[bool]]:
    """Which count cells to hide: primary (value < ``min_count``) then secondary, to a fixed point.

    ``row_links``: sets of count columns whose cells in one row add up to a published margin.
    ``row_groups``: sets of row indices whose cells in each count column add up to a published margin.
    When exactly one cell of such a set is hidden, the smallest visible other cell is hidden too.
    """
    count_columns = list(count_columns) if count_columns is not None else [c for c in df.columns if c.endswith("_n")]
    values = {c: df.get_column(c).to_list() for c in count_columns}
    mask = {c: [v is not None and v < min_count for v in values[c]] for c in count_columns}
    sets: list[list[tuple[str, int]]] = []
    for link in row_links:
        cols = [c for c in link if c in mask]
        sets += [[(c, i) for c in cols] for i in range(df.height)]
    for group in row_groups:
        sets += [[(c, i) for i in group] for c in count_columns]
    changed = True
    while changed:
        changed = False
        for cells in sets:
            cells = [(c, i) for c, i in cells if values[c][i] is not None]
            hidden = [x for x in cells if mask[x[0]][x[1]]]
            visible = [x for x in cells if not mask[x[0]][x[1]]]
            if len(hidden) == 1 and visible:
                c, i = min(visible, key=lambda x: (values[x[0]][x[1]], x))
                mask[c][i] = True
                changed = True
    return mask


def _fmt_default(v, col: str) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.1f}" if "pct" in col else f"{v:.2f}"
    return str(v)


def suppress_small_cells(df: pl.DataFrame, min_count: int = MIN_COUNT, count_columns: Sequence[str] | None = None,
                         *, derived: Mapping[str, Sequence[str]] | None = None,
                         row_links: Sequence[Sequence[str]] = (), row_groups: Sequence[Sequence[int]] = (),
                         marker: str | None = None) -> pl.DataFrame:
    """``df`` with every count cell under ``min_count`` (and the statistics derived from it) replaced by ``marker``
    (default :func:`suppressed_marker` of ``min_count``).

    ``count_columns`` default to the columns ending in ``_n``; ``derived`` maps a count column to the columns
    computed from its cell (default: ``X_n`` -> every ``X_*``). The count and derived columns come back as
    strings (counts as integers, % to 1 decimal, other numbers to 2); all other columns are unchanged.
    See :func:`suppression_mask` for ``row_links`` / ``row_groups`` (secondary suppression).
    """
    count_columns = list(count_columns) if count_columns is not None else [c for c in df.columns if c.endswith("_n")]
    unknown = [c for c in count_columns if c not in df.columns]
    if unknown:
        raise ValueError(f"count columns {unknown} not in the table")
    derived = dict(derived) if derived is not None else _derived_default(df.columns, count_columns)
    cell_mask = masked_cells(df, min_count, count_columns, derived, row_links, row_groups)
    marker = suppressed_marker(min_count) if marker is None else marker
    out = {}
    for col, m in cell_mask.items():
        vals = df.get_column(col).to_list()
        out[col] = pl.Series(col, [marker if hide else _fmt_default(v, col) for v, hide in zip(vals, m)],
                             dtype=pl.String)
    return df.with_columns(*out.values())


def masked_cells(df: pl.DataFrame, min_count: int, count_columns: Sequence[str],
                 derived: Mapping[str, Sequence[str]], row_links: Sequence[Sequence[str]] = (),
                 row_groups: Sequence[Sequence[int]] = ()) -> dict[str, list[bool]]:
    """Per column, which cells are hidden (counts and everything derived from them); for custom formatters."""
    mask = suppression_mask(df, min_count, count_columns, row_links=row_links, row_groups=row_groups)
    out: dict[str, list[bool]] = {c: list(m) for c, m in mask.items()}
    for c, ds in derived.items():
        for d in ds:
            cur = out.setdefault(d, [False] * df.height)
            out[d] = [a or b for a, b in zip(cur, mask[c])]
    return out
