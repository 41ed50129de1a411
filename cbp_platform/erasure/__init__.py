"""Erasure of the participants who withdrew consent (issue 28): walk the data map, prove it, certify it.

:func:`erase_pending` applies every pending withdrawal of the register (:mod:`cbp_platform.withdrawals`):

1. **Match.** The register holds keyed hashes only; the participants are found by hashing every pseudonym the
   platform holds (delivery registry, release manifests, warehouse) with the withdrawal key. A request whose hash
   matches nobody is certified as "held nothing".
2. **Erase**, store by store in the order of :data:`~cbp_platform.erasure.datamap.STORES` (the warehouse first,
   the delivery registry last, so that a crash midway leaves the participant findable for the re-run): rows, files,
   manifests. An ``imaging`` withdrawal removes the images and everything derived from them, and keeps the
   covariates.
3. **Compact** the warehouse once for the whole run, so the deleted rows' bytes leave the database files.
4. **Scan** every store's files as bytes (:mod:`cbp_platform.erasure.scan`), and whatever else lies in the data root,
   for the pseudonym and for the sha256 of each file the participant had; every store's verify adds its own check.
5. **Certify**: one signed, hash-chained certificate per participant (:mod:`cbp_platform.erasure.certificates`), and
   an ``applied`` record in the register (``incomplete`` when a verify failed: the request stays overdue).

Erasing a participant twice is a no-op (the request is applied); a request recorded after the participant's data is
gone is certified as "held nothing". :func:`restored` finds applied withdrawals whose participant is back (a
restore from a backup taken before the erasure): :func:`erase_pending` erases them again (``reapplied``).

Framework-free: the warehouse is the caller's (``resources.warehouse.Warehouse``); the CLI (``cbp erase``) and the
Dagster job ``erase_withdrawn`` call this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cbp_platform.erasure.certificates import Signer
from cbp_platform.erasure.datamap import STORES, UNMAPPED, Context, Subject, scan_verdict, unmapped_roots
from cbp_platform.erasure.scan import ScanResult, needles_for, scan
from cbp_platform.imaging.nifti import atomic_write_bytes
from cbp_platform.paths import DataLayout
from cbp_platform.warehouse import TABLES
from cbp_platform.withdrawals import KEY_ENV, KEY_NAME, Register, key_id, keyed_hash

BACKUP_DAYS_ENV = "CBP_BACKUP_RETENTION_DAYS"
DEFAULT_BACKUP_DAYS = 35
PG_DATA_ENV = "CBP_PG_DATA_DIR"
NOT_SCANNED_IN_DB_DIRS = ("pg_wal",)     # the WAL: its segments hold the rows until recycled (docs/lifecycle.md)


@dataclass
class Outcome:
    request_ids: list[str]
    certificate: Path
    verified: bool
    held: bool
    reapplied: bool
    summary: str


def held_pseudonyms(layout: DataLayout, warehouse: Any, *, registry_only: bool = False) -> set[str]:
    """Every pseudonym the platform holds: the delivery registry (records, manifest copies' corrections), the
    internal release manifests and the warehouse (unless ``registry_only``: a cheap look for the start-up check)."""
    from cbp_platform.ingest.registry import registered_deliveries, registered_manifest

    out: set[str] = set()
    for rec in registered_deliveries(layout.root):
        out |= set(rec.get("participants", ()))
        if registry_only:
            continue
        try:
            man = registered_manifest(layout.root, rec["delivery_id"], layout.landing)
        except Exception:  # noqa: BLE001  (an unreadable manifest copy holds nobody we could name)
            continue
        out |= set(man.get("participants", ())) | {e.get("pseudonym") for e in man.get("corrections", ())}
    if registry_only:
        return out
    folder = layout.release_manifest(1).parent
    for p in sorted(folder.glob("*.json")) if folder.exists() else []:
        doc = json.loads(p.read_bytes())
        cols = doc.get("version_columns", [])
        if "pseudonym" in cols:
            i = cols.index("pseudonym")
            out |= {r[i] for r in doc.get("versions", [])}
    out |= warehouse.pseudonyms()
    out.discard(None)
    return out


def image_data_left(layout: DataLayout, warehouse: Any, pseudonym: str) -> bool:
    from cbp_platform.ingest.redaction import holds
    from cbp_platform.ingest.registry import registered_deliveries, registered_manifest

    if any(warehouse.participant_rows(pseudonym, "imaging").values()):
        return True
    for rec in registered_deliveries(layout.root):
        try:
            if holds(registered_manifest(layout.root, rec["delivery_id"], layout.landing), pseudonym, "imaging"):
                return True
        except Exception:  # noqa: BLE001
            continue
    return False


class ErasureError(RuntimeError):
    """An erasure that cannot go on; the message names requests and stores, never a pseudonym."""


def plan(layout: DataLayout, warehouse: Any, register: Register, *, registry_only: bool = False,
         supplied: list[str] = (), strict: bool = True) -> tuple[list[Subject], list[dict], set[str]]:
    """(subjects to erase, pending requests that match nobody held, keyed hashes re-applied after a restore).
    A request is pending until an ``applied`` record names it; an applied one whose participant is held again
    (a restore) is pending again. ``supplied``: pseudonyms from the request file (``cbp erase --request``), for a
    request whose erasure was interrupted or incomplete: the platform may no longer hold them, but the scan needs
    them. ``strict`` (False for the start-up check): an interrupted erasure raises :class:`ErasureError` rather
    than being skipped."""
    records = register.records()
    requests = [r for r in records if r.get("type") == "request"]
    if not requests:
        return [], [], set()
    key = register.key()
    other = {r["key_id"] for r in requests if r.get("key_id")} - {key_id(key)}
    if other:        # hashed under another key, nobody would match: every request would look "held nothing"
        raise ErasureError(f"{register.path.name}: requests written with another withdrawal key than the one set "
                           f"now ({KEY_ENV} or {KEY_NAME}); restore that key: nothing was erased")
    applied = {r["request_id"] for r in records if r.get("type") == "applied"}
    begun = {r["request_id"] for r in records if r.get("type") in ("started", "incomplete")} - applied
    held = {keyed_hash(key, p): p for p in held_pseudonyms(layout, warehouse, registry_only=registry_only)}
    given = {keyed_hash(key, p): p for p in supplied}
    by_hash: dict[str, list[dict]] = {}
    for r in requests:
        by_hash.setdefault(r["keyed_hash"], []).append(r)
    subjects, nobody, again = [], [], set()
    for h, reqs in by_hash.items():
        todo = [r for r in reqs if r["request_id"] not in applied]
        p = held.get(h) or (given.get(h) if todo else None)
        if p is None:
            interrupted = [r["request_id"] for r in todo if r["request_id"] in begun]
            if interrupted and not strict:
                continue
            if interrupted:   # begun, never certified: "held nothing" would be false; the scan needs the pseudonym
                raise ErasureError(f"the erasure of request(s) {', '.join(interrupted)} was interrupted or did not "
                                   "verify, and the platform no longer holds the participant: run `cbp erase "
                                   "--request FILE` with the request file, so that the scan can look for them")
            nobody += todo
            continue
        scope = "all" if any(r["scope"] == "all" for r in reqs) else "imaging"
        if not todo:                      # applied, yet held again: a restore brought the participant back
            if scope == "imaging" and not image_data_left(layout, warehouse, p):
                continue
            again.add(h)
            todo = reqs
        subjects.append(Subject(p, h, scope, todo))
    return subjects, nobody, again


def _scan_all(ctx: Context, subjects: list[Subject], progress=None) -> dict[str, ScanResult]:
    needles, digests = {}, {}
    for i, s in enumerate(subjects):
        needles |= {f"#{i} {k}": v for k, v in needles_for(s.pseudonym, s.digests).items()}
        digests |= {d: f"#{i} {lbl}" for d, lbl in s.digests.items()}
    out = {}
    for st in STORES:
        roots = st.roots(ctx)
        exclude = [Path(r) / n for r in ctx.extra_db_dirs for n in NOT_SCANNED_IN_DB_DIRS] + \
            [ctx.layout.withdrawals / JOURNAL]          # the journal holds the digests being looked for
        out[st.name] = scan(roots, needles, digests, exclude=exclude, progress=progress)
    root, covered = unmapped_roots(ctx)
    out[UNMAPPED] = scan([root], needles, digests, exclude=covered, progress=progress)
    for name, res in out.items():
        keeps = name != UNMAPPED and next(st for st in STORES if st.name == name).keeps_pseudonym
        for i, s in enumerate(subjects):
            mine = [h for h in res.hits if h.what.startswith(f"#{i} ")]
            if s.scope == "imaging" and keeps:                   # the covariates, and so the pseudonym, stay here
                mine = [h for h in mine if "pseudonym" not in h.what]
            s.hits[name] = mine
            s.unreadable[name] = list(res.unreadable)
    return out


def _published(layout: DataLayout, releases: list[int]) -> list[dict]:
    out = []
    for r in releases:
        p = layout.release_report(r)
        if p.exists():
            doc = json.loads(p.read_text())
            out.append({"release": r, "cohort_hash": doc.get("cohort_hash"), "published_at": doc.get("published_at"),
                        "run_id": doc.get("run_id")})
    return out


def _clean(text: Any, pseudonym: str) -> Any:
    """``text`` (a verdict: nested dicts, lists, strings) with the pseudonym replaced: a certificate names none."""
    if isinstance(text, str):
        return text.replace(pseudonym, "<pseudonym>").replace(pseudonym.lower(), "<pseudonym>")
    if isinstance(text, dict):
        return {k: _clean(v, pseudonym) for k, v in text.items()}
    if isinstance(text, list):
        return [_clean(v, pseudonym) for v in text]
    return text


def erase_pending(layout: DataLayout, warehouse: Any, *, extra_db_dirs: list[Path] = (),
                  dagster_home: Path | None = None, backup_days: int = DEFAULT_BACKUP_DAYS,
                  code_version: dict | None = None, log=print, now: datetime | None = None,
                  only_reapply: bool = False, supplied: list[str] = ()) -> list[Outcome]:
    """Apply every pending withdrawal (see the module doc); one :class:`Outcome` per certificate written.
    ``only_reapply``: only the withdrawals applied before whose participant is back (the start-up check);
    ``supplied``: pseudonyms of the request file, to finish an interrupted erasure. One erasure at a time (a lock
    file in the register's folder): a second process waits, then finds nothing left to do."""
    with erasure_lock(layout):
        return _erase_pending(layout, warehouse, extra_db_dirs=extra_db_dirs, dagster_home=dagster_home,
                              backup_days=backup_days, code_version=code_version, log=log, now=now,
                              only_reapply=only_reapply, supplied=supplied)


def erasure_lock(layout: DataLayout):
    from cbp_platform.ingest.registry import file_lock

    return file_lock(layout.withdrawals / ".erase.lock")


def _erase_pending(layout: DataLayout, warehouse: Any, *, extra_db_dirs, dagster_home, backup_days, code_version,
                   log, now, only_reapply, supplied) -> list[Outcome]:
    from cbp_platform import __version__
    from cbp_platform.lineage import code_version as git_version

    register = Register(layout.withdrawals)
    subjects, nobody, again = plan(layout, warehouse, register, supplied=supplied, strict=not only_reapply)
    if only_reapply:
        subjects, nobody = [s for s in subjects if s.keyed_hash in again], []
    if not subjects and not nobody:
        return []
    now = now or datetime.now(timezone.utc)
    ctx = Context(layout, warehouse, [Path(p) for p in extra_db_dirs], dagster_home)
    code = {"package": __version__, **(code_version or git_version())}
    until = (now.date() + timedelta(days=int(backup_days))).isoformat()
    touched: set[str] = set()
    for n, s in enumerate(subjects, start=1):
        ids = ", ".join(r["request_id"] for r in s.requests)
        log(f"  erasing participant {n} of {len(subjects)} (request {ids}, scope {s.scope}"
            f"{', re-applied after a restore' if s.keyed_hash in again else ''})")
        # begun: from here a crash leaves a request that a re-run cannot certify as "held nothing"
        register.append([{"type": "started", "request_id": r["request_id"], "keyed_hash": s.keyed_hash,
                          "at": now.isoformat()} for r in s.requests])
        s.releases = warehouse.participant_releases(s.pseudonym)
        journal = _journal(layout, s)
        if journal.exists():        # an interrupted run's fingerprints of files it removed
            s.digests.update(json.loads(journal.read_text()))
        for st in STORES:
            if st.erase is None:
                continue
            try:
                s.removed[st.name] = st.erase(ctx, s)
            except Exception as exc:  # noqa: BLE001  (re-raised without the pseudonym a path or row would carry)
                raise ErasureError(_clean(f"request(s) {ids}: store {st.name}: {type(exc).__name__}: {exc}",
                                          s.pseudonym)) from None
            finally:
                atomic_write_bytes(journal, json.dumps(s.digests).encode())
        touched |= set(s.removed.get("warehouse", {}).get("rows", {}))
    # always rewrite when someone was erased: rows deleted by an interrupted run leave bytes behind too
    tables = sorted(touched) or sorted(t for t in warehouse.tables() if TABLES.get(t) and TABLES[t].holds != "none")
    compaction = warehouse.compact(tables) if subjects else {"method": "nothing deleted"}
    scans = _scan_all(ctx, subjects) if subjects else {}
    total = {k: v.as_dict() for k, v in scans.items()}
    signer = Signer(layout.withdrawals)
    out = []
    for s in subjects:
        stores = {}
        for st in STORES:
            verdict = st.verify(ctx, s)
            stores[st.name] = {"holds": st.holds, "removed": s.removed.get(st.name, "nothing (holds none by design)"
                                                                           if st.erase is None else {}),
                               "verified": verdict}
        stores["warehouse"]["compaction"] = compaction
        stores[UNMAPPED] = {"holds": "whatever lies in the data root outside every store (truth/ aside)",
                            "removed": "nothing", "verified": scan_verdict(s, UNMAPPED)}
        ok = all(v["verified"]["passed"] for v in stores.values())
        body = {"request_ids": [r["request_id"] for r in s.requests], "keyed_hash": s.keyed_hash,
                "key_id": s.requests[0].get("key_id"), "scope": s.scope,
                "effective_dates": sorted({r["effective_date"] for r in s.requests}),
                "received_at": min(r["received_at"] for r in s.requests), "erased_at": now.isoformat(),
                "held": True, "reapplied_after_restore": s.keyed_hash in again, "verified": ok,
                "stores": _clean(stores, s.pseudonym), "files_fingerprinted": len(s.digests),
                "scan": total, "releases": s.releases, "published_results": _published(layout, s.releases),
                "backups_hold_data_until": until, "code_version": code}
        out.append(_certify(register, signer, body, s.requests, ok, held=True, reapplied=s.keyed_hash in again))
        if ok:
            _journal(layout, s).unlink(missing_ok=True)
    if nobody:
        n_held = len(held_pseudonyms(layout, warehouse))
        for r in nobody:
            body = {"request_ids": [r["request_id"]], "keyed_hash": r["keyed_hash"], "key_id": r.get("key_id"),
                    "scope": r["scope"], "effective_dates": [r["effective_date"]], "received_at": r["received_at"],
                    "erased_at": now.isoformat(), "held": False, "reapplied_after_restore": False, "verified": True,
                    "stores": {"all": {"removed": "nothing", "verified": {
                        "method": f"the keyed hash matches none of the {n_held} pseudonyms the platform holds "
                                  "(delivery registry, release manifests, warehouse)", "passed": True}}},
                    "releases": [], "published_results": [], "backups_hold_data_until": until, "code_version": code}
            out.append(_certify(register, signer, body, [r], True, held=False, reapplied=False))
    if out:             # the warehouse remembers these erasures: restored from before them, it lacks the marks
        import polars as pl

        warehouse.append_rows(MARKS, pl.DataFrame({"certificate": [o.certificate.name for o in out],
                                                   "at": [now.isoformat()] * len(out)}))
    return out


MARKS = "erasure_marks"
JOURNAL = "journal"


def _journal(layout: DataLayout, s: Subject) -> Path:
    """The sha256 of each file the erasure removed, kept (outside the data root, no pseudonym) until it is
    certified: a run interrupted after removing a file still scans for copies of it when it is finished."""
    return layout.withdrawals / JOURNAL / f"{s.keyed_hash}.json"


def marks(warehouse: Any) -> set[str]:
    """The certificates whose erasure this warehouse has seen (:data:`MARKS`; a table with no participant)."""
    df = warehouse.table(MARKS, missing_ok=True)
    return set(df["certificate"].to_list()) if df is not None and df.height else set()


def _certify(register: Register, signer: Signer, body: dict, requests: list[dict], ok: bool, *, held: bool,
             reapplied: bool) -> Outcome:
    path, digest = signer.issue(body)
    register.append([{"type": "applied" if ok else "incomplete", "request_id": r["request_id"],
                      "keyed_hash": r["keyed_hash"], "certificate": path.name, "certificate_sha256": digest,
                      "at": body["erased_at"]} for r in requests])
    ids = ", ".join(r["request_id"] for r in requests)
    if not held:
        summary = f"request {ids}: the platform holds no data of this participant; certified"
    elif ok:
        summary = f"request {ids}: erased and verified{' again (after a restore)' if reapplied else ''}"
    else:
        failed = [k for k, v in body["stores"].items() if not v["verified"]["passed"]]
        summary = f"request {ids}: erased, but NOT verified in {', '.join(failed)} (see the certificate)"
    return Outcome([r["request_id"] for r in requests], path, ok, held, reapplied, summary)


def backup_days_from_env() -> int:
    import os

    raw = os.environ.get(BACKUP_DAYS_ENV, "").strip()
    return int(raw) if raw.isdigit() else DEFAULT_BACKUP_DAYS


def pg_data_dirs_from_env() -> list[Path]:
    import os

    raw = os.environ.get(PG_DATA_ENV, "").strip()
    return [Path(raw)] if raw else []

