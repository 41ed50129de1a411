"""Fit time of the mixed logistic regression at paper size against lme4 (the reference fixture's timing).

The design is the paper-size simulated cohort of the lme4 fixture (``tests/fixtures/lme4/paper.json``:
27,584 analysable rows, 10 covariates + intercept, 5 sites); lme4's elapsed time was measured on this machine
when the fixture was made. Target: a tenth of lme4's time.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "lme4" / "paper.json"


def run(repeats: int = 5) -> dict:
    from cbp_platform.stats import fit_glmm, simulated_design

    ref = json.loads(FIXTURE.read_text())
    d = ref["design"]
    design = simulated_design(d["n_simulated"], d["seed"])
    import polars as pl

    from cbp_platform.stats.design import design_differences

    diff = design_differences(design.frame, pl.read_parquet(FIXTURE.with_name(d["values"])))
    if diff:
        raise RuntimeError(f"the simulated design differs from the lme4 fixture's ({'; '.join(diff)}); "
                           "regenerate the fixture")
    out = {"rows": design.frame.height, "covariates": len(d["fixed"])}
    print(f"GLMM fit, {out['rows']} rows, {out['covariates']} covariates + intercept, 5 sites "
          f"(median of {repeats}):")
    for nagq in (1, 25):
        times, res = [], None
        for _ in range(repeats):
            t = time.perf_counter()
            res = fit_glmm(design.frame, "cbp", d["fixed"], "site", nagq=nagq)
            times.append(time.perf_counter() - t)
        (lme4,) = [f for f in ref["fits"] if f["nAGQ"] == nagq and f["control"] == "default"]
        ours = statistics.median(times)
        diff = max(abs(res.coefficient(t)["estimate"] - b) for t, b in zip(lme4["terms"], lme4["estimate"]))
        name = "laplace" if nagq == 1 else f"agq{nagq}"
        out[name] = {"seconds": round(ours, 3), "lme4_seconds": lme4["elapsed_s"],
                     "ratio_to_lme4": round(ours / lme4["elapsed_s"], 4), "max_abs_coef_diff": diff}
        print(f"  nAGQ {nagq:>2}: {ours:.3f} s vs lme4 {lme4['elapsed_s']:.1f} s -> ratio {ours / lme4['elapsed_s']:.3f} "
              f"(target <= 0.1); max |coef - lme4| {diff:.1e}")
    return out


if __name__ == "__main__":
    run()
