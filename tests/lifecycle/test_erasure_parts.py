"""The parts of an erasure (issue 28), without Dagster: the byte scan, the certificates and their chain, the
redaction of a delivery, the release's salted Merkle commitment, the data map's coverage of DataLayout, and the
warehouse's erase and rewrite on DuckDB. The whole path through the pipeline: tests/lifecycle/test_erasure.py."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import zipfile

import polars as pl
import pytest

from cbp_platform.erasure.certificates import KEY_ENV, Signer, verify
from cbp_platform.erasure.datamap import NOT_STORES, STORES
from cbp_platform.erasure.scan import needles_for, scan
from cbp_platform.paths import DataLayout

P, Q = "ABCDEFGHJK", "MNPQRSTUVW"


def test_the_byte_scan_finds_a_pseudonym_in_files_gzip_streams_zip_members_and_names(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "plain.txt").write_bytes(b"x" * (8 << 20) + P.encode()[:4])          # a part only: no hit
    (root / "a" / "split.bin").write_bytes(b"y" * ((8 << 20) - 3) + P.encode() + b"z")  # across two 8 MiB chunks
    (root / "a" / "vol.nii.gz").write_bytes(gzip.compress(b"header " + P.lower().encode() + b" data"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("series/1.dcm", b"DICM" + b"\0" * 100 + P.encode())
    (root / "a" / "dixon.zip").write_bytes(buf.getvalue())
    (root / f"{P}_seg").mkdir()
    copy = b"a file the participant had"
    (root / "a" / "renamed.bin").write_bytes(copy)
    (root / "a" / "manifest.json").write_text(json.dumps({"sha256": hashlib.sha256(b"other").hexdigest()}))
    res = scan([root], needles_for(P, [hashlib.sha256(copy).hexdigest(), hashlib.sha256(b"other").hexdigest()]),
               {hashlib.sha256(copy).hexdigest(): "the file"})
    where = {(h.path, h.member, h.what) for h in res.hits}
    assert ("root/a/split.bin", "", "pseudonym") in where
    assert ("root/a/vol.nii.gz", "gzip", "pseudonym (lower case)") in where
    assert ("root/a/dixon.zip", "series/1.dcm", "pseudonym") in where
    assert ("root/a/renamed.bin", "", "the file (a copy: same sha256)") in where
    assert {("root/a/manifest.json", "", "sha256 of file 1"), ("root/a/manifest.json", "", "sha256 of file 2")} & where
    assert any(h.path == f"root/{P}_seg" and h.what == "pseudonym in the path" for h in res.hits)
    assert not any(h.path == "root/a/plain.txt" for h in res.hits)                     # 4 of 10 characters: no hit
    assert res.members == 2 and not res.unreadable and res.damaged == []
    (root / "a" / "cut.nii.gz").write_bytes(gzip.compress(os.urandom(4000))[:2000])          # truncated: counted
    cut = scan([root / "a" / "cut.nii.gz"], needles_for(P))
    assert cut.damaged == ["cut.nii.gz"] and cut.as_dict()["damaged_archives"] == 1
    # nothing of another participant
    assert scan([root], needles_for(Q)).hits == []


def test_certificates_are_signed_and_chained_and_tampering_or_deletion_is_found(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    folder = tmp_path / "w"
    signer = Signer(folder)
    applied = []
    paths = []
    for i in range(3):
        path, digest = signer.issue({"request_ids": [f"R{i}"], "keyed_hash": f"{i:064x}", "verified": True})
        applied.append({"request_id": f"R{i}", "certificate": path.name, "certificate_sha256": digest})
        paths.append(path)
    assert (folder / "erasure_signing.pem").stat().st_mode & 0o777 == 0o600
    assert [json.loads(p.read_text())["seq"] for p in paths] == [1, 2, 3]
    assert all(verify(p, folder, applied) == [] for p in paths)
    # an edited certificate: its signature fails, and the next one no longer names its sha256
    original = paths[1].read_bytes()
    doc = json.loads(original)
    doc["verified"] = False
    paths[1].write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    problems = verify(paths[1], folder, applied)
    assert any("signature does not match" in p for p in problems)
    assert any("003.json does not name the sha256" in p for p in problems)
    paths[1].write_bytes(original)
    assert verify(paths[1], folder, applied) == []
    # a certificate re-signed with another key: the signature holds, the key is not the deployment's
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cbp_platform.erasure.certificates import _raw, canonical
    other = Ed25519PrivateKey.generate()
    doc = json.loads(original)
    doc["public_key"] = _raw(other.public_key()).hex()
    import base64
    doc["signature"] = base64.b64encode(other.sign(canonical(doc))).decode()
    paths[1].write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    assert any("not by this deployment's key" in p for p in verify(paths[1], folder, applied))
    paths[1].write_bytes(original)
    # the last certificate deleted: the register's applied record points at nothing
    paths[2].unlink()
    assert any("which is gone" in p for p in verify(paths[1], folder, applied))
    # a middle one deleted: the chain has a gap
    signer.issue({"request_ids": ["R3"]})
    paths[0].unlink()
    assert any("the chain expects 1" in p for p in verify(paths[1], folder, applied[1:2]))


def test_a_lost_signing_key_is_never_replaced_while_certificates_exist(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    signer = Signer(tmp_path)
    signer.issue({"request_ids": ["R1"]})
    (tmp_path / "erasure_signing.pem").unlink()
    with pytest.raises(Exception, match="restore the key"):
        signer.issue({"request_ids": ["R2"]})


def _delivery(root, did: str, people: list[str]):
    """A registered NIfTI-like delivery of ``people`` (files, covariates, manifest; registry record and batch)."""
    from cbp_platform.ingest.registry import register_delivery

    ddir = DataLayout(root).landing / did
    files = []
    for p in people:
        for c in ("water", "fat"):
            rel = f"mri/{p}/{p}_{c}.nii.gz"
            data = gzip.compress(f"{p} {c}".encode())
            (ddir / rel).parent.mkdir(parents=True, exist_ok=True)
            (ddir / rel).write_bytes(data)
            files.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pseudonym": p,
                          "channel": c})
    cov = ("pseudonym,site,age\n" + "".join(f"{p},S1,{50 + i}\n" for i, p in enumerate(people))).encode()
    (ddir / "covariates.csv").write_bytes(cov)
    files.append({"path": "covariates.csv", "size": len(cov), "sha256": hashlib.sha256(cov).hexdigest()})
    manifest = {"schema_version": "1.0", "delivery_id": did, "created_at": "2026-01-01T00:00:00Z",
                "n_participants": len(people), "participants": people, "files": files}
    body = (json.dumps(manifest, indent=1) + "\n").encode()
    (ddir / "manifest.json").write_bytes(body)
    (ddir / "_SUCCESS").write_bytes(b"")
    register_delivery(root, ddir, manifest, body, batch_size=100)
    return ddir


def test_redaction_removes_one_participant_and_keeps_every_other_byte(tmp_path):
    from cbp_platform.ingest.redaction import redact
    from cbp_platform.ingest.registry import registered_deliveries, registered_state

    root = tmp_path / "data"
    others = ["23456789AB", "CDEFGHJKMN"]
    ddir = _delivery(root, "d01", [others[0], P, others[1]])
    keep = {p: p.read_bytes() for p in ddir.rglob("*.nii.gz") if P not in str(p)}
    cov_before = (ddir / "covariates.csv").read_bytes()
    rec = registered_deliveries(root)[0]
    assert registered_state(root, root / "landing", rec)[0] == "registered"
    out = redact(root, P, "all", "TTP-1")
    assert out["files_removed"] == 2 and out["covariate_lines_removed"] == 1 and out["deliveries"] == 1
    assert len(out["digests"]) == 2
    assert not (ddir / "mri" / P).exists()
    assert {p: p.read_bytes() for p in ddir.rglob("*.nii.gz")} == keep                  # byte-identical
    cov = (ddir / "covariates.csv").read_bytes()
    assert cov == b"".join(line for line in cov_before.splitlines(keepends=True) if P.encode() not in line)
    for p in [*ddir.rglob("*"), *(root / "registry").rglob("*")]:
        if p.is_file():
            assert P.encode() not in p.read_bytes(), p
            assert not any(d in p.read_bytes() for d in (x.encode() for x in out["digests"])), p
    # the sensor's view: redacted, not changed; a second redaction finds nothing
    rec = registered_deliveries(root)[0]
    state, reason = registered_state(root, root / "landing", rec)
    assert state == "redacted" and "1 withdrawn participant" in reason and P not in reason
    assert registered_state(root, root / "landing", rec, deep=True)[0] == "redacted"
    assert redact(root, P, "all", "TTP-1")["deliveries"] == 0
    # an imaging-only redaction keeps the covariates line and the participant in the manifest
    redact(root, others[0], "imaging", "TTP-2")
    man = json.loads((ddir / "manifest.json").read_text())
    assert others[0] in man["participants"] and others[0].encode() in (ddir / "covariates.csv").read_bytes()
    assert not (ddir / "mri" / others[0]).exists()
    assert registered_state(root, root / "landing", registered_deliveries(root)[0], deep=True)[0] == "redacted"


def test_a_release_commitment_still_verifies_after_participants_are_erased():
    from cbp_platform.releases import Release, commit, merkle_root, verify_commitment

    people = [f"{c}BCDEFGHJK" for c in "23456789"]
    versions = pl.DataFrame({"release_id": [1] * 8, "stage": ["raw_mri_scans"] * 8, "pseudonym": people,
                             "model_name": [""] * 8, "delivery_id": ["d1"] * 8, "registration_seq": [1] * 8,
                             "version_sha256": [f"{i:064x}" for i in range(8)]})
    parts = pl.DataFrame({"release_id": [1] * 8, "pseudonym": people, "retired_by": [""] * 8,
                          "qc_rejected": [False] * 8, "withdrawn": [""] * 8})
    quarantine = pl.DataFrame(schema={"release_id": pl.Int64, "pseudonym": pl.String, "stage": pl.String,
                                      "reason": pl.String, "delivery_id": pl.String})
    rel = Release(1, versions, parts, quarantine, "c" * 64)
    salts, leaves, root = commit(rel)
    assert salts.height == 8 and leaves.height == 8 and root == merkle_root(leaves["leaf"].to_list())
    ok = verify_commitment(root, leaves["leaf"].to_list(), salts, versions, parts, quarantine)
    assert ok == {"root_ok": True, "participants": 8, "recomputed": 8, "erased": 0, "mismatched": 0}
    # two participants erased: their salts and rows gone, their leaves opaque
    gone = people[2:4]
    keep = lambda df: df.filter(~pl.col("pseudonym").is_in(gone))           # noqa: E731
    after = verify_commitment(root, leaves["leaf"].to_list(), keep(salts), keep(versions), keep(parts), quarantine)
    assert after == {"root_ok": True, "participants": 8, "recomputed": 6, "erased": 2, "mismatched": 0}
    # a surviving row changed: its leaf no longer recomputes
    changed = keep(versions).with_columns(pl.when(pl.col("pseudonym") == people[0]).then(pl.lit("f" * 64))
                                          .otherwise(pl.col("version_sha256")).alias("version_sha256"))
    assert verify_commitment(root, leaves["leaf"].to_list(), keep(salts), changed, keep(parts),
                             quarantine)["mismatched"] == 1
    # the same rows, new salts: a new root (salts are random), so a leaf cannot be recomputed by guessing
    assert commit(rel)[2] != root


def test_every_path_of_the_data_layout_belongs_to_exactly_one_store():
    members = {n for n in dir(DataLayout) if not n.startswith("_")} | {"root"}
    claimed = [m for s in STORES for m in s.layout]
    assert len(claimed) == len(set(claimed)), "a DataLayout path claimed by two stores"
    assert members - set(NOT_STORES) == set(claimed), "a DataLayout path in no store of the data map"
    assert {s.name for s in STORES} >= {"landing", "derived", "warehouse", "registry", "published", "dagster"}
    assert all(s.erase is not None for s in STORES if s.name in ("landing", "derived", "warehouse", "registry"))


def test_the_duckdb_warehouse_erases_every_version_and_rewrites_its_file(tmp_path):
    from resources.warehouse import DuckDBWarehouse, UndeclaredTable

    wh = DuckDBWarehouse(database=str(tmp_path / "wh" / "cbp.duckdb"))
    people = [P, Q] + [f"{c}BCDEFGHJK" for c in "234567"]
    cov = pl.DataFrame({"pseudonym": people, "delivery_id": ["d1"] * 8, "batch_key": ["d1.b001"] * 8,
                        "age": list(range(50, 58))})
    wh.replace_rows("participant_covariates", cov, {"batch_key": "d1.b001"})
    wh.replace_rows("participant_covariates", cov.filter(pl.col("pseudonym") == P).with_columns(
        pl.lit("d2").alias("delivery_id"), pl.lit("d2.b001").alias("batch_key"), pl.lit("d1").alias("supersedes"),
        pl.lit(2, pl.Int64).alias("registration_seq")), {"batch_key": "d2.b001"})
    wh.replace_rows("quarantine", pl.DataFrame({"pseudonym": [P, P],
                                                "stage": ["raw_mri_scans", "participant_covariates"],
                                                "reason": ["missing_water", "bad_age"]}), {})
    assert wh.participant_rows(P) == {"participant_covariates": 2, "quarantine": 2}
    assert wh.participant_rows(P, "imaging") == {"quarantine": 1}
    assert wh.erase_participant(P, "imaging") == {"quarantine": 1}
    assert wh.erase_participant(P, "all") == {"participant_covariates": 2, "quarantine": 1}
    res = wh.compact(["participant_covariates", "quarantine"])
    assert "uncompressed" in res["method"]
    data = (tmp_path / "wh" / "cbp.duckdb").read_bytes()
    assert P.encode() not in data and Q.encode() in data          # the rewrite stores strings as they are
    assert wh.text_occurrences(P) == {} and wh.text_occurrences(Q) == {"participant_covariates": 1}
    assert wh.count_rows("participant_covariates") == 7 and P not in wh.pseudonyms()
    # indexes survive the rewrite: a second version in force is still refused
    from resources.warehouse import DuplicateRows
    with pytest.raises(DuplicateRows):
        wh.replace_rows("participant_covariates", cov.filter(pl.col("pseudonym") == Q).with_columns(
            pl.lit("d3").alias("delivery_id"), pl.lit("d3.b001").alias("batch_key")), {"batch_key": "d3.b001"})
    # a table the data map does not declare: no erasure runs
    wh.replace_rows("scratch_notes", pl.DataFrame({"pseudonym": [Q]}), {})
    with pytest.raises(UndeclaredTable, match="scratch_notes"):
        wh.erase_participant(Q, "all")
    assert os.path.exists(tmp_path / "wh" / "cbp.duckdb")


def test_an_interrupted_erasure_is_never_certified_as_held_nothing_and_a_copy_fails_the_proof(tmp_path, monkeypatch):
    """The engine on a small data root (a registered delivery, a DuckDB warehouse, a derived file): a crash after
    every store was erased leaves a request that needs the request file again; a byte-identical copy of a file the
    participant had, under another name, fails the certificate; a register written under another key refuses."""
    from cbp_platform.erasure import ErasureError, erase_pending
    from cbp_platform.withdrawals import KEY_ENV as HMAC_ENV
    from cbp_platform.withdrawals import Register, read_request
    from resources.warehouse import DuckDBWarehouse

    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(HMAC_ENV, raising=False)
    monkeypatch.delenv("CBP_WITHDRAWALS_DIR", raising=False)
    root = tmp_path / "data"
    people = [P, Q, "23456789AB"]
    _delivery(root, "d01", people)
    layout = DataLayout(root)
    wh = DuckDBWarehouse(database=str(layout.warehouse_file))
    wh.replace_rows("participant_covariates", pl.DataFrame({"pseudonym": people, "delivery_id": ["d01"] * 3,
                                                            "batch_key": ["d01.b001"] * 3, "age": [50, 51, 52]}),
                    {"batch_key": "d01.b001"})
    seg = layout.segmentations("d01") / f"{P}_seg.nii.gz"
    seg.parent.mkdir(parents=True)
    label_map = gzip.compress(b"labels of the participant")
    seg.write_bytes(label_map)
    request = tmp_path / "request.csv"
    request.write_text(f"request_id,pseudonym,scope,effective_date\nR-1,{P},all,2026-12-01\n")
    Register(layout.withdrawals).add(read_request(request))

    def crash(*a, **k):
        raise OSError(f"{root}/derived/{P}/x: No space left on device")
    monkeypatch.setattr(DuckDBWarehouse, "compact", crash)
    with pytest.raises(OSError):
        erase_pending(layout, wh, log=lambda *_: None)
    monkeypatch.undo()
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(HMAC_ENV, raising=False)
    monkeypatch.delenv("CBP_WITHDRAWALS_DIR", raising=False)
    assert P not in {p for p in wh.pseudonyms()} and not seg.exists()       # every store erased, nothing certified
    with pytest.raises(ErasureError, match="--request") as exc:
        erase_pending(layout, wh, log=lambda *_: None)
    assert P not in str(exc.value)
    # the request file again; but a copy of the participant's label map lies elsewhere under another name
    stray = root / "derived" / "exports" / "copy.bin"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(label_map)                                         # byte-identical
    out = erase_pending(layout, wh, log=lambda *_: None, supplied=[P])
    cert = json.loads(out[0].certificate.read_text())
    assert not out[0].verified and cert["stores"]["derived"]["verified"]["hits"] >= 1
    assert Register(layout.withdrawals).overdue(__import__("datetime").date(2099, 1, 1))       # still pending
    stray.unlink()
    out = erase_pending(layout, wh, log=lambda *_: None, supplied=[P])
    assert out[0].verified and out[0].held
    # another withdrawal key: refused, nothing certified
    monkeypatch.setenv(HMAC_ENV, "cd" * 32)
    request.write_text(f"request_id,pseudonym,scope,effective_date\nR-2,{Q},all,2026-12-01\n")
    Register(layout.withdrawals).add(read_request(request))
    n = len(list((layout.withdrawals / "certificates").glob("*.json")))
    with pytest.raises(ErasureError, match="another withdrawal key"):
        erase_pending(layout, wh, log=lambda *_: None)
    assert len(list((layout.withdrawals / "certificates").glob("*.json"))) == n
    assert not list((layout.withdrawals / "journal").glob("*.json"))      # kept only until certified


def test_many_digests_are_found_in_one_pass_as_a_few_are_found_one_by_one(tmp_path):
    from cbp_platform.erasure.scan import HEX_REGEX_FROM

    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(HEX_REGEX_FROM + 5)]
    (tmp_path / "a.json").write_text(json.dumps({"x": digests[7], "y": "f" + digests[8]}))   # 65 hex: not a digest
    for few in (digests[:3] + [digests[7]], digests):
        res = scan([tmp_path], {f"d{i}": d.encode() for i, d in enumerate(few)})
        assert [h.what for h in res.hits] == [f"d{few.index(digests[7])}"], few is digests
