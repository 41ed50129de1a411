"""``cbp synth``: simulate a NAKO-like cohort into the landing zone (ground truth beside it)."""

from __future__ import annotations

import argparse
import sys

from cbp_platform.cli.common import progress_args, progress_flag


def register(sub) -> None:
    s = sub.add_parser("synth", help="simulate a NAKO-like cohort into the landing zone",
                       description="Write K complete deliveries of N simulated participants (Dixon NIfTI + "
                                   "covariates + manifest) into $CBP_DATA_ROOT/landing and the ground truth into "
                                   "$CBP_DATA_ROOT/truth.")
    s.add_argument("--participants", "-n", type=int, default=None,
                   help="number of participants (N >= 1; required unless --correct)")
    s.add_argument("--deliveries", "-k", type=int, default=1, help="number of deliveries (1 <= K <= N)")
    s.add_argument("--seed", type=int, required=True, help="random seed: same seed, same data")
    s.add_argument("--resolution", default="fast", help="fast (4x4x6 mm, tests/demos) or nako (1.41x1.41x3 mm)")
    s.add_argument("--data-root", default=None, help="data root (default $CBP_DATA_ROOT or ./data)")
    s.add_argument("--faults", type=float, default=0.0, metavar="RATE",
                   help="share of participants given a realistic delivery fault (0-1)")
    s.add_argument("--in-opp", action="store_true", help="also write in-phase and opposed-phase images")
    s.add_argument("--format", default="nifti", choices=("nifti", "dicom"),
                   help="nifti: one .nii.gz per Dixon channel; dicom: zipped DICOM series of 4 overlapping "
                        "stations per contrast, as the scanner writes them (default nifti)")
    s.add_argument("--extent", default="lumbar", choices=("lumbar", "whole-body"),
                   help="lumbar: the T10-S1 slab (default); whole-body: neck to thighs in NAKO's stations (about "
                        "1080 mm), the same slab inside it, labelled as before, unlabelled anatomy around it")
    s.add_argument("--composed", action="store_true",
                   help="with --format dicom: also write the scanner-composed whole-body series")
    s.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    s.add_argument("--delivery-prefix", default=None, help="delivery id prefix (default sim<seed>)")
    s.add_argument("--correct", metavar="DELIVERY", default=None,
                   help="instead of a cohort, write a correction of this simulated delivery: --covariates "
                        "participants' covariates re-coded or fixed, --rescans participants re-scanned "
                        "(docs/lifecycle.md)")
    s.add_argument("--covariates", type=int, default=10, help="with --correct: covariate corrections (default 10)")
    s.add_argument("--rescans", type=int, default=1, help="with --correct: re-scans (default 1)")
    s.add_argument("--delivery-id", default=None, help="with --correct: the correction's id (default <DELIVERY>-cNN)")
    s.add_argument("--if-absent", action="store_true",
                   help="exit 0 without writing when these deliveries are already complete")
    progress_args(s)
    s.set_defaults(func=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    from cbp_platform.landing import SUCCESS_MARKER
    from cbp_platform.paths import DataLayout
    from cbp_platform.synth.delivery import SynthError, delivery_ids_for, synthesize

    if args.correct:
        return _cmd_correct(args)
    if args.participants is None:
        print("cbp synth: error: the following arguments are required: --participants (unless --correct)",
              file=sys.stderr)
        return 2
    prefix = args.delivery_prefix or f"sim{args.seed}"
    if args.if_absent and args.deliveries >= 1:
        layout = DataLayout.from_env(args.data_root)
        ids = delivery_ids_for(prefix, args.deliveries)
        if all((layout.landing / d / SUCCESS_MARKER).exists() for d in ids):
            print(f"cbp synth: deliveries {ids[0]}..{ids[-1]} already complete in {layout.landing}; nothing to do")
            return 0
    try:
        res = synthesize(participants=args.participants, deliveries=args.deliveries, seed=args.seed,
                         resolution=args.resolution, data_root=args.data_root, fault_rate=args.faults,
                         in_opp=args.in_opp, workers=args.workers, delivery_prefix=args.delivery_prefix,
                         progress=progress_flag(args), scan_format=args.format, composed=args.composed,
                         extent=args.extent)
    except SynthError as exc:
        print(f"cbp synth: error: {exc}", file=sys.stderr)
        return 2
    rate = res.n_participants / res.seconds
    print(f"cbp synth: {res.n_participants} participants in {len(res.delivery_ids)} deliveries "
          f"({', '.join(res.delivery_ids)}), {res.bytes_written / 1e6:.1f} MB in {res.seconds:.1f} s "
          f"({rate:.1f} participants/s); faults injected: {len(res.faults)}")
    print(f"  landing zone: {res.landing_dirs[0].parent}")
    print(f"  ground truth: {res.truth_dirs[0].parent}")
    return 0


def _cmd_correct(args: argparse.Namespace) -> int:
    from cbp_platform.synth.correction import synthesize_correction
    from cbp_platform.synth.delivery import SynthError

    try:
        res = synthesize_correction(of=args.correct, seed=args.seed, data_root=args.data_root,
                                    covariates=args.covariates, rescans=args.rescans, delivery_id=args.delivery_id)
    except SynthError as exc:
        print(f"cbp synth: error: {exc}", file=sys.stderr)
        return 2
    print(f"cbp synth: correction {res.delivery_ids[0]} of {args.correct}: {res.n_participants} participants "
          f"({args.covariates} covariate rows, {args.rescans} re-scans), {res.bytes_written / 1e6:.1f} MB")
    print(f"  landing zone: {res.landing_dirs[0]}")
    print(f"  what changed (truth): {res.truth_dirs[0] / 'corrections.csv'}")
    return 0
