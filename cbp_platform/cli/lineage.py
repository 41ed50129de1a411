"""``cbp lineage``: the chain behind the published results; ``--participant`` one participant's path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cbp_platform.cli.common import open_warehouse, warehouse_tables


def register(sub) -> None:
    g = sub.add_parser("lineage", help="where a published number comes from, or one participant's path",
                       description="Print the chain behind the published report (or one analysis asset): analysis "
                                   "assets and their runs, the cohort hash, batches and data versions, deliveries, "
                                   "input-file and label-map digests, model weights, code and package versions. "
                                   "With --participant: every stage one participant went through and why they "
                                   "were excluded (an operator command: its output names the pseudonym).")
    g.add_argument("--data-root", default=None)
    g.add_argument("--asset", default=None, help="an analysis asset (default published_results)")
    g.add_argument("--manifest", default=None, help="a lineage.json (default: the latest published report's)")
    g.add_argument("--participant", default=None, metavar="PSEUDONYM")
    g.set_defaults(func=_cmd_lineage)


def _cmd_lineage(args) -> int:
    from cbp_platform.lineage import MANIFEST_NAME, format_chain, read_manifest
    from cbp_platform.paths import DataLayout

    layout = DataLayout.from_env(args.data_root)
    if args.participant:
        return _participant_lineage(args.participant, args.data_root)
    if args.manifest:
        mpath = Path(args.manifest)
    else:
        latest = layout.latest_report
        if not latest.exists():
            print(f"cbp lineage: error: {latest} not found (materialise published_results first: make demo)",
                  file=sys.stderr)
            return 2
        mpath = layout.resolve(json.loads(latest.read_text())["path"]) / MANIFEST_NAME
    try:
        m = read_manifest(mpath)
        print(f"lineage manifest {mpath}")
        print(format_chain(m, args.asset))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"cbp lineage: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _participant_lineage(pseudonym: str, data_root: str | None) -> int:
    """Operator command: every stage one participant went through (prints the pseudonym; never published)."""
    from cbp_platform.analysis.cohort import participant_trace
    from cbp_platform.landing import PSEUDONYM_RE

    if not PSEUDONYM_RE.match(pseudonym):
        print(f"cbp lineage: error: {pseudonym!r} is not a pseudonym (10 characters of the pseudonym alphabet)",
              file=sys.stderr)
        return 2
    wh = open_warehouse("lineage", data_root)
    if wh is None:
        return 2
    p = {"pseudonym": pseudonym}
    t = warehouse_tables(wh, {
        "covariates": ("participant_covariates", {"where": p}),
        "scans": ("raw_mri_scans", {"where": p}),
        "metrics": ("muscle_metrics", {"where": p, "order_by": ["muscle"]}),
        "quarantine": ("quarantine", {"where": p, "order_by": ["recorded_at", "stage"]}),
        "provenance": ("provenance", {"where": p, "order_by": ["recorded_at", "stage"],
                                      "columns": ["stage", "batch_key", "input_checksums", "output_checksum",
                                                  "code_version", "run_id", "recorded_at"]}),
        "exclusion": ("analysis_exclusions", {"where": p, "columns": ["reason"]}),
        "analysed": ("analysis_cohort", {"where": p, "columns": ["pseudonym"]}),
        "reviews": ("qc_reviews", {"where": p, "order_by": ["reviewed_at", "review_id"]}),
        "maps": ("muscle_segmentations", {"where": p, "columns": ["pseudonym", "label_sha256"]}),
    })
    review = None
    if t["reviews"].height:
        from cbp_platform.qc.reviews import effective_reviews

        review = effective_reviews(t["reviews"], t["maps"]).row(0, named=True)
    history, retired_by = _versions(wh, pseudonym, data_root)
    trace = participant_trace(pseudonym, t["covariates"], t["scans"], t["metrics"], t["quarantine"], review,
                              retired_by=retired_by, withdrawn=_withdrawn(pseudonym, data_root))
    print(trace.to_text())
    if history:
        print("  versions (old -> new, by registration; docs/lifecycle.md):")
        print("\n".join(history))
    if t["reviews"].height:
        print("  review history (append-only qc_reviews; the latest review of the current label map is in force):")
        current = set(t["maps"]["label_sha256"].to_list()) if t["maps"].height else set()
        for r in t["reviews"].sort("reviewed_at").iter_rows(named=True):
            state = "current map" if r["label_sha256"] in current else "outdated: an earlier label map"
            print(f"    {r['reviewed_at']} {r['decision']:<6} {r['reason'] or '-':<18} by {r['reviewer']} "
                  f"({state} {str(r['label_sha256'])[:12]}, model {str(r['model_sha256'])[:12]})")
    if t["provenance"].height:
        print("  provenance (row-level lineage):")
        for r in t["provenance"].iter_rows(named=True):
            print(f"    {r['stage']:<22} batch {r['batch_key']} run {r['run_id'][:8]} code {r['code_version']} "
                  f"inputs {_inputs_text(r['input_checksums'])} -> {r['output_checksum'][:16] or '-'}")
    if t["analysed"].height:
        print("  last analysis_cohort materialisation: included")
    elif t["exclusion"].height:
        print(f"  last analysis_cohort materialisation: excluded ({t['exclusion']['reason'][0]})")
    else:
        print("  last analysis_cohort materialisation: not seen (not delivered, or analysis not run since)")
    return 0 if (t["covariates"].height or t["scans"].height or t["quarantine"].height) else 1


def _withdrawn(pseudonym: str, data_root: str | None) -> str | None:
    """The scope of the participant's withdrawal of consent (None if they did not withdraw)."""
    from cbp_platform.paths import DataLayout
    from cbp_platform.withdrawals import Register, WithdrawalError

    try:
        hit = Register(DataLayout.from_env(data_root).withdrawals).match([pseudonym])
    except WithdrawalError as exc:           # a register without its key: said, not raised
        print(f"  (withdrawal register not readable: {exc})")
        return None
    return hit[pseudonym]["scope"] if hit else None


def _versions(wh, pseudonym: str, data_root: str | None) -> tuple[list[str], str | None]:
    """The participant's version history of each stage (corrections: old -> new, both manifests' sha256, the reason
    code), and the retired delivery their data in force comes from (None if none)."""
    import polars as pl

    from cbp_platform.ingest.registry import corrections_of, registered_deliveries, retirements
    from cbp_platform.lineage import HISTORY_FIELDS, version_history
    from cbp_platform.paths import DataLayout

    layout = DataLayout.from_env(data_root)
    recs = {r["delivery_id"]: r for r in registered_deliveries(layout.root)}
    entries = {}
    for did, rec in recs.items():
        if rec.get("kind") == "correction":
            try:
                e = corrections_of(layout.root, did, layout.landing).get(pseudonym)
            except Exception:  # noqa: BLE001  (a manifest copy that cannot be read: shown without its entry)
                e = None
            if e:
                entries[did] = e
    rel = wh.table("release_versions", where={"pseudonym": pseudonym}, missing_ok=True)
    entered = ({(r["stage"], r["delivery_id"]): r["release_id"] for r in
                rel.group_by("stage", "delivery_id").agg(pl.col("release_id").min()).iter_rows(named=True)}
               if rel is not None else None)
    lines, in_force = [], set()
    for stage in HISTORY_FIELDS:
        rows = wh.table(stage, where={"pseudonym": pseudonym}, versions="all", missing_ok=True)
        if rows is None or rows.height == 0:
            continue
        if "superseded_by" in rows.columns:
            in_force |= set(rows.filter(pl.col("superseded_by").fill_null("") == "")["delivery_id"].to_list())
        h = version_history(stage, rows, recs, entries, entered=entered)
        if h:
            lines += [f"   {stage}:", *h]
    retired = sorted(in_force & set(retirements(layout.root)))
    return lines, (retired[0] if retired else None)


def _inputs_text(raw: str) -> str:
    """A provenance row's inputs for the console: a DICOM participant's files (``<zip>#<member>``) are counted
    per zip; their sha256 stay in the provenance table."""
    import json

    try:
        inputs = json.loads(raw)
    except (TypeError, ValueError):
        return str(raw)
    members: dict[str, int] = {}
    for k in inputs:
        if "#" in k:
            members[k.split("#")[0]] = members.get(k.split("#")[0], 0) + 1
    if not members:
        return raw
    return "; ".join(f"{z} {inputs.get(z, '')[:12]} ({n} DICOM files)" for z, n in sorted(members.items()))
