"""``cbp status``: every delivery of the landing zone: state, reason, counts (no pseudonyms)."""

from __future__ import annotations

import json


def register(sub) -> None:
    st = sub.add_parser("status", help="every delivery in the landing zone: state, reason and counts",
                        description="List every delivery folder of the landing zone and every registered delivery "
                                    "with its state (waiting, refused, ready, registered, changed, gone), the "
                                    "reason when it is not registered, participants, batches (and their runs, "
                                    "with $DAGSTER_HOME), valid scans and covariate rows, and quarantined "
                                    "participants by reason. Names no pseudonym.")
    st.add_argument("--data-root", default=None)
    st.add_argument("--deep", action="store_true",
                    help="check every listed file of registered deliveries for changes (default: the manifest "
                         "and the covariates file)")
    st.add_argument("--json", action="store_true",
                    help="one object per delivery; quarantine_explained holds each reason's explanation, accounting "
                         "where every file and covariate row of a registered delivery went (stored, quarantined, "
                         "ignored with a reason, pending; unaccounted must be 0)")
    st.add_argument("--explain", action="store_true",
                    help="list the quarantine reasons shown, with their stages and explanations (from "
                         "cbp_platform/reasons.py)")
    st.set_defaults(func=_cmd_status)


def _status_counts(data_root: str | None) -> dict | None:
    """Per delivery: valid scans and covariate rows, quarantined participants by reason; None without a warehouse
    (or while a run holds the DuckDB file's lock)."""
    from cbp_platform.reasons import PARTICIPANT_COVARIATES, RAW_MRI_SCANS
    from orchestration.profiles import warehouse

    try:
        wh = warehouse(data_root, lock_timeout_s=5.0)
        t = wh.ingestion_counts(stages=(RAW_MRI_SCANS, PARTICIPANT_COVARIATES))
    except Exception:  # noqa: BLE001  (no warehouse yet, a run holding its lock, a server down: no counts shown)
        return None
    out: dict = {}
    for name, col in (("scans", "scans_valid"), ("covariates", "covariates_valid"), ("quarantined", "quarantined")):
        for r in t[name].iter_rows(named=True):
            out.setdefault(r["delivery_id"], {})[col] = int(r[col])
    for r in t["reasons"].iter_rows(named=True):
        out.setdefault(r["delivery_id"], {}).setdefault("quarantine_reasons", {})[r["reason"]] = int(r["n"])
    for d in out.values():
        for col in ("scans_valid", "covariates_valid", "quarantined"):
            d.setdefault(col, 0)
    return out


def _outcomes(data_root: str | None):
    """delivery id -> the warehouse's ingestion outcomes (rows), for the accounting; no warehouse: none ruled yet."""
    from orchestration.profiles import warehouse

    try:
        wh = warehouse(data_root, lock_timeout_s=5.0)
        wh.tables()
    except Exception:  # noqa: BLE001  (no warehouse yet, a run holding its lock: every batch counts as not run)
        return lambda did: []
    return lambda did: wh.ingestion_outcomes(did).to_dicts()


def _cmd_status(args) -> int:
    import os

    from cbp_platform.ingest.status import format_report, landing_report
    from cbp_platform.paths import DataLayout

    layout = DataLayout.from_env(args.data_root)
    counts = _status_counts(args.data_root)
    runs = None
    if os.environ.get("DAGSTER_HOME"):
        from orchestration.instance import batch_run_states

        runs = batch_run_states()
    reports = landing_report(layout.root, layout.landing, deep=args.deep, counts=counts, runs=runs,
                             outcomes=_outcomes(args.data_root) if args.json else None)
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=1))
    else:
        print(f"landing zone {layout.landing}"
              + ("" if counts is not None else " (no warehouse counts: none yet, a run holds its lock, or the "
                                               "warehouse cannot be reached)"))
        print(format_report(reports, explain_reasons=args.explain))
    return 0
