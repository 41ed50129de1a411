"""The nnunetv2 backend on the CPU: per-volume seconds and peak RSS at NAKO resolution, with the test model.

Builds the small phantom-trained nnU-Net v2 model once (``nnunet_phantom``; cached in bench-results/nnunet-model,
its build time reported), registers it, and in a fresh process (so the peak RSS is the volume's own) loads it once
and segments NAKO-size phantom volumes (1.41 x 1.41 x 3 mm). The public models are larger networks at finer
spacing, so these are the backend's own costs (nnU-Net preprocessing, resampling both ways, sliding window,
label mapping, the platform's reorientation), not a public model's; ``benchmarks/cuda_nnunet.py`` measures the CUDA
path, with any model folder.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path("bench-results") / "nnunet-model"
NAKO_TARGET_S = 20.0          # the platform's per-volume target on 2 cores (bench_segmentation.py)
NAKO_TARGET_MB = 4096.0


def model_folder(log=print) -> tuple[Path, float | None]:
    """The cached phantom model folder, built when missing; (folder, build seconds or None when cached)."""
    from cbp_platform.segmentation.backends import nnunet_phantom as ph

    folder = CACHE / "results" / f"Dataset{ph.DATASET_ID:03d}_{ph.DATASET.split('_', 1)[1]}" / ph.TRAINER_FOLDER
    if (folder / "fold_0" / "checkpoint_final.pth").exists():
        return folder, None
    log("  building the phantom nnU-Net model (nnU-Net planning, preprocessing, nnUNetTrainer; minutes)")
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "cbp_platform.segmentation.backends.nnunet_phantom", "--out",
                          str(CACHE / "results")], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
    return Path(json.loads(out.stdout.strip().splitlines()[-1])["folder"]), time.perf_counter() - t


VOLUME = """
import json, resource, sys, time, numpy as np, torch
from pathlib import Path
from cbp_platform.segmentation.backends import load_runner, nnunet_phantom as ph
from cbp_platform.segmentation.registry import register
from cbp_platform.metrics.body_composition import muscle_metrics
from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom
folder, reg, n, device = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
m, _ = register(reg, folder, backend="nnunetv2", name="bench-phantom", labels=dict(ph.PLATFORM_OF),
                inputs=("water", "fat"), orientation=ph.ORIENTATION)
p = PRESETS["nako"]
vols = [render_phantom(Subject(False, 55, 178, 84, 8.0, 0.04, (420.0, 410.0, 135.0, 130.0)), p,
                       np.random.default_rng(5 + i)) for i in range(n)]
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
runner = load_runner(m, device=device)
load_s = time.perf_counter() - t
if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
secs = []
for ph_ in vols:
    t = time.perf_counter()
    lab = runner.segment(ph_.water, ph_.fat, ph_.affine)
    muscle_metrics(lab, ph_.water, ph_.fat, p.voxel_ml)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    secs.append(time.perf_counter() - t)
out = dict(device=str(runner.device), load_s=load_s, seconds=secs, voxels=int(np.prod(p.shape)),
           shape=list(p.shape), rss_before_mb=rss0, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           model_spacing=list(m.spacing_mm), threads=torch.get_num_threads(),
           labels_found=sorted(int(v) for v in np.unique(lab)),
           timm_imported="timm" in sys.modules, torchvision_imported="torchvision" in sys.modules)
if device.startswith("cuda"):
    out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["gpu"] = torch.cuda.get_device_name()
print(json.dumps(out))
"""


def volume_figures(folder: Path, n: int, device: str, registry: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", VOLUME, str(folder), str(registry), str(n), device],
                         capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stdout[-2000:] + res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def run() -> dict:
    import tempfile

    print("\n== nnunet (nnunetv2 backend, CPU) ==")
    folder, build_s = model_folder()
    with tempfile.TemporaryDirectory() as reg:
        r = volume_figures(folder, int(os.environ.get("CBP_BENCH_NNUNET_VOLUMES", "3")), "cpu", Path(reg))
    per = sorted(r["seconds"])[len(r["seconds"]) // 2]
    if build_s is not None:
        print(f"  test model built in {build_s:.0f} s (nnU-Net fingerprint, planning, preprocessing, training)")
    print(f"  model: {folder} (spacing {r['model_spacing']} mm), loaded in {r['load_s']:.2f} s, "
          f"{r['threads']} torch threads")
    print(f"  NAKO-size volume {r['shape']} ({r['voxels'] / 1e6:.1f} M voxels): median {per:.1f} s per volume "
          f"(all: {', '.join(f'{s:.1f}' for s in r['seconds'])}) incl. metrics; target <= {NAKO_TARGET_S:.0f} s "
          f"-> ratio {per / NAKO_TARGET_S:.2f}")
    print(f"  peak RSS {r['peak_rss_mb']:.0f} MB (volumes rendered: {r['rss_before_mb']:.0f} MB); target <= "
          f"{NAKO_TARGET_MB:.0f} MB -> ratio {r['peak_rss_mb'] / NAKO_TARGET_MB:.2f}")
    print(f"  timm imported: {r['timm_imported']}, torchvision imported: {r['torchvision_imported']}")
    return {**r, "median_seconds": per, "build_seconds": build_s, "folder": str(folder)}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    run()
