"""``cbp model register|list|compare``: the registry of segmentation models, and a model beside the primary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cbp_platform.cli.common import Parser


def register(sub) -> None:
    m = sub.add_parser("model", help="register and list segmentation models (MONAI bundles, nnU-Net v2 folders)")
    msub = m.add_subparsers(dest="model_command", required=True, parser_class=Parser)
    mr = msub.add_parser("register", help="check a model folder and register it",
                         description="Read a model folder (an nnU-Net v2 trained-model folder or a MONAI bundle), "
                                     "check it against the preset (label ids and names, channel count, readable "
                                     "checkpoints), hash every weight file and write the manifest to "
                                     "$CBP_DATA_ROOT/models/registry/<name>.json. Nothing is downloaded.")
    mr.add_argument("--folder", required=True, help="the model folder (kept where it is; never copied)")
    mr.add_argument("--preset", default=None, help="mrsegmentator, totalvibesegmentator, total_mr, cbp-default")
    mr.add_argument("--name", default=None, help="registry name (default: the preset's)")
    from cbp_platform.segmentation.backends import BACKENDS

    mr.add_argument("--backend", default=None, help=f"{' or '.join(sorted(BACKENDS))} (without a preset)")
    mr.add_argument("--label", action="append", default=None, metavar="CLASS=ID",
                    help="without a preset: the model's label id of each platform class (repeat)")
    mr.add_argument("--inputs", default=None, help="without a preset: contrasts in channel order, e.g. water,fat")
    mr.add_argument("--orientation", default=None,
                    help="the orientation the model was trained in, when its reader keeps the stored voxel order")
    mr.add_argument("--folds", default=None, help="folds to ensemble, e.g. 0,1,2 (default: the preset's, or all)")
    mr.add_argument("--configuration", default=None, help="nnU-Net configuration (default: the checkpoint's)")
    mr.add_argument("--checkpoint", default=None,
                    help="nnU-Net: each fold's checkpoint file (default checkpoint_final.pth; e.g. "
                         "checkpoint_best.pth, which TotalVibeSegmentator's loader falls back to); recorded in the "
                         "manifest")
    roi = mr.add_mutually_exclusive_group()
    roi.add_argument("--roi", dest="roi", action="store_true", default=None,
                     help="nnU-Net: run the model only on the region the platform's own model locates (T10-S1 and a "
                          "margin of half its patch; the default with a preset)")
    roi.add_argument("--no-roi", dest="roi", action="store_false",
                     help="nnU-Net: always run the model on the whole volume (the default without a preset)")
    mr.add_argument("--data-root", default=None)
    mr.add_argument("--models-dir", default=None, help="default $CBP_DATA_ROOT/models")
    mr.set_defaults(func=_cmd_model_register)
    ml = msub.add_parser("list", help="the registered models")
    ml.add_argument("--data-root", default=None)
    ml.add_argument("--models-dir", default=None)
    ml.add_argument("--json", action="store_true")
    ml.set_defaults(func=_cmd_model_list)
    mt = msub.add_parser("train-levels", help="train the vertebral-level regressor of region-of-interest inference",
                         description="Train the small network that finds T10 and S1 along a whole-body scan "
                                     "(cbp_platform/segmentation/levels.py) on simulated whole-body scans, check it "
                                     "on held-out ones, save it under the models folder and record it in "
                                     "models/platform.json. Without it, a region of interest spans wherever the "
                                     "platform's model finds the back muscles, which on a whole-body scan runs up "
                                     "to the neck.")
    mt.add_argument("--scans", type=int, default=24, help="simulated whole-body training scans (default 24)")
    mt.add_argument("--iterations", type=int, default=1500, help="training iterations (default 1500)")
    mt.add_argument("--seed", type=int, default=4000)
    mt.add_argument("--validation-scans", type=int, default=4, help="held-out scans to check it on (default 4)")
    mt.add_argument("--data-root", default=None)
    mt.add_argument("--models-dir", default=None, help="default $CBP_DATA_ROOT/models")
    mt.set_defaults(func=_cmd_model_train_levels)
    mc = msub.add_parser("compare", help="run a registered model beside the primary and publish the comparison",
                         description="Segment and measure every processed batch with the registered model NAME "
                                     "(its results kept apart from the primary's), compare the two models (Dice, "
                                     "ICC, Bland-Altman, odds ratios, truth), and refresh the report. Runs through "
                                     "Dagster against $DAGSTER_HOME.")
    mc.add_argument("name", help="a registered model (cbp model list)")
    mc.add_argument("--data-root", default=None)
    mc.set_defaults(func=_cmd_model_compare)


def _models_dir(args) -> Path:
    from cbp_platform.paths import DataLayout

    return Path(args.models_dir) if args.models_dir else DataLayout.from_env(args.data_root).models


def _cmd_model_register(args: argparse.Namespace) -> int:
    from cbp_platform.paths import DataLayout
    from cbp_platform.segmentation.manifest import ManifestError
    from cbp_platform.segmentation.registry import register

    labels = None
    if args.label:
        try:
            labels = {int(v): k for k, v in (item.split("=", 1) for item in args.label)}
        except ValueError:
            print(f"cbp model register: error: --label takes CLASS=ID, got {args.label}", file=sys.stderr)
            return 2
    try:
        m, path = register(DataLayout.model_registry(_models_dir(args)), args.folder, preset=args.preset or "",
                           name=args.name or "", backend=args.backend or "", labels=labels,
                           inputs=tuple(args.inputs.split(",")) if args.inputs else None,
                           orientation=args.orientation or "",
                           folds=args.folds.split(",") if args.folds else None,
                           configuration=args.configuration or "", checkpoint=args.checkpoint or "", roi=args.roi)
    except ManifestError as exc:
        print(f"cbp model register: error: {exc}", file=sys.stderr)
        return 2
    print(f"registered {m.name}: {m.backend} {m.backend_version}, {len(m.weights)} weight file(s), sha256 "
          f"{m.sha256[:16]}...")
    print(f"  inputs {', '.join(m.inputs)}; orientation {m.orientation}; spacing {list(m.spacing_mm)} mm")
    if "roi" in m.options:
        print("  inference: " + ("on the region the platform's own model locates (--no-roi: the whole volume)"
                                 if m.options["roi"] else "on the whole volume"))
    print("  labels " + ", ".join(f"{k} -> {v}" for k, v in sorted(m.labels.items())))
    print(f"  manifest {path}")
    print(f"  use it: materialise segmentation_model with config {{model: {m.name}}}, or compare it: "
          f"cbp model compare {m.name}")
    return 0


def _cmd_model_train_levels(args: argparse.Namespace) -> int:
    from cbp_platform.paths import DataLayout
    from cbp_platform.segmentation.registry import train_level_model

    models = _models_dir(args)
    print(f"cbp model train-levels: {args.scans} simulated whole-body scans, {args.iterations} iterations")
    path, model = train_level_model(models, n_scans=args.scans, iterations=args.iterations, seed=args.seed,
                                    n_val=args.validation_scans, log=print)
    p = model.provenance
    print(f"trained in {p['training_seconds']} s (data {p['data_seconds']} s), final loss {p['final_loss']:.4f}")
    if "validation" in p:
        from cbp_platform.segmentation.roi import LEVEL_ALLOWANCE_MM, MARGIN_MM

        v = p["validation"]
        cover = LEVEL_ALLOWANCE_MM + MARGIN_MM          # the allowance and the region's margin
        if v["max_abs_error_mm"] is not None:
            print(f"held-out check ({v['n_scans']} scans): T10 and S1 within {v['max_abs_error_mm']} mm (median "
                  f"{v['median_abs_error_mm']} mm)")
        if v["not_found"] or (v["max_abs_error_mm"] or 0.0) > cover:
            print(f"warning: levels not found on {v['not_found']} of {v['n_scans']} held-out scans, or an error "
                  f"beyond the {cover:g} mm the region covers: train on more scans or for more iterations",
                  file=sys.stderr)
    print(f"saved {path} (sha256 {model.sha256[:16]}...), recorded in {DataLayout.platform_model_pointer(models)}")
    return 0


def _cmd_model_list(args: argparse.Namespace) -> int:
    from cbp_platform.paths import DataLayout
    from cbp_platform.segmentation.manifest import list_manifests

    models = _models_dir(args)
    cur = {}
    if (models / "current.json").exists():
        cur = json.loads((models / "current.json").read_text())
    rows = list_manifests(DataLayout.model_registry(models))
    if args.json:
        print(json.dumps([json.loads(m.to_json()) for m in rows], indent=1))
        return 0
    if not rows:
        print(f"no registered models in {DataLayout.model_registry(models)}")
        return 0
    for m in rows:
        star = "*" if m.name == cur.get("name") else " "
        print(f"{star} {m.name:<36} {m.backend:<13} {m.preset or '-':<22} {','.join(m.inputs):<16} "
              f"{m.orientation} {'x'.join(f'{v:g}' for v in m.spacing_mm)} mm  sha256 {m.sha256[:12]}")
    print("(* the primary model, models/current.json)")
    return 0


def _cmd_model_compare(args: argparse.Namespace) -> int:
    import os

    if args.data_root:
        os.environ["CBP_DATA_ROOT"] = str(Path(args.data_root).resolve())
    from orchestration.runner import compare_models
    from cbp_platform.paths import DataLayout

    print(f"cbp model compare: {args.name} beside the primary model, batch by batch")
    summary = compare_models(args.name)
    print(json.dumps(summary))
    latest = DataLayout.from_env().latest_report
    if not summary["failed"] and latest.exists():
        out = DataLayout.from_env().resolve(json.loads(latest.read_text())["path"])
        print(f"report with the comparison (section 9): {out / 'report.html'}")
    return 1 if summary["failed"] else 0
