"""Segmentation QC figures: the cost of a QC image and its features against the segmentation itself (fast
preset and one NAKO-size volume), and the triage score's recall of injected failures against the share of the
cohort reviewed (target: the top 2 % hold >= 90 % of the failures). Needs a trained model: bench_segmentation
passes the one it trains; standalone: ``python benchmarks/bench_qc.py BUNDLE_FOLDER``."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

N_CLEAN = 400
FAILURES_PER_KIND = 10
SEED = 9090


def _cost(seg, scans: list[dict], out: Path) -> dict:
    from cbp_platform.qc.pipeline import ScanQC

    qc = ScanQC(out)
    seg_s = qc_s = 0.0
    for i, s in enumerate(scans):
        t = time.perf_counter()
        labels, unc = seg.predict_qc(seg.prepare(s["water"], s["fat"], s["affine"]))
        seg_s += time.perf_counter() - t
        t = time.perf_counter()
        qc(f"P{i:05d}", labels, s["water"], s["fat"], s["affine"], unc)
        qc_s += time.perf_counter() - t
    n = len(scans)
    return {"n": n, "segmentation_s": seg_s / n, "qc_s": qc_s / n, "ratio": qc_s / seg_s}


def measure(bundle_path: str) -> dict:
    import numpy as np
    import torch

    from cbp_platform.qc.evaluate import FAILURE_KINDS, evaluate_triage
    from cbp_platform.segmentation.bundle import load_bundle
    from cbp_platform.segmentation.infer import Segmenter
    from cbp_platform.segmentation.train import simulated_set
    from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom

    print("\n== segmentation QC ==")
    seg = Segmenter(load_bundle(bundle_path), device="cpu")
    with tempfile.TemporaryDirectory(prefix="cbp-bench-qc-") as tmp:
        fast = _cost(seg, simulated_set(20, SEED + 1), Path(tmp))
        ph = render_phantom(Subject(False, 55, 178, 84, 8.0, 0.04, (420.0, 410.0, 135.0, 130.0)), PRESETS["nako"],
                            np.random.default_rng(5))
        nako = _cost(seg, [{"water": ph.water, "fat": ph.fat, "affine": ph.affine}], Path(tmp))
    print(f"QC image + features, fast preset: {1000 * fast['qc_s']:.0f} ms per scan against "
          f"{1000 * fast['segmentation_s']:.0f} ms of segmentation (ratio {fast['ratio']:.3f}; "
          f"{torch.get_num_threads()} threads)")
    print(f"QC image + features, one NAKO-size volume: {nako['qc_s']:.2f} s against {nako['segmentation_s']:.2f} s "
          f"of segmentation (ratio {nako['ratio']:.3f})")

    scans = simulated_set(N_CLEAN + FAILURES_PER_KIND * len(FAILURE_KINDS), SEED)
    t = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.perf_counter() - last[0] > 30 or done == total:
            last[0] = time.perf_counter()
            print(f"  triage evaluation: {done}/{total} scans segmented and measured", flush=True)

    res = evaluate_triage(seg, scans, FAILURES_PER_KIND, seed=SEED, progress=progress)
    seconds = time.perf_counter() - t
    print(f"triage on {N_CLEAN} clean + {FAILURES_PER_KIND} x {len(FAILURE_KINDS)} injected failures "
          f"({', '.join(FAILURE_KINDS)}), one batch, {seconds:.0f} s:")
    print("  review fraction (1 % of maps failed) | score threshold | failures found | recall")
    for r in res["recall"]:
        print(f"  {100 * r['review_fraction']:>14.0f} % | {r['score_threshold']:>15.2f} | "
              f"{r['found']:>7d} / {r['failures']:<6d} | {r['recall']:.2f}")
    at2 = next(r for r in res["recall"] if r["review_fraction"] == 0.02)
    print(f"  target: recall >= 0.90 at 2 % -> {at2['recall']:.2f} (ratio {at2['recall'] / 0.90:.2f}); by kind at "
          f"2 %: " + ", ".join(f"{k} {v:.2f}" for k, v in res["by_kind"].items()))
    low = res["frame"].filter("failed").sort("triage_score").head(3)
    print("  the three failures with the lowest scores: " + "; ".join(
        f"{r['kind']} ({r['severity']}) score {r['triage_score']:.1f}" for r in low.iter_rows(named=True)))
    return {"cost_fast": fast, "cost_nako": nako, "recall": res["recall"], "recall_by_kind_2pct": res["by_kind"],
            "n_clean": N_CLEAN, "failures_per_kind": FAILURES_PER_KIND, "seconds": seconds}


if __name__ == "__main__":
    measure(sys.argv[1])
