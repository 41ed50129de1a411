"""Write a reference design (CSV + ``.meta.json``) for ``tools/lme4_reference.R``.

    python -m cbp_platform.stats.reference --n 30868 --seed 1 --out /tmp/lme4/paper.csv
    python -m cbp_platform.stats.reference --n 2240 --seed 3 --out /tmp/lme4/small.csv
    python -m cbp_platform.stats.reference --clustered --seed 20250101 --out /tmp/lme4/clustered.csv

The meta file carries (n, seed), the fixed effects, the design's sha256 (:func:`design_sha256`: this machine's
bits) and the sha256 of its exact columns (the same on any machine); the R script copies it into the fixture.
Beside the CSV, ``<name>.design.parquet`` holds the design's values (the CSV's numbers, losslessly), which the
tests compare the regenerated design with (:func:`design_differences`: exact columns equal, the exposures
within ``DESIGN_ATOL``), so the check holds on any machine, not just on the one that wrote the fixture.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from cbp_platform.stats.design import (DESIGN_ATOL, PAPER_COVARIATES, clustered_design, design_sha256, exact_columns,
                                       simulated_design)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write a reference design (CSV + .meta.json) for tools/lme4_reference.R")
    ap.add_argument("--n", type=int, help="participants scanned (simulate_cohort n)")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--clustered", action="store_true", help="the many-small-clusters design instead")
    ap.add_argument("--out", type=Path, required=True, help="CSV path; a .meta.json is written beside it")
    a = ap.parse_args(argv)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if a.clustered:
        frame = clustered_design(a.seed)
        frame.write_csv(a.out)
        meta = {"n_simulated": None, "seed": a.seed, "outcome": "cbp", "group": "site", "fixed": ["x1", "x2"],
                "n_obs": frame.height, "events": int(frame.get_column("cbp").sum()),
                "design_sha256": design_sha256(frame), "csv": a.out.name,
                "note": "150 small clusters (2-12), site SD 1.2: Laplace and AGQ differ; the CSV is committed"}
    else:
        if a.n is None:
            ap.error("--n is required unless --clustered")
        d = simulated_design(a.n, a.seed)
        d.frame.write_csv(a.out)
        values = a.out.with_suffix(".design.parquet")
        d.frame.write_parquet(values, compression="zstd", compression_level=19)
        meta = {"n_simulated": d.n, "seed": d.seed, "outcome": "cbp", "group": "site",
                "fixed": list(PAPER_COVARIATES), "n_obs": d.frame.height,
                "events": int(d.frame.get_column("cbp").sum()), "design_sha256": d.sha256(),
                "exact_columns_sha256": design_sha256(d.frame, exact_columns(d.frame)),
                "values": values.name, "inexact_atol": DESIGN_ATOL,
                "scale": {k: {"mean": v[0], "sd": v[1]} for k, v in d.scale.items()}}
    a.out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
