"""Segmentation figures: participants/s for segmentation + metrics at the fast preset, seconds and peak RSS for
one NAKO-size volume (targets: <= 20 s, <= 4 GiB on 2 cores), Dagster overhead as a share of a batch run, and
GPU figures where CUDA is present. Trains (and calibrates) a model with the default configuration first (reported
too); the spread over training seeds is bench_seeds.py's."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path



def _nako_volume(bundle_path: str) -> dict:
    """One NAKO-size volume in a fresh process, so its peak RSS is its own."""
    code = f"""
import json, resource, time, numpy as np, torch
from cbp_platform.segmentation.bundle import load_bundle
from cbp_platform.segmentation.infer import Segmenter
from cbp_platform.metrics.body_composition import muscle_metrics, dice_per_class
from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom
p = PRESETS["nako"]
ph = render_phantom(Subject(False, 55, 178, 84, 8.0, 0.04, (420.0, 410.0, 135.0, 130.0)), p, np.random.default_rng(5))
out = {{}}
for dev in (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])):
    seg = Segmenter(load_bundle({bundle_path!r}), device=dev)
    t = time.perf_counter()
    lab = seg.segment(ph.water, ph.fat, ph.affine)
    m = muscle_metrics(lab, ph.water, ph.fat, p.voxel_ml)
    out[dev] = dict(seconds=time.perf_counter() - t, dice=dice_per_class(lab, ph.labels))
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["voxels"] = int(np.prod(p.shape))
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run() -> dict:
    import dagster as dg

    from orchestration.runner import pipeline_environment, run_pending
    from cbp_platform.synth.delivery import synthesize

    print("\n== segmentation ==")
    root = Path(tempfile.mkdtemp(prefix="cbp-bench-seg-"))
    env = pipeline_environment(root)
    env.__enter__()
    try:
        synthesize(participants=250, deliveries=1, seed=4242, data_root=root)
        inst = dg.DagsterInstance.get()
        s = run_pending(inst, refresh=False, log=lambda *_: None)
        assert not s["failed"], s
        model_run = [r for r in inst.get_runs() if r.job_name == "train_segmentation_model"][0]
        batch_run = [r for r in inst.get_runs() if r.job_name == "process_batch"][0]
        mstats = inst.get_run_stats(model_run.run_id)
        bstats = inst.get_run_stats(batch_run.run_id)
        steps = {st.step_key: st.end_time - st.start_time for st in inst.get_run_step_stats(batch_run.run_id)}
        seg_md = inst.get_latest_materialization_event(dg.AssetKey("muscle_segmentations")).asset_materialization
        ing_md = inst.get_latest_materialization_event(dg.AssetKey("raw_mri_scans")).asset_materialization
        model_md = inst.get_latest_materialization_event(dg.AssetKey("segmentation_model")).asset_materialization
        seg_s = float(seg_md.metadata["seconds"].value)
        run_s = bstats.end_time - bstats.start_time
        compute = seg_s + float(ing_md.metadata["seconds"].value) + steps.get("muscle_metrics", 0.0) + \
            steps.get("participant_covariates", 0.0)
        checks = sum(v for k, v in steps.items() if k not in ("raw_mri_scans", "participant_covariates",
                                                               "muscle_segmentations", "muscle_metrics"))
        overhead = run_s - compute - checks
        seg_metrics_s = seg_s + steps.get("muscle_metrics", 0.0)
        cur = json.loads((root / "models" / "current.json").read_text())
        from cbp_platform.paths import resolve_under
        cur["path"] = str(resolve_under(root / "models", cur["path"]))     # stored relative to models/
        acc = subprocess.run([str(Path(sys.executable).with_name("cbp")), "accuracy", "--data-root", str(root),
                              "--json"], capture_output=True, text=True)
        accuracy = json.loads(acc.stdout) if acc.returncode == 0 else {}
        nako = _nako_volume(cur["path"])
        from benchmarks.bench_qc import measure as qc_figures

        qc = qc_figures(cur["path"])            # QC cost and triage recall, with the model just trained
    finally:
        env.__exit__(None, None, None)
        shutil.rmtree(root, ignore_errors=True)
    fast_rate = 250 / seg_metrics_s
    print(f"model: trained in {float(model_md.metadata['training_seconds'].value):.0f} s "
          f"({int(model_md.metadata['training_iterations'].value)} iterations), run {mstats.end_time - mstats.start_time:.0f} s, "
          f"held-out Dice {json.dumps(cur['validation_dice'])}")
    print(f"fast preset, batch of 250: segmentation + metrics {seg_metrics_s:.1f} s = {fast_rate:.2f} participants/s "
          f"on {os.cpu_count()} cores; whole batch run {run_s:.1f} s (checks {checks:.1f} s, Dagster overhead "
          f"{overhead:.1f} s = {100 * overhead / run_s:.1f} % of the run)")
    cpu = nako["cpu"]
    print(f"nako preset, one volume ({nako['voxels'] / 1e6:.1f} M voxels): {cpu['seconds']:.1f} s on CPU "
          f"(target <= 20 s; ratio {cpu['seconds'] / 20:.2f}), peak RSS {nako['peak_rss_mb']:.0f} MB "
          f"(target <= 4096 MB; ratio {nako['peak_rss_mb'] / 4096:.2f}), Dice {json.dumps({k: round(v, 3) for k, v in cpu['dice'].items()})}")
    if "cuda" in nako:
        print(f"nako preset on CUDA: {nako['cuda']['seconds']:.2f} s")
    else:
        print("no CUDA device here: GPU figures not measured")
    if accuracy:
        print(f"accuracy on the 250 (fast preset): Dice {json.dumps({k: round(v, 3) for k, v in accuracy['dice'].items()})}, "
              f"LMM ICC {accuracy['lmm']['icc']:.3f} bias {accuracy['lmm']['bias']:+.2f} %, "
              f"InterMAT ICC {accuracy['imat']['icc']:.3f} bias {accuracy['imat']['bias']:+.2f} % "
              f"(measured - true = {accuracy['imat']['proportional']['intercept']:+.2f} "
              f"{accuracy['imat']['proportional']['slope']:+.3f} x true, pp)")
    return dict(fast_participants_per_s=fast_rate, batch_run_s=run_s, dagster_overhead_s=overhead, checks_s=checks,
                nako=nako, accuracy=accuracy, validation_dice=cur["validation_dice"], qc=qc)


if __name__ == "__main__":
    run()
