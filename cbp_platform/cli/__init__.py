"""The ``cbp`` command line: one module per command, each with its arguments beside its handler.

``cbp synth``               simulate a NAKO-like cohort into the landing zone (ground truth beside it)
``cbp calibration-report``  paper (docs/study.md) vs simulated cohort figures, computed from a fresh draw
``cbp accuracy``            segmentation Dice, and ICC / bias / limits of agreement of the exposures vs truth
``cbp lineage``             the chain behind the published results; ``--participant`` one participant's path
``cbp instance init``       write ``$DAGSTER_HOME/dagster.yaml`` for the deployment profile, size the gpu pool
``cbp k8s-plan``            the Kubernetes Job every step would get in the kubernetes profile
``cbp model register``      check and register a segmentation model folder (a preset, or labels and inputs)
``cbp model list``          the registered models, their backends, inputs and weights
``cbp model compare``       a registered model beside the primary on every batch; the comparison in the report
``cbp status``              every delivery of the landing zone: state, reason, counts (no pseudonyms)
``cbp release cut|list``    data releases: freeze the versions in force (through Dagster), list them
``cbp reproduce``           rebuild a release's report and compare every published number
``cbp impact``              what the pending corrections, retirements and withdrawals would change
``cbp delivery retire``     take a delivery's participants out of the next release
``cbp withdraw``            record withdrawals of consent (keyed hashes); the next release excludes them
``cbp erase``               apply the pending withdrawals: erase, verify, certify; ``--verify CERT`` re-checks
``cbp qc serve``            the QC review app (keyboard review of the triage queue) on the loopback interface
``cbp qc list``             the QC queue in triage order; ``cbp qc accept|reject`` record a decision

Building the parser imports no Dagster, torch or asset (only the QC reject reasons, with polars, for a help
text); a command imports what it uses when it runs. Commands that need the warehouse or the Dagster instance get
them from :mod:`orchestration` (profiles, instance), which loads no asset; only ``cbp k8s-plan`` and ``cbp model
compare`` load the code location's definitions (``tests/test_architecture.py`` checks both).
"""

from __future__ import annotations

from cbp_platform.cli import (accuracy, calibration, instance, k8s_plan, lifecycle, lineage, model, qc, status,
                              synth)
from cbp_platform.cli.common import Parser

# In the order `cbp --help` lists them.
COMMANDS = (synth, accuracy, lineage, instance, k8s_plan, model, status, lifecycle, qc, calibration)


def build_parser() -> Parser:
    p = Parser(prog="cbp", description="cbp-platform: MRI back-muscle composition and chronic back pain")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    return p


# Commands that never read participant data, or erase themselves: no start-up check of the erasures before them.
NO_ERASURE_CHECK = ("erase", "withdraw", "instance", "k8s-plan", "synth", "calibration-report")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in NO_ERASURE_CHECK:
        import sys

        from orchestration.erasure import reapply_on_start

        reapply_on_start(getattr(args, "data_root", None), log=lambda m: print(m, file=sys.stderr))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
