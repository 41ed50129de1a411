"""``cbp accuracy``: segmentation Dice, and ICC / bias / limits of agreement of the exposures vs truth."""

from __future__ import annotations

import argparse
import json
import sys

from cbp_platform.cli.common import open_warehouse, progress_args, progress_flag


def register(sub) -> None:
    a = sub.add_parser("accuracy", help="segmentation and metric accuracy against the simulated ground truth")
    a.add_argument("--data-root", default=None)
    a.add_argument("--json", action="store_true")
    progress_args(a)
    a.set_defaults(func=_cmd_accuracy)


def _cmd_accuracy(args: argparse.Namespace) -> int:
    from cbp_platform.paths import DataLayout
    from cbp_platform.segmentation.accuracy import evaluate, format_report

    layout = DataLayout.from_env(args.data_root)
    wh = open_warehouse("accuracy", args.data_root)
    if wh is None:
        return 2
    if not {"muscle_metrics", "muscle_segmentations"} <= set(wh.tables()):
        print("cbp accuracy: error: no segmentations in the warehouse yet", file=sys.stderr)
        return 2
    segs = layout.resolved_paths(wh.table("muscle_segmentations", columns=["delivery_id", "pseudonym", "label_path"],
                                          order_by=["pseudonym"]), "label_path")
    mets = wh.table("muscle_metrics", order_by=["pseudonym", "muscle"])
    rep = evaluate(segs, mets, layout.truth, progress=progress_flag(args))
    print(json.dumps(rep, indent=1) if args.json else format_report(rep))
    return 0 if rep.get("n") else 2
