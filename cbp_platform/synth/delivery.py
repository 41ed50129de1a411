"""``cbp synth``: write a simulated NAKO-like cohort as deliveries into the landing zone, truth beside it.

The cohort table is drawn first (:mod:`cbp_platform.synth.cohort`), participants are ordered by examination
date and cut into ``K`` deliveries, and then every participant's images are rendered and written by a pool of
worker processes, one participant at a time, so memory does not grow with ``N``. Each participant's random
stream is seeded from ``(seed, participant index)``, so the output is identical whatever the number of
workers, and gzip members carry no timestamp, so identical arrays give identical files and checksums.

A delivery is never half-written: the delivery folders must not exist beforehand, ``_SUCCESS`` is written
last, and if anything fails the folders this run created are removed again.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import polars as pl

from cbp_platform import __version__
from cbp_platform.imaging.nifti import atomic_write_bytes, nifti_bytes, sha256_bytes
from cbp_platform.landing import (COVARIATE_COLUMNS, COVARIATES_NAME, DELIVERY_ID_RE, DELIVERY_ID_RULE,
                                  MANIFEST_NAME, PSEUDONYM_ALPHABET, PSEUDONYM_LENGTH, SCAN_FORMATS, SCHEMA_VERSION,
                                  SITES, SUCCESS_MARKER, dicom_relpath, scan_relpath)
from cbp_platform.paths import DataLayout
from cbp_platform.progress import bar
from cbp_platform.synth import faults as F
from cbp_platform.synth.cohort import CohortParameters, beta_2sd, simulate_cohort, site_effects
from cbp_platform.synth.phantom import EXTENTS, LABELS, PRESETS, Subject, render_phantom, whole_body_slices


class SynthError(ValueError):
    """Impossible arguments or an unusable data root (the CLI prints the message and exits 2)."""


@dataclass
class SynthResult:
    delivery_ids: list[str]
    landing_dirs: list[Path]
    truth_dirs: list[Path]
    n_participants: int
    bytes_written: int
    seconds: float
    faults: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------


def make_pseudonyms(n: int, seed: int) -> list[str]:
    """``n`` unique opaque pseudonyms (no order, no site), deterministic in seed."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    alphabet = np.array(list(PSEUDONYM_ALPHABET))
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        block = rng.integers(0, len(alphabet), size=(n - len(out), PSEUDONYM_LENGTH))
        for row in block:
            p = "".join(alphabet[row])
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


def delivery_ids_for(prefix: str, k: int) -> list[str]:
    return [f"{prefix}-d{j + 1:02d}" for j in range(k)]


def _check_args(n: int, k: int, preset: str, fault_rate: float, prefix: str, workers: int) -> None:
    if n < 1:
        raise SynthError(f"--participants must be >= 1 (got {n})")
    if k < 1:
        raise SynthError(f"--deliveries must be >= 1 (got {k})")
    if k > n:
        raise SynthError(f"--deliveries ({k}) cannot exceed --participants ({n}): every delivery needs a participant")
    if preset not in PRESETS:
        raise SynthError(f"unknown --resolution {preset!r} (choose from {', '.join(PRESETS)})")
    if not (0.0 <= fault_rate <= 1.0):
        raise SynthError(f"--faults must be a share between 0 and 1 (got {fault_rate})")
    if workers < 1:
        raise SynthError(f"--workers must be >= 1 (got {workers})")
    if not DELIVERY_ID_RE.match(f"{prefix}-d01"):
        raise SynthError(f"--delivery-prefix {prefix!r} gives invalid delivery ids ({DELIVERY_ID_RULE})")


def _check_root(layout: DataLayout, ids: list[str]) -> None:
    for d in (layout.landing, layout.truth):
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise SynthError(f"data root {layout.root} is not writable ({d}: {exc.strerror or exc})") from None
    for did in ids:
        for d in (layout.landing / did, layout.truth / did):
            if d.exists():
                raise SynthError(f"delivery id {did!r} already exists ({d}); choose another --seed or "
                                 f"--delivery-prefix")


def _assign_faults(n: int, delivery_of: np.ndarray, rate: float, seed: int, k: int,
                   fault_kinds: tuple[str, ...] = F.FAULT_KINDS) -> dict[int, tuple[str, str]]:
    """participant index -> (fault kind, variant)."""
    if rate <= 0:
        return {}
    rng = np.random.default_rng(np.random.SeedSequence([seed, 4]))
    n_f = int(round(rate * n))
    if n_f == 0:
        return {}
    chosen = rng.permutation(n)[:n_f]
    kinds = list(fault_kinds)
    if k == 1:
        kinds.remove("duplicate_pseudonym")
    order = rng.permutation(len(kinds))
    slots = [kinds[order[i % len(kinds)]] for i in range(n_f)]
    # a duplicate needs an earlier delivery: give those slots to participants of later deliveries first
    later = [int(i) for i in chosen if delivery_of[i] > 0]
    first = [int(i) for i in chosen if delivery_of[i] == 0]
    n_dup = min(slots.count("duplicate_pseudonym"), len(later))
    other = [s for s in slots if s != "duplicate_pseudonym"]
    other += [kinds[order[0]] if kinds[order[0]] != "duplicate_pseudonym" else kinds[order[1]]] * (
        slots.count("duplicate_pseudonym") - n_dup)
    pairs = [(i, "duplicate_pseudonym") for i in later[:n_dup]] + list(zip(later[n_dup:] + first, other))
    out: dict[int, tuple[str, str]] = {}
    for idx, kind in pairs:
        variant = ""
        if kind == "malformed_covariate_row":
            variant = F.MALFORMED_VARIANTS[rng.integers(len(F.MALFORMED_VARIANTS))]
        elif kind == "out_of_range_covariate":
            variant = F.OUT_OF_RANGE_VARIANTS[rng.integers(len(F.OUT_OF_RANGE_VARIANTS))]
        out[int(idx)] = (kind, variant)
    return out


# ----------------------------------------------------------------------------------------------------------
# per-participant work (runs in worker processes)


@dataclass
class _Task:
    index: int
    pseudonym: str
    delivery_dir: str
    truth_dir: str
    seed: int
    preset: str
    in_opp: bool
    subject: Subject
    fault: str
    fmt: str = "nifti"
    exam: str = ""
    composed: bool = False
    extent: str = "lumbar"


def subject_of(r: dict) -> Subject:
    """The phantom's subject for a row of the simulated cohort table."""
    lean = r["lean_volume_target_cm3"]
    ps, lr_a, lr_p = r["psoas_share"], r["lr_ratio_autochthonous"], r["lr_ratio_psoas"]
    auto, pso = lean * (1 - ps), lean * ps
    return Subject(female=r["sex"] == "F", age=float(r["age"]), height_cm=r["height_cm"], weight_kg=r["weight_kg"],
                   imat_pct=r["imat_true"], mfi=r["mfi_true"],
                   lean_ml=(auto * lr_a / (1 + lr_a), auto / (1 + lr_a), pso * lr_p / (1 + lr_p), pso / (1 + lr_p)),
                   swap=r["fat_water_swap"])


def _render_and_write(task: _Task) -> dict:
    rng = np.random.default_rng(np.random.SeedSequence([task.seed, 2, task.index]))
    preset = PRESETS[task.preset]
    if task.fmt == "dicom":
        return _render_and_write_dicom(task, preset, rng)
    ph = render_phantom(task.subject, preset, rng, in_opp=task.in_opp, extent=task.extent)
    ddir = Path(task.delivery_dir)
    files = []
    nbytes = 0

    def emit(channel: str, data: np.ndarray, affine: np.ndarray, transform=None):
        nonlocal nbytes
        payload = nifti_bytes(data, affine)
        if transform is not None:
            payload = transform(payload)
        rel = scan_relpath(task.pseudonym, channel)
        atomic_write_bytes(ddir / rel, payload)
        files.append(dict(path=rel, size=len(payload), sha256=sha256_bytes(payload), pseudonym=task.pseudonym,
                          channel=channel))
        nbytes += len(payload)

    fault = task.fault
    fault_detail = ""
    water, fat = ph.water, ph.fat
    fat_affine = ph.affine
    water_tf = fat_tf = None
    if fault == "nan_values":
        water = water.astype(np.float32)
        k0 = water.shape[2] // 3
        water[:, :, k0:k0 + max(water.shape[2] // 4, 1)] = np.nan
        fault_detail = f"{scan_relpath(task.pseudonym, 'water')}: NaN in slices {k0}..{k0 + max(water.shape[2] // 4, 1) - 1}"
    elif fault == "shape_mismatch":
        fat = fat[:, :, :-1]
        fault_detail = f"{scan_relpath(task.pseudonym, 'fat')}: shape {fat.shape} vs water {water.shape}"
    elif fault == "affine_mismatch":
        fat_affine = ph.affine.copy()
        fat_affine[2, 3] += 15.0
        fault_detail = f"{scan_relpath(task.pseudonym, 'fat')}: origin shifted 15 mm in z"
    elif fault == "corrupt_gzip":
        water_tf = F.corrupt_gzip
        fault_detail = f"{scan_relpath(task.pseudonym, 'water')}: 256 corrupted bytes mid-stream"
    elif fault == "truncated_gzip":
        fat_tf = F.truncate_gzip
        fault_detail = f"{scan_relpath(task.pseudonym, 'fat')}: gzip stream truncated to 60 %"
    elif fault == "missing_fat":
        fault_detail = f"{scan_relpath(task.pseudonym, 'fat')}: not delivered"

    emit("water", water, ph.affine, water_tf)
    if fault != "missing_fat":
        emit("fat", fat, fat_affine, fat_tf)
    if task.in_opp:
        emit("in", ph.in_phase, ph.affine)
        emit("opp", ph.opp_phase, ph.affine)

    return _with_truth(task, ph, dict(index=task.index, files=files, bytes=nbytes, fault_detail=fault_detail))


def _with_truth(task: _Task, ph, out: dict) -> dict:
    """Write the label map into the truth folder; add the realised truth to a participant's output."""
    label_payload = nifti_bytes(ph.labels, ph.affine)
    atomic_write_bytes(Path(task.truth_dir) / "labels" / f"{task.pseudonym}_labels.nii.gz", label_payload)
    tr = {k: v for k, v in ph.truth.items() if not isinstance(v, (dict, list, tuple)) and v is not None}
    tr["swap_slices"] = "" if ph.truth["swap_slices"] is None else f"{ph.truth['swap_slices'][0]}-{ph.truth['swap_slices'][1] - 1}"
    tr["pose_rotation_deg"] = float(np.degrees(ph.truth["pose"]["theta"]))
    tr["label_sha256"] = sha256_bytes(label_payload)
    if ph.extent != "lumbar":
        # where the labelled slab lies in the longer volume (slices, inclusive, as swap_slices)
        tr["slab_slices"] = f"{ph.truth['slab_slices'][0]}-{ph.truth['slab_slices'][1] - 1}"
    return {**out, "truth": tr, "bytes": out["bytes"] + len(label_payload)}


def _render_and_write_dicom(task: _Task, preset, rng: np.random.Generator) -> dict:
    """The DICOM format: the same phantom, written as overlapping stations, one zip per contrast. A cohort swap
    is applied per station (``slab``: one end station; ``full``: every station) instead of to a slab of slices."""
    from dataclasses import replace

    from cbp_platform.synth.dicom import participant_zips, plan_stations

    ph = render_phantom(replace(task.subject, swap="none"), preset, rng, in_opp=task.in_opp, extent=task.extent)
    plan = plan_stations(ph.water.shape[2], task.fault, task.subject.swap, rng, composed=task.composed,
                         extent=task.extent)
    if plan.swap_stations:
        ks = [plan.stations[s - 1] for s in plan.swap_stations]
        ph.truth["swap_slices"] = (min(k0 for k0, _ in ks), max(k1 for _, k1 in ks))
    volumes = {"water": ph.water, "fat": ph.fat}
    if task.in_opp:
        volumes.update({"in": ph.in_phase, "opp": ph.opp_phase})
    exam = datetime.fromisoformat(task.exam).replace(hour=8) + timedelta(minutes=int(rng.integers(0, 600)))
    zips = participant_zips(volumes, ph.affine, plan, pseudonym=task.pseudonym, seed=task.seed, exam=exam)
    files, nbytes = [], 0
    for contrast, payload in zips.items():
        rel = dicom_relpath(task.pseudonym, contrast)
        atomic_write_bytes(Path(task.delivery_dir) / rel, payload)
        files.append(dict(path=rel, size=len(payload), sha256=sha256_bytes(payload), pseudonym=task.pseudonym,
                          channel=contrast))
        nbytes += len(payload)
    detail = f"{dicom_relpath(task.pseudonym, 'water')}: {plan.detail}" if plan.detail else ""
    return _with_truth(task, ph, dict(index=task.index, files=files, bytes=nbytes, fault_detail=detail))


# ----------------------------------------------------------------------------------------------------------


def _fmt_bool(x) -> str:
    return "1" if x else "0"


def _covariate_row(r: dict, pseudonym: str) -> list[str]:
    missing_com = r["missing_comorbidity"]
    row = {
        "pseudonym": pseudonym,
        "site": r["site"],
        "exam_date": str(r["exam_date"]),
        "age": str(int(r["age"])),
        "sex": r["sex"],
        "height_cm": f"{r['height_cm']:.1f}",
        "weight_kg": f"{r['weight_kg']:.1f}",
        "cbp": "" if r["missing_cbp"] else _fmt_bool(r["cbp_true"]),
        "nrs_pain": "" if r["missing_cbp"] else str(int(r["nrs_true"])),
        "met_min_week": "" if r["missing_met"] else str(int(r["met_min_week"])),
    }
    for c in ("diabetes", "dyslipidemia", "osteoporosis", "osteoarthritis"):
        row[c] = "" if missing_com == c else _fmt_bool(r[c])
    return [row[c] for c in COVARIATE_COLUMNS]


def _apply_covariate_fault(cells: list[str], kind: str, variant: str) -> tuple[list[str], str]:
    col = {c: i for i, c in enumerate(COVARIATE_COLUMNS)}
    cells = list(cells)
    if kind == "malformed_covariate_row":
        if variant == "extra_field":
            cells.append("see remark")
            return cells, "row has 15 fields, header 14"
        if variant == "unit_in_number":
            cells[col["height_cm"]] = cells[col["height_cm"]] + " cm"
            return cells, f"height_cm={cells[col['height_cm']]!r}"
        y, m, d = cells[col["exam_date"]].split("-")
        cells[col["exam_date"]] = f"{d}.{m}.{y}"
        return cells, f"exam_date={cells[col['exam_date']]!r} (not ISO)"
    # out of range
    if variant == "age_low":
        cells[col["age"]] = "7"
        return cells, "age=7"
    if variant == "age_high":
        cells[col["age"]] = "112"
        return cells, "age=112"
    if variant == "height_in_m":
        cells[col["height_cm"]] = f"{float(cells[col['height_cm']]) / 100:.2f}"
        return cells, f"height_cm={cells[col['height_cm']]}"
    if variant == "weight_in_g":
        cells[col["weight_kg"]] = f"{float(cells[col['weight_kg']]) * 1000:.0f}"
        return cells, f"weight_kg={cells[col['weight_kg']]}"
    if variant == "nrs_too_high":
        cells[col["nrs_pain"]] = "14"
        return cells, "nrs_pain=14"
    cells[col["met_min_week"]] = "-30"
    return cells, "met_min_week=-30"


def synthesize(*, participants: int, deliveries: int, seed: int, resolution: str = "fast",
               data_root: str | os.PathLike[str] | None = None, fault_rate: float = 0.0, in_opp: bool = False,
               workers: int | None = None, delivery_prefix: str | None = None, progress: bool | None = False,
               params: CohortParameters | None = None, scan_format: str = "nifti",
               composed: bool = False, extent: str = "lumbar") -> SynthResult:
    """Write ``deliveries`` complete deliveries of ``participants`` simulated participants in total.

    ``scan_format``: ``nifti`` (one ``.nii.gz`` per Dixon channel) or ``dicom`` (one zip of DICOM station series
    per contrast, :mod:`cbp_platform.synth.dicom`; ``composed`` adds the scanner-composed series). ``extent``:
    ``lumbar`` (the T10-S1 slab) or ``whole-body`` (neck to thighs around the same slab, labels in the slab only;
    :func:`cbp_platform.synth.phantom.render_phantom`)."""
    workers = workers if workers is not None else (os.cpu_count() or 1)
    prefix = delivery_prefix or f"sim{seed}"
    _check_args(participants, deliveries, resolution, fault_rate, prefix, workers)
    if scan_format not in SCAN_FORMATS:
        raise SynthError(f"unknown --format {scan_format!r} (choose from {', '.join(SCAN_FORMATS)})")
    if composed and scan_format != "dicom":
        raise SynthError("--composed needs --format dicom")
    if extent not in EXTENTS:
        raise SynthError(f"unknown --extent {extent!r} (choose from {', '.join(EXTENTS)})")
    layout = DataLayout.from_env(data_root)
    ids = delivery_ids_for(prefix, deliveries)
    _check_root(layout, ids)
    params = params or CohortParameters()
    t0 = time.perf_counter()

    cohort = simulate_cohort(participants, seed, params)
    pseudonyms = make_pseudonyms(participants, seed)
    order = np.argsort(cohort["exam_date"].to_numpy(), kind="stable")
    chunks = np.array_split(order, deliveries)
    delivery_of = np.empty(participants, np.int64)
    for j, ch in enumerate(chunks):
        delivery_of[ch] = j
    fault_of = _assign_faults(participants, delivery_of, fault_rate, seed, deliveries,
                              F.DICOM_FAULT_KINDS if scan_format == "dicom" else F.FAULT_KINDS)
    delivered_pseudonym = list(pseudonyms)
    dup_rng = np.random.default_rng(np.random.SeedSequence([seed, 5]))
    for idx, (kind, _) in fault_of.items():
        if kind == "duplicate_pseudonym":
            earlier = [int(i) for j in range(delivery_of[idx]) for i in chunks[j]
                       if fault_of.get(int(i), ("",))[0] != "duplicate_pseudonym"]
            src = earlier[dup_rng.integers(len(earlier))]
            delivered_pseudonym[idx] = pseudonyms[src]
            fault_of[idx] = (kind, f"same pseudonym as participant in {ids[delivery_of[src]]}")
    rows = cohort.to_dicts()

    created: list[Path] = []
    result = SynthResult(ids, [], [], participants, 0, 0.0)
    ctx = get_context("fork")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx) if workers > 1 else None
    # progress: True/False forces the bar on stderr; None shows it on a terminal only
    pbar = bar(total=participants, desc="synth", unit="participant", enabled=progress)
    try:
        for did, chunk in zip(ids, chunks):
            ddir = layout.landing / did
            tdir = layout.truth / did
            for d in (ddir, tdir):
                d.mkdir(parents=True, exist_ok=False)
                created.append(d)
            tasks = []
            for idx in chunk:
                r = rows[idx]
                tasks.append(_Task(int(idx), delivered_pseudonym[idx], str(ddir), str(tdir), seed, resolution,
                                   in_opp, subject_of(r), fault_of.get(int(idx), ("", ""))[0], scan_format,
                                   str(r["exam_date"]), composed, extent))
            mapper = pool.map(_render_and_write, tasks, chunksize=4) if pool else map(_render_and_write, tasks)
            outputs = []
            for out in mapper:
                outputs.append(out)
                pbar.update(1)
            result.bytes_written += _finish_delivery(
                did, ddir, tdir, chunk, outputs, rows, delivered_pseudonym, fault_of, result, scan_format)
            result.landing_dirs.append(ddir)
            result.truth_dirs.append(tdir)
        _write_cohort_truth(layout, prefix, ids, seed, participants, deliveries, resolution, fault_rate, params,
                            extent)
    except BaseException:
        for d in created:
            shutil.rmtree(d, ignore_errors=True)
        raise
    finally:
        pbar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    result.seconds = time.perf_counter() - t0
    return result


def _finish_delivery(did, ddir: Path, tdir: Path, chunk, outputs, rows, delivered_pseudonym, fault_of,
                     result: SynthResult, scan_format: str = "nifti") -> int:
    nbytes = 0
    by_index = {o["index"]: o for o in outputs}
    fault_rows = []
    # covariates.csv
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COVARIATE_COLUMNS)
    for idx in chunk:
        idx = int(idx)
        cells = _covariate_row(rows[idx], delivered_pseudonym[idx])
        kind, variant = fault_of.get(idx, ("", ""))
        if kind in F.COVARIATE_FAULTS:
            cells, detail = _apply_covariate_fault(cells, kind, variant)
            fault_rows.append(dict(delivery_id=did, pseudonym=delivered_pseudonym[idx], fault=kind,
                                   variant=variant, target=COVARIATES_NAME, detail=detail, outcome="quarantine"))
        elif kind:
            detail = by_index[idx]["fault_detail"] or variant
            target = {"checksum_mismatch": MANIFEST_NAME, "duplicate_pseudonym": COVARIATES_NAME}.get(
                kind, detail.split(":")[0])
            fault_rows.append(dict(delivery_id=did, pseudonym=delivered_pseudonym[idx], fault=kind,
                                   variant=variant, target=target, detail=detail,
                                   outcome="handled" if kind in F.HANDLED_FAULTS else "quarantine"))
        w.writerow(cells)
    cov_bytes = buf.getvalue().encode()
    atomic_write_bytes(ddir / COVARIATES_NAME, cov_bytes)
    nbytes += len(cov_bytes)

    files = [dict(path=COVARIATES_NAME, size=len(cov_bytes), sha256=sha256_bytes(cov_bytes))]
    for idx in sorted((int(i) for i in chunk), key=lambda i: delivered_pseudonym[i]):
        o = by_index[idx]
        nbytes += o["bytes"]
        for f in o["files"]:
            entry = dict(f)
            if fault_of.get(idx, ("",))[0] == "checksum_mismatch" and f["channel"] == "water":
                entry["sha256"] = sha256_bytes(f["sha256"].encode())  # a well-formed but wrong checksum
                for fr in fault_rows:
                    if fr["pseudonym"] == delivered_pseudonym[idx] and fr["fault"] == "checksum_mismatch":
                        fr["detail"] = f"{f['path']}: manifest sha256 does not match the file"
            files.append(entry)
    exam_dates = [rows[int(i)]["exam_date"] for i in chunk]
    created_at = datetime.combine(max(exam_dates) + timedelta(days=14), datetime.min.time(),
                                  tzinfo=timezone.utc).replace(hour=6)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "delivery_id": did,
        "created_at": created_at.isoformat().replace("+00:00", "Z"),
        "producer": f"cbp synth {__version__} (simulated cohort)",
        "n_participants": len(chunk),
        "participants": sorted({delivered_pseudonym[int(i)] for i in chunk}),
        "files": files,
    }
    if scan_format != "nifti":
        manifest["scan_format"] = scan_format
    man_bytes = (json.dumps(manifest, indent=1) + "\n").encode()

    # truth first (outside the landing zone), the manifest and the _SUCCESS marker last
    truth_rows = []
    for idx in (int(i) for i in chunk):
        r = rows[idx]
        t = by_index[idx]["truth"]
        kind = fault_of.get(idx, ("", ""))[0]
        truth_rows.append({
            "delivery_id": did, "pseudonym": delivered_pseudonym[idx], "participant_index": idx,
            "site": r["site"], "site_effect": r["site_effect"], "exam_date": r["exam_date"], "age": r["age"],
            "sex": r["sex"], "height_cm": r["height_cm"], "weight_kg": r["weight_kg"], "bmi": r["bmi"],
            "pa_category": r["pa_category"], "met_min_week": r["met_min_week"],
            "diabetes": r["diabetes"], "dyslipidemia": r["dyslipidemia"], "osteoporosis": r["osteoporosis"],
            "osteoarthritis": r["osteoarthritis"],
            "lmm_index_latent": r["lmm_true"], "imat_pct_latent": r["imat_true"], "mfi_latent": r["mfi_true"],
            "lmm_index_true": t["lmm_index"], "imat_pct_true": t["imat_pct"], "mfi_true": t["mfi"],
            **{k: v for k, v in t.items() if k.endswith("_ml")},
            "cbp_probability": r["cbp_probability"], "cbp_true": r["cbp_true"], "nrs_true": r["nrs_true"],
            "missing_cbp": r["missing_cbp"], "missing_met": r["missing_met"],
            "missing_comorbidity": r["missing_comorbidity"] or "",
            "fat_water_swap": r["fat_water_swap"], "swap_slices": t["swap_slices"],
            "snr": t["snr"], "pose_rotation_deg": t["pose_rotation_deg"], "label_sha256": t["label_sha256"],
            "fault": kind,
            **({"extent": t["extent"], "slab_slices": t["slab_slices"]} if "slab_slices" in t else {}),
        })
    pl.DataFrame(truth_rows).write_csv(tdir / "participants.csv")
    pl.DataFrame(fault_rows, schema={c: pl.String for c in
                                     ("delivery_id", "pseudonym", "fault", "variant", "target", "detail",
                                                         "outcome")}
                 ).write_csv(tdir / "faults.csv")
    result.faults.extend(fault_rows)
    atomic_write_bytes(ddir / MANIFEST_NAME, man_bytes)
    atomic_write_bytes(ddir / SUCCESS_MARKER, b"")
    return nbytes + len(man_bytes)


def _write_cohort_truth(layout: DataLayout, prefix, ids, seed, n, k, resolution, fault_rate,
                        params: CohortParameters, extent: str = "lumbar") -> None:
    u = site_effects(seed, params)
    shape = PRESETS[resolution].shape
    if extent != "lumbar":      # (a lumbar cohort's file stays as it always was: no extent key)
        nz, k0 = whole_body_slices(PRESETS[resolution])
        shape = (shape[0], shape[1], nz)
    doc = {
        "cohort": prefix,
        "seed": seed,
        "participants": n,
        "deliveries": ids,
        "resolution": resolution,
        "voxel_spacing_mm": PRESETS[resolution].spacing,
        "shape": shape,
        **({"extent": extent, "slab_slices": [k0, k0 + PRESETS[resolution].shape[2]]} if extent != "lumbar" else {}),
        "fault_rate": fault_rate,
        "labels": LABELS,
        "site_effects": dict(zip(SITES, [float(x) for x in u])),
        "true_log_odds_per_sd": {
            "cbp": {"lmm": beta_2sd(params.or_lmm_2sd), "imat": beta_2sd(params.or_imat_2sd)},
            "nrs_ge_4": {"lmm": beta_2sd(params.or_lmm_2sd_nrs), "imat": beta_2sd(params.or_imat_2sd_nrs)},
        },
        "parameters": params.to_dict(),
        "generator": f"cbp-platform {__version__}",
    }
    atomic_write_bytes(layout.truth / f"cohort-{prefix}.json", (json.dumps(doc, indent=1, default=str) + "\n").encode())
