"""Ingesting one batch's scans (no Dagster here; the assets call these). Registration: :mod:`.registry`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl

from cbp_platform.ingest.deliveries import Batch
from cbp_platform.ingest.scans import SCAN_FACTS_SCHEMA, ByteBudget, ScanProblem, inspect_participant


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
