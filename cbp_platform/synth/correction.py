"""``cbp synth --correct ID``: a realistic correction of an earlier simulated delivery, into the landing zone.

What a data centre sends between releases (docs/lifecycle.md):

* **covariate corrections** of ``covariates`` participants, cycling through the registered reasons: a pain
  questionnaire item re-coded under a revised scoring (``covariate_recoded``: ``cbp`` flips, ``nrs_pain`` follows),
  a body weight mistyped at the study centre (``covariate_error``: ``weight_kg`` off by a transposed digit or a
  slipped decimal) and, for every tenth, the study site reassigned (``site_reassigned``);
* **re-scans** of ``rescans`` participants (``rescan``): the same person imaged again, so a new image of the same
  anatomy, with new noise, pose and coil profile, in the original delivery's format (NIfTI or DICOM).

Participants are drawn (seeded) among those the original delivery brought without a simulated fault, so every
correction reaches the warehouse. The correction is a complete delivery: ``manifest.json`` with ``kind:
"correction"`` and one ``corrections`` entry per participant, ``covariates.csv`` with the full corrected rows,
the re-scans' images, ``_SUCCESS`` last. The truth beside it (``truth/<id>/``): ``corrections.csv`` with every old
and new value, and for the re-scans their label maps and a ``participants.csv`` like a delivery's.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from cbp_platform import __version__
from cbp_platform.imaging.nifti import atomic_write_bytes, sha256_bytes
from cbp_platform.landing import (CORRECTION, CORRECTION_REASONS, COVARIATE_COLUMNS, COVARIATES, COVARIATES_NAME, DELIVERY_ID_RE,
                                  DELIVERY_ID_RULE, MANIFEST_NAME, SCAN, SCHEMA_VERSION, SITES, SUCCESS_MARKER)
from cbp_platform.paths import DataLayout
from cbp_platform.synth.cohort import CohortParameters, simulate_cohort
from cbp_platform.synth.delivery import SynthError, SynthResult, _render_and_write, _Task, subject_of

RESCAN = "rescan"           # the correction reason of a re-scan (cbp_platform.landing.CORRECTION_REASONS)
RESCAN_STREAM = 13          # random streams of this module (SeedSequence tags), apart from the cohort's
PICK_STREAM = 11
assert RESCAN in CORRECTION_REASONS


def correction_id(layout: DataLayout, of: str) -> str:
    """The next free ``<of>-cNN`` id (``sim1-d01-c01``, ``sim1-d01-c02``, ...)."""
    for n in range(1, 100):
        did = f"{of}-c{n:02d}"
        if not (layout.landing / did).exists() and not (layout.truth / did).exists():
            return did
    raise SynthError(f"{of}: 99 corrections exist already; name the next one with --delivery-id")


def _cohort_of(layout: DataLayout, of: str) -> dict:
    for p in sorted(layout.truth.glob("cohort-*.json")):
        doc = json.loads(p.read_text())
        if of in doc.get("deliveries", ()):
            return doc
    raise SynthError(f"{of}: no simulated cohort in {layout.truth} lists this delivery (cbp synth --correct "
                     "corrects simulated deliveries only)")


def _recode(cells: dict[str, str], reason: str, rng: np.random.Generator) -> dict[str, str]:
    out = dict(cells)
    if reason == "covariate_recoded":                 # revised pain scoring: the answer flips, the intensity follows
        if out["cbp"] == "1":
            out["cbp"], out["nrs_pain"] = "0", str(min(int(out["nrs_pain"] or 0), 2))
        else:
            out["cbp"], out["nrs_pain"] = "1", str(max(int(out["nrs_pain"] or 0), 5))
    elif reason == "covariate_error":                 # a mistyped weight: a transposed digit or a slipped decimal
        w = float(out["weight_kg"])
        whole = f"{int(w):d}"
        swapped = float(whole[::-1]) + (w - int(w)) if len(whole) == 2 and whole[0] != whole[1] else w * 1.1
        new = swapped if 35.0 <= swapped <= 180.0 else w + (8.0 if rng.random() < 0.5 else -8.0)
        out["weight_kg"] = f"{new:.1f}"
    else:                                             # site_reassigned
        others = [s for s in SITES if s != out["site"]]
        out["site"] = others[int(rng.integers(len(others)))]
    return out


def synthesize_correction(*, of: str, seed: int, data_root=None, covariates: int = 10, rescans: int = 1,
                          delivery_id: str | None = None) -> SynthResult:
    """Write a correction of the simulated delivery ``of`` (see the module doc); returns what was written."""
    layout = DataLayout.from_env(data_root)
    src = layout.landing / of
    if not (src / SUCCESS_MARKER).exists() or not (src / MANIFEST_NAME).exists():
        raise SynthError(f"{of}: no complete delivery in {layout.landing}")
    if covariates < 0 or rescans < 0 or covariates + rescans == 0:
        raise SynthError("a correction needs --covariates N and/or --rescans N (N >= 0, together >= 1)")
    did = delivery_id or correction_id(layout, of)
    if not DELIVERY_ID_RE.match(did):
        raise SynthError(f"--delivery-id {did!r} is not a valid delivery id ({DELIVERY_ID_RULE})")
    for d in (layout.landing / did, layout.truth / did):
        if d.exists():
            raise SynthError(f"delivery id {did!r} already exists ({d})")
    manifest = json.loads((src / MANIFEST_NAME).read_text())
    truth = pl.read_csv(layout.truth / of / "participants.csv", infer_schema_length=None)
    with open(src / COVARIATES_NAME, newline="") as fh:
        cov_rows = {r["pseudonym"]: r for r in csv.DictReader(fh)}
    answered = [p for p, r in cov_rows.items() if r["cbp"] != ""]     # a re-coding changes an answer given
    clean = truth.filter((pl.col("fault").fill_null("") == "") & pl.col("pseudonym").is_in(answered))
    clean = clean.sort("pseudonym")
    if clean.height < covariates + rescans:
        raise SynthError(f"{of}: {clean.height} participants without a simulated fault; cannot correct "
                         f"{covariates + rescans}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, PICK_STREAM]))
    picked = clean[[int(i) for i in rng.permutation(clean.height)[:covariates + rescans]]]
    cov_people = sorted(picked["pseudonym"][:covariates].to_list())
    scan_people = sorted(picked["pseudonym"][covariates:].to_list())

    t0 = datetime.now()
    ddir, tdir = layout.landing / did, layout.truth / did
    ddir.mkdir(parents=True)
    tdir.mkdir(parents=True)
    try:
        entries, changes, files, nbytes = [], [], [], 0
        if cov_people:
            reasons = ["site_reassigned" if i % 10 == 9 else "covariate_recoded" if i % 2 == 0 else "covariate_error"
                       for i in range(len(cov_people))]
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(COVARIATE_COLUMNS)
            for p, reason in zip(cov_people, reasons):
                new = _recode(cov_rows[p], reason, rng)
                w.writerow([new[c] for c in COVARIATE_COLUMNS])
                entries.append({"pseudonym": p, "supersedes": of, "parts": [COVARIATES], "reason": reason})
                changes += [dict(delivery_id=did, pseudonym=p, supersedes=of, reason=reason, field=c,
                                 old=cov_rows[p][c], new=new[c]) for c in COVARIATE_COLUMNS if new[c] != cov_rows[p][c]]
            payload = buf.getvalue().encode()
            atomic_write_bytes(ddir / COVARIATES_NAME, payload)
            files.append(dict(path=COVARIATES_NAME, size=len(payload), sha256=sha256_bytes(payload)))
            nbytes += len(payload)
        if scan_people:
            nbytes += _rescan(layout, of, did, scan_people, truth, manifest, seed, files, entries, changes)
        entries.sort(key=lambda e: e["pseudonym"])
        created = datetime.fromisoformat(manifest["created_at"].replace("Z", "+00:00")) + timedelta(days=30)
        doc = {"schema_version": SCHEMA_VERSION, "delivery_id": did, "kind": CORRECTION,
               "created_at": created.isoformat().replace("+00:00", "Z"),
               "producer": f"cbp synth {__version__} (simulated correction of {of})",
               "n_participants": len(entries), "participants": sorted(e["pseudonym"] for e in entries),
               "corrections": entries, "files": sorted(files, key=lambda f: f["path"])}
        if manifest.get("scan_format", "nifti") != "nifti":
            doc["scan_format"] = manifest["scan_format"]
        pl.DataFrame(changes, schema={c: pl.String for c in ("delivery_id", "pseudonym", "supersedes", "reason",
                                                            "field", "old", "new")}
                     ).write_csv(tdir / "corrections.csv")
        man = (json.dumps(doc, indent=1) + "\n").encode()
        atomic_write_bytes(ddir / MANIFEST_NAME, man)
        atomic_write_bytes(ddir / SUCCESS_MARKER, b"")
    except BaseException:
        shutil.rmtree(ddir, ignore_errors=True)
        shutil.rmtree(tdir, ignore_errors=True)
        raise
    return SynthResult([did], [ddir], [tdir], len(entries), nbytes + len(man),
                       (datetime.now() - t0).total_seconds())


def _rescan(layout: DataLayout, of: str, did: str, people: list[str], truth: pl.DataFrame, manifest: dict,
            seed: int, files: list, entries: list, changes: list) -> int:
    """Re-image ``people``: the cohort's subject, rendered with a new random stream (new noise, pose, coil);
    their files, manifest entries, truth rows and label maps. Returns the bytes written."""
    cohort = _cohort_of(layout, of)
    params = CohortParameters.from_dict(cohort["parameters"]) if cohort.get("parameters") else CohortParameters()
    rows = simulate_cohort(int(cohort["participants"]), int(cohort["seed"]), params).to_dicts()
    fmt = manifest.get("scan_format", "nifti")
    in_opp = any(f["path"].endswith(("_in.nii.gz", "_dixon_in.zip")) for f in manifest["files"])
    stream = int(np.random.SeedSequence([int(cohort["seed"]), seed, RESCAN_STREAM]).generate_state(1)[0])
    ddir, tdir = layout.landing / did, layout.truth / did
    by_p = {r["pseudonym"]: r for r in truth.to_dicts()}
    truth_rows, nbytes = [], 0
    for p in people:
        old = by_p[p]
        idx = int(old["participant_index"])
        task = _Task(idx, p, str(ddir), str(tdir), stream, cohort["resolution"], in_opp,
                     replace(subject_of(rows[idx]), swap="none"), "", fmt, str(rows[idx]["exam_date"]),
                     extent=cohort.get("extent", "lumbar"))
        out = _render_and_write(task)
        for f in out["files"]:
            files.append({k: f[k] for k in ("path", "size", "sha256", "pseudonym", "channel")})
        nbytes += out["bytes"]
        t = out["truth"]
        new = {**old, "delivery_id": did, "lmm_index_true": t["lmm_index"], "imat_pct_true": t["imat_pct"],
               "mfi_true": t["mfi"], **{k: v for k, v in t.items() if k.endswith("_ml")}, "fat_water_swap": "none",
               "swap_slices": t["swap_slices"], "snr": t["snr"], "pose_rotation_deg": t["pose_rotation_deg"],
               "label_sha256": t["label_sha256"], "fault": ""}
        truth_rows.append(new)
        entries.append({"pseudonym": p, "supersedes": of, "parts": [SCAN], "reason": RESCAN})
        changes.append(dict(delivery_id=did, pseudonym=p, supersedes=of, reason=RESCAN, field="scan",
                            old=str(old.get("label_sha256", "")), new=t["label_sha256"]))
    pl.DataFrame(truth_rows, infer_schema_length=None).cast({c: truth.schema[c] for c in truth.columns
                                                             if truth.schema[c] != pl.Null}, strict=False
                                                            ).write_csv(tdir / "participants.csv")
    return nbytes
