"""Great Expectations 1.x, called directly (dagster-ge supports only GX < 1.0).

An ephemeral context, a pandas dataframe asset and an expectation suite built from the platform's own rules;
analytics stay off (``GX_ANALYTICS_ENABLED=False`` is set before GX is imported). GX is imported lazily so the
code location loads fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import polars as pl


@dataclass
class ExpectationOutcome:
    expectation: str
    column: str | None
    success: bool
    unexpected: int | None
    checked: int | None
    detail: str


def run_suite(name: str, df: pl.DataFrame, expectations: list) -> list[ExpectationOutcome]:
    """Validate ``df`` against ``expectations`` (a list of (ExpectationClass name, kwargs))."""
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    import great_expectations as gx

    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = ctx.data_sources.add_pandas(f"{name}_source")
    asset = source.add_dataframe_asset(name)
    batch_def = asset.add_batch_definition_whole_dataframe(f"{name}_batch")
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"{name}_suite"))
    for cls_name, kwargs in expectations:
        suite.add_expectation(getattr(gx.expectations, cls_name)(**kwargs))
    batch = batch_def.get_batch(batch_parameters={"dataframe": df.to_pandas()})
    result = batch.validate(suite)
    out = []
    for r in result.results:
        cfg = r.expectation_config
        res = r.result or {}
        out.append(ExpectationOutcome(
            expectation=cfg.type, column=cfg.kwargs.get("column"), success=bool(r.success),
            unexpected=res.get("unexpected_count"), checked=res.get("element_count"),
            detail=", ".join(f"{k}={v}" for k, v in cfg.kwargs.items() if k not in ("column", "batch_id"))))
    return out


def outcomes_metadata(outcomes: list[ExpectationOutcome]) -> dict:
    failed = [o for o in outcomes if not o.success]
    table = ["| expectation | column | result | unexpected / rows | rule |", "|---|---|---|---|---|"]
    for o in outcomes:
        table.append(f"| {o.expectation} | {o.column or ''} | {'pass' if o.success else 'FAIL'} | "
                     f"{'' if o.unexpected is None else o.unexpected} / {'' if o.checked is None else o.checked} | "
                     f"{o.detail} |")
    return {
        "expectations": len(outcomes),
        "failed_expectations": len(failed),
        "failures": [f"{o.expectation}({o.column}): {o.unexpected} of {o.checked} rows" for o in failed],
        "results": "\n".join(table),
    }
