"""`make bench`: run every benchmark and print figures next to their targets.

Benchmarks live here, not in the unit tests: they print numbers and ratios, they do not pass or fail on
timing. Results are also written as JSON to bench-results/ (git-ignored).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import (bench_analysis, bench_ingest, bench_lifecycle, bench_nnunet, bench_public,  # noqa: E402
                        bench_seeds, bench_segmentation, bench_stats, bench_synth, bench_warehouse)


def main() -> int:
    out_dir = Path("bench-results")
    out_dir.mkdir(exist_ok=True)
    only = sys.argv[1:]
    results = {}
    for name, mod in (("synth", bench_synth), ("ingest", bench_ingest), ("segmentation", bench_segmentation),
                      ("seeds", bench_seeds), ("nnunet", bench_nnunet), ("public", bench_public),
                      ("stats", bench_stats),
                      ("analysis", bench_analysis), ("warehouse", bench_warehouse), ("lifecycle", bench_lifecycle)):
        if not only or name in only:
            results[name] = mod.run()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (out_dir / f"bench-{stamp}.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults written to {out_dir / f'bench-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
