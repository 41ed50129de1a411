"""Generation rate (participants/s, MB/s) and peak memory of `cbp synth` at both presets.

Each case runs the real console script in a fresh process against a temp data root and measures wall time,
bytes written and the peak resident memory of the largest process involved (the parent or one of its worker
processes, from getrusage of the reaped children).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _cbp() -> str:
    return str(Path(sys.executable).with_name("cbp"))


def _case(n: int, k: int, preset: str, workers: int, seed: int = 1) -> dict:
    root = Path(tempfile.mkdtemp(prefix="cbp-bench-"))
    try:
        # a fresh measuring process so that RUSAGE_CHILDREN covers this case only
        code = (
            "import resource, subprocess, sys, time, json\n"
            "t = time.perf_counter()\n"
            f"p = subprocess.run({[_cbp(), 'synth', '-n', str(n), '-k', str(k), '--seed', str(seed), '--resolution', preset, '--workers', str(workers), '--data-root', str(root), '-q']!r}, capture_output=True, text=True)\n"
            "dt = time.perf_counter() - t\n"
            "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print(json.dumps(dict(rc=p.returncode, seconds=dt, maxrss_kb=ru.ru_maxrss, err=p.stderr[-500:])))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        import json
        res = json.loads(out.stdout.strip().splitlines()[-1])
        if res["rc"] != 0:
            raise RuntimeError(res["err"])
        nbytes = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        from cbp_platform.paths import DataLayout

        landing = sum(f.stat().st_size for f in DataLayout(root).landing.rglob("*") if f.is_file())
        return dict(participants=n, deliveries=k, preset=preset, workers=workers, seconds=res["seconds"],
                    participants_per_s=n / res["seconds"], mb_written=nbytes / 1e6,
                    mb_per_s=nbytes / 1e6 / res["seconds"], landing_mb_per_participant=landing / 1e6 / n,
                    peak_rss_mb=res["maxrss_kb"] / 1024)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run() -> dict:
    workers = os.cpu_count() or 1
    print(f"== cbp synth ({workers} cores) ==")
    fast_small = _case(150, 1, "fast", workers)
    fast_big = _case(600, 2, "fast", workers)
    nako = _case(6, 1, "nako", workers)
    rows = [fast_small, fast_big, nako]
    print(f"{'preset':6} {'N':>5} {'s':>7} {'part/s':>7} {'MB/s':>6} {'MB/part':>8} {'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['preset']:6} {r['participants']:5d} {r['seconds']:7.1f} {r['participants_per_s']:7.2f} "
              f"{r['mb_per_s']:6.1f} {r['landing_mb_per_participant']:8.2f} {r['peak_rss_mb']:11.0f}")
    projected_1000 = 1000 / fast_big["participants_per_s"]
    flat = fast_big["peak_rss_mb"] / fast_small["peak_rss_mb"]
    print(f"fast preset, 1,000 participants: {projected_1000:.0f} s projected "
          f"(target: well under 120 s; ratio {projected_1000 / 120:.2f} of the limit)")
    print(f"memory flat as N grows: peak RSS at N=600 / N=150 = {flat:.2f} (target ~1.0)")
    print(f"nako preset: {1 / nako['participants_per_s']:.2f} s per participant per {workers} cores, "
          f"{nako['landing_mb_per_participant']:.1f} MB delivered per participant")
    return dict(cases=rows, projected_1000_fast_s=projected_1000, rss_ratio_600_vs_150=flat)


if __name__ == "__main__":
    run()
