"""One poisoned delivery never stops the others (issue 26): the delivery-level cases, without a Dagster run.

The sensor's tick, ``cbp status`` and the registry are fed what once made them raise or lose data: an id whose
registry files collide with another delivery's, a manifest nested 100,000 levels deep, a damaged registry record;
harmless variations (upper-case checksums, ``./`` paths, two-member gzip files) must pass; a file completed after
the marker is reported by plain ``cbp status``. A property-based test (hypothesis) feeds the manifest parser random
and mutated manifests: it only ever accepts what the contract allows, and only ever raises ``ManifestError``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import string

import dagster as dg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cbp_platform.ingest import deliveries as dv
from cbp_platform.ingest.batch import duplicate_content
from cbp_platform.ingest.deliveries import (READY, REFUSED, ManifestError, check_delivery, parse_manifest,
                                            scan_landing)
from cbp_platform.ingest.registry import (record_path, register_delivery, registered_deliveries, registered_state,
                                          unreadable_records)
from cbp_platform.landing import PSEUDONYM_ALPHABET, PSEUDONYM_RE

P1, P2 = "ABCDEFGHJK", "MNPQRSTUVW"


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _delivery(landing, did: str, files: dict[str, bytes], participants=(P1,), *, marker=True, edit=None) -> dict:
    d = landing / did
    d.mkdir(parents=True)
    for rel, payload in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(payload)
    man = {"schema_version": "1.0", "delivery_id": did, "created_at": "2026-01-01T00:00:00Z",
           "participants": list(participants),
           "files": [{"path": rel, "size": len(b), "sha256": _sha(b)} for rel, b in files.items()]}
    if edit:
        edit(man)
    (d / "manifest.json").write_text(json.dumps(man))
    if marker:
        (d / "_SUCCESS").write_text("")
    return man


def _files(p: str = P1, water: bytes = b"w" * 100) -> dict[str, bytes]:
    return {f"mri/{p}/{p}_water.nii.gz": water, f"mri/{p}/{p}_fat.nii.gz": b"f" * 90, "covariates.csv": b"x\n"}


def test_an_id_whose_registry_files_would_collide_is_refused_and_the_others_go_on(tmp_path):
    landing = tmp_path / "landing"
    _delivery(landing, "d01", _files())
    _delivery(landing, "d01.manifest", _files(P2), (P2,))
    _delivery(landing, "d01.b001", _files(P2), (P2,))
    _delivery(landing, "bad\nid", _files(P2), (P2,))
    by = {s.delivery_id: s for s in scan_landing(landing)}
    assert by["d01"].state == READY
    for did in ("d01.manifest", "d01.b001", "bad\nid"):
        assert by[did].state == REFUSED and "invalid delivery id" in by[did].reason and "no '.'" in by[did].reason
    st_ = by["d01"]
    register_delivery(tmp_path, st_.path, st_.manifest, st_.manifest_bytes, 10)
    assert [r["delivery_id"] for r in registered_deliveries(tmp_path)] == ["d01"]


def test_a_manifest_nested_100000_levels_deep_is_refused_without_recursion(tmp_path):
    landing = tmp_path / "landing"
    _delivery(landing, "deep", _files())
    (landing / "deep" / "manifest.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _delivery(landing, "ok-d01", _files(P2), (P2,))
    by = {s.delivery_id: s for s in scan_landing(landing)}
    assert by["deep"].state == REFUSED and "nested 100001 levels deep" in by["deep"].reason
    assert by["ok-d01"].state == READY
    # and a string full of brackets is no nesting
    assert dv.nesting_depth(b'{"a": "[[[[{{{{", "b": "\\"[["}') == 1


def test_parser_bounds_each_refuse_by_name(tmp_path, monkeypatch):
    d = tmp_path / "d01"
    man = {"schema_version": "1.0", "delivery_id": "d01", "created_at": "x", "participants": [P1, P2],
           "files": [{"path": f"f{i}", "size": 1, "sha256": "a" * 64} for i in range(3)]}
    monkeypatch.setattr(dv, "MAX_MANIFEST_FILES", 2)
    with pytest.raises(ManifestError, match=r"3 files listed \(limit 2\)"):
        parse_manifest(d, json.dumps(man).encode())
    monkeypatch.setattr(dv, "MAX_MANIFEST_PARTICIPANTS", 1)
    with pytest.raises(ManifestError, match=r"2 participants listed \(limit 1\)"):
        parse_manifest(d, json.dumps({**man, "files": []}).encode())
    monkeypatch.setattr(dv, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(ManifestError, match="more than a manifest may hold"):
        parse_manifest(d, json.dumps(man).encode())


def test_harmless_variations_are_normalised_and_escapes_still_refused(tmp_path):
    d = tmp_path / "d01"
    base = {"schema_version": "1.0", "delivery_id": "d01", "created_at": "x", "participants": [P1]}
    sha = "AB" * 32
    doc = parse_manifest(d, json.dumps({**base, "files": [
        {"path": f"./mri/{P1}/{P1}_water.nii.gz", "size": 1, "sha256": sha},
        {"path": f"mri//{P1}/{P1}_fat.nii.gz/", "size": 1, "sha256": sha.lower()},
        {"path": "covariates.csv", "size": 1, "sha256": sha}]}).encode())
    assert [f["path"] for f in doc["files"]] == [f"mri/{P1}/{P1}_water.nii.gz", f"mri/{P1}/{P1}_fat.nii.gz",
                                                 "covariates.csv"]
    assert {f["sha256"] for f in doc["files"]} == {sha.lower()}
    for bad, why in ((f"mri/../../{P1}", "escapes"), ("/etc/passwd", "escapes"), ("a\\b", "escapes"),
                     (".", "escapes"), ("a/\x00b", "escapes")):
        with pytest.raises(ManifestError, match=why):
            parse_manifest(d, json.dumps({**base, "files": [{"path": bad, "size": 1, "sha256": sha}]}).encode())
    twice = [{"path": "covariates.csv", "size": 1, "sha256": sha}, {"path": "./covariates.csv", "size": 1,
                                                                    "sha256": sha}]
    with pytest.raises(ManifestError, match=r"files\[1\] names the same file as files\[0\]"):
        parse_manifest(d, json.dumps({**base, "files": twice}).encode())
    for entry, why in (({"path": "a", "size": True, "sha256": sha}, "lacks"),
                       ({"path": "a", "size": -1, "sha256": sha}, "negative size"),
                       ({"path": "a", "size": 1, "sha256": "g" * 64}, "64 hexadecimal")):
        with pytest.raises(ManifestError, match=why):
            parse_manifest(d, json.dumps({**base, "files": [entry]}).encode())


def test_the_sensor_and_status_survive_every_poisoned_delivery_and_register_the_good_one(tmp_path):
    from assets.sensors import delivery_sensor
    from cbp_platform.ingest.status import format_report, landing_report
    from resources import DataRootResource

    landing = tmp_path / "landing"
    _delivery(landing, "good-d01", _files())
    _delivery(landing, "good-d01.manifest", _files(P2), (P2,))
    _delivery(landing, "deep", _files(P2), (P2,))
    (landing / "deep" / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    _delivery(landing, "dir-manifest", _files(P2), (P2,))
    (landing / "dir-manifest" / "manifest.json").unlink()
    (landing / "dir-manifest" / "manifest.json").mkdir()
    dr = DataRootResource(root=str(tmp_path), batch_size=10)
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, resources={"data_root": dr}) as ctx:
            r1 = delivery_sensor(ctx)
        assert [r.partition_key for r in r1.run_requests] == ["good-d01.b001"]
        refused = json.loads(r1.cursor)["refused"]
        assert set(refused) == {"good-d01.manifest", "deep", "dir-manifest"}
        # a registry record damaged on disk: the next tick and cbp status go on, and name it
        (record_path(tmp_path, "good-d01")).write_text("{not json")
        assert [r["delivery_id"] for r in unreadable_records(tmp_path)] == ["good-d01"]
        with dg.build_sensor_context(instance=instance, cursor=r1.cursor, resources={"data_root": dr}) as ctx:
            delivery_sensor(ctx)
    reports = {r.delivery_id: r for r in landing_report(tmp_path, landing)}
    assert reports["deep"].state == REFUSED and reports["good-d01"].state == REFUSED
    assert "cannot be read" in reports["good-d01"].reason or "registration failed" in reports["good-d01"].reason
    assert "good-d01" in format_report(list(reports.values()))


def test_a_file_completed_after_the_marker_is_reported_by_plain_status(tmp_path):
    landing = tmp_path / "landing"
    water = b"w" * 1000
    man = _delivery(landing, "d01", _files(water=water))
    rel = f"mri/{P1}/{P1}_water.nii.gz"
    (landing / "d01" / rel).write_bytes(water[:300])                   # still being copied at _SUCCESS
    st_ = check_delivery(landing / "d01")
    register_delivery(tmp_path, st_.path, st_.manifest, st_.manifest_bytes, 10)
    (rec,) = registered_deliveries(tmp_path)
    assert rec["unsettled"] == [rel] and registered_state(tmp_path, landing, rec) == ("registered", "")
    (landing / "d01" / rel).write_bytes(water)                         # the copy completes
    state, reason = registered_state(tmp_path, landing, rec)           # cheap: not --deep
    i = [f["path"] for f in man["files"]].index(rel)
    assert state == "changed" and f"files[{i}] incomplete when the delivery closed" in reason
    assert "re-run the batch" in reason and P1 not in reason


def test_identical_content_under_two_pseudonyms_is_found_in_the_manifest():
    man = {"files": [{"path": f"mri/{P1}/{P1}_water.nii.gz", "sha256": "a" * 64},
                     {"path": f"mri/{P1}/{P1}_fat.nii.gz", "sha256": "b" * 64},
                     {"path": f"mri/{P2}/{P2}_water.nii.gz", "sha256": "a" * 64},
                     {"path": "covariates.csv", "sha256": "a" * 64}]}
    out = duplicate_content(man)
    assert set(out) == {P1, P2}
    assert "files[0]" in out[P1] and "files[2]" in out[P1] and P2 not in out[P1]


def test_a_two_member_gzip_is_read_as_one_stream(tmp_path):
    import numpy as np

    from cbp_platform.imaging.nifti import nifti_bytes
    from cbp_platform.ingest.scans import ScanProblem, inspect_participant

    rng = np.random.default_rng(0)
    water, fat = ((rng.random((20, 20, 20)) * 100 + 1).astype(np.float32) for _ in range(2))
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    raw = gzip.decompress(nifti_bytes(water, aff))
    two = gzip.compress(raw[:1000], mtime=0) + gzip.compress(raw[1000:], mtime=0) + gzip.compress(b"", mtime=0)
    files = {f"mri/{P1}/{P1}_water.nii.gz": two, f"mri/{P1}/{P1}_fat.nii.gz": nifti_bytes(fat, aff)}
    man = _delivery(tmp_path, "d01", files)
    by = {f["path"]: f for f in man["files"]}
    facts = inspect_participant(tmp_path / "d01", P1, by, swap_qc=False)
    assert facts["water_max"] == pytest.approx(float(water.max()))
    # a further member holding data is data after the image
    more = two + gzip.compress(b"extra", mtime=0)
    man = _delivery(tmp_path, "d03", {**files, f"mri/{P1}/{P1}_water.nii.gz": more})
    with pytest.raises(ScanProblem) as exc:
        inspect_participant(tmp_path / "d03", P1, {f["path"]: f for f in man["files"]}, swap_qc=False)
    assert exc.value.reason == "trailing_data"


# --- property-based: the manifest parser ----------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda children: st.lists(children, max_size=4)
                     | st.dictionaries(st.text(max_size=10), children, max_size=4), max_leaves=20)
_pseudonym = st.text(alphabet=PSEUDONYM_ALPHABET, min_size=10, max_size=10)
_path = st.lists(st.sampled_from(["mri", "dicom", ".", "..", "", "a b", "x.nii.gz", "\\", "covariates.csv",
                                  "\x00", "é"]) | _pseudonym, min_size=1, max_size=5).map("/".join)
_entry = st.fixed_dictionaries({"path": _path | st.text(max_size=30),
                                "size": st.integers(-5, 10**12) | st.booleans() | st.floats(),
                                "sha256": st.text(alphabet="0123456789abcdefABCDEFg", min_size=62, max_size=66)})
_manifest = st.fixed_dictionaries({
    "schema_version": st.sampled_from(["1.0", "1.3", "2.0", ""]),
    "delivery_id": st.just("d01") | st.text(max_size=5),
    "created_at": st.text(max_size=5),
    "participants": st.lists(_pseudonym | st.text(max_size=12), max_size=4),
    "files": st.lists(_entry, max_size=5)}) | _json


def _check_contract(doc: dict) -> None:
    assert doc["delivery_id"] == "d01" and isinstance(doc["participants"], list)
    assert all(isinstance(p, str) and PSEUDONYM_RE.match(p) for p in doc["participants"])
    paths = [f["path"] for f in doc["files"]]
    assert len(paths) == len(set(paths))
    for f in doc["files"]:
        parts = f["path"].split("/")
        assert f["path"] and not f["path"].startswith("/") and "\\" not in f["path"]
        assert all(p not in ("", ".", "..") for p in parts)
        assert type(f["size"]) is int and f["size"] >= 0
        assert len(f["sha256"]) == 64 and set(f["sha256"]) <= set(string.hexdigits.lower())


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_manifest)
@example(doc={"schema_version": "1.0", "delivery_id": "d01", "created_at": "", "participants": [],
              "files": [{"path": "./a", "size": 0, "sha256": "A" * 64}, {"path": "a", "size": 0, "sha256": "a" * 64}]})
def test_the_manifest_parser_accepts_only_the_contract_and_raises_only_manifest_error(tmp_path_factory, doc):
    d = tmp_path_factory.getbasetemp() / "d01"
    try:
        out = parse_manifest(d, json.dumps(doc).encode())
    except ManifestError:
        return
    _check_contract(out)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.data())
def test_mutated_manifest_bytes_never_escape_the_parser(tmp_path_factory, data):
    d = tmp_path_factory.getbasetemp() / "d01"
    valid = json.dumps({"schema_version": "1.0", "delivery_id": "d01", "created_at": "2026", "participants": [P1],
                        "files": [{"path": f"mri/{P1}/{P1}_water.nii.gz", "size": 10, "sha256": "c" * 64}]}).encode()
    buf = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        i = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=8) | st.sampled_from([b"[" * 50, b"{", b"\\u0000"]))
        elif buf:
            del buf[i]
    try:
        out = parse_manifest(d, bytes(buf))
    except ManifestError:
        return
    _check_contract(out)


def test_cbp_status_never_raises_on_a_poisoned_landing_zone(tmp_path, monkeypatch):
    from cbp_platform.cli import main as cbp

    landing = tmp_path / "landing"
    _delivery(landing, "good-d01", _files())
    _delivery(landing, "x.manifest", _files(P2), (P2,))
    (landing / "deep").mkdir()
    (landing / "deep" / "manifest.json").write_text("{" * 200_000)
    (landing / "deep" / "_SUCCESS").write_text("")
    monkeypatch.setenv("CBP_DATA_ROOT", str(tmp_path))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    for args in (["status"], ["status", "--json"], ["status", "--deep", "--explain"]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert cbp(args) == 0
    assert "x.manifest" in buf.getvalue() and "nested 200000 levels deep" in buf.getvalue()
