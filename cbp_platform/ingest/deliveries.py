"""The state of each delivery in the landing zone (waiting, refused, closed), and cutting deliveries into batches.

A delivery is closed once its ``_SUCCESS`` marker is present and its manifest is valid; its files are judged per
participant at ingestion, never here. Registration and what happens after it: :mod:`.registry`.

A batch is a slice of one delivery of at most ``batch_size`` participants, keyed ``<delivery_id>.b<NNN>``
(for example ``sim1-d01.b002``). Membership is fixed when the delivery is registered (the sorted participant
list of the manifest, cut in order) and written to the batch registry, so a later change of ``batch_size``
never moves a participant between existing batches.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cbp_platform.imaging.nifti import atomic_write_bytes
from cbp_platform.landing import (CORRECTION, CORRECTION_PARTS, CORRECTION_REASONS, COVARIATES, COVARIATES_NAME,
                                  DELIVERY, DELIVERY_ID_RE, DELIVERY_ID_RULE, DELIVERY_KINDS, DICOM_DIR, MANIFEST_NAME,
                                  MRI_DIR, PSEUDONYM_RE, SCAN, SCAN_FORMATS, SCHEMA_VERSION, SUCCESS_MARKER)
from cbp_platform.paths import DataLayout

BATCH_SEP = ".b"
DEFAULT_BATCH_SIZE = 250

# The manifest parser's bounds: a manifest beyond any of them refuses its delivery, with a message naming the bound.
MAX_MANIFEST_BYTES = 256 << 20
MAX_MANIFEST_DEPTH = 32                 # nesting of objects and arrays (a valid manifest has 3)
MAX_MANIFEST_FILES = 1_000_000          # entries of ``files``
MAX_MANIFEST_PARTICIPANTS = 200_000     # entries of ``participants`` (NAKO has ~205,000 participants in all)
MAX_PATH_CHARS = 1024                   # one listed path
_HEX64 = re.compile(r"[0-9a-fA-F]{64}\Z")


def batch_key(delivery_id: str, number: int) -> str:
    return f"{delivery_id}{BATCH_SEP}{number:03d}"


def split_batch_key(key: str) -> tuple[str, int]:
    did, _, num = key.rpartition(BATCH_SEP)
    if not did or not num.isdigit():
        raise ValueError(f"not a batch key: {key!r} (expected <delivery_id>{BATCH_SEP}NNN)")
    return did, int(num)


class ManifestError(ValueError):
    """A delivery's manifest is unusable; the message names the file and the problem."""


# Delivery states, as the sensor, ``cbp status`` and the landing-zone observation name them.
WAITING = "waiting"        # no _SUCCESS marker yet: still being transferred
REFUSED = "refused"        # never registered: invalid id, manifest unusable, a path escaping the folder, a link
READY = "ready"            # closed (marker present, manifest valid): registered at the next sensor tick
REGISTERED = "registered"  # batches planned; per-file problems quarantine their participant
CHANGED = "changed"        # registered, and its manifest or files changed since: reported, never re-ingested
GONE = "gone"              # registered, and its folder is no longer in the landing zone
RETIRED = "retired"        # registered, then retired (cbp delivery retire): its participants leave the next release
REDACTED = "redacted"      # registered, then a participant's files removed by an erasure (withdrawal of consent)
STATES = (WAITING, REFUSED, READY, REGISTERED, CHANGED, GONE, RETIRED, REDACTED)


@dataclass
class DeliveryStatus:
    delivery_id: str
    path: Path
    state: str
    reason: str = ""
    manifest: dict | None = None
    manifest_bytes: bytes | None = None


@dataclass
class Batch:
    """A slice of one delivery. ``parts``: for a correction's batch, what its participants' versions replace
    (``scan``, ``covariates`` or both; every participant of the batch the same), so that only those stages run;
    empty for an ordinary delivery's batch (every stage)."""

    key: str
    delivery_id: str
    number: int
    participants: list[str] = field(default_factory=list)
    parts: tuple[str, ...] = ()

    def covers(self, part: str) -> bool:
        """Whether this batch brings ``part`` (``scan`` or ``covariates``) of its participants."""
        return not self.parts or part in self.parts


def read_manifest_bytes(delivery_dir: Path) -> bytes:
    """The bytes of ``manifest.json``; a link or a non-file is refused without being opened."""
    path = delivery_dir / MANIFEST_NAME
    label = f"{delivery_dir.name}/{MANIFEST_NAME}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ManifestError(f"{label}: missing") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise ManifestError(f"{label}: not a regular file (links are never followed out of the delivery)")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{label}: {st.st_size} bytes, more than a manifest may hold ({MAX_MANIFEST_BYTES})")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{label}: cannot be read ({exc.strerror})") from None


def nesting_depth(payload: bytes) -> int:
    """The deepest nesting of objects and arrays in a JSON text (brackets inside strings do not count), in linear
    time and without recursion, so a document nested 100,000 levels deep is measured, not parsed. Vectorised over
    chunks: a quote counts unless an odd run of backslashes precedes it; a bracket counts outside strings."""
    step = np.zeros(256, dtype=np.int32)
    step[[ord("["), ord("{")]] = 1
    step[[ord("]"), ord("}")]] = -1
    depth = deepest = 0
    in_string, backslashes = 0, 0                    # carried from one chunk to the next
    for i in range(0, len(payload), 1 << 22):        # in chunks: bounded memory for a 256 MiB manifest
        a = np.frombuffer(payload, dtype=np.uint8, count=min(1 << 22, len(payload) - i), offset=i)
        idx = np.arange(a.size)
        last_other = np.maximum.accumulate(np.where(a != ord("\\"), idx, -1))   # last non-backslash at or before
        before = np.concatenate(([-1], last_other[:-1]))
        run = idx - 1 - before + np.where(before < 0, backslashes, 0)           # backslashes right before each byte
        quote = (a == ord('"')) & (run % 2 == 0)
        inside = (np.cumsum(quote) - quote + in_string) % 2 == 1               # within a string (its quotes excluded)
        levels = np.cumsum(np.where(inside | quote, 0, step[a])) + depth
        deepest = max(deepest, int(levels.max()))
        depth = int(levels[-1])
        in_string = int((in_string + quote.sum()) % 2)
        backslashes = backslashes + a.size if last_other[-1] < 0 else a.size - 1 - int(last_other[-1])
    return deepest


def normalise_path(path: str) -> str | None:
    """A listed path in its one spelling: ``./`` and duplicate or trailing slashes removed. None when it would
    escape the delivery (absolute, ``..``, a backslash or a control character) or is empty."""
    if path.startswith("/") or "\\" in path or any(ord(c) < 32 for c in path):
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def parse_manifest(delivery_dir: Path, payload: bytes) -> dict:
    """Parse and structurally validate a manifest; raise :class:`ManifestError` naming the problem. Messages
    name entries by their position (``files[3]``), never by a path holding a pseudonym.

    Bounded: bytes (:data:`MAX_MANIFEST_BYTES`), nesting (:data:`MAX_MANIFEST_DEPTH`, measured before parsing),
    entries and path length. Harmless variations are normalised, so they compare equal: checksums to lower-case hex,
    paths without ``./`` or duplicate and trailing slashes (:func:`normalise_path`); a path that escapes the delivery
    is refused, and so are two entries that name one file."""
    path = f"{delivery_dir.name}/{MANIFEST_NAME}"
    if len(payload) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: {len(payload)} bytes, more than a manifest may hold ({MAX_MANIFEST_BYTES})")
    depth = nesting_depth(payload)
    if depth > MAX_MANIFEST_DEPTH:
        raise ManifestError(f"{path}: nested {depth} levels deep (a manifest has 3; limit {MAX_MANIFEST_DEPTH})")
    try:
        doc = json.loads(payload.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({type(exc).__name__} at byte "
                            f"{getattr(exc, 'pos', getattr(exc, 'start', '?'))})") from None
    except (RecursionError, MemoryError, ValueError) as exc:     # a number too long to convert, too deep a text
        raise ManifestError(f"{path}: cannot be parsed ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}: top level is not an object")
    for key, typ in (("schema_version", str), ("delivery_id", str), ("created_at", str), ("participants", list),
                     ("files", list)):
        if not isinstance(doc.get(key), typ):
            raise ManifestError(f"{path}: field {key!r} missing or not a {typ.__name__}")
    if doc["schema_version"].split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise ManifestError(f"{path}: schema_version {doc['schema_version'][:20]!r} not supported "
                            f"(want {SCHEMA_VERSION})")
    if doc["delivery_id"] != delivery_dir.name:
        raise ManifestError(f"{path}: delivery_id {doc['delivery_id'][:80]!r} does not match folder "
                            f"{delivery_dir.name!r}")
    if len(doc["files"]) > MAX_MANIFEST_FILES:
        raise ManifestError(f"{path}: {len(doc['files'])} files listed (limit {MAX_MANIFEST_FILES})")
    if len(doc["participants"]) > MAX_MANIFEST_PARTICIPANTS:
        raise ManifestError(f"{path}: {len(doc['participants'])} participants listed "
                            f"(limit {MAX_MANIFEST_PARTICIPANTS})")
    seen: dict[str, int] = {}
    files = []
    for i, f in enumerate(doc["files"]):
        if not (isinstance(f, dict) and isinstance(f.get("path"), str) and type(f.get("size")) is int
                and isinstance(f.get("sha256"), str)):
            raise ManifestError(f"{path}: files[{i}] lacks path/size/sha256")
        if f["size"] < 0:
            raise ManifestError(f"{path}: files[{i}] has a negative size")
        if not _HEX64.match(f["sha256"]):
            raise ManifestError(f"{path}: files[{i}] has a sha256 that is not 64 hexadecimal digits")
        if len(f["path"]) > MAX_PATH_CHARS:
            raise ManifestError(f"{path}: files[{i}] has a path of {len(f['path'])} characters "
                                f"(limit {MAX_PATH_CHARS})")
        p = normalise_path(f["path"])
        if p is None:
            raise ManifestError(f"{path}: files[{i}] has a path that escapes the delivery folder")
        if p in seen:
            raise ManifestError(f"{path}: files[{i}] names the same file as files[{seen[p]}]")
        seen[p] = i
        files.append({**f, "path": p, "sha256": f["sha256"].lower()})
    doc["files"] = files
    fmt = doc.get("scan_format", "nifti")
    if fmt not in SCAN_FORMATS:
        raise ManifestError(f"{path}: scan_format {str(fmt)[:20]!r} not supported (one of {', '.join(SCAN_FORMATS)})")
    bad = [p for p in doc["participants"] if not isinstance(p, str) or not PSEUDONYM_RE.match(p)]
    if bad:
        raise ManifestError(f"{path}: {len(bad)} participant entries are not valid pseudonyms")
    kind = doc.get("kind", DELIVERY)
    if kind not in DELIVERY_KINDS:
        raise ManifestError(f"{path}: kind {str(kind)[:20]!r} not supported (one of {', '.join(DELIVERY_KINDS)})")
    doc["kind"] = kind
    if kind == CORRECTION:
        doc["corrections"] = parse_corrections(path, doc)
    elif "corrections" in doc:
        raise ManifestError(f"{path}: lists corrections but is not a correction (add \"kind\": \"{CORRECTION}\")")
    return doc


def parse_corrections(path: str, doc: dict) -> list[dict]:
    """The ``corrections`` of a correction's manifest, checked for what needs no registry: each entry names a valid
    pseudonym once, the delivery it supersedes, the parts it corrects and a registered reason code; the participant
    list is exactly the entries' pseudonyms; a corrected scan has files under its participant's folder, corrected
    covariates have ``covariates.csv``, and no image file lies under a folder whose entry does not correct the
    scan. Any problem refuses the whole correction (it never touches data in force), naming ``corrections[i]``.
    Whether the platform holds the participant and registered the delivery: :func:`..registry.check_correction`."""
    entries = doc.get("corrections")
    if not isinstance(entries, list) or not entries:
        raise ManifestError(f"{path}: a correction needs a non-empty list 'corrections'")
    if len(entries) > MAX_MANIFEST_PARTICIPANTS:
        raise ManifestError(f"{path}: {len(entries)} corrections listed (limit {MAX_MANIFEST_PARTICIPANTS})")
    folders: dict[str, list[int]] = {}
    for k, f in enumerate(doc["files"]):
        parts = f["path"].split("/")
        if len(parts) >= 3 and parts[0] in (MRI_DIR, DICOM_DIR):
            folders.setdefault(parts[1], []).append(k)
    listed = {f["path"] for f in doc["files"]}
    seen: dict[str, int] = {}
    out = []
    for i, e in enumerate(entries):
        where = f"{path}: corrections[{i}]"
        if not isinstance(e, dict):
            raise ManifestError(f"{where} is not an object")
        p, sup, parts, reason = e.get("pseudonym"), e.get("supersedes"), e.get("parts"), e.get("reason")
        if not isinstance(p, str) or not PSEUDONYM_RE.match(p):
            raise ManifestError(f"{where}: 'pseudonym' missing or not a valid pseudonym")
        if p in seen:
            raise ManifestError(f"{where} names the same participant as corrections[{seen[p]}]")
        seen[p] = i
        if not isinstance(sup, str) or not DELIVERY_ID_RE.match(sup):
            raise ManifestError(f"{where}: 'supersedes' missing or not a delivery id")
        if sup == doc["delivery_id"]:
            raise ManifestError(f"{where}: a delivery cannot supersede itself")
        if not (isinstance(parts, list) and parts and all(isinstance(x, str) for x in parts)
                and set(parts) <= set(CORRECTION_PARTS) and len(set(parts)) == len(parts)):
            raise ManifestError(f"{where}: 'parts' must list what it corrects, once each, from "
                                f"{', '.join(CORRECTION_PARTS)}")
        if reason not in CORRECTION_REASONS:
            raise ManifestError(f"{where}: reason {str(reason)[:40]!r} is not a registered correction reason "
                                f"({', '.join(CORRECTION_REASONS)})")
        allowed = CORRECTION_REASONS[reason][0]
        if not set(parts) <= set(allowed):
            raise ManifestError(f"{where}: reason {reason!r} corrects only {' and '.join(allowed)}, not "
                                f"{' and '.join(x for x in parts if x not in allowed)}")
        if COVARIATES in parts and COVARIATES_NAME not in listed:
            raise ManifestError(f"{where} corrects covariates, but {COVARIATES_NAME} is not listed in files")
        if SCAN in parts and p not in folders:
            raise ManifestError(f"{where} corrects the scan, but no file is listed under the participant's folder")
        if SCAN not in parts and p in folders:
            raise ManifestError(f"{path}: files[{folders[p][0]}] lies in the folder of corrections[{i}], which does "
                                "not correct the scan")
        out.append({"pseudonym": p, "supersedes": sup, "parts": tuple(x for x in CORRECTION_PARTS if x in parts),
                    "reason": reason})
    stray = sorted(set(folders) - set(seen))
    if stray:
        raise ManifestError(f"{path}: files[{folders[stray[0]][0]}] lies under a participant folder that no "
                            f"corrections entry names ({len(stray)} such folders)")
    if set(doc["participants"]) != set(seen):
        extra = len(set(doc["participants"]) - set(seen))
        raise ManifestError(f"{path}: 'participants' must list exactly the corrected participants ({extra} listed "
                            f"without a corrections entry, {len(set(seen) - set(doc['participants']))} corrected "
                            "but not listed)")
    return out


def unlisted_participants(manifest: dict) -> list[str]:
    """Pseudonyms whose files the manifest lists (``mri/<pseudonym>/...``, ``dicom/<pseudonym>/...``) but whose
    participant entry it lacks. They are batched with the others and quarantined as ``not_in_participant_list``
    at every stage, so nothing of a delivery disappears unreported."""
    listed = set(manifest["participants"])
    out = set()
    for f in manifest.get("files", ()):
        parts = f["path"].split("/")
        if len(parts) >= 3 and parts[0] in (MRI_DIR, DICOM_DIR) and PSEUDONYM_RE.match(parts[1]) \
                and parts[1] not in listed:
            out.add(parts[1])
    return sorted(out)


def load_manifest(delivery_dir: Path) -> dict:
    """Read, parse and validate ``manifest.json``; raise :class:`ManifestError` naming the problem."""
    return parse_manifest(delivery_dir, read_manifest_bytes(delivery_dir))


def check_delivery(delivery_dir: Path) -> DeliveryStatus:
    """waiting (no marker), refused (with the reason) or ready (marker present and the manifest valid).

    Files are not looked at here: once the marker is present the delivery is closed, and a listed file that is
    absent, resized or unreadable quarantines its participant at ingestion, never the delivery."""
    did = delivery_dir.name
    if delivery_dir.is_symlink():
        return DeliveryStatus(did, delivery_dir, REFUSED, f"{did}: the delivery folder is a symbolic link "
                                                          "(links are never followed)")
    if not DELIVERY_ID_RE.match(did):
        return DeliveryStatus(did, delivery_dir, REFUSED, f"{did[:80]!r}: invalid delivery id ({DELIVERY_ID_RULE})")
    if not os.path.lexists(delivery_dir / SUCCESS_MARKER):
        return DeliveryStatus(did, delivery_dir, WAITING, f"{did}: no {SUCCESS_MARKER} marker yet (in transfer)")
    try:
        payload = read_manifest_bytes(delivery_dir)
        man = parse_manifest(delivery_dir, payload)
    except ManifestError as exc:
        return DeliveryStatus(did, delivery_dir, REFUSED, str(exc))
    return DeliveryStatus(did, delivery_dir, READY, manifest=man, manifest_bytes=payload)


def scan_landing(landing: Path, skip: set[str] | frozenset[str] = frozenset()) -> list[DeliveryStatus]:
    """Status of every delivery folder not in ``skip`` (one ``scandir`` plus a few stats per delivery)."""
    if not landing.exists():
        return []
    out = []
    with os.scandir(landing) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")
                          and (e.is_symlink() or e.is_dir(follow_symlinks=False))), key=lambda e: e.name)
    for e in entries:
        if e.name in skip:
            continue
        out.append(checked(Path(e.path)))
    return out


def checked(delivery_dir: Path) -> DeliveryStatus:
    """:func:`check_delivery` inside the delivery's own boundary: whatever goes wrong there refuses this delivery,
    with the error's type as the reason, and never reaches the caller (the sensor, ``cbp status``)."""
    try:
        return check_delivery(delivery_dir)
    except Exception as exc:  # noqa: BLE001  (the boundary: one delivery's problem never stops the others)
        return DeliveryStatus(delivery_dir.name, delivery_dir, REFUSED,
                              f"{delivery_dir.name}: could not be checked ({type(exc).__name__}); refused, the "
                              "other deliveries go on")


def plan_batches(manifest: dict, batch_size: int = DEFAULT_BATCH_SIZE) -> list[Batch]:
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    did = manifest["delivery_id"]
    if manifest.get("kind") == CORRECTION:
        # one group per set of corrected parts, so that each batch runs only its stages (a covariate correction
        # never re-runs segmentation); within a group, sorted and cut in order
        groups: dict[tuple[str, ...], list[str]] = {}
        for e in manifest["corrections"]:
            groups.setdefault(tuple(e["parts"]), []).append(e["pseudonym"])
        out: list[Batch] = []
        for parts in sorted(groups, key=lambda g: [CORRECTION_PARTS.index(x) for x in g]):
            ps = sorted(groups[parts])
            for i in range(0, len(ps), batch_size):
                n = len(out) + 1
                out.append(Batch(batch_key(did, n), did, n, ps[i:i + batch_size], parts))
        return out
    ps = sorted(set(manifest["participants"]) | set(unlisted_participants(manifest)))
    if not ps:
        return []
    return [Batch(batch_key(did, i // batch_size + 1), did, i // batch_size + 1, ps[i:i + batch_size])
            for i in range(0, len(ps), batch_size)]


class BatchRegistry:
    """Batch membership files under ``<data root>/registry/batches/<key>.json`` (written atomically)."""

    def __init__(self, root: Path):
        self.dir = DataLayout(Path(root)).batch_registry

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def write(self, batch: Batch) -> None:
        doc = {"batch_key": batch.key, "delivery_id": batch.delivery_id, "number": batch.number,
               "participants": batch.participants, **({"parts": list(batch.parts)} if batch.parts else {})}
        atomic_write_bytes(self.path(batch.key), json.dumps(doc, indent=0).encode())

    def read(self, key: str) -> Batch:
        try:
            doc = json.loads(self.path(key).read_text())
        except FileNotFoundError:
            raise KeyError(f"batch {key!r} is not registered ({self.path(key)} missing)") from None
        return Batch(doc["batch_key"], doc["delivery_id"], doc["number"], list(doc["participants"]),
                     tuple(doc.get("parts", ())))

    def keys(self) -> list[str]:
        if not self.dir.exists():
            return []
        return sorted(p.stem for p in self.dir.glob("*.json"))
