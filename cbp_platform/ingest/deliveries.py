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
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cbp_platform.imaging.nifti import atomic_write_bytes
from cbp_platform.paths import DataLayout
from cbp_platform.landing import (DELIVERY_ID_RE, MANIFEST_NAME, PSEUDONYM_RE, SCAN_FORMATS, SCHEMA_VERSION,
                                  SUCCESS_MARKER)

BATCH_SEP = ".b"
DEFAULT_BATCH_SIZE = 250
MAX_MANIFEST_BYTES = 256 << 20


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
STATES = (WAITING, REFUSED, READY, REGISTERED, CHANGED, GONE)


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
    key: str
    delivery_id: str
    number: int
    participants: list[str] = field(default_factory=list)


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


def parse_manifest(delivery_dir: Path, payload: bytes) -> dict:
    """Parse and structurally validate a manifest; raise :class:`ManifestError` naming the problem. Messages
    name entries by their position (``files[3]``), never by a path holding a pseudonym."""
    path = f"{delivery_dir.name}/{MANIFEST_NAME}"
    try:
        doc = json.loads(payload.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({type(exc).__name__} at byte "
                            f"{getattr(exc, 'pos', getattr(exc, 'start', '?'))})") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}: top level is not an object")
    for key, typ in (("schema_version", str), ("delivery_id", str), ("created_at", str), ("participants", list),
                     ("files", list)):
        if not isinstance(doc.get(key), typ):
            raise ManifestError(f"{path}: field {key!r} missing or not a {typ.__name__}")
    if doc["schema_version"].split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise ManifestError(f"{path}: schema_version {doc['schema_version']!r} not supported (want {SCHEMA_VERSION})")
    if doc["delivery_id"] != delivery_dir.name:
        raise ManifestError(f"{path}: delivery_id {doc['delivery_id']!r} does not match folder {delivery_dir.name!r}")
    seen = set()
    for i, f in enumerate(doc["files"]):
        if not (isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
                and isinstance(f.get("sha256"), str) and len(f["sha256"]) == 64):
            raise ManifestError(f"{path}: files[{i}] lacks path/size/sha256")
        p = f["path"]
        if p.startswith("/") or "\\" in p or ".." in p.split("/") or not p.strip("/"):
            raise ManifestError(f"{path}: files[{i}] has a path that escapes the delivery folder")
        if p in seen:
            raise ManifestError(f"{path}: files[{i}] repeats the path of an earlier entry")
        seen.add(p)
    fmt = doc.get("scan_format", "nifti")
    if fmt not in SCAN_FORMATS:
        raise ManifestError(f"{path}: scan_format {fmt!r} not supported (one of {', '.join(SCAN_FORMATS)})")
    bad = [p for p in doc["participants"] if not isinstance(p, str) or not PSEUDONYM_RE.match(p)]
    if bad:
        raise ManifestError(f"{path}: {len(bad)} participant entries are not valid pseudonyms")
    return doc


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
        return DeliveryStatus(did, delivery_dir, REFUSED, f"{did!r}: invalid delivery id (letters, digits, '_', "
                                                          "'.', '-'; at most 64)")
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
        out.append(check_delivery(Path(e.path)))
    return out


def plan_batches(manifest: dict, batch_size: int = DEFAULT_BATCH_SIZE) -> list[Batch]:
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    did = manifest["delivery_id"]
    ps = sorted(set(manifest["participants"]))
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
               "participants": batch.participants}
        atomic_write_bytes(self.path(batch.key), json.dumps(doc, indent=0).encode())

    def read(self, key: str) -> Batch:
        try:
            doc = json.loads(self.path(key).read_text())
        except FileNotFoundError:
            raise KeyError(f"batch {key!r} is not registered ({self.path(key)} missing)") from None
        return Batch(doc["batch_key"], doc["delivery_id"], doc["number"], list(doc["participants"]))

    def keys(self) -> list[str]:
        if not self.dir.exists():
            return []
        return sorted(p.stem for p in self.dir.glob("*.json"))
