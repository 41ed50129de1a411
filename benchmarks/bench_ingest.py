"""Ingestion figures: time per batch of 250 through Dagster, Dagster's overhead per run, the fat-water swap
detector against the simulator's truth, sensor tick time with thousands of deliveries on disk, DICOM
conversion + stitching time and peak RSS per NAKO-size participant, and the peak RSS of parsing a covariates.csv
just under its size limit (valid rows, then a tail of NUL bytes)."""

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cbp_platform.ingest.covariates import MAX_COVARIATES_BYTES
from cbp_platform.paths import DataLayout

MAX_COVARIATES_MIB = MAX_COVARIATES_BYTES >> 20


def _batch_run(n: int, preset: str) -> dict:
    import dagster as dg

    from orchestration.runner import pipeline_environment, run_pending
    from cbp_platform.synth.delivery import synthesize

    root = Path(tempfile.mkdtemp(prefix="cbp-bench-ingest-"))
    env = pipeline_environment(root)
    env.__enter__()
    try:
        synthesize(participants=n, deliveries=1, seed=77, data_root=root, resolution=preset)
        inst = dg.DagsterInstance.get()
        # warm-up on a throwaway batch so one-off imports (GX) are not charged to the measured run
        t = time.perf_counter()
        s = run_pending(inst, refresh=False, log=lambda *_: None, job_name="ingest_batch")
        wall = time.perf_counter() - t
        assert not s["failed"], s
        run = inst.get_runs(limit=1)[0]
        stats = inst.get_run_stats(run.run_id)
        steps = inst.get_run_step_stats(run.run_id)
        step_s = {st.step_key: (st.end_time - st.start_time) for st in steps}
        mat = inst.get_latest_materialization_event(dg.AssetKey("raw_mri_scans")).asset_materialization
        asset_compute = float(mat.metadata["seconds"].value)
        run_s = stats.end_time - stats.start_time
        return dict(participants=n, preset=preset, run_seconds=run_s, wall_seconds=wall, steps=step_s,
                    scan_compute_seconds=asset_compute)
    finally:
        env.__exit__(None, None, None)
        shutil.rmtree(root, ignore_errors=True)


def _swap_figures(n_normal: int = 400, n_swapped: int = 200) -> dict:
    from cbp_platform.imaging.qc import fat_water_swap
    from cbp_platform.synth.cohort import simulate_cohort
    from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom

    preset = PRESETS["fast"]
    rows = simulate_cohort(n_normal + n_swapped, 99).to_dicts()
    tp = fn = fp = tn = 0
    t_qc = 0.0
    for i, r in enumerate(rows):
        kind = "none" if i < n_normal else ("full" if i % 10 < 7 else "slab")   # 70 % full, 30 % one station
        lean, ps = r["lean_volume_target_cm3"], r["psoas_share"]
        s = Subject(female=r["sex"] == "F", age=float(r["age"]), height_cm=r["height_cm"], weight_kg=r["weight_kg"],
                    imat_pct=r["imat_true"], mfi=r["mfi_true"],
                    lean_ml=(lean * (1 - ps) / 2, lean * (1 - ps) / 2, lean * ps / 2, lean * ps / 2), swap=kind)
        ph = render_phantom(s, preset, np.random.default_rng([99, i]))
        t = time.perf_counter()
        flag = fat_water_swap(ph.water, ph.fat, preset.spacing).suspected
        t_qc += time.perf_counter() - t
        if kind == "none":
            fp += flag
            tn += not flag
        else:
            tp += flag
            fn += not flag
    return dict(normal=n_normal, swapped=n_swapped, detected=tp, missed=fn, false_alarms=fp,
                detection_rate=tp / n_swapped, false_alarm_rate=fp / n_normal, qc_ms_per_scan=1000 * t_qc / len(rows))


def _sensor_ticks(n_deliveries: int = 3000) -> dict:
    import dagster as dg

    from assets.sensors import delivery_sensor
    from resources import DataRootResource

    root = Path(tempfile.mkdtemp(prefix="cbp-bench-sensor-"))
    try:
        land = DataLayout(root).landing
        for i in range(n_deliveries):
            d = land / f"dl{i:05d}"
            d.mkdir(parents=True)
            (d / "manifest.json").write_text(json.dumps({
                "schema_version": "1.0", "delivery_id": d.name, "created_at": "2020-01-01T00:00:00Z",
                "participants": [], "files": []}))
            (d / "_SUCCESS").write_text("")
        dr = DataRootResource(root=str(root))
        with dg.instance_for_test() as inst:
            t = time.perf_counter()
            with dg.build_sensor_context(instance=inst, resources={"data_root": dr}) as ctx:
                r1 = delivery_sensor(ctx)
            first = time.perf_counter() - t
            t = time.perf_counter()
            with dg.build_sensor_context(instance=inst, cursor=r1.cursor, resources={"data_root": dr}) as ctx:
                delivery_sensor(ctx)
            steady = time.perf_counter() - t
        return dict(deliveries=n_deliveries, first_tick_s=first, steady_tick_s=steady,
                    cursor_kb=len(r1.cursor) / 1024)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# peak RSS from /proc/self/status (VmHWM: this process image's own high-water mark; getrusage's ru_maxrss would
# carry the forking parent's peak across exec on Linux)
_WORKER = """
import json, sys, time
from pathlib import Path
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
from cbp_platform.ingest.batch import ingest_scans
from cbp_platform.ingest.deliveries import Batch, load_manifest
d = Path(sys.argv[1])
man = load_manifest(d)
base = hwm()
b = Batch(d.name + ".b001", d.name, 1, sorted(man["participants"]))
layout = None
if len(sys.argv) > 2:
    from cbp_platform.paths import DataLayout
    layout = DataLayout(Path(sys.argv[2]))
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
t = time.perf_counter()
facts, q = ingest_scans(b, d, man, duplicates={}, threads=threads, layout=layout)
print(json.dumps({"seconds": time.perf_counter() - t, "valid": len(facts), "reasons": sorted({x["reason"] for x in q}),
                  "rss_mb": hwm(), "base_mb": base}))
"""


def _worker_rss(delivery: Path, derived_root: Path | None = None, threads: int = 2) -> dict:
    """Peak RSS of a fresh ingest worker (2 threads, the memory budget) validating every scan of ``delivery``
    (a DICOM delivery converts and stitches under ``derived_root``)."""
    import subprocess
    import sys

    extra = [str(derived_root), str(threads)] if derived_root is not None else []
    out = subprocess.run([sys.executable, "-c", _WORKER, str(delivery), *extra], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _relist(d: Path, rel: str) -> None:
    from cbp_platform.imaging.nifti import sha256_file

    man = json.loads((d / "manifest.json").read_text())
    e = next(f for f in man["files"] if f["path"] == rel)
    e.update(size=(d / rel).stat().st_size, sha256=sha256_file(d / rel))
    (d / "manifest.json").write_text(json.dumps(man, indent=1))


def _ingest_memory(bomb_gib: int = 4) -> dict:
    """Peak RSS of one ingest worker: NAKO-size scans, gzip bombs, and images at the largest accepted size."""
    import gzip
    import os
    import zlib

    import numpy as np

    from cbp_platform.imaging.nifti import nifti_bytes
    from cbp_platform.ingest.scans import RULES
    from cbp_platform.synth.delivery import synthesize

    root = Path(tempfile.mkdtemp(prefix="cbp-bench-ingest-mem-"))
    try:
        synthesize(participants=8, deliveries=1, seed=78, data_root=root / "src", resolution="nako", workers=2)
        (src,) = list(DataLayout(root / "src").landing.iterdir())
        out = {"nako": _worker_rss(src)}
        # gzip bombs: two participants' water = a valid NAKO image followed by GiBs of zeros (a few MB on disk)
        bomb = root / "bomb" / src.name
        shutil.copytree(src, bomb)
        for p in sorted(os.listdir(bomb / "mri"))[:2]:
            rel = f"mri/{p}/{p}_water.nii.gz"
            path = bomb / rel
            path.chmod(0o644)
            image = gzip.decompress(path.read_bytes())
            c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            zeros = bytes(64 << 20)
            with open(path, "wb") as fh:
                fh.write(c.compress(image))
                for _ in range(bomb_gib * 16):
                    fh.write(c.compress(zeros))
                fh.write(c.flush())
            (bomb / "manifest.json").chmod(0o644)
            _relist(bomb, rel)
        out["bomb"] = _worker_rss(bomb)
        out["bomb"]["file_mb"] = path.stat().st_size / 1e6
        out["bomb"]["declared_gib"] = bomb_gib
        # the largest accepted image: water and fat of two participants at RULES.max_image_bytes each
        big = root / "big" / src.name
        shutil.copytree(src, big)
        nz = RULES.max_image_bytes // (512 * 512 * 2)
        i, j, k = np.meshgrid(np.arange(512, dtype=np.int16), np.arange(512, dtype=np.int16),
                              np.arange(nz, dtype=np.int16), indexing="ij")
        vol = (100 + (i + 2 * j + 3 * k) % 400).astype(np.int16)
        del i, j, k
        ps = sorted(os.listdir(big / "mri"))[:2]
        (big / "manifest.json").chmod(0o644)
        for n, (p, ch) in enumerate((p, ch) for p in ps for ch in ("water", "fat")):
            vol[0, 0, 0] = 100 + n            # four different files: one image under two pseudonyms is refused
            rel = f"mri/{p}/{p}_{ch}.nii.gz"
            (big / rel).chmod(0o644)
            (big / rel).write_bytes(nifti_bytes(vol, np.diag([1.0, 1.0, 2.0, 1.0])))
            _relist(big, rel)
        out["largest"] = _worker_rss(big)
        out["largest"]["image_mib"] = vol.nbytes / 2**20
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


# covariates.csv parsed by a fresh interpreter (verified against its manifest entry, then parsed, as the asset does):
# its own peak (VmHWM) and, from a small wrapper process around it, getrusage(RUSAGE_CHILDREN).ru_maxrss (a child's
# ru_maxrss carries the peak of the process that spawned it across exec, so the spawner is kept small)
_COV_WORKER = """
import json, sys, time
from pathlib import Path
from cbp_platform.ingest.covariates import parse_covariates
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
p, ps, entry = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()), json.loads(sys.argv[3])
base = hwm()
t = time.perf_counter()
res = parse_covariates(p, ps, delivery_dir=p.parent, entry=entry, verify=True, label="bench")
print(json.dumps({"seconds": time.perf_counter() - t, "valid": res.rows.height,
                  "reasons": sorted({q["reason"] for q in res.quarantine}), "rss_mb": hwm(), "base_mb": base}))
"""
_COV_WRAPPER = """
import json, resource, subprocess, sys
out = subprocess.run([sys.executable, "-c", *sys.argv[1:]], capture_output=True, text=True, check=True)
r = json.loads(out.stdout.strip().splitlines()[-1])
r["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(r))
"""


def _covariates_memory(size_mib: int = 255, rows: int = 1000) -> dict:
    """Peak RSS and seconds of parsing a ``size_mib`` MiB covariates.csv: ``rows`` valid rows, then NUL bytes (a
    sparse file), checked against its manifest entry first (the streamed sha256 pass) as the asset does."""
    import random
    import subprocess
    import sys

    from cbp_platform.imaging.nifti import sha256_file
    from cbp_platform.landing import COVARIATE_COLUMNS, PSEUDONYM_ALPHABET

    root = Path(tempfile.mkdtemp(prefix="cbp-bench-covariates-"))
    try:
        rng = random.Random(26)
        ps = sorted({"".join(rng.choices(PSEUDONYM_ALPHABET, k=10)) for _ in range(rows)})
        row = "{},Berlin,2016-03-04,45,F,168.0,64.5,1,5,1200,0,0,0,1"
        lines = [",".join(COVARIATE_COLUMNS)] + [row.format(p) for p in ps]
        path = root / "covariates.csv"
        path.write_text("\n".join(lines) + "\n")
        with open(path, "r+b") as fh:
            fh.truncate(size_mib << 20)
        entry = {"path": path.name, "size": size_mib << 20, "sha256": sha256_file(path)}
        (root / "participants.json").write_text(json.dumps(ps))
        out = subprocess.run([sys.executable, "-c", _COV_WRAPPER, _COV_WORKER, str(path),
                              str(root / "participants.json"), json.dumps(entry)],
                             capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update(file_mib=size_mib, rows=len(ps))
        return r
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _dicom_figures(n: int = 8) -> dict:
    """DICOM deliveries at NAKO size (4 contrasts x 4 stations of 288 x 224 x 30 slices): conversion + stitching
    per participant with one thread and with the worker's two, peak RSS, and a zip declaring 4 GiB."""
    import io
    import zipfile

    from cbp_platform.imaging.nifti import sha256_file
    from cbp_platform.synth.delivery import synthesize

    root = Path(tempfile.mkdtemp(prefix="cbp-bench-dicom-"))
    try:
        t = time.perf_counter()
        synthesize(participants=n, deliveries=1, seed=79, data_root=root, resolution="nako", workers=2,
                   scan_format="dicom", in_opp=True)
        synth_s = time.perf_counter() - t
        (src,) = list(DataLayout(root).landing.iterdir())
        zips = sorted((src / "dicom").rglob("*.zip"))
        out = {"participants": n, "synth_seconds": synth_s, "zip_mb": sum(z.stat().st_size for z in zips) / 1e6 / n,
               "dicom_files": sum(len(zipfile.ZipFile(z).namelist()) for z in zips) // n}
        out["one_thread"] = _worker_rss(src, root / "d1", threads=1)
        out["two_threads"] = _worker_rss(src, root / "d2", threads=2)
        # a zip declaring a 4 GiB member (zeros, 4 MB on disk) in place of one participant's water zip
        bomb = root / "bomb" / src.name
        shutil.copytree(src, bomb)
        victim = zips[0].relative_to(src)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("IM0001.dcm", "w", force_zip64=True) as fh:
            for _ in range(64):
                fh.write(bytes(64 << 20))
        (bomb / victim).chmod(0o644)
        (bomb / victim).write_bytes(buf.getvalue())
        (bomb / "manifest.json").chmod(0o644)
        man = json.loads((bomb / "manifest.json").read_text())
        e = next(f for f in man["files"] if f["path"] == str(victim))
        e.update(size=(bomb / victim).stat().st_size, sha256=sha256_file(bomb / victim))
        (bomb / "manifest.json").write_text(json.dumps(man, indent=1))
        out["bomb"] = _worker_rss(bomb, root / "d3", threads=2)
        out["bomb"]["file_mb"] = (bomb / victim).stat().st_size / 1e6
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run() -> dict:
    print("\n== ingestion ==")
    small = _batch_run(20, "fast")      # warm-up sized run: Dagster's fixed cost dominates
    b250 = _batch_run(250, "fast")
    nako = _batch_run(8, "nako")
    for r in (small, b250, nako):
        overhead = r["run_seconds"] - r["scan_compute_seconds"] - r["steps"].get("participant_covariates", 0)
        checks = sum(v for k, v in r["steps"].items() if k not in ("raw_mri_scans", "participant_covariates"))
        r["checks_seconds"] = checks
        r["dagster_overhead_seconds"] = overhead - checks
        print(f"{r['preset']:5} batch of {r['participants']:3d}: sensor + run {r['wall_seconds']:5.1f} s, run {r['run_seconds']:6.1f} s "
              f"(scan validation {r['scan_compute_seconds']:.1f} s = "
              f"{r['participants'] / max(r['scan_compute_seconds'], 1e-9):.1f} participants/s, "
              f"covariates {r['steps'].get('participant_covariates', 0):.1f} s, checks {checks:.1f} s, "
              f"Dagster overhead {r['dagster_overhead_seconds']:.1f} s = "
              f"{100 * r['dagster_overhead_seconds'] / r['run_seconds']:.0f} % of the run)")
    sw = _swap_figures()
    print(f"fat-water swap detector on {sw['normal']} normal + {sw['swapped']} swapped phantoms (70 % full, 30 % "
          f"one station): detected {sw['detected']}/{sw['swapped']} = {100 * sw['detection_rate']:.1f} % "
          f"(target >= 95 %), false alarms {sw['false_alarms']}/{sw['normal']} = "
          f"{100 * sw['false_alarm_rate']:.2f} % (target <= 1 %), {sw['qc_ms_per_scan']:.0f} ms/scan")
    tick = _sensor_ticks()
    print(f"delivery_sensor with {tick['deliveries']} deliveries on disk: first tick (registers all) "
          f"{tick['first_tick_s']:.2f} s, steady tick {tick['steady_tick_s']:.3f} s, cursor {tick['cursor_kb']:.0f} KiB")
    mem = _ingest_memory()
    limit = 1024
    for name, what in (("nako", "8 NAKO-size participants"),
                       ("bomb", f"8 NAKO-size participants, 2 of them gzip bombs ({mem['bomb']['declared_gib']} GiB "
                                f"of zeros after the image, {mem['bomb']['file_mb']:.1f} MB on disk)"),
                       ("largest", f"8 participants, 2 with water and fat at the largest accepted size "
                                   f"({mem['largest']['image_mib']:.0f} MiB each)")):
        r = mem[name]
        print(f"ingest worker peak RSS, {what}: {r['rss_mb']:.0f} MiB (imports alone {r['base_mb']:.0f} MiB; "
              f"target < {limit} MiB, ratio {r['rss_mb'] / limit:.2f}), {r['seconds']:.1f} s, {r['valid']} valid, "
              f"reasons {r['reasons'] or 'none'}")
    cm = _covariates_memory()
    print(f"covariates.csv of {cm['file_mib']} MiB ({cm['rows']} valid rows, then NUL bytes; limit "
          f"{MAX_COVARIATES_MIB} MiB): peak RSS {cm['ru_maxrss_mb']:.0f} MiB (imports alone {cm['base_mb']:.0f} MiB; "
          f"target < {limit} MiB, ratio {cm['ru_maxrss_mb'] / limit:.2f}), {cm['seconds']:.2f} s (sha256 pass + "
          f"parse), {cm['valid']} valid, reasons {cm['reasons'] or 'none'}")
    dc = _dicom_figures()
    seg_target = 20.0          # the segmentation target per NAKO volume on CPU (bench_segmentation)
    one, two = dc["one_thread"], dc["two_threads"]
    per = one["seconds"] / dc["participants"]
    print(f"DICOM, {dc['participants']} NAKO-size participants ({dc['dicom_files']} DICOM files, {dc['zip_mb']:.0f} MB "
          f"of zips each; 4 contrasts x 4 stations): conversion + stitching {per:.2f} s per participant on one thread "
          f"(ratio to the 20 s CPU segmentation target {per / seg_target:.3f}), "
          f"{two['seconds'] / dc['participants']:.2f} s per participant with the worker's 2 threads; peak RSS "
          f"{one['rss_mb']:.0f} MiB (1 thread), {two['rss_mb']:.0f} MiB (2 threads; target < {limit} MiB, ratio "
          f"{two['rss_mb'] / limit:.2f}); {two['valid']} valid; simulating them took {dc['synth_seconds']:.1f} s")
    b = dc["bomb"]
    print(f"DICOM zip declaring 4 GiB ({b['file_mb']:.1f} MB on disk) in place of one zip: refused "
          f"{b['reasons']}, peak RSS {b['rss_mb']:.0f} MiB, {b['valid']} valid, {b['seconds']:.1f} s")
    return dict(batch_small=small, batch_250=b250, batch_nako=nako, swap_detector=sw, sensor=tick, memory=mem,
                covariates_memory=cm, dicom=dc)


if __name__ == "__main__":
    run()
