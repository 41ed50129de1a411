"""Model formulas: ``"cbp ~ lmm_z2 + imat_z2 + age_10y + sex + ... + (1 | site)"`` -> a :class:`Design`.

The fixed-effect part goes to `formulaic <https://matthewwardrop.github.io/formulaic/>`_ (``formulaic.model_matrix``):
factors (string, categorical and enum columns, or ``C(x)``), interactions (``a:b``, ``a*b``), centring and scaling
(``center(x)``, ``scale(x)``), polynomials and any numpy function of a column. The random part is lme4's
``(1 | group)``: one random intercept per level of ``group`` (the only random structure this package fits);
anything else in parentheses with a bar is refused with a clear error.

Why formulaic rather than patsy: patsy is in maintenance mode (its authors point to formulaic), formulaic is
maintained, is what statsmodels 0.15 supports beside patsy, keeps a reusable ``ModelSpec`` (so ``predict`` on new
data gets the same factor levels, centring constants and column order as the fit), and reads pandas frames without
patsy's global-namespace evaluation quirks. Polars frames are converted to pandas (Polars enums become ordered
pandas categoricals, so their first category is the reference level, as in R).

Column names follow lme4, so that a table can be compared with ``fixef(glmer_fit)`` line by line: the intercept is
``(Intercept)``, a treatment contrast ``sex[T.M]`` becomes ``sexM`` and ``C(pa)[T.high]`` ``C(pa)high``, an
interaction ``x:sexM``. Boolean columns enter as 0/1 under their own name (lme4 would write ``femaleTRUE``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import polars as pl

from cbp_platform.stats.design import INTERCEPT, Design, _to_polars

_RANDOM = re.compile(r"\(\s*([^()|]*?)\s*\|\s*([^()|]*?)\s*\)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_TREATMENT = re.compile(r"\[T\.(.*?)\]")


class FormulaError(ValueError):
    """A formula this package cannot fit (the message says why and what it accepts)."""


@dataclass(frozen=True)
class ParsedFormula:
    """``outcome ~ fixed + (1 | group)`` split into its parts."""

    formula: str
    outcome: str
    fixed: str          # the right-hand side without the random term ("1" if nothing else)
    group: str


def parse_formula(formula: str) -> ParsedFormula:
    """Split an lme4-style formula with one random intercept; :class:`FormulaError` for anything else."""
    if not isinstance(formula, str) or formula.count("~") != 1:
        raise FormulaError(f"a formula needs exactly one '~' (outcome ~ terms + (1 | group)), got {formula!r}")
    lhs, rhs = (s.strip() for s in formula.split("~"))
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", lhs):
        raise FormulaError(f"the outcome must be one column name, got {lhs!r} in {formula!r}")
    randoms = _RANDOM.findall(rhs)
    if len(randoms) != 1:
        raise FormulaError(f"the model needs exactly one random intercept term '(1 | group)', found {len(randoms)} "
                           f"in {formula!r}")
    (expr, group), = randoms
    if expr.replace(" ", "") != "1":
        raise FormulaError(f"only a random intercept is supported: '(1 | {group})', not '({expr} | {group})' "
                           f"in {formula!r}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", group):
        raise FormulaError(f"the grouping factor must be one column name, got {group!r}")
    fixed = _RANDOM.sub("", rhs)
    fixed = re.sub(r"\+\s*\+", "+", fixed).strip().strip("+").strip() or "1"
    if "|" in fixed:
        raise FormulaError(f"'|' outside the random term in {formula!r}")
    return ParsedFormula(formula=formula, outcome=lhs, fixed=fixed, group=group)


def lme4_name(name: str) -> str:
    """formulaic's column name -> lme4's (``Intercept`` -> ``(Intercept)``, ``sex[T.M]`` -> ``sexM``)."""
    if name == "Intercept":
        return INTERCEPT
    return _TREATMENT.sub(lambda m: m.group(1), name)


def _pandas(frame: pl.DataFrame) -> pd.DataFrame:
    out = {}
    for c in frame.columns:
        s = frame.get_column(c)
        if s.dtype == pl.Enum:
            out[c] = pd.Categorical(s.cast(pl.String).to_list(), categories=s.dtype.categories.to_list())
        elif s.dtype == pl.Boolean:
            out[c] = s.cast(pl.Float64).fill_null(float("nan")).to_numpy()
        elif s.dtype in (pl.String, pl.Categorical):
            out[c] = pd.Series(s.cast(pl.String).to_list(), dtype=object)
        elif s.dtype.is_numeric():
            out[c] = s.cast(pl.Float64).fill_null(float("nan")).to_numpy()
        else:
            out[c] = s.to_list()
    return pd.DataFrame(out)


@dataclass(frozen=True)
class FormulaDesign:
    """A :class:`Design` built from a formula, with what rebuilds it on new data."""

    design: Design
    parsed: ParsedFormula
    spec: object               # formulaic ModelSpec of the fixed part
    variables: tuple[str, ...]  # frame columns the fixed part reads

    def exog(self, data) -> np.ndarray:
        """The fixed-effect design of new data (same levels, centring constants and column order as the fit)."""
        frame = _pandas(_to_polars(data))
        mm = self.spec.get_model_matrix(frame, na_action="ignore")
        return np.asarray(mm, dtype=np.float64)


def formula_design(formula: str, data) -> FormulaDesign:
    """Parse ``formula`` and build the design of ``data`` (Polars or pandas)."""
    from formulaic import model_matrix

    parsed = parse_formula(formula)
    frame = _to_polars(data)
    needed = [parsed.outcome, parsed.group]
    variables = tuple(dict.fromkeys(v for v in _NAME.findall(parsed.fixed) if v in frame.columns))
    absent = [c for c in needed if c not in frame.columns]
    if absent:
        raise KeyError(f"columns not in the frame: {absent} (formula {formula!r})")
    if parsed.outcome in variables or parsed.group in variables:
        raise FormulaError(f"the outcome and the group cannot be fixed effects too ({formula!r})")
    ys = frame.get_column(parsed.outcome)
    if ys.dtype in (pl.String, pl.Categorical, pl.Enum):
        raise TypeError(f"outcome {parsed.outcome!r} must be boolean or numeric 0/1, not {ys.dtype}")
    y = ys.cast(pl.Float64).fill_null(float("nan")).to_numpy().astype(np.float64, copy=True)
    missing = {parsed.outcome: int(np.isnan(y).sum())}
    for v in variables:
        s = frame.get_column(v)
        missing[v] = int(s.null_count()) + (int(s.is_nan().sum()) if s.dtype.is_float() else 0)
    pdf = _pandas(frame.select(list(variables))) if variables else pd.DataFrame(index=range(frame.height))
    try:
        mm = model_matrix(parsed.fixed, pdf, na_action="ignore")
    except Exception as exc:  # formulaic raises many types; name the formula and the cause
        raise FormulaError(f"cannot build the fixed-effect design of {formula!r}: {exc}") from exc
    names = tuple(lme4_name(c) for c in mm.columns)
    if len(set(names)) != len(names):
        raise FormulaError(f"duplicate column names in the design of {formula!r}: {names}")
    spec = mm.model_spec
    sources: list[str] = [""] * len(names)
    for term, idx in spec.term_indices.items():
        vars_ = [str(f) for f in term.factors if str(f) != "1"]
        for j in idx:
            sources[j] = ":".join(vars_) if vars_ else INTERCEPT
    gs = frame.get_column(parsed.group)
    missing[parsed.group] = int(gs.null_count())
    gtext = gs.cast(pl.String)
    levels = sorted(set(gtext.drop_nulls().to_list())) if gs.dtype != pl.Enum else \
        [lv for lv in gs.dtype.categories.to_list() if lv in set(gtext.drop_nulls().to_list())]
    lookup = {lv: i for i, lv in enumerate(levels)}
    codes = np.array([lookup[v] if v is not None else -1 for v in gtext.to_list()], dtype=np.int64)
    X = np.ascontiguousarray(np.asarray(mm, dtype=np.float64))
    design = Design(y=y, X=X, groups=codes, names=names, columns=tuple(sources), group_levels=tuple(levels),
                    outcome=parsed.outcome, group=parsed.group, missing=missing)
    return FormulaDesign(design=design, parsed=parsed, spec=spec, variables=variables)


def formula_of(outcome: str, fixed, group: str) -> str:
    """The formula of the list form ``fit_glmm(df, outcome, fixed, group)``."""
    rhs = " + ".join(fixed) if fixed else "1"
    return f"{outcome} ~ {rhs} + (1 | {group})"
