"""Calibrate the unpublished outcome-model coefficients to docs/study.md's marginal figures.

The paper gives the exposure ORs but not the intercept, age, sex or activity coefficients. Given the rest of
the cohort model, this module solves for those five coefficients (and the NRS intercept) so that the
*expected* marginal figures of a large simulated population equal the paper's: CBP prevalence by
physical-activity category (24.6/19.4/22.0 %, which also fixes the overall 21.8 %), the CBP group's share of
women (2,999 of 6,003) and its median age (53). Expectations use the generating probabilities (not draws)
and integrate the site random intercept, so the solution is smooth and deterministic.

Run ``python -m cbp_platform.synth.calibrate`` to re-derive the defaults of ``CohortParameters``; it prints
the values to paste there. The test suite checks that the committed defaults still satisfy the targets.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from scipy import optimize, special

from cbp_platform.synth.cohort import CohortParameters, draw_population, linear_predictors

TARGETS = {
    "cbp_prevalence_pa_low": 0.246,
    "cbp_prevalence_pa_moderate": 0.194,
    "cbp_prevalence_pa_high": 0.220,
    "cbp_share_women": 2999 / 6003,
    "cbp_median_age": 53.0,
}


def _population(n: int, seed: int, params: CohortParameters):
    rng = np.random.default_rng(np.random.SeedSequence([seed, 99]))
    pop = draw_population(n, rng, params)
    site_u = rng.normal(0.0, params.site_sd, n)  # marginalise the site intercept
    return pop, site_u


def expected_margins(params: CohortParameters, pop, site_u) -> dict[str, float]:
    eta, _ = linear_predictors(pop, site_u, params)
    pr = special.expit(eta)
    out = {}
    for k, name in enumerate(("low", "moderate", "high")):
        m = pop["pa"] == k
        out[f"cbp_prevalence_pa_{name}"] = float(pr[m].mean())
    out["cbp_share_women"] = float((pr * pop["female"]).sum() / pr.sum())
    # smooth "median": mass of CBP below 53 plus half of those aged exactly 53
    w = pr / pr.sum()
    out["cbp_mass_below_53"] = float(w[pop["age"] < 53].sum() + 0.5 * w[pop["age"] == 53].sum())
    out["cbp_prevalence"] = float(pr.mean())
    return out


def calibrate(params: CohortParameters | None = None, n: int = 400_000, seed: int = 7) -> CohortParameters:
    p0 = params or CohortParameters()
    pop, site_u = _population(n, seed, p0)
    lz_mean, lz_sd = float(pop["lmm"].mean()), float(pop["lmm"].std())
    iz_mean, iz_sd = float(pop["imat"].mean()), float(pop["imat"].std())
    p0 = p0.with_(lmm_ref=(round(lz_mean, 3), round(lz_sd, 3)), imat_ref=(round(iz_mean, 3), round(iz_sd, 3)))

    def resid(x):
        p = p0.with_(cbp_intercept=x[0], cbp_age10=x[1], cbp_female=x[2], cbp_pa_moderate=x[3],
                     cbp_pa_high=x[4])
        m = expected_margins(p, pop, site_u)
        return [
            m["cbp_prevalence_pa_low"] - TARGETS["cbp_prevalence_pa_low"],
            m["cbp_prevalence_pa_moderate"] - TARGETS["cbp_prevalence_pa_moderate"],
            m["cbp_prevalence_pa_high"] - TARGETS["cbp_prevalence_pa_high"],
            m["cbp_share_women"] - TARGETS["cbp_share_women"],
            m["cbp_mass_below_53"] - 0.5,
        ]

    x0 = [p0.cbp_intercept, p0.cbp_age10, p0.cbp_female, p0.cbp_pa_moderate, p0.cbp_pa_high]
    sol = optimize.least_squares(resid, x0, xtol=1e-10, ftol=1e-12)
    x = [round(float(v), 4) for v in sol.x]
    p1 = p0.with_(cbp_intercept=x[0], cbp_age10=x[1], cbp_female=x[2], cbp_pa_moderate=x[3], cbp_pa_high=x[4])

    def nrs_gap(c0):
        _, eta_nrs = linear_predictors(pop, site_u, p1.with_(nrs_intercept=c0))
        return float(special.expit(eta_nrs).mean()) - p1.nrs_high_prevalence

    c0 = optimize.brentq(nrs_gap, -6.0, 2.0, xtol=1e-8)
    return p1.with_(nrs_intercept=round(float(c0), 4))


def main(argv: list[str] | None = None) -> int:
    p = calibrate()
    keys = ["lmm_ref", "imat_ref", "cbp_intercept", "cbp_age10", "cbp_female", "cbp_pa_moderate", "cbp_pa_high",
            "nrs_intercept"]
    json.dump({k: getattr(p, k) for k in keys}, sys.stdout, indent=2)
    print()
    pop, site_u = _population(400_000, 7, p)
    print(json.dumps(expected_margins(p, pop, site_u), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
