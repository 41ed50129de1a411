"""``cbp calibration-report``: paper (docs/study.md) vs simulated cohort figures, from a fresh draw."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    c = sub.add_parser("calibration-report", help="paper vs simulated cohort figures (markdown)")
    c.add_argument("--participants", "-n", type=int, default=30868)
    c.add_argument("--seed", type=int, default=1)
    c.set_defaults(func=_cmd_calibration)


def _cmd_calibration(args: argparse.Namespace) -> int:
    from cbp_platform.synth.report import calibration_table

    print(calibration_table(args.participants, args.seed))
    return 0
