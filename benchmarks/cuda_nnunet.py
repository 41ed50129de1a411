"""The nnunetv2 backend on CUDA: one script, run on a GPU machine whenever one is available.

    python benchmarks/cuda_nnunet.py [--folder MODEL_FOLDER --preset mrsegmentator] [--volumes 8]
    python benchmarks/cuda_nnunet.py --public mrsegmentator,totalvibesegmentator,total_mr [--volumes 8]

``--public``: the measurement of ``make bench`` (``benchmarks/bench_public.py``) on the GPU: each preset's
public-shaped folder (fold 0), whole-body NAKO-size scans written as NIfTI, segmented through the platform's own
batch path (``segment_scans``: DataLoader workers load, locate and preprocess the next scans on the CPU while the
GPU runs the current one) with region-of-interest inference, then one scan on the whole volume. It writes
``bench-results/cuda-public-<time>.json`` (seconds per scan, scans per hour), which ``make bench`` prints. The
locator is the platform's model cached in ``bench-results/platform-model`` (carried from a CPU machine), or trained
here.

Without ``--folder`` it uses the phantom-trained test model (bench-results/nnunet-model, built when missing). It
prints, for NAKO-size phantom volumes (1.41 x 1.41 x 3 mm):

* model load time (once per batch, as ``muscle_segmentations`` does);
* per-volume seconds on CPU (one volume) and CUDA, the speed-up, and the whole-batch throughput of one GPU with
  the model loaded once (volumes per second and per hour; ingest-to-metrics excluded);
* peak GPU memory and peak host RSS;
* agreement of the CUDA and CPU label maps (share of identical voxels).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default=None, help="an nnU-Net v2 model folder (default: the phantom test model)")
    ap.add_argument("--preset", default=None, help="its preset (mrsegmentator, totalvibesegmentator, total_mr)")
    ap.add_argument("--volumes", type=int, default=8, help="volumes in the GPU batch")
    ap.add_argument("--public", default=None, help="presets, comma-separated: whole-body scans through their "
                                                    "public-shaped folders (make bench's measurement)")
    ap.add_argument("--workers", type=int, default=4, help="--public: DataLoader workers preparing scans")
    args = ap.parse_args(argv)
    if args.public:
        return public(args.public.split(","), args.volumes, args.workers)

    import tempfile

    import numpy as np
    import torch

    from benchmarks.bench_nnunet import model_folder
    from cbp_platform.metrics.body_composition import muscle_metrics
    from cbp_platform.segmentation.backends import load_runner, nnunet_phantom as ph
    from cbp_platform.segmentation.registry import register
    from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom

    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine", file=sys.stderr)
        return 2
    folder = Path(args.folder) if args.folder else model_folder()[0]
    reg = Path(tempfile.mkdtemp(prefix="cbp-cuda-bench-"))
    if args.preset:
        m, _ = register(reg, folder, preset=args.preset)
    else:
        m, _ = register(reg, folder, backend="nnunetv2", name="bench-phantom", labels=dict(ph.PLATFORM_OF),
                        inputs=("water", "fat"), orientation=ph.ORIENTATION)
    p = PRESETS["nako"]
    vols = [render_phantom(Subject(i % 2 == 0, 40 + i, 170 + i, 70 + 2 * i, 6.0 + i % 5, 0.04,
                                   (420.0, 410.0, 135.0, 130.0)), p, np.random.default_rng(100 + i))
            for i in range(args.volumes)]
    out = {"model": m.name, "folder": m.folder, "weights_sha256": m.sha256, "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "shape": list(p.shape), "volumes": args.volumes}

    t = time.perf_counter()
    cpu = load_runner(m, device="cpu")
    out["cpu_load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ref = cpu.segment(vols[0].water, vols[0].fat, vols[0].affine)
    out["cpu_seconds_per_volume"] = time.perf_counter() - t
    del cpu

    t = time.perf_counter()
    gpu = load_runner(m, device="cuda")
    torch.cuda.synchronize()
    out["cuda_load_s"] = time.perf_counter() - t
    gpu.segment(vols[0].water, vols[0].fat, vols[0].affine)          # warm-up (cudnn autotuning)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    secs = []
    t_all = time.perf_counter()
    for i, v in enumerate(vols):
        t = time.perf_counter()
        lab = gpu.segment(v.water, v.fat, v.affine)
        muscle_metrics(lab, v.water, v.fat, p.voxel_ml)
        torch.cuda.synchronize()
        secs.append(time.perf_counter() - t)
        if i == 0:
            out["cuda_cpu_identical_voxels"] = float(np.mean(lab == ref))
    batch_s = time.perf_counter() - t_all
    out.update(cuda_seconds_per_volume=sorted(secs)[len(secs) // 2], cuda_seconds_all=secs,
               batch_seconds=batch_s, volumes_per_second=args.volumes / batch_s,
               volumes_per_hour=3600 * args.volumes / batch_s,
               speedup=out["cpu_seconds_per_volume"] / (sorted(secs)[len(secs) // 2]),
               gpu_peak_mb=torch.cuda.max_memory_allocated() / 2**20,
               host_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"model {m.name} ({m.sha256[:12]}) on {out['gpu']}: load {out['cuda_load_s']:.2f} s")
    print(f"per NAKO volume {out['shape']}: CPU {out['cpu_seconds_per_volume']:.1f} s, CUDA "
          f"{out['cuda_seconds_per_volume']:.2f} s (x{out['speedup']:.1f})")
    print(f"batch of {args.volumes} with the model loaded once: {batch_s:.1f} s, {out['volumes_per_second']:.2f} "
          f"volumes/s ({out['volumes_per_hour']:.0f}/h)")
    print(f"GPU peak {out['gpu_peak_mb']:.0f} MB, host peak RSS {out['host_peak_rss_mb']:.0f} MB; CUDA vs CPU "
          f"label maps {100 * out['cuda_cpu_identical_voxels']:.3f} % identical voxels")
    print(json.dumps(out))
    return 0


def public(presets: list[str], n: int, workers: int) -> int:
    """Whole-body scans through each preset's public-shaped folder on the GPU, region of interest and whole volume;
    writes bench-results/cuda-public-<time>.json."""
    import tempfile

    import nibabel as nib
    import numpy as np
    import torch

    from benchmarks.bench_public import platform_models, public_folder
    from cbp_platform.paths import DataLayout
    from cbp_platform.segmentation.backends import load_runner
    from cbp_platform.segmentation.pipeline import segment_scans
    from cbp_platform.segmentation.registry import platform_levels, platform_model, register
    from cbp_platform.segmentation.roi import RoiSegmenter
    from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom

    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="cbp-cuda-public-"))
    items = []
    for i in range(n):
        ph = render_phantom(Subject(i % 2 == 0, 40 + i, 170 + i, 70 + 2 * i, 6.0 + i % 5, 0.04,
                                    (420.0, 410.0, 135.0, 130.0)), PRESETS["nako"], np.random.default_rng(100 + i),
                            extent="whole-body")
        item = {"pseudonym": f"scan{i:03d}"}
        for c in ("water", "fat"):
            path = tmp / f"scan{i:03d}_{c}.nii.gz"
            nib.save(nib.Nifti1Image(getattr(ph, c), ph.affine), path)
            item[c] = str(path)
        items.append(item)
    models = platform_models()
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "scans": n, "workers": workers,
           "shape": list(ph.water.shape), "presets": {}}
    locator = load_runner(platform_model(models), device="cuda")
    levels = platform_levels(models)
    for preset in presets:
        m, _ = register(DataLayout.model_registry(tmp), public_folder(preset), preset=preset, folds=["0"], roi=True)
        runner = load_runner(m, device="cuda")
        seg = RoiSegmenter(runner, locator, levels=levels)
        segment_scans(items[:1], seg, tmp / "warm")                          # warm-up: cuDNN autotuning
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        segment_scans(items, RoiSegmenter(runner, locator, levels=levels), tmp / preset, num_workers=workers)
        torch.cuda.synchronize()
        batch_s = time.perf_counter() - t
        t = time.perf_counter()
        lab = runner.segment(*(np.asarray(nib.load(items[0][c]).dataobj) for c in ("water", "fat")),
                             nib.load(items[0]["water"]).affine)
        torch.cuda.synchronize()
        whole_s = time.perf_counter() - t
        out["presets"][preset] = {"seconds_per_scan": batch_s / n, "scans_per_hour": 3600 * n / batch_s,
                                  "whole_volume_seconds": whole_s, "gpu_peak_mb": torch.cuda.max_memory_allocated()
                                  / 2**20, "labels_found": sorted(int(v) for v in np.unique(lab))}
        print(f"{preset}: {batch_s / n:.1f} s/scan with the region ({3600 * n / batch_s:.0f} scans/h, {workers} "
              f"workers preparing), whole volume {whole_s:.1f} s; target <= 11 s/scan (one fold)")
        del runner, seg
        torch.cuda.empty_cache()
    out["host_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dest = Path("bench-results") / f"cuda-public-{time.strftime('%Y%m%dT%H%M%S')}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
