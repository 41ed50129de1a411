"""Lineage of published results: the manifest written beside the report, and the chain ``cbp lineage`` prints.

The manifest (``lineage.json`` beside ``report.md``) ties every published number to
* the analysis-cohort hash (content of the analysed frame, :func:`cbp_platform.analysis.cohort.cohort_hash`);
* the batches behind it, each with the data version (table checksum) and run id of every per-batch asset;
* the deliveries (sha256 of each delivery's manifest) and a digest of every input file checksum and label-map
  checksum of the analysed participants (a digest, so no pseudonym leaves the warehouse);
* the segmentation model weights (sha256) and where the bundle lives;
* the code (git commit, asset code versions), the package versions, and the run id of each cohort-level asset.

The assets gather these from the warehouse and the Dagster instance (they run inside Dagster); this module is
framework-free and does the parts that need neither: hashing, versions, the manifest's shape
(:func:`build_manifest`), the lineage summary the report prints (:func:`report_lineage`) and the chain's text
rendering. Pseudonyms never enter the manifest.
"""

import hashlib
import json
import subprocess
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path

import polars as pl

MANIFEST_NAME = "lineage.json"
MANIFEST_VERSION = "cbp-lineage/1"
PACKAGES = ("cbp-platform", "dagster", "dagster-duckdb", "duckdb", "torch", "monai", "nibabel", "polars", "numpy",
            "scipy", "statsmodels", "great-expectations", "matplotlib")
REPO_ROOT = Path(__file__).resolve().parent.parent


def code_version(repo: Path = REPO_ROOT) -> dict:
    """The git commit of the code that ran (and whether the work tree had uncommitted changes)."""
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip() != ""
        return {"git_commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown (not a git checkout)", "dirty": None}


def package_versions(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    out = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def digest(lines: Iterable[str]) -> str:
    """sha256 over sorted lines: an order-independent fingerprint of a set of checksums."""
    h = hashlib.sha256()
    for line in sorted(lines):
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()


def input_digests(analysed: Iterable[str], scans: pl.DataFrame, segmentations: pl.DataFrame) -> dict:
    """Digests of the analysed participants' input files (water/fat sha256) and label maps (sha256).

    ``analysed``: pseudonyms of the analysed cohort; ``scans``: raw_mri_scans rows; ``segmentations``:
    muscle_segmentations rows. The digests cover checksums only; no pseudonym is part of the output.
    """
    keep = set(analysed)
    s = scans.filter(pl.col("pseudonym").is_in(keep)) if scans.height else scans
    g = segmentations.filter(pl.col("pseudonym").is_in(keep)) if segmentations.height else segmentations
    files = [f"{r['water_sha256']} {r['fat_sha256']}" for r in s.iter_rows(named=True)] if s.height else []
    labels = [r["label_sha256"] for r in g.iter_rows(named=True)] if g.height else []
    models = sorted(set(g["model_sha256"].to_list())) if g.height else []
    return {"input_files": {"participants": len(files), "files": 2 * len(files), "sha256_digest": digest(files)},
            "label_maps": {"count": len(labels), "sha256_digest": digest(labels)},
            "segmentation_weights_sha256": models}


def delivery_checksums(landing: Path, delivery_ids: Iterable[str], registry_root: Path | None = None) -> list[dict]:
    """sha256 of each delivery's manifest (the delivery's own list of files and checksums): the manifest as
    registered (what was ingested) when ``registry_root`` holds its record, else the landing zone's copy."""
    from cbp_platform.imaging.nifti import sha256_file
    from cbp_platform.landing import MANIFEST_NAME as DELIVERY_MANIFEST

    registered = {}
    if registry_root is not None:
        from cbp_platform.ingest.registry import registered_deliveries

        registered = {r["delivery_id"]: r.get("manifest_sha256") for r in registered_deliveries(registry_root)}
    out = []
    for d in sorted(set(delivery_ids)):
        p = landing / d / DELIVERY_MANIFEST
        sha = registered.get(d) or (sha256_file(p) if p.exists() else "missing")
        out.append({"delivery_id": d, "manifest_sha256": sha})
    return out


def cohort_asset_runs(lineage_rows: pl.DataFrame, extra: Mapping[str, dict] | None = None) -> dict[str, dict]:
    """asset -> run id, data version, code version, upstream and time, from the warehouse's ``asset_lineage``
    rows; ``extra`` adds (or overrides) assets recorded elsewhere (the report's own run, the model's)."""
    runs = {}
    for r in lineage_rows.iter_rows(named=True):
        runs[r["asset"]] = {"run_id": r["run_id"], "data_version": r["data_version"], "code_version": r["code_version"],
                            "upstream": json.loads(r["upstream"]), "timestamp": str(r["recorded_at"])}
    runs.update(extra or {})
    return runs


def build_manifest(*, cohort_meta: Mapping, flow: pl.DataFrame, batches: list[dict], deliveries: list[dict],
                   analysed: Iterable[str], scans: pl.DataFrame, segmentations: pl.DataFrame,
                   model_pointer: Mapping, comparisons: Iterable[Mapping], cohort_assets: Mapping[str, dict],
                   generated_at: str) -> dict:
    """The lineage manifest of one published report (see the module docstring); ``files`` is added once the
    report is written.

    ``cohort_meta``: the ``analysis_cohort_meta`` row; ``flow``: the exclusion flow; ``batches``: per batch its
    key and each per-batch asset's run and data version; ``deliveries``: :func:`delivery_checksums`;
    ``analysed`` / ``scans`` / ``segmentations``: for :func:`input_digests`; ``model_pointer``: the current
    segmentation model (``models/current.json``); ``comparisons``: the model comparisons published with it;
    ``cohort_assets``: :func:`cohort_asset_runs`.
    """
    flow_rows = {r["criterion"]: r for r in flow.iter_rows(named=True)}
    return {
        "manifest_version": MANIFEST_VERSION,
        "generated_at": generated_at,
        "cohort": {"cohort_hash": cohort_meta["cohort_hash"], "analysed": cohort_meta["n_analysed"],
                   "start": int(flow_rows["start"]["remaining"]) if "start" in flow_rows else None,
                   "lmm_normaliser": cohort_meta["lmm_normaliser"],
                   "standardisation": json.loads(cohort_meta["standardisation"])},
        "release": {"id": cohort_meta.get("release_id"), "content_hash": cohort_meta.get("release_content_hash"),
                    "merkle_root": cohort_meta.get("release_merkle_root") or None,
                    "summary": f"published/releases/{cohort_meta.get('release_id')}/release.json"},
        "batches": batches,
        "deliveries": deliveries,
        "inputs": input_digests(analysed, scans, segmentations),
        "model": {"weights_sha256": model_pointer.get("weights_sha256"), "bundle_path": model_pointer.get("path"),
                  "name": model_pointer.get("name"), "backend": model_pointer.get("backend"),
                  "validation_dice": model_pointer.get("validation_dice"), "source": "models/current.json"},
        "reviews": {"count": cohort_meta.get("reviews_count") or 0, "sha256": cohort_meta.get("reviews_sha256"),
                    "rejected_in_force": cohort_meta.get("qc_rejected") or 0,
                    "outdated": cohort_meta.get("qc_outdated") or 0, "table": "qc_reviews",
                    "read_by": "analysis_cohort"},
        "model_comparisons": [{"model_name": c["other"]["name"], "backend": c["other"]["backend"],
                               "weights_sha256": c["other"]["weights_sha256"], "batches": c["batches"],
                               "primary_sha256": c["primary"]["weights_sha256"], "run_id": c["run_id"]}
                              for c in comparisons],
        "code": code_version(),
        "packages": package_versions(),
        "cohort_assets": dict(cohort_assets),
    }


def report_lineage(manifest: Mapping, run_id: str) -> dict:
    """The lineage summary the report prints (its lineage section): the anchors of the full manifest."""
    rel = manifest.get("release") or {}
    return {"release": f"{rel.get('id')} (content hash {rel.get('content_hash')})",
            "cohort_hash": manifest["cohort"]["cohort_hash"], "batches": len(manifest["batches"]),
            "deliveries": len(manifest["deliveries"]),
            "input_files_digest": manifest["inputs"]["input_files"]["sha256_digest"],
            "segmentation_weights_sha256": ", ".join(manifest["inputs"]["segmentation_weights_sha256"]),
            "reviews": f"{manifest['reviews']['count']} (sha256 {manifest['reviews']['sha256']})",
            "git_commit": manifest["code"]["git_commit"], "run_id": run_id, "manifest": MANIFEST_NAME}


def add_files(manifest: dict, out_dir: Path, written: Mapping[str, Path]) -> dict:
    """The manifest with the written files (path relative to the report folder, sha256) under ``files``."""
    from cbp_platform.imaging.nifti import sha256_file

    manifest["files"] = {k: {"path": str(p.relative_to(out_dir)), "sha256": sha256_file(p)}
                         for k, p in written.items()}
    return manifest


def write_manifest(path: Path, manifest: dict) -> None:
    from cbp_platform.imaging.nifti import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n").encode())


def read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no lineage manifest (materialise published_results first)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def format_chain(m: dict, asset: str | None = None) -> str:
    """The manifest as a readable chain: result -> analysis assets -> cohort -> batches -> deliveries/files ->
    weights -> code. ``asset`` narrows the cohort-level part to one analysis asset and what it read."""
    lines = []
    runs = m.get("cohort_assets", {})
    top = asset or "published_results"
    lines.append(f"{top}")
    if top not in runs:
        raise KeyError(f"{top!r} is not in this manifest; known: {', '.join(sorted(runs))}")
    chain = [top]
    seen = set()
    while chain:
        a = chain.pop(0)
        if a in seen:
            continue
        seen.add(a)
        r = runs.get(a, {})
        if not r.get("run_id"):
            lines.append(f"  <- {a}: not materialised in this Dagster instance")
        else:
            lines.append(f"  <- {a}: run {r['run_id']}, data version {str(r.get('data_version'))[:16]}, "
                         f"code version {r.get('code_version') or '-'}, at {r.get('timestamp', '?')}")
        chain += [u for u in r.get("upstream", []) if u in runs]
    c = m["cohort"]
    lines.append(f"  <- analysis cohort {c['cohort_hash']} ({c['analysed']} analysed of {c['start']}; "
                 f"LMM normaliser {c['lmm_normaliser']})")
    rel = m.get("release") or {}
    if rel.get("id") is not None:
        lines.append(f"  <- data release {rel['id']} (content hash {rel.get('content_hash')}; {rel.get('summary')})")
    lines.append(f"  <- {len(m['batches'])} batches:")
    for b in m["batches"]:
        dv = ", ".join(f"{k} {str(v.get('data_version'))[:12]} (run {str(v.get('run_id'))[:8]})" if v.get("run_id")
                       else f"{k} not materialised in this Dagster instance" for k, v in sorted(b["assets"].items()))
        lines.append(f"       {b['batch_key']}: {dv}")
    lines.append(f"  <- {len(m['deliveries'])} deliveries:")
    for d in m["deliveries"]:
        lines.append(f"       {d['delivery_id']}: manifest sha256 {d['manifest_sha256']}")
    i = m["inputs"]
    lines.append(f"  <- input files: {i['input_files']['files']} NIfTI files of {i['input_files']['participants']} "
                 f"analysed participants, checksum digest {i['input_files']['sha256_digest']}")
    lines.append(f"  <- label maps: {i['label_maps']['count']}, checksum digest {i['label_maps']['sha256_digest']}")
    mdl = m["model"]
    lines.append(f"  <- segmentation weights sha256 {', '.join(i['segmentation_weights_sha256']) or 'none'} "
                 f"(model {mdl.get('name') or '?'}, backend {mdl.get('backend') or 'monai-bundle'}, folder "
                 f"{mdl.get('bundle_path', '?')}; {mdl.get('source', '?')})")
    for c in m.get("model_comparisons", []):
        lines.append(f"  (compared with {c['model_name']}: {c['backend']}, weights sha256 {c['weights_sha256']}, "
                     f"{len(c['batches'])} batches, run {str(c['run_id'])[:8]})")
    cv = m["code"]
    lines.append(f"  <- code: git {cv['git_commit']}{' (uncommitted changes)' if cv.get('dirty') else ''}; "
                 + ", ".join(f"{k} {v}" for k, v in sorted(m["packages"].items())))
    return "\n".join(lines)


# what a participant's version history shows per stage: the columns whose old -> new values are printed
HISTORY_FIELDS = {
    "participant_covariates": ("site", "exam_date", "age", "sex", "height_cm", "weight_kg", "cbp", "nrs_pain",
                               "met_min_week", "diabetes", "dyslipidemia", "osteoporosis", "osteoarthritis"),
    "raw_mri_scans": ("water_sha256", "fat_sha256"),
    "muscle_segmentations": ("label_sha256", "model_sha256"),
    "muscle_metrics": ("lean_ml", "imat_pct", "mfi"),
}


def version_history(stage: str, versions: pl.DataFrame, deliveries: Mapping[str, dict],
                    corrections: Mapping[str, dict], *, entered: Mapping[tuple[str, str], int] | None = None,
                    muscle: str = "back_total") -> list[str]:
    """One participant's versions of one stage, oldest registration first, as lines: each version's delivery, its
    manifest's sha256 and, for a correction, the reason code and what it declared it supersedes; between two
    versions, every value that changed (old -> new). ``versions``: the stage's rows of the participant, every
    version (``Warehouse.table(..., versions="all")``); ``deliveries``: delivery id -> registry record;
    ``corrections``: delivery id -> the participant's ``corrections`` entry; ``entered``: (stage, delivery id) ->
    the first release that froze that version. Operator only: callers print it for one pseudonym inside the
    secure environment."""
    if versions is None or versions.height == 0:
        return []
    rows = versions.filter(pl.col("muscle") == muscle) if "muscle" in versions.columns else versions
    if "registration_seq" in rows.columns:
        rows = rows.sort(pl.col("registration_seq").fill_null(0), "delivery_id")
    out, prev = [], None
    for r in rows.iter_rows(named=True):
        did = r["delivery_id"]
        rec = deliveries.get(did, {})
        state = "in force" if not (r.get("superseded_by") or "") else f"replaced by {r['superseded_by']}"
        entry = corrections.get(did)
        why = (f", correction {entry['reason']} (declared to supersede {entry['supersedes']})" if entry else "")
        first = (entered or {}).get((stage, did))
        released = f", entered release {first}" if first is not None else ", in no release yet"
        out.append(f"    {did}: manifest sha256 {str(rec.get('manifest_sha256', '?'))[:16]}, registered "
                   f"#{rec.get('seq', '?')}{why}; {state}{released if entered is not None else ''}")
        if prev is not None:
            for f in HISTORY_FIELDS.get(stage, ()):
                if f in r and r[f] != prev[f]:
                    old, new = prev[f], r[f]
                    if isinstance(old, str) and len(old) == 64:
                        old, new = old[:16], str(new)[:16]
                    elif isinstance(old, float) or isinstance(new, float):
                        old, new = (f"{v:.6g}" if isinstance(v, float) else v for v in (old, new))
                    out.append(f"      {f}: {old} -> {new}")
        prev = r
    return out if len(out) > 1 else []
