"""covariates.csv read with bounded memory: the size limit, the streamed manifest check, long lines and NUL tails
(issue 26). The large files are sparse (``truncate``): a NUL tail costs no disk and little time to write."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cbp_platform.imaging.nifti import sha256_bytes, sha256_file
from cbp_platform.ingest import covariates as cov
from cbp_platform.ingest.covariates import MAX_COVARIATES_BYTES, MAX_LINE_BYTES, parse_covariates
from cbp_platform.landing import COVARIATE_COLUMNS
from cbp_platform.reasons import REASONS

ROOT = Path(__file__).resolve().parents[2]
HEADER = ",".join(COVARIATE_COLUMNS)
ROW = "{p},Berlin,2016-03-04,45,F,168.0,64.5,1,5,1200,0,0,0,1"
PS = ["AAAAAAAAAA", "BBBBBBBBBB", "CCCCCCCCCC"]
GiB = 1 << 30


def _nul_tailed(path: Path, total: int, rows: list[str] = PS) -> bytes:
    """A header, one valid row per pseudonym, then NUL bytes up to ``total`` bytes (a sparse file)."""
    head = ("\n".join([HEADER, *(ROW.format(p=p) for p in rows)]) + "\n").encode()
    path.write_bytes(head)
    with open(path, "r+b") as fh:
        fh.truncate(total)
    return head


def _reasons(res) -> dict[str, str]:
    return {q["pseudonym"]: q["reason"] for q in res.quarantine}


def test_the_limit_is_the_registered_explanations():
    assert MAX_COVARIATES_BYTES == 256 << 20
    assert f"{MAX_COVARIATES_BYTES >> 20} MiB" in REASONS["covariates_too_large"].explanation


def test_a_file_over_the_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    p = tmp_path / "covariates.csv"
    _nul_tailed(p, 300_000_000)
    opened = []
    real_open = cov.os.open
    monkeypatch.setattr(cov.os, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    entry = {"path": "covariates.csv", "size": 300_000_000, "sha256": "0" * 64}
    for kw in ({}, dict(delivery_dir=tmp_path, entry=entry, verify=True)):
        res = parse_covariates(p, PS + ["DDDDDDDDDD"], label="d1: covariates.csv (files[0])", **kw)
        assert res.rows.height == 0
        assert _reasons(res) == {q: "covariates_too_large" for q in PS + ["DDDDDDDDDD"]}
        msg = res.quarantine[0]["message"]
        assert msg.startswith("d1: covariates.csv (files[0]): 300000000 bytes") and str(MAX_COVARIATES_BYTES) in msg
        assert "256 MiB" in msg
    assert not [a for a in opened if Path(a[0]) == p]          # refused from the lstat size, never opened


def test_a_file_of_exactly_the_limit_is_read(tmp_path):
    p = tmp_path / "covariates.csv"
    _nul_tailed(p, MAX_COVARIATES_BYTES)
    res = parse_covariates(p, PS)
    assert res.rows["pseudonym"].to_list() == PS and res.quarantine == []


def test_growing_past_the_limit_while_read_is_refused(monkeypatch):
    monkeypatch.setattr(cov, "MAX_COVARIATES_BYTES", 1000)
    with pytest.raises(cov._TooLarge):
        list(cov._lines(io.BytesIO(b"a,b\n" * 300)))
    with pytest.raises(cov._TooLarge):                            # inside one overlong line too
        list(cov._lines(io.BytesIO(b"\0" * (MAX_LINE_BYTES + 5000))))


def test_long_lines_are_skipped_unread_and_reported(tmp_path):
    p = tmp_path / "covariates.csv"
    long_row = ROW.format(p="BBBBBBBBBB").replace(",Berlin,", "," + "x" * (MAX_LINE_BYTES + 10) + ",")
    lines = [HEADER, ROW.format(p="AAAAAAAAAA"), long_row, "Z" * (3 * MAX_LINE_BYTES), " " * (MAX_LINE_BYTES + 1),
             ROW.format(p="CCCCCCCCCC")]
    p.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    res = parse_covariates(p, PS + ["DDDDDDDDDD"], label="F")
    assert res.rows["pseudonym"].to_list() == ["AAAAAAAAAA", "CCCCCCCCCC"]
    q = {x["pseudonym"]: x for x in res.quarantine}
    assert q["BBBBBBBBBB"]["reason"] == "malformed_row"
    assert q["BBBBBBBBBB"]["message"] == f"F line 3: longer than {MAX_LINE_BYTES} bytes, not read"
    assert q["DDDDDDDDDD"]["reason"] == "no_covariate_row"
    assert q["DDDDDDDDDD"]["message"] == "F: no row for this participant (line 4 could not be read or attributed)"


def test_bom_crlf_undecodable_and_line_numbers_as_before(tmp_path):
    p = tmp_path / "covariates.csv"
    rows = [HEADER, ROW.format(p="AAAAAAAAAA"), "", ROW.format(p="BBBBBBBBBB").replace("Berlin", "Ber\udcfflin"),
            ROW.format(p="CCCCCCCCCC") + ",surplus", "\udcfe,garbage"]
    p.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode("utf-8", errors="surrogateescape"))
    res = parse_covariates(p, PS + ["DDDDDDDDDD"], label="F")
    assert res.rows["pseudonym"].to_list() == ["AAAAAAAAAA"]
    assert [(q["pseudonym"], q["reason"], q["message"]) for q in res.quarantine] == [
        ("BBBBBBBBBB", "undecodable_row", "F line 4: bytes that are not UTF-8 in site; the other rows are kept"),
        ("CCCCCCCCCC", "malformed_row", "F line 5: 15 fields, header has 14"),
        ("DDDDDDDDDD", "no_covariate_row", "F: no row for this participant (line 6 could not be read or attributed)")]


def test_a_repeated_pseudonym_is_quarantined_once_whatever_its_rows_hold(tmp_path):
    p = tmp_path / "covariates.csv"
    a, b, c = (ROW.format(p=x) for x in PS)
    lines = [HEADER, a + ",surplus", a, a, b, b + ",surplus", c, c]
    p.write_text("\n".join(lines) + "\n")
    res = parse_covariates(p, PS, {"CCCCCCCCCC": "d0"}, label="F")
    assert res.rows.height == 0
    assert [(q["pseudonym"], q["reason"], q["message"]) for q in res.quarantine] == [
        ("AAAAAAAAAA", "duplicate_pseudonym", "F line 3: pseudonym repeated (first on line 2)"),
        ("BBBBBBBBBB", "duplicate_pseudonym", "F line 6: pseudonym repeated (first on line 5)"),
        ("CCCCCCCCCC", "duplicate_pseudonym",
         "F line 7: participant already registered by delivery d0 (first registered wins)")]


@pytest.mark.parametrize("value, reason", [("nan", "out_of_range"), ("NaN", "out_of_range"), ("inf", "out_of_range"),
                                           ("-inf", "out_of_range"), ("168,0", "malformed_row")])
def test_non_finite_numbers_are_out_of_range(tmp_path, value, reason):
    p = tmp_path / "covariates.csv"
    p.write_text("\n".join([HEADER, ROW.format(p="AAAAAAAAAA").replace("168.0", value)]) + "\n")
    res = parse_covariates(p, ["AAAAAAAAAA"])
    assert res.rows.height == 0 and _reasons(res) == {"AAAAAAAAAA": reason}


@pytest.mark.parametrize("value", ["20160-03-04", "99999-12-31", "0001-01-01", "2016-02-30"])
def test_any_date_is_checked_without_raising(tmp_path, value):
    p = tmp_path / "covariates.csv"
    p.write_text("\n".join([HEADER, ROW.format(p="AAAAAAAAAA").replace("2016-03-04", value)]) + "\n")
    res = parse_covariates(p, ["AAAAAAAAAA"])
    assert res.rows.height == 0 and _reasons(res)["AAAAAAAAAA"] in ("out_of_range", "invalid_value")


def test_the_manifest_check_is_streamed_before_parsing(tmp_path):
    d = tmp_path
    p = d / "covariates.csv"
    payload = ("\n".join([HEADER, *(ROW.format(p=x) for x in PS)]) + "\n").encode()
    p.write_bytes(payload)
    good = {"path": "covariates.csv", "size": len(payload), "sha256": sha256_bytes(payload)}
    kw = dict(delivery_dir=d, verify=True, label="F")
    assert parse_covariates(p, PS, entry=good, **kw).rows.height == 3
    res = parse_covariates(p, PS, entry=dict(good, size=len(payload) + 1), **kw)
    assert _reasons(res) == dict.fromkeys(PS, "size_mismatch")
    assert res.quarantine[0]["message"] == f"F: {len(payload)} bytes, the manifest says {len(payload) + 1}"
    res = parse_covariates(p, PS, entry=dict(good, sha256="0" * 64), **kw)
    assert _reasons(res) == dict.fromkeys(PS, "checksum_mismatch")
    assert _reasons(parse_covariates(p, PS, entry=None, **kw)) == dict.fromkeys(PS, "not_in_manifest")
    empty = d / "empty.csv"
    empty.write_bytes(b"\xef\xbb\xbf \r\n\n")
    assert _reasons(parse_covariates(empty, PS)) == dict.fromkeys(PS, "unreadable_covariates")


# a fresh interpreter parses the file (its own peak from /proc/self/status, VmHWM); the wrapper around it reports
# getrusage(RUSAGE_CHILDREN).ru_maxrss. The wrapper is a small process of its own because on Linux a child's
# ru_maxrss carries the peak of the process that spawned it across exec (here, pytest's)
_WORKER = """
import json, sys, time
from pathlib import Path
from cbp_platform.ingest.covariates import parse_covariates
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
p, ps, entry = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
t = time.perf_counter()
res = parse_covariates(p, ps, delivery_dir=p.parent, entry=entry, verify=entry is not None, label="F")
print(json.dumps({"seconds": time.perf_counter() - t, "rows": res.rows["pseudonym"].to_list(),
                  "quarantine": res.quarantine, "vm_hwm": hwm()}))
"""
_WRAPPER = """
import json, resource, subprocess, sys
out = subprocess.run([sys.executable, "-c", *sys.argv[1:]], capture_output=True, text=True)
if out.returncode:
    sys.exit(out.stderr)
r = json.loads(out.stdout.strip().splitlines()[-1])
r["ru_maxrss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss << 10
print(json.dumps(r))
"""


def parse_in_subprocess(path: Path, participants: list[str], entry: dict | None) -> dict:
    """parse_covariates in a fresh process: its result, seconds and peak RSS in bytes (``ru_maxrss``, ``vm_hwm``)."""
    out = subprocess.run([sys.executable, "-c", _WRAPPER, _WORKER, str(path), json.dumps(participants),
                          json.dumps(entry)], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_nul_tail_under_the_limit_is_parsed_in_bounded_memory(tmp_path):
    p = tmp_path / "covariates.csv"
    size = 200_000_000
    _nul_tailed(p, size)
    entry = {"path": "covariates.csv", "size": size, "sha256": sha256_file(p)}
    r = parse_in_subprocess(p, PS + ["DDDDDDDDDD"], entry)
    assert r["rows"] == PS
    assert [(q["pseudonym"], q["reason"], q["message"]) for q in r["quarantine"]] == [
        ("DDDDDDDDDD", "no_covariate_row", "F: no row for this participant (line 5 could not be read or attributed)")]
    assert r["ru_maxrss"] < GiB and r["vm_hwm"] < GiB, r
    assert r["vm_hwm"] < 400 << 20, r           # imports (Polars) and a few MiB of buffers, not the file
