"""Where everything of a registered delivery went: every file in its folder and every row of its covariates file.

Each ends in exactly one of:

* ``stored``: a scan file of a participant stored by ``raw_mri_scans``, the covariates file (some rows stored),
  the manifest (kept in the registry), a covariate row stored by ``participant_covariates``;
* ``quarantined``: a file or row of a participant quarantined at that stage (counted by reason);
* ``ignored``: with a reason (:data:`IGNORED`): the transfer marker, a file the manifest does not list, a listed
  file outside the contract, a row that names no participant of the delivery or cannot be read;
* ``pending``: its batch has not run yet.

What fits none of them is ``unaccounted``, and must be 0 once every batch ran: a participant whose files or row
were read but who is neither stored nor quarantined (silent loss). ``cbp status --json`` shows the counts
(``accounting``); the tests check that they add up for every case of the corpora. Counts only: no path, no
pseudonym. Bounded: at most :data:`MAX_ENTRIES` folder entries and :data:`MAX_ROWS` rows are looked at (beyond,
``truncated``), a row is read 64 KiB at most.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from cbp_platform.landing import (COVARIATES_NAME, DICOM_DIR, MANIFEST_NAME, MRI_DIR, OPTIONAL_CHANNELS,
                                  REQUIRED_CHANNELS, SUCCESS_MARKER, scan_relpath)

MAX_ENTRIES = 2_000_000
MAX_ROWS = 2_000_000
MAX_LINE = 64 << 10
SCANS, COVARIATES = "raw_mri_scans", "participant_covariates"

IGNORED = {
    "marker": "the transfer marker (_SUCCESS)",
    "not_in_manifest": "present in the folder, not listed in the manifest (and not a scan file the contract expects)",
    "outside_contract": "listed in the manifest, but not a file the contract reads (not a scan of a participant, "
                        "not covariates.csv)",
    "not_a_participant": "a covariate row whose first field is no participant of this delivery (or cannot be read)",
    "not_corrected": "a covariate row of a correction's participant whose entry does not correct the covariates",
}


def account_registered(root: Path, landing: Path, rec: dict, outcomes_rows: list[dict]) -> dict:
    """:func:`account` of a registered delivery, from the registry (its manifest and batches)."""
    from cbp_platform.ingest.deliveries import BatchRegistry
    from cbp_platform.ingest.registry import registered_manifest

    did = rec["delivery_id"]
    reg = BatchRegistry(root)
    read = [reg.read(k) for k in rec["batches"]]
    batches = {b.key: b.participants for b in read}
    no_covariates = {p for b in read if not b.covers("covariates") for p in b.participants}
    return account(Path(landing) / did, registered_manifest(root, did, landing), batches, outcomes_rows,
                   no_covariates=no_covariates)


def _outcome(outcomes: dict, stage: str, pseudonym: str, planned: set[str], ran: set[str]) -> tuple[str, str]:
    """(category, reason) of a participant at a stage."""
    r = outcomes.get(stage, {}).get(pseudonym)
    if r is not None:
        return ("stored", "") if r == "" else ("quarantined", r)
    if pseudonym not in planned:
        return "unaccounted", "not in any batch"
    if pseudonym not in ran:
        return "pending", ""
    return "unaccounted", "neither stored nor quarantined"


def account(delivery_dir: Path, manifest: dict, batches: dict[str, list[str]], outcomes_rows: list[dict], *,
            no_covariates: set[str] = frozenset()) -> dict:
    """The accounting of one registered delivery. ``batches``: batch key -> participants (the registry);
    ``outcomes_rows``: the warehouse's :meth:`~resources.warehouse.Warehouse.ingestion_outcomes` as dicts;
    ``no_covariates``: a correction's participants whose entry does not correct the covariates."""
    outcomes: dict[str, dict[str, str]] = {}
    ran_batches: dict[str, set[str]] = {}
    for r in outcomes_rows:
        outcomes.setdefault(r["stage"], {})[r["pseudonym"]] = r["reason"] or ""
        ran_batches.setdefault(r["stage"], set()).add(r["batch_key"])
    planned = {p for ps in batches.values() for p in ps}
    ran = {stage: {p for k in keys for p in batches.get(k, ())} for stage, keys in ran_batches.items()}
    listed = {f["path"] for f in manifest["files"]}
    dicom = manifest.get("scan_format") == "dicom"
    files: Counter = Counter()
    reasons: dict[str, Counter] = {"quarantined": Counter(), "ignored": Counter(), "unaccounted": Counter()}
    seen = 0
    truncated = False

    def put(category: str, reason: str = "") -> None:
        files[category] += 1
        if reason and category in reasons:
            reasons[category][reason] += 1

    for dirpath, dirnames, filenames in os.walk(delivery_dir, followlinks=False):
        dirnames.sort()
        # a link to a folder is listed among dirnames and not followed: count it as an entry
        entries = filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in sorted(entries):
            seen += 1
            if seen > MAX_ENTRIES:
                truncated = True
                break
            rel = os.path.relpath(os.path.join(dirpath, name), delivery_dir).replace(os.sep, "/")
            put(*_file(rel, listed, dicom, outcomes, planned, ran, no_covariates))
        if truncated:
            break
    rows = _rows(Path(delivery_dir) / COVARIATES_NAME, outcomes, planned, ran.get(COVARIATES, set()), no_covariates)
    return {"files": _summary(files, reasons), "covariate_rows": rows, "truncated": truncated,
            "adds_up": files["unaccounted"] == 0 and rows["unaccounted"] == 0}


def _file(rel: str, listed: set[str], dicom: bool, outcomes: dict, planned: set[str],
          ran: dict[str, set[str]], no_covariates: set[str] = frozenset()) -> tuple[str, str]:
    if rel == MANIFEST_NAME:
        return "stored", ""
    if rel == SUCCESS_MARKER:
        return "ignored", "marker"
    if rel == COVARIATES_NAME:
        cats = {_outcome(outcomes, COVARIATES, p, planned, ran.get(COVARIATES, set()))[0] for p in planned
                if p not in no_covariates}
        if "stored" in cats:
            return "stored", ""
        qs = Counter(r for r in outcomes.get(COVARIATES, {}).values() if r)
        if qs:
            return "quarantined", qs.most_common(1)[0][0]
        return ("pending", "") if "pending" in cats or not planned else ("unaccounted", "neither stored nor "
                                                                                       "quarantined")
    parts = rel.split("/")
    if len(parts) == 2 and parts[0] == (DICOM_DIR if dicom else MRI_DIR) and parts[1] in planned:
        return _outcome(outcomes, SCANS, parts[1], planned, ran.get(SCANS, set()))    # a participant folder's link
    scan = len(parts) == 3 and parts[0] == (DICOM_DIR if dicom else MRI_DIR)
    if scan:
        p = parts[1]
        expected = (rel.lower().endswith(".zip") if dicom
                    else rel in {scan_relpath(p, c) for c in REQUIRED_CHANNELS + OPTIONAL_CHANNELS})
        if expected and (rel in listed or not dicom):
            return _outcome(outcomes, SCANS, p, planned, ran.get(SCANS, set()))
    if rel in listed:
        return "ignored", "outside_contract"
    return "ignored", "not_in_manifest"


def _rows(path: Path, outcomes: dict, planned: set[str], ran: set[str], no_covariates: set[str] = frozenset()
          ) -> dict:
    rows: Counter = Counter()
    reasons: dict[str, Counter] = {"quarantined": Counter(), "ignored": Counter(), "unaccounted": Counter()}
    truncated = False
    try:
        fh = open(path, "rb")
    except OSError:
        return {**_summary(rows, reasons), "truncated": False}
    with fh:
        header = True
        for n, line in enumerate(iter(lambda: fh.readline(MAX_LINE), b"")):
            while not line.endswith(b"\n") and len(line) >= MAX_LINE:       # a long line: skip the rest of it
                more = fh.readline(MAX_LINE)
                if not more:
                    break
                line = line[:MAX_LINE - 1] + more[-1:]
            if header:
                header = False
                continue
            if n > MAX_ROWS:
                truncated = True
                break
            if not line.strip(b"\r\n \t"):
                continue                                       # blank lines are not rows
            first = line.split(b",", 1)[0].strip().decode("utf-8", "replace").lstrip("\ufeff")
            if first not in planned:
                cat, reason = "ignored", "not_a_participant"
            elif first in no_covariates:
                cat, reason = "ignored", "not_corrected"
            else:
                cat, reason = _outcome(outcomes, COVARIATES, first, planned, ran)
            rows[cat] += 1
            if reason and cat in reasons:
                reasons[cat][reason] += 1
    return {**_summary(rows, reasons), "truncated": truncated}


def _summary(counts: Counter, reasons: dict[str, Counter]) -> dict:
    out = {k: int(counts.get(k, 0)) for k in ("stored", "quarantined", "ignored", "pending", "unaccounted")}
    out["total"] = sum(out.values())
    for k, c in reasons.items():
        if c:
            out[f"{k}_reasons"] = dict(sorted(c.items()))
    return out
