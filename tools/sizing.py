"""Capacity plan for NAKO baseline + follow-up (docs/operator-guide.md, section Sizing), from measured figures.

Inputs, all measured on this code base, none typed in:
* bytes per participant on disk: a simulated NAKO-resolution delivery (1.41 x 1.41 x 3 mm, water + fat, gzip
  NIfTI) written now by ``cbp synth --resolution nako``, plus its label maps (one per participant, uint8 gzip);
* seconds per NAKO-resolution volume (segmentation, CPU, 2 cores) and per-batch figures: the newest
  ``bench-results/bench-*.json`` written by ``make bench``;
* the production warehouse's size and write rate: the newest ``make bench BENCH=warehouse`` results
  (PostgreSQL).

Scaling assumptions (stated in the output): the simulated volume covers the lumbar field of view
(288 x 224 x 96 voxels); a whole-body NAKO Dixon series (several stations stitched) has about ``--wb-factor``
times the voxels. Segmentation time and bytes are scaled by that factor for the whole-body column.

The public models (MRSegmentator, TotalVibeSegmentator, TotalSegmentator ``total_mr``) on whole-body scans, with
and without region-of-interest inference: 2-core CPU-days and GPU-days from the newest ``make bench BENCH=public``
results (fold 0 measured, times the preset's folds) and, for the GPU, ``benchmarks/cuda_nnunet.py --public``
results when a GPU run left them (none: said so, no GPU figure is assumed).

``python tools/sizing.py [--baseline 30868] [--followup 20000] [--gpu-speedup 10]``
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_warehouse import PARTICIPANTS, WRITERS  # noqa: E402
from cbp_platform.paths import DataLayout  # noqa: E402


def measured_bytes_per_participant(n: int = 4) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        layout = DataLayout(Path(tmp))
        subprocess.run([str(Path(sys.executable).with_name("cbp")), "synth", "-n", str(n), "--seed", "77",
                        "--resolution", "nako", "--workers", "1", "--quiet", "--data-root", tmp], check=True,
                       capture_output=True)
        mri = sum(p.stat().st_size for p in layout.landing.rglob("*.nii.gz"))
        labels = sum(p.stat().st_size for p in layout.truth.rglob("*_labels.nii.gz"))
    return {"scans": mri / n, "labels": labels / n}


def latest_bench(section: str = "segmentation", required: bool = True) -> dict | None:
    """The newest ``bench-results/bench-*.json`` that holds ``section`` (``make bench NAME`` writes one section)."""
    for f in sorted(glob.glob(str(ROOT / "bench-results" / "bench-*.json")), reverse=True):
        doc = json.loads(Path(f).read_text())
        if section in doc:
            return doc | {"_file": Path(f).name}
    if required:
        raise SystemExit(f"no bench-results/bench-*.json with {section!r}: run `make bench` first")
    return None


def warehouse_plan(n: int, bench: dict) -> list[str]:
    """The production warehouse (PostgreSQL) at ``n`` participants, from ``make bench BENCH=warehouse``: its size
    (measured at 30,868, scaled by participants: rows are per participant) and the time its batch writes take."""
    wh = bench["warehouse"]
    pg, duck = wh["postgres"], wh["duckdb"]
    n0 = pg["refresh"]["participants"]
    size = pg["refresh"]["warehouse_bytes"] * n / n0
    per_batch = pg["writes"]["concurrent_wall_s"] / WRITERS     # WRITERS batches written at once
    batches = n / PARTICIPANTS
    return [
        f"warehouse (PostgreSQL, measured at {n0:,}: {pg['refresh']['warehouse_bytes'] / 1e6:,.0f} MB; "
        f"DuckDB file {duck['refresh']['warehouse_bytes'] / 1e6:,.0f} MB): about {size / 1e6:,.0f} MB at {n:,}",
        f"warehouse writes: {batches:,.0f} batches of {PARTICIPANTS} at {pg['writes']['concurrent_batches_per_s']:.1f} "
        f"batches/s with {WRITERS} concurrent writers = {batches * per_batch / 60:,.1f} min of write time in total; "
        "cohort refresh "
        f"{pg['refresh']['refresh_wall_s']:.0f} s at {n0:,} ({bench['_file']})",
    ]


def plan(n: int, per: dict, bench: dict, wb: float, gpu_speedup: float, gpus: int, cpu_nodes: int) -> list[tuple]:
    seg = bench["segmentation"]
    s_nako = seg["nako"]["cpu"]["seconds"]
    batch_s_per_participant = seg["batch_run_s"] / 250.0          # bench batch: 250 fast-preset participants
    rows = []
    for label, factor in (("simulated lumbar FOV", 1.0), (f"whole body (x{wb:g} voxels)", wb)):
        cpu_h = n * s_nako * factor / 3600
        gpu_h = cpu_h / gpu_speedup
        tb = n * (per["scans"] + per["labels"]) * factor / 1e12
        wall_gpu_h = gpu_h / gpus
        rows.append((label, f"{cpu_h:,.0f}", f"{gpu_h:,.1f}", f"{wall_gpu_h:,.1f}", f"{tb:,.2f}"))
    ingest_h = n * batch_s_per_participant / 3600 / cpu_nodes
    rows.append(("per-batch CPU work (ingest + metrics + checks, fast preset), wall on "
                 f"{cpu_nodes} CPU nodes", f"{n * batch_s_per_participant / 3600:,.1f}", "-", f"{ingest_h:,.1f}", "-"))
    return rows


def public_plan(n: int, bench: dict) -> list[tuple]:
    """Rows (preset, folds, CPU-days whole volume, CPU-days region, GPU-days whole, GPU-days region) for ``n``
    whole-body scans, from ``make bench BENCH=public`` (``bench['public']``; fold 0 measured on a 2-core worker)
    and its GPU results (``bench['public']['gpu']``, from ``benchmarks/cuda_nnunet.py --public``)."""
    from cbp_platform.segmentation.presets import PRESETS

    pub = bench["public"]
    gpu = (pub.get("gpu") or {}).get("presets", {})
    rows = []
    for preset, r in pub.items():
        if preset == "gpu" or not isinstance(r, dict) or "roi" not in r:
            continue
        folds = len(PRESETS[preset].folds) or 1
        days = lambda s: n * s * folds / 86400  # noqa: E731
        g = gpu.get(preset)
        rows.append((preset, str(folds), f"{days(r['whole']['seconds']):,.0f}", f"{days(r['roi']['seconds']):,.0f}",
                     f"{days(g['whole_volume_seconds']):,.1f}" if g else "not measured",
                     f"{days(g['seconds_per_scan']):,.1f}" if g else "not measured"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=int, default=30868)
    ap.add_argument("--followup", type=int, default=20000)
    ap.add_argument("--wb-factor", type=float, default=6.5,
                    help="whole-body / simulated voxel count (NAKO: ~4 stations of ~320 x 260 x ~120)")
    ap.add_argument("--gpu-speedup", type=float, default=10.0,
                    help="assumed GPU vs 2-core CPU speed-up of segmentation (not measured here: no GPU)")
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--cpu-nodes", type=int, default=8)
    args = ap.parse_args(argv)
    n = args.baseline + args.followup
    print(f"participants: {args.baseline:,} baseline + {args.followup:,} follow-up = {n:,}")
    bench = latest_bench("segmentation", required=False)
    if bench is None:
        print("imaging: no `make bench` results with the segmentation benchmark yet "
              "(make bench BENCH=segmentation)")
    else:
        per = measured_bytes_per_participant()
        seg = bench["segmentation"]["nako"]
        print(f"measured: {per['scans'] / 1e6:.1f} MB scans + {per['labels'] / 1e6:.2f} MB label map per "
              f"participant (simulated NAKO resolution); segmentation {seg['cpu']['seconds']:.2f} s per volume on 2 "
              f"CPU cores, peak RSS {seg['peak_rss_mb']:,.0f} MB ({bench['_file']})")
        print(f"assumed: whole body = x{args.wb_factor:g} voxels; GPU = x{args.gpu_speedup:g} the 2-core CPU; "
              f"{args.gpus} GPUs; {args.cpu_nodes} CPU nodes\n")
        print("| volume | segmentation CPU-hours (2 cores) | GPU-hours | wall hours | storage TB |")
        print("|---|---|---|---|---|")
        for r in plan(n, per, bench, args.wb_factor, args.gpu_speedup, args.gpus, args.cpu_nodes):
            print("| " + " | ".join(r) + " |")
    pub = latest_bench("public", required=False)
    print()
    if pub is None:
        print("public models: no `make bench BENCH=public` results yet")
    else:
        print(f"public models on whole-body scans, {n:,} scans ({pub['_file']}; fold 0 measured on a 2-core worker, "
              "times the preset's folds; the times of a bench run without CBP_BENCH_PUBLIC_FULL=1 are "
              "extrapolated from the tiles it ran at the measured seconds per tile):")
        print("| preset | folds | CPU-days, whole volume | CPU-days, region of interest | GPU-days, whole volume | "
              "GPU-days, region of interest |")
        print("|---|---|---|---|---|---|")
        for r in public_plan(n, pub):
            print("| " + " | ".join(r) + " |")
        if not (pub["public"].get("gpu") or {}).get("presets"):
            print("GPU: no benchmarks/cuda_nnunet.py --public results (no GPU was lent); for scale, MRSegmentator's "
                  "authors publish 23-33 s per scan on an A100 (whole volume), not measured here")
    wh = latest_bench("warehouse", required=False)
    print()
    if wh is None:
        print("warehouse: no `make bench BENCH=warehouse` results yet")
    else:
        for line in warehouse_plan(n, wh):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
