"""Redaction of a delivery: one participant's data leaves the landing zone and the registry (an erasure, issue 28).

Raw files are never modified, with one exception: the erasure of a participant who withdrew consent
(:mod:`cbp_platform.erasure`). For every registered delivery that brought the participant, under the registry lock:

* **landing zone**: the participant's listed files are removed (scope ``all``: every file; ``imaging``: the scan
  files, the covariates kept); with scope ``all`` their line leaves ``covariates.csv``, every other line kept
  byte for byte; the manifest loses their entries (``participants``, ``files``, ``corrections``), and the
  covariates file's entry gets its new size and sha256. The other participants' files stay byte-identical;
* **registry**: the manifest copy gets the same bytes, the record and the file stats follow (so the sensor and
  ``cbp status`` report the delivery as ``redacted``, not ``changed``), the batches lose the participant (scope
  ``all``), and a redaction record is appended to ``registry/redactions/<delivery id>.json``: when, which request,
  how many participants and files; never a pseudonym.

Idempotent, and an interrupted redaction is finished by the next (the delivery record, written last, still names
the participant): a participant the delivery no longer holds is skipped. Returns what was removed and the sha256 of each
removed file, for the byte scan (:mod:`cbp_platform.erasure.scan`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from cbp_platform.imaging.nifti import atomic_write_bytes, sha256_file
from cbp_platform.ingest.deliveries import BatchRegistry
from cbp_platform.ingest.registry import (files_path, manifest_copy_path, record_path, registered_deliveries,
                                          registered_manifest, registry_lock)
from cbp_platform.landing import COVARIATES_NAME, MANIFEST_NAME
from cbp_platform.paths import DataLayout

IMAGING = "imaging"


def _owned(entry: dict, pseudonym: str) -> bool:
    return entry.get("pseudonym") == pseudonym or pseudonym in entry["path"].split("/")


def drop_covariate_lines(data: bytes, pseudonym: str) -> tuple[bytes, int]:
    """``covariates.csv``'s bytes without the participant's lines (every other byte kept); (bytes, lines removed).
    The participant's column is ``pseudonym`` of the header."""
    lines = data.splitlines(keepends=True)
    if not lines:
        return data, 0
    header = next(csv.reader(io.StringIO(lines[0].decode("utf-8-sig", "replace"))), [])
    try:
        col = [h.strip() for h in header].index("pseudonym")
    except ValueError:
        return data, 0
    keep, dropped = [lines[0]], 0
    for line in lines[1:]:
        row = next(csv.reader(io.StringIO(line.decode("utf-8", "replace"))), [])
        if len(row) > col and row[col].strip() == pseudonym:
            dropped += 1
        else:
            keep.append(line)
    return b"".join(keep), dropped


def redacted_manifest(manifest: dict, pseudonym: str, scope: str, covariates: tuple[int, str] | None) -> dict:
    """The manifest without the participant's entries (``imaging``: without their scan files only);
    ``covariates``: the new (size, sha256) of the covariates file."""
    out = dict(manifest)
    out["files"] = [f for f in manifest["files"] if not (_owned(f, pseudonym) and f["path"] != COVARIATES_NAME)]
    if covariates is not None:
        out["files"] = [{**f, "size": covariates[0], "sha256": covariates[1]} if f["path"] == COVARIATES_NAME else f
                        for f in out["files"]]
    if scope != IMAGING:
        out["participants"] = [p for p in manifest.get("participants", []) if p != pseudonym]
        if "n_participants" in manifest:
            out["n_participants"] = len(set(out["participants"]))
        if "corrections" in manifest:
            out["corrections"] = [e for e in manifest["corrections"] if e.get("pseudonym") != pseudonym]
    return out


def _stat(path: Path) -> list[int]:
    try:
        st = os.lstat(path)
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [-1, 0]


def holds(manifest: dict, pseudonym: str, scope: str) -> bool:
    if scope == IMAGING:
        return any(_owned(f, pseudonym) and f["path"] != COVARIATES_NAME for f in manifest["files"])
    return pseudonym in manifest.get("participants", ()) or any(_owned(f, pseudonym) for f in manifest["files"]) \
        or any(e.get("pseudonym") == pseudonym for e in manifest.get("corrections", ()))


def redact(root: Path, pseudonym: str, scope: str, request_id: str) -> dict:
    """Remove the participant from every registered delivery (see the module doc). Returns ``{"deliveries": n,
    "files_removed": n, "covariate_lines_removed": n, "batches_changed": n, "digests": {sha256: label}}``."""
    layout = DataLayout(Path(root))
    out = {"deliveries": 0, "files_removed": 0, "covariate_lines_removed": 0, "batches_changed": 0, "digests": {}}
    batches = BatchRegistry(root)
    with registry_lock(root):
        for rec in registered_deliveries(root):
            did = rec["delivery_id"]
            copy = manifest_copy_path(root, did)
            manifest = registered_manifest(root, did, layout.landing)   # (the landing copy for an old registration)
            # the record too: a redaction interrupted after the manifest copy was rewritten is finished now
            if not holds(manifest, pseudonym, scope) and \
                    not (scope != IMAGING and pseudonym in rec.get("participants", ())):
                continue
            ddir = layout.landing / did
            removed = 0
            for f in manifest["files"]:
                if not _owned(f, pseudonym) or f["path"] == COVARIATES_NAME:
                    continue
                out["digests"][f["sha256"]] = f"{did}/files[{manifest['files'].index(f)}]"
                p = ddir / f["path"]
                if p.is_file() and not p.is_symlink():
                    out["digests"].setdefault(sha256_file(p), f"{did}/files[{manifest['files'].index(f)}] (as found)")
                    p.unlink()
                    removed += 1
                for parent in p.parents:                  # the participant's now empty folders
                    if parent == ddir or not parent.is_relative_to(ddir):
                        break
                    try:
                        parent.rmdir()
                    except OSError:
                        break
            cov = None
            cov_path = ddir / COVARIATES_NAME
            if scope != IMAGING and cov_path.is_file():
                data, n = drop_covariate_lines(cov_path.read_bytes(), pseudonym)
                if n:
                    atomic_write_bytes(cov_path, data)
                    out["covariate_lines_removed"] += n
                cov = (len(data), hashlib.sha256(data).hexdigest())
            new = redacted_manifest(manifest, pseudonym, scope, cov)
            body = (json.dumps(new, indent=1) + "\n").encode()
            if ddir.is_dir():
                atomic_write_bytes(ddir / MANIFEST_NAME, body)
            atomic_write_bytes(copy, body)
            # the registry follows the new bytes: the sensor sees a redacted delivery, not a changed one
            stats_file = files_path(root, did)
            stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
            stats = {k: v for k, v in stats.items() if k in {f["path"] for f in new["files"]} | {MANIFEST_NAME}}
            for name in (MANIFEST_NAME, COVARIATES_NAME):
                if name in stats or name == MANIFEST_NAME:
                    stats[name] = _stat(ddir / name)
            atomic_write_bytes(stats_file, json.dumps(stats).encode())
            rec = dict(rec)
            if scope != IMAGING:
                rec["participants"] = [p for p in rec["participants"] if p != pseudonym]
            rec["manifest_sha256"] = hashlib.sha256(body).hexdigest()
            rec["watch"] = {n: stats[n] for n in rec.get("watch", {}) if n in stats} | \
                {n: stats[n] for n in (MANIFEST_NAME, COVARIATES_NAME) if n in stats}
            rec["unsettled"] = [n for n in rec.get("unsettled", ()) if n in stats]
            if scope != IMAGING:
                for key in rec.get("batches", ()):
                    b = batches.read(key)
                    if pseudonym in b.participants:
                        b.participants.remove(pseudonym)
                        batches.write(b)
                        out["batches_changed"] += 1
            red_path = layout.redactions / f"{did}.json"
            history = json.loads(red_path.read_text()) if red_path.exists() else []
            history.append({"redacted_at": datetime.now(timezone.utc).isoformat(), "request_id": request_id,
                            "scope": scope, "participants": 1, "files_removed": removed,
                            "manifest_sha256": rec["manifest_sha256"]})
            atomic_write_bytes(red_path, json.dumps(history, indent=1).encode())
            atomic_write_bytes(record_path(root, did), json.dumps(rec).encode())
            out["deliveries"] += 1
            out["files_removed"] += removed
    return out


def redactions(root: Path, delivery_id: str) -> list[dict]:
    """A delivery's redaction records (empty when it was never redacted)."""
    path = DataLayout(Path(root)).redactions / f"{delivery_id}.json"
    return json.loads(path.read_text()) if path.exists() else []
