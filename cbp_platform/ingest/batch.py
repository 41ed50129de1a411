"""Ingesting one batch's scans (no Dagster here; the assets call these). Registration: :mod:`.registry`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl

from cbp_platform.ingest.deliveries import Batch
from cbp_platform.ingest.dicom import inspect_dicom_participant
from cbp_platform.ingest.scans import SCAN_FACTS_SCHEMA, ByteBudget, ScanProblem, inspect_participant
from cbp_platform.ingest.covariates import CovariateResult, parse_covariates
from cbp_platform.landing import COVARIATES_NAME, DICOM_DIR, MRI_DIR
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
    listed = set(manifest["participants"])
    same = duplicate_content(manifest)
    for p in batch.participants:
        if p not in listed:
            quarantine.append(dict(pseudonym=p, reason=R.not_in_participant_list.code,
                                   message=unlisted_message(batch.delivery_id, p, index)))
        elif p in same:
            quarantine.append(dict(pseudonym=p, reason=R.duplicate_content.code,
                                   message=f"{batch.delivery_id}: {same[p]}"))
        elif p in duplicates:
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
    # the same image under two pseudonyms that the manifest could not show (DICOM: zips that differ in their headers,
    # one volume): by the sha256 of the stored (DICOM: stitched) water image, within the batch
    by_sha: dict[str, list[dict]] = {}
    for f in facts:
        by_sha.setdefault(f["water_sha256"], []).append(f)
    for group in (g for g in by_sha.values() if len(g) > 1):
        for f in group:
            others = ", ".join(f"participant {batch.participants.index(g['pseudonym']) + 1} of the batch"
                               for g in group if g is not f)
            quarantine.append(dict(pseudonym=f["pseudonym"], reason=R.duplicate_content.code,
                                   message=f"{batch.delivery_id}: the same water image as {others}; both "
                                           "quarantined"))
            facts.remove(f)
    return facts, quarantine


def ingest_covariates(batch: Batch, delivery_dir: Path, manifest: dict, *, duplicates: set[str] | dict[str, str]
                      ) -> tuple[CovariateResult, dict | None]:
    """The batch's rows of ``covariates.csv`` (checked against its manifest entry) and their quarantine, with the
    participants the manifest's participant list lacks quarantined as ``not_in_participant_list``; and the entry."""
    k, entry = next(((i, f) for i, f in enumerate(manifest["files"]) if f["path"] == COVARIATES_NAME), (None, None))
    listed = set(manifest["participants"])
    res = parse_covariates(Path(delivery_dir) / COVARIATES_NAME, [p for p in batch.participants if p in listed],
                           duplicates, delivery_dir=delivery_dir, entry=entry, verify=True,
                           label=f"{batch.delivery_id}: {COVARIATES_NAME} "
                                 f"({'not in the manifest' if k is None else f'files[{k}]'})")
    index = {f["path"]: i for i, f in enumerate(manifest["files"])}
    res.quarantine.extend(dict(pseudonym=p, reason=R.not_in_participant_list.code,
                               message=unlisted_message(batch.delivery_id, p, index))
                          for p in batch.participants if p not in listed)
    return res, entry


def unlisted_message(delivery_id: str, pseudonym: str, index: dict[str, int]) -> str:
    first = min((i for path, i in index.items() if path.split("/")[1:2] == [pseudonym]), default=None)
    where = f" (files[{first}] and the participant's other files)" if first is not None else ""
    return (f"{delivery_id}: files are listed under the participant's folder{where}, but the manifest's "
            "participant list lacks the pseudonym")


def duplicate_content(manifest: dict) -> dict[str, str]:
    """Participants of the delivery whose image files (a NIfTI channel, a DICOM zip) have the sha256 of another
    participant's: pseudonym -> a message naming the other's file by its position in the manifest."""
    owner: dict[str, list[tuple[str, int]]] = {}
    for i, f in enumerate(manifest["files"]):
        parts = f["path"].split("/")
        if len(parts) >= 3 and parts[0] in (MRI_DIR, DICOM_DIR):
            owner.setdefault(f["sha256"], []).append((parts[1], i))
    out: dict[str, str] = {}
    for holders in owner.values():
        people = {p for p, _ in holders}
        if len(people) < 2:
            continue
        for p, i in holders:
            j = next(j for q, j in holders if q != p)
            out.setdefault(p, f"files[{i}] has the same content (sha256) as files[{j}], another participant's; "
                              "both quarantined")
    return out


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
