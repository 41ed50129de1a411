"""``cbp qc serve|list|accept|reject``: the segmentation QC queue, the review app and reviewers' decisions."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager

from cbp_platform.cli.common import Parser, open_warehouse


QC_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def register(sub) -> None:
    q = sub.add_parser("qc", help="the segmentation QC queue: review app, list, accept, reject",
                       description="Reviewers' decisions on segmentations, in the append-only warehouse table "
                                   "qc_reviews (reported to $DAGSTER_HOME's instance when set). A rejected "
                                   "participant leaves the analysis at the next cohort refresh. These commands "
                                   "name pseudonyms: operator use inside the secure environment.")
    qsub = q.add_subparsers(dest="qc_command", required=True, parser_class=Parser)
    qs = qsub.add_parser("serve", help="the review app (keyboard review of the queue) on the loopback interface")
    from cbp_platform.qc import DEFAULT_HOST, DEFAULT_PORT

    qs.add_argument("--host", default=DEFAULT_HOST, help=f"interface (default {DEFAULT_HOST}). Another one exposes "
                                                         "QC images that name pseudonyms: secure environment only")
    qs.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    qs.add_argument("--reviewer", default=None, metavar="NAME", help="prefill the reviewer (default $CBP_REVIEWER)")
    qs.add_argument("--data-root", default=None)
    qs.set_defaults(func=_cmd_qc_serve)
    ql = qsub.add_parser("list", help="the queue in triage order (riskiest first)")
    ql.add_argument("--batch", default=None)
    ql.add_argument("--site", default=None)
    ql.add_argument("--model", default=None, help="a model name or a weights sha256 prefix")
    ql.add_argument("--status", default="todo", help="todo, reviewed, rejected, accepted, outdated or all "
                                                    "(default todo)")
    ql.add_argument("--limit", type=int, default=20, help="at most this many rows (0: all; default 20)")
    ql.add_argument("--json", action="store_true")
    ql.add_argument("--data-root", default=None)
    ql.set_defaults(func=_cmd_qc_list)
    from cbp_platform.qc.reviews import REJECT_REASONS

    reasons = "; ".join(f"{r.code}: {r.description}" for r in REJECT_REASONS)
    for decision, text in (("accept", "accept a participant's current segmentation"),
                           ("reject", "reject a participant's current segmentation, with a reason")):
        qd = qsub.add_parser(decision, help=text)
        qd.add_argument("pseudonym", metavar="PSEUDONYM")
        qd.add_argument("--reviewer", default=None, metavar="NAME", help="who decides (default $CBP_REVIEWER)")
        if decision == "reject":
            qd.add_argument("--reason", default=None, metavar="CODE", help=f"why: {reasons}")
        qd.add_argument("--note", default=None, metavar="TEXT")
        qd.add_argument("--label-sha", default=None, metavar="SHA256",
                        help="the label map's sha256 (or a prefix) as shown by `cbp qc list --json`: refuse the "
                             "decision if the map was replaced since")
        qd.add_argument("--data-root", default=None)
        qd.set_defaults(func=_cmd_qc_decide, decision=decision, reason=None)


@contextmanager
def _qc_store(data_root: str | None):
    """The review store of the data root; closes its Dagster instance (``$DAGSTER_HOME``) afterwards."""
    from orchestration.instance import review_store

    store = review_store(data_root)
    try:
        yield store
    finally:
        if store.instance is not None:
            store.instance.dispose()


def _qc_warehouse_missing(cmd: str, data_root: str | None) -> bool:
    return open_warehouse(f"qc {cmd}", data_root) is None


def _cmd_qc_serve(args: argparse.Namespace) -> int:
    import logging
    import os

    import uvicorn

    from cbp_platform.qc.app import create_app

    if _qc_warehouse_missing("serve", args.data_root):
        return 2
    loopback = args.host in QC_LOOPBACK
    if not loopback:
        print(f"cbp qc serve: warning: --host {args.host} is not the loopback interface. QC images and the queue "
              "name pseudonyms: they must stay inside the secure environment (the loopback host check is off).",
              file=sys.stderr)
    reviewer = args.reviewer if args.reviewer is not None else os.environ.get("CBP_REVIEWER", "")
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    with _qc_store(args.data_root) as store:
        app = create_app(store, reviewer=reviewer, loopback_only=loopback)
        print(f"cbp qc serve: review app on http://{host}:{args.port}/ (Ctrl-C stops it)", flush=True)
        # the app's own lines (counts, decision kinds); no access log: request lines name pseudonyms
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        app_log = logging.getLogger("cbp.qc.app")
        app_log.setLevel(logging.INFO)
        app_log.addHandler(handler)
        uvicorn.run(app, host=args.host.strip("[]"), port=args.port, access_log=False, log_level="info",
                    server_header=False)
    return 0


def _cmd_qc_list(args: argparse.Namespace) -> int:
    from cbp_platform.qc.reviews import ReviewError

    if _qc_warehouse_missing("list", args.data_root):
        return 2
    with _qc_store(args.data_root) as store:
        try:
            q = store.queue(batch=args.batch, site=args.site, model=args.model, status=args.status)
        except ReviewError as exc:
            print(f"cbp qc list: error: {exc}", file=sys.stderr)
            return 2
    total = q.height
    if args.limit and args.limit > 0:
        q = q.head(args.limit)
    cols = ["triage_rank", "pseudonym", "batch_key", "delivery_id", "site", "model_name", "label_sha256",
            "triage_score", "triage_flags", "lean_ml", "imat_pct", "decision", "reason", "reviewer", "reviewed_at",
            "outdated"]
    rows = [{c: r.get(c) for c in cols} for r in q.iter_rows(named=True)] if total else []
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    print(f"{'rank':>4}  {'pseudonym':<10}  {'batch':<14} {'site':<10} {'score':>7}  {'decision':<28} flags")
    for r in rows:
        dec = r["decision"] or "-"
        if r["decision"] == "reject":
            dec = f"reject: {r['reason']}"
        if r["outdated"]:
            dec += " (outdated)"
        score = "-" if r["triage_score"] is None else f"{r['triage_score']:.2f}"
        print(f"{r['triage_rank'] if r['triage_rank'] is not None else '-':>4}  {r['pseudonym']:<10}  "
              f"{r['batch_key'] or '-':<14} {r['site'] or '-':<10} {score:>7}  {dec:<28} {r['triage_flags'] or ''}")
    print(f"({len(rows)} of {total} shown; status {args.status}; riskiest first)")
    return 0


def _cmd_qc_decide(args: argparse.Namespace) -> int:
    import os

    from cbp_platform.qc.reviews import ReviewError

    name = f"cbp qc {args.decision}"
    reviewer = (args.reviewer or os.environ.get("CBP_REVIEWER") or "").strip()
    if not reviewer:
        print(f"{name}: error: name the reviewer: --reviewer NAME or $CBP_REVIEWER", file=sys.stderr)
        return 2
    if _qc_warehouse_missing(args.decision, args.data_root):
        return 2
    with _qc_store(args.data_root) as store:
        try:
            row = store.record(args.pseudonym, args.decision, reviewer=reviewer, reason=args.reason,
                               note=args.note or "", source="cli", label_sha256=args.label_sha or None)
        except ReviewError as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            return 2
    what = f"rejected ({row['reason']})" if row["decision"] == "reject" else "accepted"
    print(f"{row['pseudonym']}: {what} by {row['reviewer']} on label map {row['label_sha256'][:16]}... "
          f"(review {row['review_id'][:12]})")
    return 0
