"""The delivery registry: what was registered, in which order, with which manifest, and who owns a pseudonym.

Under ``<data root>/registry/deliveries/``:

* ``<id>.manifest.json``: the manifest's bytes as registered. Ingestion checks every file against *this* copy,
  so a manifest edited in the landing zone afterwards can never change what a batch accepts;
* ``<id>.files.json``: size and modification time of every listed file at registration (for change detection);
* ``<id>.json``: the record, written last (the delivery is registered once it exists): registration number
  ``seq``, time, the manifest's sha256, participants, batch size and batch keys.

Registration is serialised by a lock file (``registry/.lock``), so the daemon's sensor and a foreground runner
never give two deliveries the same number.

**First registered wins.** A pseudonym belongs to the delivery registered first (lowest ``seq``) that lists it;
a later delivery's copy is quarantined as ``duplicate_pseudonym``, whatever the delivery ids or the order in
which batches run. Deliveries found in the same sensor tick register in the order of their manifest's
``created_at``, then id. Results never change retroactively when a re-send arrives.

**Corrections** (manifest ``kind: "correction"``) are the one way to change a participant's data: each entry names
a participant the platform holds and the delivery whose version it supersedes (the participant's owner, or an
earlier correction of that participant), checked here under the registry lock (:func:`check_correction`); a
correction that fails is refused whole. A correction owns nothing (:func:`owners` skips it). Of several versions
of one participant's stage, the one whose delivery registered last is in force, whatever the order in which their
batches run (the warehouse orders versions by ``seq``, ``docs/lifecycle.md``).

**Delivery ids are never reused.** A registered delivery whose manifest or files change is reported as
``changed`` (sensor, ``cbp status``, the landing-zone observation); the registered version stands and nothing
of the change is ingested (``docs/ingestion.md``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

from cbp_platform.imaging.nifti import atomic_write_bytes
from cbp_platform.ingest.deliveries import (CHANGED, GONE, REDACTED, REGISTERED, RETIRED, Batch, BatchRegistry, ManifestError,
                                            load_manifest, parse_manifest, plan_batches)
from cbp_platform.landing import CORRECTION, COVARIATES_NAME, DELIVERY, MANIFEST_NAME, PSEUDONYM_ALPHABET
from cbp_platform.paths import DataLayout


def _dir(root: Path) -> Path:
    return DataLayout(Path(root)).delivery_registry


def record_path(root: Path, delivery_id: str) -> Path:
    return _dir(root) / f"{delivery_id}.json"


def manifest_copy_path(root: Path, delivery_id: str) -> Path:
    return _dir(root) / f"{delivery_id}.manifest.json"


def files_path(root: Path, delivery_id: str) -> Path:
    return _dir(root) / f"{delivery_id}.files.json"


def registry_lock(root: Path):
    return file_lock(DataLayout(Path(root)).registry / ".lock")


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock on ``path`` (created), across processes, for a with-block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stat_listed(delivery_dir: Path, manifest: dict) -> dict[str, list[int]]:
    out = {}
    for name in [MANIFEST_NAME] + [f["path"] for f in manifest["files"]]:
        try:
            st = os.lstat(Path(delivery_dir) / name)
            out[name] = [st.st_size, st.st_mtime_ns]
        except OSError:
            out[name] = [-1, 0]
    return out


def register_delivery(root: Path, delivery_dir: Path, manifest: dict, manifest_bytes: bytes,
                      batch_size: int) -> list[Batch]:
    """Register a closed delivery: batch membership, the manifest copy and file stats, then the record (last).
    Idempotent: a registered delivery keeps its batches. A correction that names a participant the platform does
    not hold, or a delivery it did not register, raises :class:`ManifestError` (:func:`check_correction`) and
    leaves no trace."""
    reg = BatchRegistry(root)
    did = manifest["delivery_id"]
    with registry_lock(root):
        rec_path = record_path(root, did)
        if rec_path.exists():
            rec = json.loads(rec_path.read_text())
            return [reg.read(k) for k in rec["batches"]]
        problem = check_correction(root, manifest)
        if problem:
            raise ManifestError(problem)
        seq = _next_seq(root)
        batches = plan_batches(manifest, batch_size)
        for b in batches:
            reg.write(b)
        atomic_write_bytes(manifest_copy_path(root, did), manifest_bytes)
        stats = _stat_listed(delivery_dir, manifest)
        atomic_write_bytes(files_path(root, did), json.dumps(stats).encode())
        rec = {"delivery_id": did, "seq": seq, "kind": manifest.get("kind", DELIVERY),
               "registered_at": datetime.now(timezone.utc).isoformat(),
               "created_at": manifest["created_at"], "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
               "participants": sorted(set(manifest["participants"])), "batch_size": batch_size,
               "batches": [b.key for b in batches],
               # what every sensor tick compares (cheap); <id>.files.json holds every listed file (cbp status --deep)
               "watch": {n: stats[n] for n in WATCHED if n in stats}}
        # listed files that were absent or of another size than the manifest's when the delivery closed (still being
        # copied?): their participants are quarantined, and plain `cbp status` watches them for a later change
        unsettled = [f["path"] for f in manifest["files"] if stats[f["path"]][0] != f["size"]][:MAX_UNSETTLED]
        rec["watch"].update({n: stats[n] for n in unsettled})
        rec["unsettled"] = unsettled
        atomic_write_bytes(rec_path, json.dumps(rec).encode())   # written last: the delivery is now registered
        atomic_write_bytes(_seq_path(root), str(seq).encode())
    return batches


WATCHED = (MANIFEST_NAME, COVARIATES_NAME)
MAX_UNSETTLED = 10_000            # unsettled files watched per delivery (beyond them, `cbp status --deep`)


def _seq_path(root: Path) -> Path:
    return DataLayout(Path(root)).registry / "delivery_seq"


def _next_seq(root: Path) -> int:
    """The next registration number (under the registry lock): one more than the last, however many exist."""
    try:
        return int(_seq_path(root).read_text()) + 1
    except (FileNotFoundError, ValueError):
        return 1 + max((r.get("seq") or 0 for r in registered_deliveries(root)), default=0)


def _order(rec: dict) -> tuple:
    # records from before registration numbers existed come first, by creation time then id
    return (rec.get("seq") or 0, rec.get("created_at", ""), rec["delivery_id"])


def registered_deliveries(root: Path) -> list[dict]:
    """Every delivery record, in registration order (a record that cannot be read: :func:`unreadable_records`)."""
    return sorted((rec for rec in _records(root) if "problem" not in rec), key=_order)


def unreadable_records(root: Path) -> list[dict]:
    """Record files of the registry that cannot be read (``delivery_id``, ``problem``): shown by ``cbp status``,
    never raised, so one damaged record cannot stop the sensor or the status of the others."""
    return [rec for rec in _records(root) if "problem" in rec]


def _records(root: Path) -> list[dict]:
    d = _dir(root)
    if not d.exists():
        return []
    out = []
    for p in d.glob("*.json"):
        if p.name.endswith((".manifest.json", ".files.json")):
            continue
        try:
            rec = json.loads(p.read_text())
            if not (isinstance(rec, dict) and rec.get("delivery_id") == p.stem
                    and isinstance(rec.get("participants"), list) and isinstance(rec.get("batches"), list)):
                raise ValueError("not a delivery record")
            out.append(rec)
        except (OSError, ValueError) as exc:
            out.append({"delivery_id": p.stem, "problem": f"registry record {p.name} cannot be read "
                                                          f"({type(exc).__name__})"})
    return out


def registered_manifest(root: Path, delivery_id: str, landing: Path) -> dict:
    """The manifest as registered (the landing zone's copy for deliveries registered before copies were kept)."""
    copy = manifest_copy_path(root, delivery_id)
    if copy.exists():
        return parse_manifest(Path(landing) / delivery_id, copy.read_bytes())
    return load_manifest(Path(landing) / delivery_id)


def owners(root: Path, records: list[dict] | None = None) -> dict[str, str]:
    """pseudonym -> the delivery that registered it first (corrections own nothing)."""
    out: dict[str, str] = {}
    for r in registered_deliveries(root) if records is None else records:
        if r.get("kind", DELIVERY) == CORRECTION:
            continue
        for p in r["participants"]:
            out.setdefault(p, r["delivery_id"])
    return out


def duplicates_of(root: Path, delivery_id: str) -> dict[str, str]:
    """This delivery's pseudonyms that another delivery registered first, with that delivery's id (none for a
    correction: its participants are the versions it brings)."""
    recs = registered_deliveries(root)
    own = owners(root, recs)
    rec = next((r for r in recs if r["delivery_id"] == delivery_id), None)
    if rec is None or rec.get("kind", DELIVERY) == CORRECTION:
        return {}
    return {p: own[p] for p in rec["participants"] if own.get(p, delivery_id) != delivery_id}


def holders(root: Path, records: list[dict] | None = None) -> dict[str, list[str]]:
    """pseudonym -> the deliveries that brought a version of it, in registration order: its owner, then each
    correction of it (a later delivery that re-sent it as a duplicate brought no version)."""
    recs = registered_deliveries(root) if records is None else records
    own = owners(root, recs)
    out: dict[str, list[str]] = {p: [d] for p, d in own.items()}
    for r in recs:
        if r.get("kind", DELIVERY) == CORRECTION:
            for p in r["participants"]:
                out.setdefault(p, []).append(r["delivery_id"])
    return out


def check_correction(root: Path, manifest: dict, records: list[dict] | None = None) -> str:
    """Why a correction cannot be registered ("" when it can, and for an ordinary delivery): an entry naming a
    participant the platform does not hold, or superseding a delivery it did not register or that did not bring
    that participant. The message names the manifest entry (``corrections[i]``), never the pseudonym."""
    if manifest.get("kind", DELIVERY) != CORRECTION:
        return ""
    recs = registered_deliveries(root) if records is None else records
    known = {r["delivery_id"] for r in recs}
    held = holders(root, recs)
    label = f"{manifest['delivery_id']}/{MANIFEST_NAME}"
    for i, e in enumerate(manifest["corrections"]):
        if e["supersedes"] not in known:
            return (f"{label}: corrections[{i}] supersedes delivery {e['supersedes']!r}, which this platform did not "
                    "register; the correction is refused and nothing in force changes")
        if e["pseudonym"] not in held:
            return (f"{label}: corrections[{i}] names a participant this platform does not hold; the correction is "
                    "refused and nothing in force changes")
        if e["supersedes"] not in held[e["pseudonym"]]:
            return (f"{label}: corrections[{i}] supersedes delivery {e['supersedes']!r}, which did not bring this "
                    "participant; the correction is refused and nothing in force changes")
    return ""


def registration_seq(root: Path, delivery_id: str) -> int | None:
    """The registration number of a registered delivery (its versions are ordered by it); None when the delivery
    has no record or was registered before numbers existed."""
    try:
        rec = json.loads(record_path(root, delivery_id).read_text())
    except FileNotFoundError:
        return None
    return int(rec["seq"]) if rec.get("seq") else None


def corrections_of(root: Path, delivery_id: str, landing: Path) -> dict[str, dict]:
    """pseudonym -> its ``corrections`` entry, for a registered correction ({} for an ordinary delivery)."""
    man = registered_manifest(root, delivery_id, landing)
    return {e["pseudonym"]: e for e in man.get("corrections", ())}


def _sha256(path: Path) -> str | None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        return h.hexdigest()
    except OSError:
        return None


class RetireError(ValueError):
    """A delivery that cannot be retired (unknown, or a reason that is empty or names a pseudonym)."""


MAX_RETIRE_REASON = 500
_PSEUDONYM_LIKE = re.compile(rf"(?<![{PSEUDONYM_ALPHABET}])[{PSEUDONYM_ALPHABET}]{{10}}(?![{PSEUDONYM_ALPHABET}])")


def retire_delivery(root: Path, delivery_id: str, reason: str) -> dict:
    """Retire a registered delivery: its participants leave the next release at the exclusion step
    ``delivery_retired`` (every participant with a version in force from it). Nothing is deleted: its files, rows
    and batches stay; the release that is cut next records the retirement. Written once
    (``registry/retirements/<id>.json``); retiring it again returns the first record. The reason is published in
    the release's summary, so it may not look like a pseudonym."""
    reason = " ".join(str(reason).split())
    if not reason:
        raise RetireError("a retirement needs a reason (--reason)")
    if len(reason) > MAX_RETIRE_REASON:
        raise RetireError(f"the reason has {len(reason)} characters (limit {MAX_RETIRE_REASON})")
    if _PSEUDONYM_LIKE.search(reason):
        raise RetireError("the reason contains what looks like a pseudonym; it is published with the next release, "
                          "so write it without one")
    path = DataLayout(Path(root)).retirements / f"{delivery_id}.json"
    with registry_lock(root):
        if not record_path(root, delivery_id).exists():
            raise RetireError(f"{delivery_id}: no registered delivery of that id")
        if path.exists():
            return json.loads(path.read_text())
        rec = {"delivery_id": delivery_id, "reason": reason, "retired_at": datetime.now(timezone.utc).isoformat()}
        atomic_write_bytes(path, json.dumps(rec).encode())
    return rec


def retirements(root: Path) -> dict[str, dict]:
    """Retired deliveries: delivery id -> its retirement record (``reason``, ``retired_at``)."""
    d = DataLayout(Path(root)).retirements
    out = {}
    for p in sorted(d.glob("*.json")) if d.exists() else []:
        try:
            rec = json.loads(p.read_text())
            out[rec["delivery_id"]] = rec
        except (OSError, ValueError, KeyError):
            continue
    return out


def registered_state(root: Path, landing: Path, rec: dict, *, deep: bool = False) -> tuple[str, str]:
    """(state, reason) of a registered delivery: ``registered``, ``changed``, ``gone``, ``retired`` or ``redacted``
    (an erasure removed a withdrawn participant's files: :mod:`cbp_platform.ingest.redaction`).

    Cheap by default (the manifest, the covariates file and the files that were unsettled when the delivery closed:
    a stat, and a hash only when the stat differs); ``deep`` looks at every listed file. A file whose stat changed
    but whose content did not (a copy that reset modification times) is not a change. Never raises: a delivery
    that cannot be checked is reported as ``changed``, with the error's type."""
    try:
        retired = DataLayout(Path(root)).retirements / f"{rec['delivery_id']}.json"
        if retired.exists():
            r = json.loads(retired.read_text())
            return RETIRED, f"{rec['delivery_id']}: retired {r['retired_at'][:10]} ({r['reason']})"
        state, reason = _registered_state(root, landing, rec, deep=deep)
        redacted = DataLayout(Path(root)).redactions / f"{rec['delivery_id']}.json"
        if state == REGISTERED and redacted.exists():
            history = json.loads(redacted.read_text())
            return REDACTED, (f"{rec['delivery_id']}: redacted {history[-1]['redacted_at'][:10]} (an erasure removed "
                              f"the files of {sum(int(h['participants']) for h in history)} withdrawn participant(s); "
                              "docs/lifecycle.md)")
        return state, reason
    except Exception as exc:  # noqa: BLE001  (the delivery's boundary: the sensor and `cbp status` go on)
        return CHANGED, f"{rec.get('delivery_id')}: could not be checked ({type(exc).__name__})"


def _registered_state(root: Path, landing: Path, rec: dict, *, deep: bool) -> tuple[str, str]:
    did = rec["delivery_id"]
    ddir = Path(landing) / did
    if not ddir.is_dir():
        return GONE, f"{did}: registered, but the folder is no longer in the landing zone"
    stats_path = files_path(root, did)
    if deep and stats_path.exists():
        stats = json.loads(stats_path.read_text())
    elif not deep and "watch" in rec:
        stats = rec["watch"]
    else:                                                 # registered before stats were kept: the manifest only
        if not deep:
            return REGISTERED, ""
        cur = _sha256(ddir / MANIFEST_NAME)
        if rec.get("manifest_sha256") and cur != rec["manifest_sha256"]:
            return CHANGED, _changed_message(did, [MANIFEST_NAME], {})
        return REGISTERED, ""
    names = list(stats)
    sha: dict | None = None
    changed = []
    for name in names:
        try:
            st = os.lstat(ddir / name)
            now = [st.st_size, st.st_mtime_ns]
        except OSError:
            now = [-1, 0]
        if now == stats[name] or (now[0] == -1 and stats[name][0] == -1):
            continue
        if now[0] != -1 and now[0] == stats[name][0]:      # same size: look at the content
            if sha is None:
                man = registered_manifest(root, did, landing)
                sha = {f["path"]: f["sha256"] for f in man["files"]} | {MANIFEST_NAME: rec.get("manifest_sha256")}
            if sha.get(name) and _sha256(ddir / name) == sha[name]:
                continue                                  # touched, not changed
        changed.append(name)
    index = {}
    if changed and any(n not in (MANIFEST_NAME, COVARIATES_NAME) for n in changed):
        index = {f["path"]: i for i, f in enumerate(registered_manifest(root, did, landing)["files"])}
    unsettled = set(rec.get("unsettled", ()))
    settled = [n for n in changed if n in unsettled]
    others = [n for n in changed if n not in unsettled]
    if changed:
        return CHANGED, "; ".join(([_changed_message(did, others, index)] if others else [])
                                  + ([_settled_message(did, settled, index)] if settled else []))
    return REGISTERED, ""


def _settled_message(did: str, changed: list[str], index: dict[str, int]) -> str:
    roles = [f"files[{index.get(n, '?')}]" for n in changed]
    shown = ", ".join(roles[:5]) + (f" and {len(roles) - 5} more" if len(roles) > 5 else "")
    return (f"{did}: {shown} incomplete when the delivery closed (its participant quarantined) and changed since; "
            "re-run the batch to ingest it (docs/ingestion.md, files completed after the marker)")


def _changed_message(did: str, changed: list[str], index: dict[str, int]) -> str:
    roles = [n if n in (MANIFEST_NAME, COVARIATES_NAME) else f"files[{index.get(n, '?')}]" for n in changed]
    shown = ", ".join(roles[:5]) + (f" and {len(roles) - 5} more" if len(roles) > 5 else "")
    return (f"{did}: changed since registration ({shown}); delivery ids are never reused, so the registered "
            "version stands and nothing of the change is ingested (docs/ingestion.md, changed deliveries)")
