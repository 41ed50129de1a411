"""A small, real nnU-Net v2 trained-model folder, made from phantom scans on the CPU in minutes.

The tests and the benchmark run the ``nnunetv2`` backend on a model they make themselves (the public models'
weights are the operator's, kept offline). Every step is nnU-Net's own: a raw dataset (``imagesTr``, ``labelsTr``,
``dataset.json``), ``DatasetFingerprintExtractor``, ``ExperimentPlanner`` (3d_fullres, then shrunk to a small
network and patch so training fits in minutes), ``DefaultPreprocessor``, and the stock ``nnUNetTrainer`` (fold 0,
20 epochs of 60 iterations, its SGD and poly schedule from an initial rate of 0.05 instead of 0.01: at 0.01 the
psoas classes had not appeared after 450 iterations). The network trains in channels-last memory layout (an
instance-level change: oneDNN's 3D convolution backward runs about 30 % faster in it on the CPU, the arithmetic the
same up to float rounding; the checkpoint is written in the usual layout). On 2 idle cores the build takes about 2.5
minutes (4 with one thread, ``--threads 1``); the model reaches Dice ~0.9 for the autochthonous muscles and ~0.3-0.9
for the psoas on held-out phantoms, enough to exercise every class of the mapping (it is a test model, not a
measurement model). The result is the folder nnU-Net writes,
``<out>/nnUNetTrainer__nnUNetPlans__3d_fullres/{dataset.json,plans.json,fold_0/checkpoint_final.pth}``, which
the platform then registers and runs like any public model.

Label ids and names are deliberately *not* the platform's (``LABELS``: 11/12 autochthon, 7/8 iliopsoas, a
``adipose_tissue`` class outside the muscles that the platform ignores), so the manifest's label mapping is exercised for real.

Run it as a program (nnU-Net reads its ``nnUNet_*`` paths when first imported, and its planning uses process
pools, so a fresh interpreter keeps the caller clean)::

    python -m cbp_platform.segmentation.backends.nnunet_phantom --out DIR [--epochs 6 --iterations 50]

Left-right mirroring is removed from the trainer's augmentation and from the checkpoint's test-time mirroring
axes (an instance-level override; the class stays ``nnUNetTrainer``): the classes are lateral.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

DATASET_ID = 901
DATASET = f"Dataset{DATASET_ID:03d}_CbpDixonPhantom"
# this model's own label table: ids and names unlike the platform's, one extra class the platform ignores
LABELS = {"background": 0, "adipose_tissue": 1, "iliopsoas_left": 2, "iliopsoas_right": 3, "autochthon_left": 4,
          "autochthon_right": 5}
# the platform's class of each of this model's labels (what `cbp model register --label` is given)
PLATFORM_OF = {4: "autochthonous_left", 5: "autochthonous_right", 2: "psoas_left", 3: "psoas_right"}
PLATFORM_TO_MODEL = {1: 4, 2: 5, 3: 2, 4: 3}     # the phantom's truth ids -> this model's
ORIENTATION = "LAS"                                 # the phantoms' stored orientation (the trainer's reader keeps it)
TRAINER_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def _log(msg: str) -> None:
    print(f"nnunet-phantom: {msg}", flush=True)


def _write_dataset(raw: Path, n: int, seed: int) -> list[str]:
    import nibabel as nib
    import numpy as np

    from cbp_platform.metrics.body_composition import signal_fat_fraction
    from cbp_platform.segmentation.train import simulated_set

    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir(parents=True)
    cases = []
    for i, it in enumerate(simulated_set(n, seed)):
        case = f"phantom_{i:03d}"
        aff = np.asarray(it["affine"], np.float64)
        for ch, key in enumerate(("water", "fat")):
            nib.save(nib.Nifti1Image(np.asarray(it[key], np.float32), aff), raw / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
        lab = np.zeros(it["labels"].shape, np.uint8)
        for platform_id, model_id in PLATFORM_TO_MODEL.items():
            lab[it["labels"] == platform_id] = model_id
        w, f = np.asarray(it["water"], np.float64), np.asarray(it["fat"], np.float64)
        fatty = (signal_fat_fraction(w, f) >= 0.7) & (w + f >= 0.3 * np.percentile(w + f, 99))
        lab[(lab == 0) & fatty] = LABELS["adipose_tissue"]
        nib.save(nib.Nifti1Image(lab, aff), raw / "labelsTr" / f"{case}.nii.gz")
        cases.append(case)
    # the cases listed explicitly ("dataset"): without it nnU-Net finds them with a fork-based pool of 12 processes,
    # forked from this process after torch has started its threads; a child dying there deadlocks the pool
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "water", "1": "fat"}, "labels": LABELS, "numTraining": len(cases),
        "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO", "name": DATASET,
        "dataset": {c: {"images": [f"imagesTr/{c}_{ch:04d}.nii.gz" for ch in range(2)], "label": f"labelsTr/{c}.nii.gz"}
                    for c in cases}}, indent=1))
    return cases


def build(out: Path, *, n_train: int = 10, seed: int = 4242, epochs: int = 20, iterations: int = 60,
          target_spacing=(8.0, 8.0, 12.0), features=(8, 16, 32), initial_lr: float = 0.05) -> Path:
    """Build the model folder under ``out`` (replaced); returns the trained-model folder. ``target_spacing``:
    along the phantom's i, j, k axes (mm)."""
    out = Path(out).resolve()
    work = out / "work"
    if out.exists():
        shutil.rmtree(out)
    env = {"nnUNet_raw": work / "raw", "nnUNet_preprocessed": work / "preprocessed", "nnUNet_results": out}
    for k, v in env.items():
        os.environ[k] = str(v)
    os.environ["nnUNet_n_proc_DA"] = "1"           # the planner sets torch threads from it (0 breaks planning)
    os.environ["nnUNet_def_n_proc"] = "1"
    import random

    import numpy as np
    import torch

    # nnU-Net's sampling and augmentation draw from the global generators: seeded, a build repeats more closely
    # (not bit for bit: CPU kernels and thread scheduling still vary)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    t0 = time.perf_counter()
    cases = _write_dataset(work / "raw" / DATASET, n_train, seed)
    _log(f"{len(cases)} phantom cases written ({time.perf_counter() - t0:.0f} s)")
    fpe = DatasetFingerprintExtractor(DATASET_ID, num_processes=1, verbose=False)
    fpe.show_progress_bar = False
    fpe.num_foreground_voxels_for_intensitystats = 100_000   # default 1e8: 3 GB and 25 s for 10 small phantoms
    fpe.run(overwrite_existing=True)
    # nnU-Net's planner works in its (k, j, i) array order: the target spacing reversed
    planner = ExperimentPlanner(DATASET_ID, preprocessor_name="DefaultPreprocessor", plans_name="nnUNetPlans",
                                overwrite_target_spacing=[float(s) for s in target_spacing[::-1]],
                                suppress_transpose=False)
    plans = planner.plan_experiment()
    cfg = plans["configurations"]["3d_fullres"]
    n_stages = len(features)
    div = 2 ** (n_stages - 1)
    cfg["patch_size"] = [min(64, max(div, int(round(m)) // div * div)) for m in cfg["median_image_size_in_voxels"]]
    cfg["batch_size"] = 2
    cfg["architecture"]["arch_kwargs"].update({
        "n_stages": n_stages, "features_per_stage": list(features), "kernel_sizes": [[3, 3, 3]] * n_stages,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1), "n_conv_per_stage": [2] * n_stages,
        "n_conv_per_stage_decoder": [2] * (n_stages - 1)})
    plans["configurations"] = {"3d_fullres": cfg}
    recursive_fix_for_json_export(plans)
    pre = work / "preprocessed" / DATASET
    save_json(plans, str(pre / "nnUNetPlans.json"), sort_keys=False)
    save_json([{"train": cases[:-2], "val": cases[-2:]}], str(pre / "splits_final.json"))
    _log(f"planned: patch {cfg['patch_size']}, spacing {cfg['spacing']} ({time.perf_counter() - t0:.0f} s)")
    DefaultPreprocessor(verbose=False).run(DATASET_ID, "3d_fullres", "nnUNetPlans", num_processes=1)
    _log(f"preprocessed ({time.perf_counter() - t0:.0f} s); training {epochs} x {iterations} iterations")

    os.environ["nnUNet_n_proc_DA"] = "0"           # single-threaded augmentation: no worker processes
    plans_t = load_json(str(pre / "nnUNetPlans.json"))
    plans_t["continue_training"] = False
    trainer = nnUNetTrainer(plans=plans_t, configuration="3d_fullres", fold=0,
                            dataset_json=load_json(str(pre / "dataset.json")), device=torch.device("cpu"))
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = 2
    trainer.initial_lr = initial_lr
    lr_axis = plans_t["transpose_forward"].index(2)   # array axis 2 is the phantom's i (left-right) axis
    configure = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size

    def no_lr_mirroring():
        rot, dummy_2d, patch, axes = configure()
        axes = tuple(a for a in axes if a != lr_axis)
        trainer.inference_allowed_mirroring_axes = axes
        return rot, dummy_2d, patch, axes

    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size = no_lr_mirroring
    start, end = trainer.on_train_start, trainer.on_train_end

    def channels_last_start():              # the network and its optimiser exist from here on
        start()
        trainer.network.to(memory_format=torch.channels_last_3d)     # in place: the optimiser keeps its parameters

    def contiguous_end():                   # checkpoint_final.pth in the usual layout
        trainer.network.to(memory_format=torch.contiguous_format)
        end()

    trainer.on_train_start, trainer.on_train_end = channels_last_start, contiguous_end
    trainer.run_training()
    folder = Path(trainer.output_folder_base)
    shutil.rmtree(work)
    for p in folder.glob("fold_0/*"):
        if p.name != "checkpoint_final.pth":
            (shutil.rmtree if p.is_dir() else Path.unlink)(p)
    _log(f"model folder {folder} ({time.perf_counter() - t0:.0f} s)")
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cbp_platform.segmentation.backends.nnunet_phantom",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-train", type=int, default=10)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--initial-lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    folder = build(Path(args.out), n_train=args.n_train, seed=args.seed, epochs=args.epochs,
                   iterations=args.iterations, initial_lr=args.initial_lr)
    print(json.dumps({"folder": str(folder), "timm_imported": "timm" in sys.modules,
                      "torchvision_imported": "torchvision" in sys.modules}))
    return 0


if __name__ == "__main__":       # nnU-Net's planning uses spawn process pools: keep the guard
    raise SystemExit(main())
