"""The withdrawal register (issue 28, part 1), without Dagster: the request file's checks, keyed hashes only, the
register outside the data root, idempotent recording, overdue requests."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from cbp_platform.paths import DataLayout
from cbp_platform.withdrawals import KEY_ENV, Register, WithdrawalError, keyed_hash, read_request

P1, P2 = "ABCDEFGHJK", "MNPQRSTUVW"


def _file(tmp_path, body: str, name: str = "request.csv"):
    path = tmp_path / name
    path.write_text("request_id,pseudonym,scope,effective_date\n" + body)
    return path


def test_a_request_is_recorded_as_keyed_hashes_outside_the_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv("CBP_WITHDRAWALS_DIR", raising=False)
    layout = DataLayout(tmp_path / "data")
    reg = Register(layout.withdrawals)
    assert layout.withdrawals == tmp_path / "data.withdrawals"            # beside the data root, never inside
    added, known = reg.add(read_request(_file(tmp_path, f"TTP-1,{P1},all,2026-11-30\nTTP-2,{P2},imaging,2026-12-01\n")))
    assert added == ["TTP-1", "TTP-2"] and known == []
    raw = reg.path.read_bytes()
    assert P1.encode() not in raw and P2.encode() not in raw                  # never a pseudonym
    key = reg.key()
    assert (layout.withdrawals / "hmac.key").stat().st_mode & 0o777 == 0o600
    assert set(reg.withdrawn()) == {keyed_hash(key, P1), keyed_hash(key, P2)}
    assert reg.match([P1, P2, "XYZ2345678"]) == {P1: reg.withdrawn()[keyed_hash(key, P1)],
                                                 P2: reg.withdrawn()[keyed_hash(key, P2)]}
    # the same file again: nothing new; the same request id with another participant: refused, nothing recorded
    before = reg.path.read_bytes()
    assert reg.add(read_request(_file(tmp_path, f"TTP-1,{P1},all,2026-11-30\n"))) == ([], ["TTP-1"])
    with pytest.raises(WithdrawalError, match="recorded already with another participant"):
        reg.add(read_request(_file(tmp_path, f"TTP-3,{P2},all,2026-12-01\nTTP-1,{P2},all,2026-11-30\n")))
    assert reg.path.read_bytes() == before
    # an imaging-only request, then a full one for the same participant: the full one counts
    reg.add(read_request(_file(tmp_path, f"TTP-4,{P2},all,2026-12-02\n")))
    assert reg.match([P2])[P2]["scope"] == "all"
    # the key file lost: no new key is made for a register that has records
    (layout.withdrawals / "hmac.key").unlink()
    with pytest.raises(WithdrawalError, match="restore the key"):
        reg.add(read_request(_file(tmp_path, f"TTP-5,{P1},all,2026-12-03\n")))


def test_a_deployment_key_from_the_environment_gives_other_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "ab" * 32)
    reg = Register(tmp_path / "w")
    reg.add(read_request(_file(tmp_path, f"R1,{P1},all,2026-11-30\n")))
    assert not (tmp_path / "w" / "hmac.key").exists()
    assert set(reg.withdrawn()) == {keyed_hash(bytes.fromhex("ab" * 32), P1)}
    monkeypatch.setenv(KEY_ENV, "abcd")
    with pytest.raises(WithdrawalError, match="at least 32"):
        reg.key()
    # another key than the register was written with: matching refuses (a withdrawal must never silently miss)
    monkeypatch.setenv(KEY_ENV, "cd" * 32)
    with pytest.raises(WithdrawalError, match="another withdrawal key"):
        reg.match([P1])


@pytest.mark.parametrize("body, message", [
    ("", "no request in the file"),
    (f"R1,{P1},all\n", "line 2: 3 fields"),
    (f"R1,{P1},everything,2026-01-01\n", "line 2: scope 'everything' is not one of all, imaging"),
    (f"R1,{P1},all,01.12.2026\n", "line 2: effective_date '01.12.2026' is not an ISO date"),
    ("R1,not-a-pseudonym,all,2026-01-01\n", "line 2: the pseudonym is not a valid pseudonym"),
    (f"R1,{P1},all,2026-01-01\nR1,{P2},all,2026-01-01\n", "line 3: request_id 'R1' repeats line 2"),
    (f"{P2},{P1},all,2026-01-01\n", "request_id looks like a pseudonym"),
    (f"R 1,{P1},all,2026-01-01\n", "request_id must be"),
])
def test_a_bad_request_file_is_refused_naming_the_line_never_the_pseudonym(tmp_path, body, message):
    with pytest.raises(WithdrawalError) as exc:
        read_request(_file(tmp_path, body))
    assert message in str(exc.value) and P1 not in str(exc.value) and "request.csv" in str(exc.value)


def test_the_header_is_required(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text(f"R1,{P1},all,2026-01-01\n")
    with pytest.raises(WithdrawalError, match="line 1 must be the header"):
        read_request(path)


def test_requests_not_applied_within_the_deadline_are_overdue(tmp_path):
    reg = Register(tmp_path / "w")
    then = datetime(2026, 10, 1, tzinfo=timezone.utc)
    reg.add(read_request(_file(tmp_path, f"R1,{P1},all,2026-10-01\n")), now=then)
    reg.add(read_request(_file(tmp_path, f"R2,{P2},all,2026-11-20\n")), now=then + timedelta(days=50))
    assert [r["request_id"] for r in reg.overdue(date(2026, 11, 25))] == ["R1"]
    assert reg.overdue(date(2026, 10, 20)) == []
    assert [r["request_id"] for r in reg.overdue(date(2026, 11, 25), deadline_days=10)] == ["R1"]
