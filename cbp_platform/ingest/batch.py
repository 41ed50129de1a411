"""Registering deliveries and ingesting one batch's scans (no Dagster here; the assets call these)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl

from cbp_platform.imaging.nifti import atomic_write_bytes
from cbp_platform.ingest.deliveries import Batch, BatchRegistry, plan_batches
from cbp_platform.ingest.scans import SCAN_FACTS_SCHEMA, ByteBudget, ScanProblem, inspect_participant


def _delivery_record_path(root: Path, delivery_id: str) -> Path:
    return root / "registry" / "deliveries" / f"{delivery_id}.json"


def register_delivery(root: Path, manifest: dict, batch_size: int) -> list[Batch]:
    """Write the delivery record and its batch membership files; idempotent (an existing split is kept)."""
    reg = BatchRegistry(root)
    rec_path = _delivery_record_path(root, manifest["delivery_id"])
    if rec_path.exists():
        rec = json.loads(rec_path.read_text())
        return [reg.read(k) for k in rec["batches"]]
    batches = plan_batches(manifest, batch_size)
    for b in batches:
        reg.write(b)
    rec = {"delivery_id": manifest["delivery_id"], "created_at": manifest["created_at"],
           "participants": sorted(set(manifest["participants"])), "batch_size": batch_size,
           "batches": [b.key for b in batches]}
    atomic_write_bytes(rec_path, json.dumps(rec).encode())   # written last: the delivery is now registered
    return batches


def registered_deliveries(root: Path) -> list[dict]:
    d = root / "registry" / "deliveries"
    if not d.exists():
        return []
    return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))]


def earlier_pseudonyms(root: Path, delivery_id: str) -> set[str]:
    """Pseudonyms of deliveries registered before ``delivery_id`` (ordered by created_at, then id).

    The rule does not depend on which batch happens to run first: the earliest delivery of a pseudonym
    keeps it, later ones are quarantined as duplicates.
    """
    recs = registered_deliveries(root)
    me = next((r for r in recs if r["delivery_id"] == delivery_id), None)
    if me is None:
        return set()
    key = (me["created_at"], me["delivery_id"])
    out: set[str] = set()
    for r in recs:
        if (r["created_at"], r["delivery_id"]) < key:
            out.update(r["participants"])
    return out


def ingest_scans(batch: Batch, delivery_dir: Path, manifest: dict, *, duplicates: set[str] | dict[str, str],
                 threads: int = 2, progress=None, budget: ByteBudget | None = None) -> tuple[list[dict], list[dict]]:
    """Validate every participant of ``batch``: (facts rows, quarantine rows). Never raises per participant.

    ``duplicates``: pseudonyms that belong to another delivery (with that delivery's id when known)."""
    files = {f["path"]: f for f in manifest["files"]}
    index = {f["path"]: i for i, f in enumerate(manifest["files"])}
    budget = budget or ByteBudget()
    facts: list[dict] = []
    quarantine: list[dict] = []
    todo = []
    for p in batch.participants:
        if p in duplicates:
            owner = duplicates[p] if isinstance(duplicates, dict) else ""
            quarantine.append(dict(pseudonym=p, reason="duplicate_pseudonym",
                                   message=f"{batch.delivery_id}: participant already registered "
                                           f"{f'by delivery {owner}' if owner else 'by an earlier delivery'} "
                                           "(first registered wins)"))
        else:
            todo.append(p)

    def one(p: str):
        try:
            return inspect_participant(delivery_dir, p, files, budget=budget, files_index=index), None
        except ScanProblem as exc:
            return None, dict(pseudonym=p, reason=exc.reason, message=f"{batch.delivery_id}: {exc.message}")
        except Exception as exc:  # an unforeseen failure quarantines one scan, not the batch
            text = redact(f"{type(exc).__name__}: {exc}", p, delivery_dir)
            return None, dict(pseudonym=p, reason="unreadable", message=f"{batch.delivery_id}: {text}")

    with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
        for i, (ok, bad) in enumerate(pool.map(one, todo), start=1):
            if ok is not None:
                facts.append(ok)
            else:
                quarantine.append(bad)
            if progress is not None:
                progress(i, len(todo))
    return facts, quarantine


def redact(text: str, pseudonym: str, delivery_dir: Path | None = None) -> str:
    """``text`` without the pseudonym or the delivery folder's path (for messages that operators read)."""
    if delivery_dir is not None:
        text = text.replace(str(delivery_dir), "<delivery>")
    return text.replace(pseudonym, "<participant>")


def facts_frame(facts: list[dict], batch: Batch) -> pl.DataFrame:
    """Scan facts as a table with the fixed schema (absent optional channels are null)."""
    rows = [{**{k: None for k in SCAN_FACTS_SCHEMA}, **f, "batch_key": batch.key, "delivery_id": batch.delivery_id}
            for f in facts]
    return pl.DataFrame(rows, schema=SCAN_FACTS_SCHEMA).sort("pseudonym")
