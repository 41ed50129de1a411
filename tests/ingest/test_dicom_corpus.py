"""The DICOM regression corpus (issue 26): one DICOM delivery of simulated participants, each given one class of
damaged or unusual input, run through the real ingestion core (no Dagster, no mocks), with every participant's
outcome and the accounting of every file and covariate row checked.

The delivery (``scan_format: dicom``) is written from the scanner simulator: each participant a phantom of its own
(so no two volumes are alike), four overlapping stations, one zip per contrast. :data:`CASES` lists what each
participant is given and the quarantine reason expected at ``raw_mri_scans`` (None: stored); the manifest is what
a data centre would have listed. The phantom is small (6 x 6 x 12 mm, 24 slices: 288 mm, above the 280 mm
coverage rule; 8 slices per station), so the whole module runs in a few seconds.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from datetime import datetime, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cbp_platform.ingest.accounting import account
from cbp_platform.ingest.batch import ingest_covariates, ingest_scans
from cbp_platform.ingest.deliveries import parse_manifest, plan_batches
from cbp_platform.landing import (COVARIATE_COLUMNS, COVARIATES_NAME, MANIFEST_NAME, PSEUDONYM_ALPHABET, SITES,
                                  SUCCESS_MARKER, dicom_relpath)
from cbp_platform.paths import DataLayout
from cbp_platform.reasons import R
from cbp_platform.synth.dicom import UID_ROOT, FakeIdentity, participant_zips, plan_stations, series_slices
from cbp_platform.synth.phantom import Preset, Subject, render_phantom
from tests.support.dicom import (cut, dicomdir, edited, everything, members, no_preamble, series_of,
                                 with_members)

DELIVERY = "dicom-corpus-d01"
PRESET = Preset("corpus", (6.0, 6.0, 12.0), (64, 48, 24))
EXAM = datetime(2016, 5, 4, 9, 0)
NAME = "Hildegard Quellenstein"                 # typed into free-text fields by a person at the scanner
SCANS, COVARIATES = "raw_mri_scans", "participant_covariates"

# case -> the raw_mri_scans reason expected (None: stored)
CASES = {
    "good_1": None,
    "good_2": None,
    "good_3": None,
    "foreign_station": R.participant_mismatch.code,       # a newer station 2 of another participant in its zips
    "foreign_patient_id": R.participant_mismatch.code,    # station 3's files carry another PatientID
    "dicomdir": None,                                     # DICOMDIR members: ignored and counted in the sidecar
    "no_preamble": None,                                  # every file of the water zip without the preamble
    "truncated": R.truncated_dicom.code,                  # a slice cut inside its pixel data
    "free_text": None,                                    # a name typed into every free-text field
    "duplicate_a": R.duplicate_content.code,              # a and b: byte-identical zips under two pseudonyms
    "duplicate_b": R.duplicate_content.code,
    "unlisted": R.not_in_participant_list.code,           # zips listed, pseudonym missing from `participants`
    "manifest_spelling": None,                            # upper-case sha256, a ./dicom//... path
}
# the other stages a case quarantines its participant at (with the same reason)
ALSO_AT = {"unlisted": (COVARIATES,)}
STORED = [c for c, r in CASES.items() if r is None]
DICOMDIR_NAMES = ("EXPORT/DICOMDIR", "export2/INDEX")     # named so, or of the Media Storage Directory class only


def _pseudonyms(n: int) -> list[str]:
    rng = np.random.default_rng(26)
    out: list[str] = []
    while len(out) < n:
        p = "".join(rng.choice(list(PSEUDONYM_ALPHABET), 10))
        if p not in out:
            out.append(p)
    return out


def _subject(i: int) -> Subject:
    female = i % 2 == 0
    lean = np.array([420.0, 410.0, 130.0, 125.0]) * (0.75 if female else 1.0) * (0.9 + 0.02 * i)
    return Subject(female=female, age=30.0 + 3 * i, height_cm=(164.0 if female else 176.0) + i,
                   weight_kg=(62.0 if female else 78.0) + 1.5 * i, imat_pct=5.0 + 0.4 * i, mfi=0.05 + 0.004 * i,
                   lean_ml=tuple(float(x) for x in lean))


def _covariate_row(i: int, p: str, s: Subject) -> str:
    date = (EXAM + timedelta(days=i)).date().isoformat()
    cells = [p, SITES[i % len(SITES)], date, str(int(s.age)), "F" if s.female else "M", f"{s.height_cm:.1f}",
             f"{s.weight_kg:.1f}", str(i % 2), str(i % 8), str(600 + 100 * i), "0", str(i % 2), "0", "1"]
    assert len(cells) == len(COVARIATE_COLUMNS)
    return ",".join(cells)


def _typed(ds) -> None:
    """The name typed into every free-text field; the description and protocol keep their suffixes."""
    for kw in ("StudyDescription", "ImageComments", "PatientComments", "AdditionalPatientHistory",
               "RequestedProcedureDescription", "PerformedProcedureStepDescription", "OperatorsName",
               "PerformingPhysicianName", "InstitutionalDepartmentName", "ReasonForStudy", "DerivationDescription"):
        setattr(ds, kw, NAME)
    ds.StationName = NAME.split()[1]
    ds.SeriesDescription = NAME + re.search(r"_[A-Za-z]+$", ds.SeriesDescription).group(0)
    ds.ProtocolName = NAME + re.search(r"_S\d+$", ds.ProtocolName).group(0)


def _make_zips(case: str, p: str, seed: int, ph, plan, others: dict, work: Path) -> dict[str, bytes]:
    vols = {"water": ph.water, "fat": ph.fat}
    zips = participant_zips(vols, ph.affine, plan, pseudonym=p, seed=seed, exam=EXAM)
    if case == "foreign_station":
        q, qph = others["good_1"]                     # another participant's body, acquired two hours later
        for c in vols:
            _, slices = series_slices(getattr(qph, c), ph.affine, contrast=c, station=2, k_range=plan.stations[1],
                                      pseudonym=q, seed=seed + 1000, acquired=EXAM + timedelta(hours=2))
            zips[c] = with_members(zips[c], [(f"0121_{c}/IM{n:04d}.dcm", b) for n, b in enumerate(slices, 1)])
    elif case == "foreign_patient_id":
        q = others["good_2"][0]
        for c in vols:
            zips[c] = edited(zips[c], series_of(3, c), lambda ds: setattr(ds, "PatientID", q))
    elif case == "dicomdir":
        index = dicomdir(work / "export", [b for _, b in members(zips["water"])[:3]])
        zips["water"] = with_members(zips["water"], [(name, index) for name in DICOMDIR_NAMES])
    elif case == "no_preamble":
        zips["water"] = edited(zips["water"], everything, no_preamble)
    elif case == "truncated":
        target = [n for n, _ in members(zips["water"]) if series_of(3, "water")(n)][4]
        zips["water"] = edited(zips["water"], lambda n: n == target, cut(1000))
    elif case == "free_text":
        zips = {c: edited(z, everything, _typed) for c, z in zips.items()}
    return zips


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom-corpus")               # the data root: landing zone and outputs
    scratch = tmp_path_factory.mktemp("dicom-corpus-scratch")    # where the DICOMDIR is written (not the root)
    ddir = root / "landing" / DELIVERY
    ps = dict(zip(CASES, _pseudonyms(len(CASES))))
    phantoms, plans = {}, {}
    for i, case in enumerate(CASES):
        phantoms[case] = render_phantom(_subject(i), PRESET, np.random.default_rng(100 + i))
        plans[case] = plan_stations(PRESET.shape[2], "", "none", np.random.default_rng(i))
    others = {c: (ps[c], phantoms[c]) for c in ("good_1", "good_2")}
    files, zips_of = [], {}
    for i, case in enumerate(CASES):
        p = ps[case]
        if case == "duplicate_b":
            zips = dict(zips_of["duplicate_a"])       # the same bytes under another pseudonym
        else:
            zips = _make_zips(case, p, i + 1, phantoms[case], plans[case], others, scratch / case)
        zips_of[case] = zips
        for c, payload in zips.items():
            rel = dicom_relpath(p, c)
            (ddir / rel).parent.mkdir(parents=True, exist_ok=True)
            (ddir / rel).write_bytes(payload)
            entry = dict(path=rel, size=len(payload), sha256=_sha(payload), pseudonym=p, channel=c)
            if case == "manifest_spelling":          # as Windows' Get-FileHash and a careless join write them
                if c == "water":
                    entry["sha256"] = entry["sha256"].upper()
                else:
                    entry["path"] = f"./dicom//{p}/{Path(rel).name}"
            files.append(entry)
    rows = [_covariate_row(i, ps[c], _subject(i)) for i, c in enumerate(CASES)]
    cov = ("\n".join([",".join(COVARIATE_COLUMNS), *rows]) + "\n").encode()
    (ddir / COVARIATES_NAME).write_bytes(cov)
    files.append(dict(path=COVARIATES_NAME, size=len(cov), sha256=_sha(cov)))
    man = {"schema_version": "1.0", "delivery_id": DELIVERY, "created_at": "2016-06-01T00:00:00Z",
           "producer": "tests/ingest/test_dicom_corpus.py", "n_participants": len(rows), "scan_format": "dicom",
           "participants": sorted(ps[c] for c in CASES if c != "unlisted"), "files": files}
    (ddir / MANIFEST_NAME).write_text(json.dumps(man, indent=1))
    (ddir / SUCCESS_MARKER).write_text("")

    manifest = parse_manifest(ddir, (ddir / MANIFEST_NAME).read_bytes())
    batches = plan_batches(manifest, 250)
    layout = DataLayout(root)
    outcomes, scan_facts, quarantine = [], [], []
    for batch in batches:
        facts, q = ingest_scans(batch, ddir, manifest, duplicates={}, layout=layout)
        cov_res, _ = ingest_covariates(batch, ddir, manifest, duplicates={})
        scan_facts += facts
        q = [{**r, "stage": SCANS} for r in q] + [{**r, "stage": COVARIATES} for r in cov_res.quarantine]
        quarantine += q
        # the outcome rows the warehouse would hold: stored (reason None) from the facts and rows, and the quarantine
        outcomes += [dict(stage=SCANS, batch_key=batch.key, pseudonym=f["pseudonym"], reason=None) for f in facts]
        outcomes += [dict(stage=COVARIATES, batch_key=batch.key, pseudonym=p, reason=None)
                     for p in cov_res.rows["pseudonym"].to_list()]
        outcomes += [dict(stage=r["stage"], batch_key=batch.key, pseudonym=r["pseudonym"], reason=r["reason"])
                     for r in q]
    return dict(root=root, ddir=ddir, ps=ps, phantoms=phantoms, manifest=manifest, batches=batches, layout=layout,
                facts={f["pseudonym"]: f for f in scan_facts}, quarantine=quarantine, outcomes=outcomes)


def _reasons(corpus, stage: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for r in corpus["outcomes"]:
        if r["stage"] == stage:
            assert r["pseudonym"] not in out, ("two outcomes", stage, r)
            out[r["pseudonym"]] = r["reason"]
    return out


def test_the_delivery_is_planned_in_one_batch_with_the_unlisted_participant(corpus):
    (batch,) = corpus["batches"]
    assert sorted(batch.participants) == sorted(corpus["ps"].values())
    assert corpus["ps"]["unlisted"] not in corpus["manifest"]["participants"]


def test_each_participant_ends_with_its_reason(corpus):
    ps = corpus["ps"]
    got = _reasons(corpus, SCANS)
    messages = {c: r["message"] for r in corpus["quarantine"] for c in CASES if r["pseudonym"] == ps[c]}
    assert {c: got.get(ps[c], "no outcome") for c in CASES} == CASES, messages
    assert set(corpus["facts"]) == {ps[c] for c in STORED}


def test_other_stages_quarantine_the_unlisted_participant_and_store_the_rest(corpus):
    ps = corpus["ps"]
    got = _reasons(corpus, COVARIATES)
    want = {ps[c]: CASES[c] if COVARIATES in ALSO_AT.get(c, ()) else None for c in CASES}
    assert got == want


def test_the_messages_name_the_problem(corpus):
    ps = corpus["ps"]
    msg = {r["pseudonym"]: r["message"] for r in corpus["quarantine"] if r["stage"] == SCANS}
    assert "station 2: PatientID differs" in msg[ps["foreign_station"]]
    assert "station 3: PatientID differs from the participant's other series" in msg[ps["foreign_patient_id"]]
    # the 5th file of water station 3 (member 20 of the water zip: 8 slices a station), 1000 bytes short; slices
    # are numbered along the slice normal (superior to inferior here), so it is slice 4 of 8
    water = next(i for i, f in enumerate(corpus["manifest"]["files"]) if f["path"] == dicom_relpath(ps["truncated"],
                                                                                                     "water"))
    assert msg[ps["truncated"]] == (f"{DELIVERY}: water station 3: slice 4 of 8 (DICOM zip (files[{water}]) member "
                                    "20): the pixel data ends after 5144 of the 6144 bytes its rows, columns and bits "
                                    "declare (a file cut short)")
    for c in ("duplicate_a", "duplicate_b"):
        assert "has the same content (sha256) as files[" in msg[ps[c]] and "both quarantined" in msg[ps[c]]
    assert "participant list lacks the pseudonym" in msg[ps["unlisted"]]
    assert all(m.startswith(f"{DELIVERY}: ") for m in msg.values())


def test_no_message_holds_a_pseudonym_a_name_or_a_uid(corpus):
    secrets = [*corpus["ps"].values(), NAME, *NAME.split(), FakeIdentity().patient_name, UID_ROOT[:-1]]
    leaks = [(s, r["message"]) for r in corpus["quarantine"] for s in secrets if s in r["message"]]
    assert leaks == []


def test_stored_participants_hold_their_own_body(corpus):
    """Each stored volume is its own phantom's, exactly (stations on the phantom's lattice are copied)."""
    ps, root = corpus["ps"], corpus["root"]
    for c in STORED:
        f = corpus["facts"][ps[c]]
        assert f["stations"] == 4 and f["source_format"] == "dicom", (c, f)
        for contrast in ("water", "fat"):
            img = nib.load(root / f[f"{contrast}_path"])
            np.testing.assert_array_equal(np.asarray(img.dataobj), getattr(corpus["phantoms"][c], contrast),
                                          err_msg=f"{c} {contrast}")
            np.testing.assert_allclose(img.affine, corpus["phantoms"][c].affine, atol=1e-3)


def _sidecar(corpus, case: str) -> dict:
    p = corpus["ps"][case]
    return json.loads((corpus["layout"].derived_dicom(DELIVERY) / p / f"{p}_dixon.json").read_text())


def test_a_dicomdir_is_ignored_and_counted_in_the_sidecar(corpus):
    ps = corpus["ps"]
    assert corpus["facts"][ps["dicomdir"]]["ignored_files"] == len(DICOMDIR_NAMES)
    assert [i["why"] for i in _sidecar(corpus, "dicomdir")["ignored_files"]] == \
        ["a DICOMDIR (the export's index)"] * len(DICOMDIR_NAMES)
    others = [c for c in STORED if c != "dicomdir"]
    assert {c: corpus["facts"][ps[c]]["ignored_files"] for c in others} == {c: 0 for c in others}


def test_files_without_the_preamble_are_read(corpus):
    f = corpus["facts"][corpus["ps"]["no_preamble"]]
    n = sum(len(members((corpus["ddir"] / dicom_relpath(corpus["ps"]["no_preamble"], c)).read_bytes()))
            for c in ("water", "fat"))
    assert f["dicom_files"] == n and f["ignored_files"] == 0
    water = members((corpus["ddir"] / dicom_relpath(corpus["ps"]["no_preamble"], "water")).read_bytes())
    assert all(b[128:132] != b"DICM" for _, b in water)


def test_a_typed_name_appears_nowhere_in_the_outputs(corpus):
    root = corpus["root"]
    p = corpus["ps"]["free_text"]
    assert p in corpus["facts"]
    ddir = corpus["ddir"]
    landed = b"".join(b for c in ("water", "fat") for _, b in members((ddir / dicom_relpath(p, c)).read_bytes()))
    assert NAME.encode() in landed                           # it was there to leak
    outputs = [q for q in root.rglob("*") if q.is_file() and not q.is_relative_to(root / "landing")]
    assert any(q.name == f"{p}_dixon.json" for q in outputs)
    blobs = [gzip.decompress(q.read_bytes()) if q.suffix == ".gz" else q.read_bytes() for q in outputs]
    blobs += [json.dumps(corpus["facts"], default=str).encode(), json.dumps(corpus["quarantine"]).encode()]
    for word in (NAME, *NAME.split()):
        for form in (word, word.upper(), word.replace(" ", "^")):
            assert not any(form.encode() in b for b in blobs), form


def test_every_file_and_covariate_row_is_accounted_for(corpus):
    ddir = corpus["ddir"]
    batches = {b.key: b.participants for b in corpus["batches"]}
    acc = account(ddir, corpus["manifest"], batches, corpus["outcomes"])
    entries = [n for top, dirs, names in os.walk(ddir) for n in
               names + [d for d in dirs if os.path.islink(os.path.join(top, d))]]
    data_rows = [ln for ln in (ddir / COVARIATES_NAME).read_bytes().splitlines()[1:] if ln.strip()]
    assert len(entries) == 2 * len(CASES) + 3 and len(data_rows) == len(CASES)
    files, rows = acc["files"], acc["covariate_rows"]
    assert acc["adds_up"] and files["unaccounted"] == 0 and rows["unaccounted"] == 0, acc
    assert files["pending"] == 0 and rows["pending"] == 0, acc
    assert files["total"] == len(entries) and rows["total"] == len(data_rows), acc
    # each participant's two zips where its scans went; the manifest and covariates.csv stored, the marker ignored
    quarantined: dict[str, int] = {}
    for r in CASES.values():
        if r is not None:
            quarantined[r] = quarantined.get(r, 0) + 2
    assert files["quarantined_reasons"] == quarantined, acc
    assert files["stored"] == 2 * len(STORED) + 2 and files["ignored_reasons"] == {"marker": 1}, acc
    assert rows["stored"] == len(CASES) - 1 and rows["quarantined_reasons"] == {"not_in_participant_list": 1}, acc


def test_the_harmless_manifest_spellings_were_normalised(corpus):
    p = corpus["ps"]["manifest_spelling"]
    raw = json.loads((corpus["ddir"] / MANIFEST_NAME).read_text())
    mine = [f for f in raw["files"] if f.get("pseudonym") == p]
    assert any(f["sha256"] != f["sha256"].lower() for f in mine) and any(f["path"].startswith("./dicom//")
                                                                      for f in mine)
    assert {f["path"] for f in corpus["manifest"]["files"] if f.get("pseudonym") == p} == \
        {dicom_relpath(p, c) for c in ("water", "fat")}

