"""Ingesting one batch's scans (no Dagster here; the assets call these). Registration: :mod:`.registry`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl

from cbp_platform.ingest.deliveries import Batch
from cbp_platform.ingest.dicom import inspect_dicom_participant
from cbp_platform.ingest.scans import SCAN_FACTS_SCHEMA, ByteBudget, ScanProblem, inspect_participant
from cbp_platform.paths import DataLayout
from cbp_platform.reasons import R


def ingest_scans(batch: Batch, delivery_dir: Path, manifest: dict, *, duplicates: set[str] | dict[str, str],
                 threads: int = 2, progress=None, budget: ByteBudget | None = None,
                 layout: DataLayout | None = None) -> tuple[list[dict], list[dict]]:
    """Validate every participant of ``batch``: (facts rows, quarantine rows). Never raises per participant.

    ``duplicates``: pseudonyms that belong to another delivery (with that delivery's id when known). A DICOM
    delivery (``scan_format: dicom``) is converted and stitched under ``layout``'s derived folder; its facts
    rows carry ``inputs``, the sha256 of every DICOM file read (for provenance)."""
    dicom = manifest.get("scan_format") == "dicom"
    if dicom and layout is None:
        raise ValueError("a DICOM delivery needs the data layout (derived volumes go under the data root)")
    files = {f["path"]: f for f in manifest["files"]}
    index = {f["path"]: i for i, f in enumerate(manifest["files"])}
    budget = budget or ByteBudget()
    facts: list[dict] = []
    quarantine: list[dict] = []
    todo = []
    for p in batch.participants:
        if p in duplicates:
            owner = duplicates[p] if isinstance(duplicates, dict) else ""
            quarantine.append(dict(pseudonym=p, reason=R.duplicate_pseudonym.code,
                                   message=f"{batch.delivery_id}: participant already registered "
                                           f"{f'by delivery {owner}' if owner else 'by an earlier delivery'} "
                                           "(first registered wins)"))
        else:
            todo.append(p)

    def inspect(p: str) -> dict:
        if not dicom:
            return inspect_participant(delivery_dir, p, files, budget=budget, files_index=index)
        out = layout.derived_dicom(batch.delivery_id) / p
        res = inspect_dicom_participant(delivery_dir, p, files, out_dir=out, rel_out=str(out.relative_to(layout.root)),
                                        budget=budget, files_index=index)
        return {**res.facts, "inputs": res.inputs}

    def one(p: str):
        try:
            return inspect(p), None
        except ScanProblem as exc:
            return None, dict(pseudonym=p, reason=exc.reason, message=f"{batch.delivery_id}: {exc.message}")
        except Exception as exc:  # an unforeseen failure quarantines one scan, not the batch
            text = redact(f"{type(exc).__name__}: {exc}", p, delivery_dir)
            return None, dict(pseudonym=p, reason=R.unreadable.code, message=f"{batch.delivery_id}: {text}")

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
    rows = [{**{k: None for k in SCAN_FACTS_SCHEMA}, **{k: v for k, v in f.items() if k in SCAN_FACTS_SCHEMA},
             "batch_key": batch.key, "delivery_id": batch.delivery_id} for f in facts]
    return pl.DataFrame(rows, schema=SCAN_FACTS_SCHEMA).sort("pseudonym")


def scan_files(layout: DataLayout, delivery_id: str, row: dict) -> dict[str, str]:
    """``{"water": path, "fat": path}`` of a ``raw_mri_scans`` row (a delivered NIfTI file, or the volume derived
    from a DICOM delivery), in that order."""
    fmt = row.get("source_format")
    return {c: str(layout.scan_path(delivery_id, row[f"{c}_path"], fmt)) for c in ("water", "fat")}
