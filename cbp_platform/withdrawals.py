"""The withdrawal register: participants who withdrew consent, kept as keyed hashes only (issue 28, part 1).

A request comes from the trusted third party as a CSV file with the header ``request_id,pseudonym,scope,
effective_date`` (:data:`REQUEST_COLUMNS`): ``scope`` is a key of :data:`SCOPES`, ``effective_date`` an ISO date.
``cbp withdraw --request FILE`` checks the whole file first (a bad line refuses the file, naming the line, never
the pseudonym) and appends one record per request to the register: the request id, the **keyed hash** of the
pseudonym (HMAC-SHA256 with the deployment's withdrawal key), the scope and the dates. The register never holds a
pseudonym, and the request file is not copied.

The register and its key live **outside the data root** (``DataLayout.withdrawals``: ``$CBP_WITHDRAWALS_DIR``, by
default the folder ``<data root>.withdrawals`` beside it): erasure never touches them, and a data root restored from
a backup finds the withdrawals made since. The key is ``$CBP_WITHDRAWAL_KEY`` (hex, at least 32 bytes) when set;
otherwise a random key is created once in the register's folder (``hmac.key``, mode 0600).

From the next data release on, a withdrawn participant is excluded at the first step of the exclusion flow,
``consent_withdrawn``, before any erasure has run (``docs/lifecycle.md``). Framework-free: no Dagster.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import os
import secrets
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

from cbp_platform.landing import PSEUDONYM_RE

REQUEST_COLUMNS = ("request_id", "pseudonym", "scope", "effective_date")
SCOPES = {
    "all": "every data of the participant: images, covariates and everything derived from them",
    "imaging": "the images and everything derived from them; the covariates are kept",
}
KEY_ENV = "CBP_WITHDRAWAL_KEY"
REGISTER_NAME = "register.jsonl"
KEY_NAME = "hmac.key"
MAX_REQUEST_BYTES = 16 << 20
MAX_REQUEST_ID = 64
DEFAULT_DEADLINE_DAYS = 30


class WithdrawalError(ValueError):
    """A request file or register that cannot be used; the message names the file and the line, not the
    pseudonym."""


@dataclass(frozen=True)
class Request:
    request_id: str
    pseudonym: str
    scope: str
    effective_date: date
    line: int


def read_request(path: Path) -> list[Request]:
    """Every request of a request file, checked as a whole: the header, each field, no request id twice. The first
    problem raises :class:`WithdrawalError` naming the file and the line."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_REQUEST_BYTES:
            raise WithdrawalError(f"{path.name}: larger than {MAX_REQUEST_BYTES} bytes")
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise WithdrawalError(f"{path.name}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise WithdrawalError(f"{path.name}: not UTF-8 text") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or tuple(c.strip() for c in rows[0]) != REQUEST_COLUMNS:
        raise WithdrawalError(f"{path.name}: line 1 must be the header {','.join(REQUEST_COLUMNS)}")
    out, seen = [], {}
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        where = f"{path.name}: line {n}"
        if len(row) != len(REQUEST_COLUMNS):
            raise WithdrawalError(f"{where}: {len(row)} fields, the header has {len(REQUEST_COLUMNS)}")
        rid, p, scope, eff = (c.strip() for c in row)
        if not rid or len(rid) > MAX_REQUEST_ID or not rid.replace("-", "").replace("_", "").isalnum():
            raise WithdrawalError(f"{where}: request_id must be 1-{MAX_REQUEST_ID} letters, digits, '-' or '_'")
        if PSEUDONYM_RE.match(rid.upper()):
            raise WithdrawalError(f"{where}: request_id looks like a pseudonym; use the third party's request number")
        if rid in seen:
            raise WithdrawalError(f"{where}: request_id {rid!r} repeats line {seen[rid]}")
        seen[rid] = n
        if not PSEUDONYM_RE.match(p):
            raise WithdrawalError(f"{where}: the pseudonym is not a valid pseudonym")
        if scope not in SCOPES:
            raise WithdrawalError(f"{where}: scope {scope[:20]!r} is not one of {', '.join(SCOPES)}")
        try:
            when = date.fromisoformat(eff)
        except ValueError:
            raise WithdrawalError(f"{where}: effective_date {eff[:20]!r} is not an ISO date (YYYY-MM-DD)") from None
        out.append(Request(rid, p, scope, when, n))
    if not out:
        raise WithdrawalError(f"{path.name}: no request in the file")
    return out


def keyed_hash(key: bytes, pseudonym: str) -> str:
    """HMAC-SHA256 of the pseudonym under the deployment's withdrawal key (hex): the register's only trace of it."""
    return hmac.new(key, pseudonym.encode(), hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """Which key a record was written with (an HMAC of a fixed text: it reveals nothing of the key)."""
    return hmac.new(key, b"cbp-withdrawal-key-id", hashlib.sha256).hexdigest()[:16]


class Register:
    """The append-only register file ``register.jsonl`` and the key, in ``folder`` (``DataLayout.withdrawals``)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / REGISTER_NAME

    def key(self, *, create: bool = False) -> bytes:
        """The withdrawal key: ``$CBP_WITHDRAWAL_KEY``, else the folder's key file (created when ``create``)."""
        raw = os.environ.get(KEY_ENV, "").strip()
        if raw:
            try:
                key = bytes.fromhex(raw)
            except ValueError:
                raise WithdrawalError(f"{KEY_ENV} is not hexadecimal") from None
            if len(key) < 32:
                raise WithdrawalError(f"{KEY_ENV} holds {len(key)} bytes; a key needs at least 32")
            return key
        path = self.folder / KEY_NAME
        if not path.exists():
            if not create:
                raise WithdrawalError(f"no withdrawal key: set {KEY_ENV} or record a withdrawal first")
            if self.records():       # a register whose key is lost: a new key would never match its records
                raise WithdrawalError(f"{self.path.name} holds withdrawals but {KEY_NAME} is missing and {KEY_ENV} "
                                      "is not set; restore the key the register was written with")
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
        return bytes.fromhex(path.read_text().strip())

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for n, line in enumerate(self.path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    raise WithdrawalError(f"{self.path.name}: line {n} is not a register record") from None
        return out

    def digest(self) -> str:
        """sha256 of the register's bytes (its data version in Dagster); of nothing when it does not exist."""
        return hashlib.sha256(self.path.read_bytes() if self.path.exists() else b"").hexdigest()

    def add(self, requests: list[Request], *, now: datetime | None = None) -> tuple[list[str], list[str]]:
        """Record ``requests`` (appended, one line each, flushed to disk): (request ids added, request ids already
        recorded with the same content). A request id recorded with other content refuses the whole file."""
        key = self.key(create=True)
        have = {r["request_id"]: r for r in self.records() if r.get("type") == "request"}
        now = now or datetime.now(timezone.utc)
        added, known, lines = [], [], []
        for q in requests:
            rec = {"type": "request", "request_id": q.request_id, "keyed_hash": keyed_hash(key, q.pseudonym),
                   "scope": q.scope, "effective_date": q.effective_date.isoformat(), "key_id": key_id(key)}
            old = have.get(q.request_id)
            if old is not None:
                if {k: old.get(k) for k in rec} != rec:
                    raise WithdrawalError(f"line {q.line}: request_id {q.request_id!r} is recorded already with "
                                          "another participant, scope or date; nothing of this file was recorded")
                known.append(q.request_id)
                continue
            lines.append(json.dumps({**rec, "received_at": now.isoformat()}, sort_keys=True))
            added.append(q.request_id)
        if lines:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write("\n".join(lines) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        return added, known

    def append(self, records: list[dict]) -> None:
        """Append ``records`` (an erasure's ``applied`` or ``incomplete`` records: request id, keyed hash, the
        certificate and its sha256), flushed to disk."""
        if not records:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
            fh.flush()
            os.fsync(fh.fileno())

    def applied(self) -> list[dict]:
        """The erasures' records (``applied`` and ``incomplete``), in order."""
        return [r for r in self.records() if r.get("type") in ("applied", "incomplete")]

    def withdrawn(self) -> dict[str, dict]:
        """keyed hash -> its request (the first request of a participant; an ``all`` request outranks an
        ``imaging`` one)."""
        out: dict[str, dict] = {}
        for r in self.records():
            if r.get("type") != "request":
                continue
            h = r["keyed_hash"]
            if h not in out or (r["scope"] == "all" and out[h]["scope"] != "all"):
                out[h] = r
        return out

    def match(self, pseudonyms) -> dict[str, dict]:
        """The pseudonyms among ``pseudonyms`` that withdrew: pseudonym -> its request (nothing when there is no
        register yet)."""
        register = self.withdrawn()
        if not register:
            return {}
        key = self.key()
        other = {r.get("key_id") for r in register.values()} - {key_id(key)}
        if other:            # matched under another key, a withdrawn participant would silently stay in
            raise WithdrawalError(f"{self.path.name}: written with another withdrawal key than the one set now "
                                  f"({KEY_ENV} or {KEY_NAME}); restore that key: no release can be cut without it")
        return {p: register[h] for p in pseudonyms if (h := keyed_hash(key, p)) in register}

    def overdue(self, today: date, deadline_days: int = DEFAULT_DEADLINE_DAYS) -> list[dict]:
        """Requests received more than ``deadline_days`` before ``today`` and not yet applied (erased)."""
        records = self.records()
        applied = {r["request_id"] for r in records if r.get("type") == "applied"}
        out = []
        for r in records:
            if r.get("type") == "request" and r["request_id"] not in applied:
                received = datetime.fromisoformat(r["received_at"]).date()
                if (today - received).days > deadline_days:
                    out.append(r)
        return out
