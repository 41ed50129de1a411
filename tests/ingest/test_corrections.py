"""Correction deliveries (issue 27), without a Dagster run: the manifest's ``corrections``, the registry's
refusals, batches grouped by what they correct, and ``cbp synth --correct``.

A correction is refused whole, with a message naming the manifest entry (``corrections[i]``) and never the
pseudonym, when it is malformed (the parser) or names a participant the platform does not hold or a delivery it did
not register (the registry, under its lock). A refused correction leaves no trace in the registry.
"""

from __future__ import annotations

import csv
import hashlib
import json

import pytest

from cbp_platform.ingest.deliveries import (READY, REFUSED, ManifestError, check_delivery, parse_manifest,
                                            plan_batches)
from cbp_platform.ingest.registry import (check_correction, duplicates_of, holders, owners, record_path,
                                          register_delivery, registered_deliveries)
from cbp_platform.ingest.status import landing_report
from cbp_platform.landing import CORRECTION_REASONS

P1, P2, P3, P4 = "ABCDEFGHJK", "MNPQRSTUVW", "XYZ2345678", "9ABCDEFGHJ"


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _write(landing, did: str, files: dict[str, bytes], participants, **extra) -> tuple:
    d = landing / did
    d.mkdir(parents=True)
    entries = []
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
        entries.append({"path": rel, "size": len(data), "sha256": _sha(data)})
    man = {"schema_version": "1.0", "delivery_id": did, "created_at": "2026-01-01T00:00:00Z",
           "participants": sorted(participants), "files": entries, **extra}
    payload = json.dumps(man).encode()
    (d / "manifest.json").write_bytes(payload)
    (d / "_SUCCESS").write_bytes(b"")
    return d, payload


def _register(root, did: str):
    st = check_delivery(root / "landing" / did)
    assert st.state == READY, st.reason
    return register_delivery(root, st.path, st.manifest, st.manifest_bytes, batch_size=2)


def _scan(p: str) -> dict[str, bytes]:
    return {f"mri/{p}/{p}_water.nii.gz": b"w" + p.encode(), f"mri/{p}/{p}_fat.nii.gz": b"f" + p.encode()}


def _entry(p: str, sup: str = "d1", parts=("covariates",), reason: str = "covariate_error") -> dict:
    return {"pseudonym": p, "supersedes": sup, "parts": list(parts), "reason": reason}


@pytest.fixture
def root(tmp_path):
    """A platform holding d1 (P1, P2, P3) and d2 (P4, and P1 again: a duplicate it does not own)."""
    _write(tmp_path / "landing", "d1", {"covariates.csv": b"x", **_scan(P1), **_scan(P2), **_scan(P3)},
           [P1, P2, P3])
    _write(tmp_path / "landing", "d2", {"covariates.csv": b"y", **_scan(P4)}, [P4, P1])
    _register(tmp_path, "d1")
    _register(tmp_path, "d2")
    return tmp_path


def test_a_correction_registers_in_batches_grouped_by_what_it_corrects(root):
    cov = {"covariates.csv": b"corrected"}
    entries = [_entry(P1), _entry(P2, parts=("scan",), reason="rescan"),
               _entry(P3, parts=("scan", "covariates"), reason="resent"), _entry(P4, "d2", reason="site_reassigned")]
    _write(root / "landing", "c1", {**cov, **_scan(P2), **_scan(P3)}, [P1, P2, P3, P4], kind="correction",
           corrections=entries)
    batches = _register(root, "c1")
    assert [(b.parts, b.participants) for b in batches] == [
        (("scan",), [P2]), (("scan", "covariates"), [P3]), (("covariates",), sorted([P1, P4]))]
    assert [b.covers("scan") for b in batches] == [True, True, False]
    assert [b.key for b in batches] == ["c1.b001", "c1.b002", "c1.b003"]
    rec = json.loads(record_path(root, "c1").read_text())
    assert rec["kind"] == "correction" and rec["seq"] == 3
    # a correction owns nothing, and its participants are not duplicates: they are the versions it brings
    assert owners(root) == {P1: "d1", P2: "d1", P3: "d1", P4: "d2"}
    assert duplicates_of(root, "c1") == {} and duplicates_of(root, "d2") == {P1: "d1"}
    assert holders(root)[P1] == ["d1", "c1"] and holders(root)[P4] == ["d2", "c1"]
    # a second correction may supersede the first
    _write(root / "landing", "c2", cov, [P1], kind="correction", corrections=[_entry(P1, "c1")])
    assert [b.parts for b in _register(root, "c2")] == [("covariates",)]


@pytest.mark.parametrize("entry, message", [
    (_entry(P1, "d9"), "corrections[1] supersedes delivery 'd9', which this platform did not register"),
    (_entry("22222AAAAA"), "corrections[1] names a participant this platform does not hold"),
    (_entry(P1, "d2"), "corrections[1] supersedes delivery 'd2', which did not bring this participant"),
])
def test_a_correction_naming_what_the_platform_does_not_hold_is_refused_whole(root, entry, message):
    _write(root / "landing", "c1", {"covariates.csv": b"c"}, [P2, entry["pseudonym"]], kind="correction",
           corrections=[_entry(P2), entry])
    st = check_delivery(root / "landing" / "c1")
    assert st.state == READY                                  # well-formed: only the registry can tell
    assert message in check_correction(root, st.manifest)
    with pytest.raises(ManifestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        register_delivery(root, st.path, st.manifest, st.manifest_bytes, batch_size=2)
    assert not record_path(root, "c1").exists()               # no trace: nothing in force can change
    assert [r["delivery_id"] for r in registered_deliveries(root)] == ["d1", "d2"]
    assert not list((root / "registry" / "batches").glob("c1.*"))
    (rep,) = [r for r in landing_report(root, root / "landing") if r.delivery_id == "c1"]
    assert (rep.state, rep.reason) == (REFUSED, check_correction(root, st.manifest))
    assert entry["pseudonym"] not in rep.reason and P2 not in rep.reason


MALFORMED = [
    ({"corrections": []}, "a correction needs a non-empty list 'corrections'"),
    ({"corrections": [_entry("lowercase1")]}, "corrections[0]: 'pseudonym' missing or not a valid pseudonym"),
    ({"corrections": [_entry(P1), _entry(P1)]}, "corrections[1] names the same participant as corrections[0]"),
    ({"corrections": [_entry(P1, "c1")]}, "corrections[0]: a delivery cannot supersede itself"),
    ({"corrections": [_entry(P1, "../d1")]}, "corrections[0]: 'supersedes' missing or not a delivery id"),
    ({"corrections": [_entry(P1, parts=())]}, "corrections[0]: 'parts' must list what it corrects"),
    ({"corrections": [_entry(P1, parts=("mri",))]}, "corrections[0]: 'parts' must list what it corrects"),
    ({"corrections": [_entry(P1, reason="typo")]}, "corrections[0]: reason 'typo' is not a registered"),
    ({"corrections": [_entry(P1, parts=("scan",), reason="covariate_error")]},
     "corrections[0]: reason 'covariate_error' corrects only covariates, not scan"),
    ({"corrections": [_entry(P1)], "participants": [P1, P2]}, "'participants' must list exactly the corrected"),
    ({"kind": "erratum"}, "kind 'erratum' not supported"),
    ({"kind": "delivery", "corrections": [_entry(P1)]}, "lists corrections but is not a correction"),
]


@pytest.mark.parametrize("change, message", MALFORMED)
def test_a_malformed_correction_is_refused_naming_the_entry(tmp_path, change, message):
    man = {"schema_version": "1.0", "delivery_id": "c1", "created_at": "2026-01-01T00:00:00Z", "kind": "correction",
           "participants": [P1], "files": [{"path": "covariates.csv", "size": 1, "sha256": "0" * 64}], **change}
    with pytest.raises(ManifestError) as exc:
        parse_manifest(tmp_path / "c1", json.dumps(man).encode())
    assert message in str(exc.value) and P1 not in str(exc.value)


def test_the_files_of_a_correction_must_match_what_it_corrects(tmp_path):
    def refused(files: dict, entries: list, participants) -> str:
        man = {"schema_version": "1.0", "delivery_id": "c1", "created_at": "2026-01-01T00:00:00Z",
               "kind": "correction", "participants": participants, "corrections": entries,
               "files": [{"path": p, "size": 1, "sha256": "0" * 64} for p in files]}
        with pytest.raises(ManifestError) as exc:
            parse_manifest(tmp_path / "c1", json.dumps(man).encode())
        return str(exc.value)

    assert "corrections[0] corrects covariates, but covariates.csv is not listed" in refused(
        list(_scan(P1)), [_entry(P1)], [P1])
    assert "corrections[0] corrects the scan, but no file is listed" in refused(
        ["covariates.csv"], [_entry(P1, parts=("scan",), reason="rescan")], [P1])
    assert "lies in the folder of corrections[0], which does not correct the scan" in refused(
        ["covariates.csv", *_scan(P1)], [_entry(P1)], [P1])
    assert "lies under a participant folder that no corrections entry names" in refused(
        ["covariates.csv", *_scan(P2)], [_entry(P1)], [P1])


def test_every_reason_code_is_explained_and_names_the_parts_it_may_correct():
    for code, (parts, meaning) in CORRECTION_REASONS.items():
        assert parts and set(parts) <= {"scan", "covariates"} and len(meaning) > 20, code


def test_plan_batches_of_an_ordinary_delivery_is_unchanged():
    man = {"delivery_id": "d1", "participants": [P3, P1, P2], "files": []}
    assert [(b.key, b.participants, b.parts) for b in plan_batches(man, 2)] == [
        ("d1.b001", [P1, P2], ()), ("d1.b002", [P3], ())]


def test_synth_writes_a_correction_the_platform_accepts(tmp_path):
    from cbp_platform.synth.correction import synthesize_correction
    from cbp_platform.synth.delivery import SynthError, synthesize

    synthesize(participants=24, deliveries=1, seed=31, data_root=tmp_path, workers=1)
    res = synthesize_correction(of="sim31-d01", seed=4, data_root=tmp_path, covariates=5, rescans=1)
    assert res.delivery_ids == ["sim31-d01-c01"]
    cdir = tmp_path / "landing" / "sim31-d01-c01"
    st = check_delivery(cdir)
    assert st.state == READY, st.reason
    man = st.manifest
    assert man["kind"] == "correction" and len(man["corrections"]) == 6
    assert sorted(e["reason"] for e in man["corrections"]).count("rescan") == 1
    # the corrected rows differ from the original in exactly the fields corrections.csv records
    with open(tmp_path / "landing" / "sim31-d01" / "covariates.csv", newline="") as fh:
        old = {r["pseudonym"]: r for r in csv.DictReader(fh)}
    with open(cdir / "covariates.csv", newline="") as fh:
        new = {r["pseudonym"]: r for r in csv.DictReader(fh)}
    with open(tmp_path / "truth" / "sim31-d01-c01" / "corrections.csv", newline="") as fh:
        logged = list(csv.DictReader(fh))
    diff = sorted((p, c, old[p][c], new[p][c]) for p in new for c in new[p] if new[p][c] != old[p][c])
    assert diff == sorted((r["pseudonym"], r["field"], r["old"], r["new"]) for r in logged if r["field"] != "scan")
    assert len(new) == 5 and all(any(d[0] == p for d in diff) for p in new)
    # the re-scan is a new image of the same participant: files of its own, not the original's bytes
    (rescan,) = [e["pseudonym"] for e in man["corrections"] if e["reason"] == "rescan"]
    orig = {f["path"]: f["sha256"] for f in json.loads((tmp_path / "landing" / "sim31-d01" / "manifest.json")
                                                       .read_text())["files"]}
    mine = {f["path"]: f["sha256"] for f in man["files"] if f["path"].startswith("mri/")}
    assert set(mine) == {p for p in orig if p.startswith(f"mri/{rescan}/")}
    assert all(mine[p] != orig[p] for p in mine)
    assert (tmp_path / "truth" / "sim31-d01-c01" / "labels" / f"{rescan}_labels.nii.gz").exists()
    # the same seed writes the same correction (deterministic), a second one gets the next id
    res2 = synthesize_correction(of="sim31-d01", seed=4, data_root=tmp_path, covariates=5, rescans=1)
    assert res2.delivery_ids == ["sim31-d01-c02"]
    assert (cdir / "covariates.csv").read_bytes() == (tmp_path / "landing" / "sim31-d01-c02" /
                                                      "covariates.csv").read_bytes()
    with pytest.raises(SynthError, match="no complete delivery"):
        synthesize_correction(of="sim99-d01", seed=4, data_root=tmp_path)
