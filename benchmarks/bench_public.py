"""Public models at cohort scale: whole-body NAKO-size scans through each preset's public-shaped nnU-Net folder.

For MRSegmentator, TotalVibeSegmentator and TotalSegmentator ``total_mr``, the folder is the one
``benchmarks/public_models.py`` builds from nnU-Net's own planner for data like the model's training data (its
label table, trainer, configuration; random weights: enough for cost). Fold 0 of each, on this machine's cores;
each measurement in a fresh process, so its peak RSS is its own. The scan: one simulated whole-body participant
(``render_phantom(..., extent="whole-body")``, NAKO resolution, neck to thighs).

* **Region of interest** (the platform's default for a preset): the platform's own model (trained once here with
  the default configuration and cached, as ``segmentation_model`` trains it) finds the back muscles across the
  body, the vertebral-level regressor (``cbp model train-levels``' defaults, cached too) bounds them to T10-S1 along
  it, and the public model runs on the region: locating, the tool's own preprocessing of the whole scan, the
  whole-volume grid's tiles that reach the region, the region's export, the label map placed back on the full grid.
  With random weights the label map is noise that touches every face of the region, so the re-run on the whole
  volume that a real cut would cause is counted (``cut``) but not run: the benchmark measures the region's own cost.
* **Whole volume** (``roi: false``): every step on the whole scan (the tool's preprocessing, nnU-Net's logit
  sliding window streamed along the model grid in about one patch of planes, the export).

Both ways every step runs for real, except that only the first ``CBP_BENCH_PUBLIC_TILES`` (default 3) tiles of a
run go through the network; every later tile gets a fresh output of the same shape, so the accumulation, its memory
and the export run in full, and a path's time is its measured time plus the tiles not run through the network at
the measured seconds per tile (the same network on the same patch size; on 2 cores one full-size tile takes 5-15 s,
a whole-body scan 48-80 tiles). ``CBP_BENCH_PUBLIC_FULL=1`` runs every tile (about an hour per preset on 2 cores).
Peak RSS is measured with the full-size accumulators either way.

Printed per preset: seconds per scan each way and their ratio (target: region at least 4x faster), the tiles each
way, peak RSS each way and its ratio to 4 GiB, scans per hour of a 2-core worker (one fold; the preset's folds
multiply the time), and the GPU figures of ``benchmarks/cuda_nnunet.py --public`` when a GPU run left them in
bench-results/.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path("bench-results")
PRESETS = ("mrsegmentator", "totalvibesegmentator", "total_mr")
TARGET_RATIO = 4.0
TARGET_MB = 4096.0

SCAN = """
import json, resource, sys, time, numpy as np, torch
from pathlib import Path
from cbp_platform.segmentation.backends import load_runner
from cbp_platform.segmentation.registry import platform_levels, platform_model, register
from cbp_platform.segmentation.roi import RoiSegmenter
from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom
folder, preset, reg, models, mode, tiles = sys.argv[1:7]
tiles = int(tiles)
m, _ = register(Path(reg), folder, preset=preset, name=preset + "-" + mode, folds=["0"], roi=mode == "roi")
ph = render_phantom(Subject(False, 55, 178, 84, 8.0, 0.04, (420.0, 410.0, 135.0, 130.0)), PRESETS["nako"],
                    np.random.default_rng(5), extent="whole-body")
water, fat, affine, shape = ph.water, ph.fat, ph.affine, ph.water.shape
del ph
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
runner = load_runner(m, device="cpu")
pred = runner.predictor
count = {"tiles": 0, "run": 0, "tile_s": 0.0, "shape": None}
forward = pred._internal_maybe_mirror_and_predict
def some_tiles(x):
    # the network's forward pass for the first ``tiles`` tiles; every later tile gets a fresh output of the same
    # shape (zeros), so the accumulation, its memory and the export run in full and only the network's time is
    # extrapolated
    count["tiles"] += 1
    if tiles and count["run"] >= tiles:
        return torch.zeros(count["shape"])
    t = time.perf_counter()
    out = forward(x)
    count["run"] += 1
    count["tile_s"] += time.perf_counter() - t
    count["shape"] = out.shape
    return out
pred._internal_maybe_mirror_and_predict = some_tiles
seg = (RoiSegmenter(runner, load_runner(platform_model(Path(models)), device="cpu"),
                    levels=platform_levels(Path(models)), rerun=False) if mode == "roi" else runner)
t = time.perf_counter()
lab = seg.segment(water, fat, affine)
secs = time.perf_counter() - t
per_tile = count["tile_s"] / max(count["run"], 1)
out = dict(preset=preset, mode=mode, seconds_measured=secs, tiles=count["tiles"], tiles_run=count["run"],
           seconds_per_tile=per_tile, seconds=secs + (count["tiles"] - count["run"]) * per_tile,
           shape=list(shape), rss_before_mb=rss0, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           threads=torch.get_num_threads(), patch_mm=list(runner.patch_mm), spacing_mm=list(m.spacing_mm),
           preprocessing=m.options["preprocessing"]["name"], classes=int(runner.lut.size))
if mode == "roi":
    out["roi"] = seg.stats.to_dict()
print(json.dumps(out))
"""


def _run(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, "-c", SCAN, *args], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stdout[-2000:] + res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def platform_models(log=print) -> Path:
    """The platform's own model (the locator), trained once with ``segmentation_model``'s defaults and cached."""
    from cbp_platform.paths import DataLayout

    from cbp_platform.segmentation.registry import platform_levels, train_default_model, train_level_model

    models = (CACHE / "platform-model").resolve()
    pointer = DataLayout.platform_model_pointer(models)
    if not (pointer.is_file() and json.loads(pointer.read_text()).get("name")):
        log("  training the platform's own model (the locator; 900 iterations, cached in "
            "bench-results/platform-model)")
        t = time.perf_counter()
        train_default_model(models, DataLayout.model_registry(models), n_train=120, budget_s=None, seed=1000,
                            max_iterations=900, n_calibration=120, device="cpu")
        log(f"  trained in {time.perf_counter() - t:.0f} s")
    if platform_levels(models) is None:
        log("  training the vertebral-level regressor (cbp model train-levels' defaults, cached there too)")
        t = time.perf_counter()
        train_level_model(models)
        log(f"  trained in {time.perf_counter() - t:.0f} s")
    return models


def public_folder(preset: str) -> Path:
    """The preset's public-shaped folder (benchmarks/public_models.py), built once and cached (fold 0)."""
    out = (CACHE / "public-models").resolve()
    found = sorted((out / preset).glob("*__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth"))
    if found:
        return found[0].parent.parent
    res = subprocess.run([sys.executable, "-m", "benchmarks.public_models", "--preset", preset, "--out", str(out),
                          "--folds", "0"], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stdout[-2000:] + res.stderr[-2000:])
    return Path(json.loads(res.stdout.strip().splitlines()[-1])["folder"])


def gpu_figures() -> dict | None:
    """The newest ``benchmarks/cuda_nnunet.py --public`` results left in bench-results/ by a GPU run, if any."""
    files = sorted(glob.glob(str(CACHE / "cuda-public-*.json")), reverse=True)
    return json.loads(Path(files[0]).read_text()) | {"_file": Path(files[0]).name} if files else None


def run() -> dict:
    import tempfile

    print("\n== public models on whole-body scans (fold 0, CPU) ==")
    full = os.environ.get("CBP_BENCH_PUBLIC_FULL") == "1"
    tiles = "0" if full else os.environ.get("CBP_BENCH_PUBLIC_TILES", "3")
    only = [p for p in os.environ.get("CBP_BENCH_PUBLIC_PRESETS", ",".join(PRESETS)).split(",") if p]
    models = platform_models()
    out = {}
    for preset in only:
        folder = public_folder(preset)
        with tempfile.TemporaryDirectory() as reg:
            roi = _run([str(folder), preset, reg, str(models), "roi", tiles])
            whole = _run([str(folder), preset, reg, str(models), "whole", tiles])
        ratio = whole["seconds"] / roi["seconds"]
        r = roi["roi"]
        print(f"  {preset} ({roi['classes']} classes, preprocessing {roi['preprocessing']}, patch "
              f"{'x'.join(f'{v:.0f}' for v in roi['patch_mm'])} mm, {roi['threads']} threads), scan "
              f"{'x'.join(map(str, roi['shape']))}:")
        how = "all run" if full else f"{roi['tiles_run']} run, the rest at the measured s/tile"
        print(f"    region of interest: {roi['seconds']:.0f} s per scan ({roi['tiles']} tiles, {how}, at "
              f"{roi['seconds_per_tile']:.1f} s; region {100 * (r['median_voxel_share'] or 1):.0f} % of the voxels, "
              f"locating {r['locate_seconds']:.1f} s{' with the vertebral levels' if r['levels_found'] else ''}, "
              f"{r['tiles_run']} of the grid's {r['tiles_whole_volume']} tiles, "
              f"context >= "
              f"{r['min_context_mm']} mm), peak RSS "
              f"{roi['peak_rss_mb']:.0f} MB -> ratio to 4 GiB {roi['peak_rss_mb'] / TARGET_MB:.2f}")
        how = "all run" if full else f"{whole['tiles_run']} run, the rest at the measured s/tile"
        print(f"    whole volume: {whole['seconds']:.0f} s per scan ({whole['tiles']} tiles, {how}), peak RSS "
              f"{whole['peak_rss_mb']:.0f} MB -> ratio to 4 GiB {whole['peak_rss_mb'] / TARGET_MB:.2f}")
        print(f"    region vs whole: {ratio:.1f}x faster (target >= {TARGET_RATIO:.0f}x); a 2-core worker: "
              f"{3600 / roi['seconds']:.1f} scans/h with the region, {3600 / whole['seconds']:.1f} whole")
        out[preset] = {"roi": roi, "whole": whole, "ratio": ratio, "tiles_extrapolated": not full}
    gpu = gpu_figures()
    if gpu is None:
        print("  GPU: no results of benchmarks/cuda_nnunet.py --public in bench-results/ (no GPU lent to this "
              "machine)")
    else:
        print(f"  GPU ({gpu.get('gpu')}, {gpu['_file']}): " + "; ".join(
            f"{p}: {v['seconds_per_scan']:.1f} s/scan, {v['scans_per_hour']:.0f} scans/h"
            for p, v in gpu.get("presets", {}).items()))
    out["gpu"] = gpu
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    run()
