"""Finding complete deliveries in the landing zone and cutting them into batches.

A batch is a slice of one delivery of at most ``batch_size`` participants, keyed ``<delivery_id>.b<NNN>``
(for example ``sim1-d01.b002``). Membership is fixed when the delivery is registered (the sorted participant
list of the manifest, cut in order) and written to the batch registry, so a later change of ``batch_size``
never moves a participant between existing batches.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cbp_platform.imaging.nifti import atomic_write_bytes
from cbp_platform.landing import (DELIVERY_ID_RE, MANIFEST_NAME, PSEUDONYM_RE, SCHEMA_VERSION,
                                  SUCCESS_MARKER)

BATCH_SEP = ".b"
DEFAULT_BATCH_SIZE = 250


def batch_key(delivery_id: str, number: int) -> str:
    return f"{delivery_id}{BATCH_SEP}{number:03d}"


def split_batch_key(key: str) -> tuple[str, int]:
    did, _, num = key.rpartition(BATCH_SEP)
    if not did or not num.isdigit():
        raise ValueError(f"not a batch key: {key!r} (expected <delivery_id>{BATCH_SEP}NNN)")
    return did, int(num)


class ManifestError(ValueError):
    """A delivery's manifest is unusable; the message names the file and the problem."""


@dataclass
class DeliveryStatus:
    delivery_id: str
    path: Path
    state: str                          # complete | incomplete | malformed
    reason: str = ""
    manifest: dict | None = None


@dataclass
class Batch:
    key: str
    delivery_id: str
    number: int
    participants: list[str] = field(default_factory=list)


def load_manifest(delivery_dir: Path) -> dict:
    """Parse and structurally validate ``manifest.json``; raise :class:`ManifestError` naming the problem."""
    path = delivery_dir / MANIFEST_NAME
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
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
    for i, f in enumerate(doc["files"]):
        if not (isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
                and isinstance(f.get("sha256"), str) and len(f["sha256"]) == 64):
            raise ManifestError(f"{path}: files[{i}] lacks path/size/sha256")
        p = f["path"]
        if p.startswith("/") or ".." in p.split("/"):
            raise ManifestError(f"{path}: files[{i}] path {p!r} escapes the delivery")
    bad = [p for p in doc["participants"] if not isinstance(p, str) or not PSEUDONYM_RE.match(p)]
    if bad:
        raise ManifestError(f"{path}: {len(bad)} participant entries are not valid pseudonyms")
    return doc


def check_delivery(delivery_dir: Path) -> DeliveryStatus:
    """complete (marker, manifest parses, every listed file present with its size), incomplete, or malformed."""
    did = delivery_dir.name
    if not DELIVERY_ID_RE.match(did):
        return DeliveryStatus(did, delivery_dir, "malformed", f"{delivery_dir}: invalid delivery id")
    if not (delivery_dir / SUCCESS_MARKER).exists():
        return DeliveryStatus(did, delivery_dir, "incomplete", "no _SUCCESS marker yet")
    try:
        man = load_manifest(delivery_dir)
    except ManifestError as exc:
        return DeliveryStatus(did, delivery_dir, "malformed", str(exc))
    for f in man["files"]:
        p = delivery_dir / f["path"]
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            return DeliveryStatus(did, delivery_dir, "incomplete", f"{p}: listed in the manifest but not present")
        if size != f["size"]:
            return DeliveryStatus(did, delivery_dir, "incomplete",
                                  f"{p}: size {size} differs from the manifest's {f['size']}")
    return DeliveryStatus(did, delivery_dir, "complete", manifest=man)


def scan_landing(landing: Path, skip: set[str] | frozenset[str] = frozenset()) -> list[DeliveryStatus]:
    """Status of every delivery folder not in ``skip`` (one ``scandir`` plus a stat for known ones)."""
    if not landing.exists():
        return []
    out = []
    with os.scandir(landing) as it:
        entries = sorted((e for e in it if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)
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
        self.dir = root / "registry" / "batches"

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
