"""The data map: every store that can hold a participant's data, each with its erase and its verify.

One declared list (:data:`STORES`). Every path of :class:`~cbp_platform.paths.DataLayout` belongs to exactly one
store (``layout``), and the warehouse store covers every table of :data:`cbp_platform.warehouse.TABLES`: the test
``tests/lifecycle/test_erasure.py`` checks both, and an erasure refuses to run while the warehouse holds an
undeclared table, so a new store or table cannot be forgotten silently. A store that holds nothing of a
participant by design (published results, the Dagster instance, models) has no erase, and its verify proves the
design each time with the byte scan.

Each store's ``roots`` are what the byte scan (:mod:`cbp_platform.erasure.scan`) reads for it; whatever else lies
in the data root (outside every store, ``truth/`` aside) is scanned as ``unmapped``, where any hit fails the
erasure. ``keeps_pseudonym``: for an ``imaging`` withdrawal, the stores that keep the covariates, and so the
pseudonym (the file digests must still be gone from them).

Framework-free: the warehouse is the caller's object (``resources.warehouse.Warehouse``).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import polars as pl

from cbp_platform.erasure.scan import Hit
from cbp_platform.imaging.nifti import sha256_file
from cbp_platform.paths import DataLayout


@dataclass
class Subject:
    """One participant being erased: the pseudonym (in memory only, never written), the requests, and what the
    erasure found and removed."""

    pseudonym: str
    keyed_hash: str
    scope: str
    requests: list[dict]
    digests: dict[str, str] = field(default_factory=dict)      # sha256 of each file they had -> a label
    removed: dict[str, dict] = field(default_factory=dict)     # store -> what was removed
    releases: list[int] = field(default_factory=list)
    montages: set[tuple[str, str]] = field(default_factory=set)   # (delivery id, batch key) to redraw
    hits: dict[str, list[Hit]] = field(default_factory=dict)   # store -> byte-scan hits that count
    unreadable: dict[str, list[str]] = field(default_factory=dict)   # store -> files the scan could not read


@dataclass
class Context:
    layout: DataLayout
    warehouse: Any
    extra_db_dirs: list[Path] = field(default_factory=list)    # e.g. the PostgreSQL data directory
    dagster_home: Path | None = None


@dataclass(frozen=True)
class Store:
    name: str
    holds: str
    layout: tuple[str, ...]                                    # the DataLayout members it covers
    roots: Callable[[Context], list[Path]]                     # what the byte scan reads for it
    verify: Callable[[Context, Subject], dict]
    erase: Callable[[Context, Subject], dict] | None = None    # None: holds nothing of a participant by design
    keeps_pseudonym: bool = False                              # an imaging-only erasure keeps the covariates here


def scan_verdict(subject: Subject, store: str, extra: dict | None = None) -> dict:
    hits = subject.hits.get(store, [])
    unreadable = subject.unreadable.get(store, [])
    out = {"method": "byte scan (files, gzip streams, zip members, names)", "hits": len(hits),
           "unreadable_files": len(unreadable), "passed": not hits and not unreadable, **(extra or {})}
    if unreadable:          # a file the scan could not read proves nothing: the store does not pass
        out["unreadable"] = unreadable[:20]
    if hits:
        out["where"] = sorted({f"{h.path}{'::' + h.member if h.member else ''}: {h.what}" for h in hits})[:20]
    return out


# --- warehouse ---------------------------------------------------------------------------------------------------

def _erase_warehouse(ctx: Context, s: Subject) -> dict:
    wh = ctx.warehouse
    for f in wh.participant_files(s.pseudonym):              # label maps and QC images: removed with the derived
        s.digests.update(_digest_of(ctx.layout, f))
    have = set(wh.tables())
    if "segmentation_qc" in have:
        qc = wh.table("segmentation_qc", columns=["delivery_id", "batch_key"], where={"pseudonym": s.pseudonym},
                      versions="all")
        s.montages |= set(qc.iter_rows())
    rows = wh.erase_participant(s.pseudonym, s.scope)
    return {"rows": {t: n for t, n in rows.items() if n}, "rows_total": sum(rows.values())}


def _verify_warehouse(ctx: Context, s: Subject) -> dict:
    wh = ctx.warehouse
    left = {t: n for t, n in wh.participant_rows(s.pseudonym, s.scope).items() if n}
    text = {} if s.scope == "imaging" else wh.text_occurrences(s.pseudonym)
    out = scan_verdict(s, "warehouse", {"rows_left": left, "text_left": text})
    out["method"] = "SQL: the participant's rows in every declared table, and every text column of every table; " \
                    "then " + out["method"] + " of the database files"
    out["passed"] = out["passed"] and not left and not text
    return out


def _warehouse_roots(ctx: Context) -> list[Path]:
    return [ctx.layout.warehouse_file.parent, *ctx.extra_db_dirs]


# --- derived files -----------------------------------------------------------------------------------------------

def _digest_of(layout: DataLayout, stored: str) -> dict[str, str]:
    p = Path(stored) if os.path.isabs(stored) else layout.root / stored
    return {sha256_file(p): f"derived file {p.name.split('_')[-1]}"} if p.is_file() else {}


def _named(root: Path, pseudonym: str) -> list[Path]:
    """Files and folders under ``root`` whose name holds the pseudonym (the platform names every per-participant
    file after it: label maps, QC images, comparison maps, volumes converted from DICOM)."""
    out = []
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if pseudonym in name:
                out.append(Path(dirpath) / name)
    return out


def _erase_derived(ctx: Context, s: Subject) -> dict:
    files = dirs = 0
    named = _named(ctx.layout.derived, s.pseudonym)
    seg_root = ctx.layout.segmentations("x").parent
    for p in named:        # the montages of the deliveries the participant's maps are in (also after a crash that
        if p.is_relative_to(seg_root) and len(p.relative_to(seg_root).parts) > 1:    # lost the warehouse rows)
            delivery = p.relative_to(seg_root).parts[0]
            s.montages |= {(delivery, m.stem[len("qc_montage_"):])
                           for m in ctx.layout.segmentations(delivery).glob("qc_montage_*.png")}
    for p in sorted(named, key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            for f in p.rglob("*"):
                if f.is_file():
                    s.digests[sha256_file(f)] = f"derived file {f.suffix or f.name}"
                    files += 1
            shutil.rmtree(p)
            dirs += 1
        elif p.exists() or p.is_symlink():
            if p.is_file():
                s.digests[sha256_file(p)] = f"derived file {''.join(p.suffixes)}"
            p.unlink()
            files += 1
    redrawn = _redraw_montages(ctx, s)
    return {"files": files, "folders": dirs, "qc_montages_redrawn": redrawn}


def _redraw_montages(ctx: Context, s: Subject) -> int:
    """A batch's QC montage shows its highest-risk maps, perhaps the participant's: drawn again from the batch's
    remaining QC images (removed when none is left)."""
    from cbp_platform.qc.pipeline import batch_montage

    n = 0
    for delivery_id, batch_key in sorted(s.montages):
        path = ctx.layout.segmentations(delivery_id) / f"qc_montage_{batch_key}.png"
        if not path.exists():
            continue
        qc = ctx.warehouse.table("segmentation_qc", where={"batch_key": batch_key}, missing_ok=True)
        if qc is not None and qc.height:
            qc = qc.with_columns(pl.col("qc_image").map_elements(
                lambda v: str(ctx.layout.root / v) if v and not os.path.isabs(v) else v, return_dtype=pl.String))
            qc = qc.filter(pl.col("qc_image").map_elements(lambda v: bool(v) and Path(v).is_file(),
                                                           return_dtype=pl.Boolean))
        if qc is None or qc.height == 0:
            path.unlink()
        else:
            from cbp_platform.imaging.nifti import atomic_write_bytes
            atomic_write_bytes(path, batch_montage(qc))
        n += 1
    return n


def _verify_derived(ctx: Context, s: Subject) -> dict:
    left = _named(ctx.layout.derived, s.pseudonym)
    out = scan_verdict(s, "derived", {"named_left": len(left)})
    out["passed"] = out["passed"] and not left
    return out


# --- landing zone and registry -----------------------------------------------------------------------------------

def _erase_landing(ctx: Context, s: Subject) -> dict:
    from cbp_platform.ingest.redaction import redact

    res = redact(ctx.layout.root, s.pseudonym, s.scope, ",".join(r["request_id"] for r in s.requests))
    s.digests.update(res.pop("digests"))
    s.removed["registry"] = {"delivery_records": res["deliveries"], "batches": res.pop("batches_changed")}
    return {"deliveries_redacted": res["deliveries"], "files": res["files_removed"],
            "covariate_lines": res["covariate_lines_removed"]}


def _listed(ctx: Context, s: Subject) -> int:
    """Registered manifests that still list the participant (imaging: still list a scan file of theirs)."""
    from cbp_platform.ingest.redaction import holds
    from cbp_platform.ingest.registry import registered_deliveries, registered_manifest

    n = 0
    for rec in registered_deliveries(ctx.layout.root):
        try:
            man = registered_manifest(ctx.layout.root, rec["delivery_id"], ctx.layout.landing)
        except Exception:  # noqa: BLE001  (an unreadable copy is found by the byte scan)
            continue
        n += holds(man, s.pseudonym, s.scope)
        if s.scope != "imaging" and s.pseudonym in rec.get("participants", ()):
            n += 1
    return n


def _verify_landing(ctx: Context, s: Subject) -> dict:
    left = _listed(ctx, s)
    out = scan_verdict(s, "landing", {"still_listed": left})
    out["passed"] = out["passed"] and not left
    return out


def _erase_registry(ctx: Context, s: Subject) -> dict:
    """The internal release manifests (delivery records and batches: with the landing zone, one redaction)."""
    import json

    from cbp_platform.imaging.nifti import atomic_write_bytes
    from cbp_platform.warehouse import COVARIATE_STAGES

    changed = 0
    folder = ctx.layout.release_manifest(1).parent
    for p in sorted(folder.glob("*.json")) if folder.exists() else []:
        doc = json.loads(p.read_bytes())
        cols = doc.get("version_columns", [])
        i_p, i_s = cols.index("pseudonym") if "pseudonym" in cols else 1, cols.index("stage") if "stage" in cols else 0

        def gone(row) -> bool:
            return row[i_p] == s.pseudonym and (s.scope != "imaging" or row[i_s] not in COVARIATE_STAGES)

        new = {**doc, "versions": [r for r in doc.get("versions", []) if not gone(r)]}
        if s.scope != "imaging":
            new["retired"] = [r for r in doc.get("retired", []) if r[0] != s.pseudonym]
            new["qc_rejected"] = [r for r in doc.get("qc_rejected", []) if r != s.pseudonym]
        if new != doc:
            atomic_write_bytes(p, json.dumps(new).encode())
            changed += 1
    out = dict(s.removed.get("registry", {}))
    out["release_manifests"] = changed
    return out


def _verify_scan(store: str) -> Callable[[Context, Subject], dict]:
    return lambda ctx, s: scan_verdict(s, store)


def _dagster_roots(ctx: Context) -> list[Path]:
    out = [ctx.layout.dagster_home]
    if ctx.dagster_home and Path(ctx.dagster_home).resolve() != ctx.layout.dagster_home:
        out.append(Path(ctx.dagster_home))
    return out


def _truth_verify(ctx: Context, s: Subject) -> dict:
    return {"method": "not scanned: the simulator's truth stands for the data centre, outside the platform's "
                      "custody (its erasure is the data centre's)", "passed": True, "hits": 0}


STORES: tuple[Store, ...] = (
    Store("warehouse", "every table's rows of the participant, every version, the review decisions (qc_reviews: "
                       "append-only, erasure its one exception); then the database files rewritten",
          ("warehouse_file",), _warehouse_roots, _verify_warehouse, _erase_warehouse, keeps_pseudonym=True),
    Store("derived", "label maps, QC images and montages, comparison label maps, volumes converted from DICOM",
          ("derived", "segmentations", "comparisons", "derived_dicom"), lambda c: [c.layout.derived],
          _verify_derived, _erase_derived),
    Store("landing", "the delivered files (scans, covariates line, manifest entries); the delivery is marked "
                     "redacted", ("landing", "scan_path"), lambda c: [c.layout.landing], _verify_landing,
          _erase_landing, keeps_pseudonym=True),
    Store("registry", "delivery records, manifest copies and file stats, batch membership, internal release "
                      "manifests, retirements, redaction records",
          ("registry", "delivery_registry", "batch_registry", "retirements", "redactions", "release_manifest"),
          lambda c: [c.layout.registry], _verify_scan("registry"), _erase_registry, keeps_pseudonym=True),
    Store("published", "reports, published tables, release summaries, the impact report: aggregates with cells "
                       "under 5 suppressed, no pseudonym by design",
          ("published", "latest_report", "report_dir", "release_summary", "release_report", "release_impact"),
          lambda c: [c.layout.published], _verify_scan("published")),
    Store("dagster", "the Dagster instance: event log, run storage, compute logs; no pseudonym by design",
          ("dagster_home",), _dagster_roots, _verify_scan("dagster")),
    Store("models", "model bundles, manifests, the primary model's and the platform model's (the region locator's) "
                    "pointers, the vertebral-level regressor; trained on simulated truth, no participant data by "
                    "design",
          ("models", "model_registry", "platform_model_pointer", "level_model"), lambda c: [c.layout.models],
          _verify_scan("models")),
    Store("withdrawals", "the withdrawal register (keyed hashes), its keys and the certificates; outside the data "
                         "root, never erased", ("withdrawals",), lambda c: [c.layout.withdrawals],
          _verify_scan("withdrawals")),
    Store("truth", "the simulator's ground truth: stands for the data centre, outside the platform's custody",
          ("truth",), lambda c: [], _truth_verify),
)
# DataLayout members that are not stores: the root itself, constructors and helpers
NOT_STORES = ("root", "from_env", "stored", "resolve", "stored_paths", "resolved_paths")
UNMAPPED = "unmapped"
_WORD = re.compile(r"^[a-z_]+$")
assert all(_WORD.match(s.name) for s in STORES)


def unmapped_roots(ctx: Context) -> tuple[Path, list[Path]]:
    """(the data root, what to leave out of its scan): everything in the data root outside every store."""
    covered = [ctx.layout.truth]
    for st in STORES:
        covered += [p for p in st.roots(ctx) if p.is_relative_to(ctx.layout.root)]
    return ctx.layout.root, covered
