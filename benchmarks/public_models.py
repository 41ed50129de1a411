"""Public-shaped nnU-Net v2 model folders: each public model's network as nnU-Net plans it, with random weights.

The benchmarks measure what running MRSegmentator, TotalVibeSegmentator or TotalSegmentator ``total_mr`` costs on
whole-body scans without their weights (those are the operator's, kept offline). Cost depends on the model's
*shape*, not on its weights: the network nnU-Net plans for data like the model's training data, the label count,
the channel count, the trainer (its test-time mirroring), the folds and the configuration. :func:`build` writes the
folder nnU-Net itself would write for such a model::

    <out>/<preset>/<trainer>__nnUNetPlans__3d_fullres/dataset.json      the model's public label table
    <out>/<preset>/<trainer>__nnUNetPlans__3d_fullres/plans.json        nnU-Net's ExperimentPlanner, from a fingerprint
    <out>/<preset>/<trainer>__nnUNetPlans__3d_fullres/fold_<k>/checkpoint_final.pth   random (He) weights, seeded
    <out>/<preset>/<trainer>__nnUNetPlans__3d_fullres/public_shape.json  what was assumed, and from where

and the platform registers it with the model's preset and runs it like the real one (``cbp model register --preset
<preset> --folder ...``). Its predictions are noise: the folder is for measuring cost, never for measuring muscles.

Planning. ``plans.json`` comes from nnU-Net's own ``ExperimentPlanner`` (3d_fullres; the 3d_lowres search is skipped
by setting the planner's ``lowres_creation_threshold`` to 0, since the platform runs 3d_fullres only), fed a
``dataset_fingerprint.json`` written directly from the training cohorts in :data:`SHAPES` (spacing, shape after
cropping and count of each), so no image is needed. nnU-Net reads its ``nnUNet_*`` paths when first imported, so the
planner runs in a fresh interpreter (as :mod:`cbp_platform.segmentation.backends.nnunet_phantom` does); everything
else runs here and imports only ``get_network_from_plans`` and the plans and label helpers (no trainer class, so
neither timm nor torchvision).

Sources of each preset (repositories read at the commits named; see :data:`SHAPES` for every number):

* **MRSegmentator** (hhaentze/MRSegmentator @1c47a04, v1.2 weights): labels from README "Class details" (40 classes
  and background); trainer ``nnUNetTrainerNoMirroring`` (CHANGELOG 1.1.0), folds 0-4 and ``checkpoint_final.pth``
  (``src/mrsegmentator/inference.py``); its own ``SimpleITKIO`` copy orients to LPS
  (``simpleitk_reader_writer.py``); training data (arXiv 2405.06463 and ``evaluation/Readme.md`` "v1.2"): 1,200
  UK Biobank Dixon scans (2.23 x 2.23 x 3.0 mm, as tabulated in arXiv 2507.17971 Table 1), 1,228 TotalSegmentator
  CT scans and, since v1.2, 900 NAKO scans; 221 in-house scans of unpublished geometry are left out (neither median
  spacing nor median shape moves whatever their geometry: the three cohorts fix both medians). Its released
  ``plans.json`` is inside ``weights.zip`` and was not found in any public text, so the planned network is not
  cross-checked.
* **TotalVibeSegmentator** (robert-graf/TotalVibeSegmentator @5b20e04): labels from README "Label overview" (72
  labels of dataset 100, 20 ``unused``); resolution from README "Versions" (ID 100: axial 1.41 mm, S = 3 mm), which
  its ``inference/inference_nnunet.py`` resamples every input to before nnU-Net; NAKO whole-body VIBE geometry from
  ``run_TotalVibeSegmentator.py`` (1.40625 mm R/L and A/P, 3 mm S/I); 2,897 training series (arXiv 2406.00125).
  Not public: the trainer and the ``orientation`` entry of its ``dataset.json``. Trainer ``nnUNetTrainerNoMirroring``
  is inferred (its 62 lateral labels cannot be learned under nnU-Net's left-right mirroring, the reason MRSegmentator
  and TotalSegmentator train without it; the same group's SPINEPS uses ``nnUNetTrainerNoMirroring`` folders) and
  its inference disables mirroring anyway (``use_mirroring=inference_augmentation=False`` in
  ``spineps_/utils/inference_api.py``). Orientation ``["R", "A", "S"]``: the default the maintained successor of
  its inference code applies when the entry is missing (Hendrik-code/TPTBox
  ``TPTBox/segmentation/VibeSeg/inference_nnunet.py``: ``ds_info.get("orientation", ("R", "A", "S"))``). The
  paper trains 3-fold cross-validation; fold 0 is built unless ``folds`` says otherwise.
* **TotalSegmentator total_mr** (wasserth/TotalSegmentator @0e65a44, weights v2.5.0): the muscles model
  ``Dataset851_TotalSegMRI_part2_muscles_1088subj`` (``map_tasks_config.py``), labels ``class_map_parts_mr
  ["class_map_part_muscles"]`` (``map_to_binary.py``, 21 and background), trainer
  ``nnUNetTrainer_2000epochs_NoMirroring`` at 1.5 mm isotropic, fold 0 (``map_tasks_config.py`` ``total_mr``);
  ``NibabelIOWithReorient`` (``resources/convert_dataset_to_nnunet.py`` sets ``overwrite_image_reader_writer``);
  inputs canonicalised (``nnunet.py``) and resampled to 1.5 mm before nnU-Net, so every training case is 1.5 mm.
  Cross-check: a third-party TorchScript port of the released Dataset850/851 weights (class ``UnetCPP_1(mri=True)``
  in public code) has 6 stages of 32, 64, 128, 256, 320, 320 features and a last stride of (1, 2, 2); the planner
  reproduces exactly that network from the assumed median shape, which no public text states.

``small=True`` keeps everything (labels, plans, patch size, stages, strides, trainer, folds) but caps the features
of every stage at 4-8 (:data:`SMALL_FEATURES_CAP`), so a test builds, registers and runs a folder in seconds.

    python -m benchmarks.public_models --preset mrsegmentator --out DIR [--small] [--folds 0 1] [--forward]

prints the folder and a summary (patch size, spacing, stages, features, parameters; ``--forward``: seconds of one
forward pass of one patch on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGURATION = "3d_fullres"
PLANS_NAME = "nnUNetPlans"
SMALL_FEATURES_CAP = 8          # small=True: every stage's features min(8, max(4, features // 8))
SEED = 30_600                   # weights of fold k: torch.manual_seed(SEED + 1000 * preset index + k)

MRSEGMENTATOR_LABELS = (
    "background", "spleen", "right_kidney", "left_kidney", "gallbladder", "liver", "stomach", "pancreas",
    "right_adrenal_gland", "left_adrenal_gland", "left_lung", "right_lung", "heart", "aorta", "inferior_vena_cava",
    "portal_vein_and_splenic_vein", "left_iliac_artery", "right_iliac_artery", "left_iliac_vena",
    "right_iliac_vena", "esophagus", "small_bowel", "duodenum", "colon", "urinary_bladder", "spine", "sacrum",
    "left_hip", "right_hip", "left_femur", "right_femur", "left_autochthonous_muscle", "right_autochthonous_muscle",
    "left_iliopsoas_muscle", "right_iliopsoas_muscle", "left_gluteus_maximus", "right_gluteus_maximus",
    "left_gluteus_medius", "right_gluteus_medius", "left_gluteus_minimus", "right_gluteus_minimus")

TOTALVIBE_LABELS = (
    "background", "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
    "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea",
    "thyroid_gland", "intestine", "duodenum", "unused", "urinary_bladder", "prostate", "sacrum", "heart", "aorta",
    "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right", "subclavian_artery_left",
    "common_carotid_artery_right", "common_carotid_artery_left", "brachiocephalic_vein_left",
    "brachiocephalic_vein_right", "atrial_appendage_left", "superior_vena_cava", "inferior_vena_cava",
    "portal_vein_and_splenic_vein", "iliac_artery_left", "iliac_artery_right", "iliac_vena_left",
    "iliac_vena_right", "humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left",
    "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "spinal_cord", "gluteus_maximus_left",
    "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right", "gluteus_minimus_left",
    "gluteus_minimus_right", "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right", "sternum",
    "costal_cartilages", "subcutaneous_fat", "muscle", "inner_fat", "IVD", "vertebra_body",
    "vertebra_posterior_elements", "spinal_channel", "bone_other")

TOTAL_MR_PART2_LABELS = (
    "background", "humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left",
    "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "gluteus_maximus_left",
    "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right", "gluteus_minimus_left",
    "gluteus_minimus_right", "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right", "brain")

# z-scored channels (any name but "CT"): nnU-Net normalises each image by its own mean and std, so these numbers
# (plausible MR magnitudes, not measured) never enter inference; the planner copies them into plans.json
MR_INTENSITIES = {"mean": 310.0, "median": 290.0, "std": 160.0, "min": 0.0, "max": 2600.0,
                  "percentile_99_5": 980.0, "percentile_00_5": 6.0}


@dataclass(frozen=True)
class Cohort:
    """One group of a model's training data as its fingerprint lists it: ``n`` cases of this spacing and shape
    (after nnU-Net's crop to the non-zero region; whole-body scans lose nothing there)."""

    name: str
    n: int
    spacing_xyz: tuple[float, float, float]    # mm along the image axes i, j, k (k: the slice axis)
    shape_xyz: tuple[int, int, int]
    source: str


@dataclass(frozen=True)
class PublicShape:
    """What a public model's folder looks like, and where each part comes from."""

    preset: str
    dataset_name: str
    trainer: str
    folds: tuple[int, ...]
    epochs: int                                 # the trainer's epochs (``current_epoch`` of its final checkpoint)
    labels: tuple[str, ...]                     # label names by id, 0 = background
    channel_name: str
    reader: str                                 # ``overwrite_image_reader_writer``: what the planner records
    cohorts: tuple[Cohort, ...]
    num_training: int
    dataset_extra: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    public_network: str = ""                    # what is publicly known of the released network, for comparison

    @property
    def trainer_folder(self) -> str:
        return f"{self.trainer}__{PLANS_NAME}__{CONFIGURATION}"


UKBB = Cohort("UK Biobank neck-to-knee Dixon", 1200, (2.232, 2.232, 3.0), (224, 174, 370),
              "count: arXiv 2405.06463; spacing: arXiv 2507.17971 Table 1 (2.23 x 2.23 x 3.00 mm); shape: the six "
              "stitched stations (224 x 174 x 370 voxels, Langner et al., Sci Rep 2019) - assumed")
NAKO = Cohort("NAKO whole-body 3D VIBE Dixon", 900, (1.40625, 1.40625, 3.0), (320, 260, 316),
              "count: MRSegmentator evaluation/Readme.md v1.2 (its 900 NAKO test scans moved to training); spacing: "
              "TotalVibeSegmentator run_TotalVibeSegmentator.py; shape: four stitched stations, 450 x 366 x 948 mm "
              "(~26 M voxels, cf. cbp_platform/ingest/scans.py) - assumed")
TOTALSEG_CT = Cohort("TotalSegmentator CT", 1228, (1.5, 1.5, 1.5), (256, 256, 260),
                     "count: arXiv 2405.06463; spacing: the dataset's 1.5 mm resampling; shape assumed (whatever it "
                     "is, the median stays the MR cohorts': 300 x 244-259 x 316 voxels (i, j, k) at 1.5 x 1.5 x 3 mm)")
SHAPES: dict[str, PublicShape] = {s.preset: s for s in (
    PublicShape(
        preset="mrsegmentator", dataset_name="Dataset960_MRSegmentatorShape", trainer="nnUNetTrainerNoMirroring",
        folds=(0, 1, 2, 3, 4), epochs=1000, labels=MRSEGMENTATOR_LABELS, channel_name="MRI", reader="SimpleITKIO",
        cohorts=(UKBB, NAKO, TOTALSEG_CT), num_training=1200 + 221 + 1228 + 900,
        sources={"labels": "hhaentze/MRSegmentator README 'Class details'",
                 "trainer": "CHANGELOG v1.1.0 (weights trained by nnUNetTrainerNoMirroring); inference.py folds 0-4",
                 "reader": "nnU-Net's default reader for .nii.gz; its inference uses its own SimpleITKIO (LPS)",
                 "geometry": "arXiv 2405.06463 (cohorts), evaluation/Readme.md (v1.2 adds NAKO)",
                 "dataset_name": "not public (ours)"},
        public_network="not found: the released plans.json is only inside weights.zip"),
    PublicShape(
        preset="totalvibesegmentator", dataset_name="Dataset100_TotalVibeSegmentatorShape",
        trainer="nnUNetTrainerNoMirroring", folds=(0,), epochs=1000, labels=TOTALVIBE_LABELS, channel_name="MRI",
        reader="SimpleITKIO",
        cohorts=(Cohort("TotalVibeSegmentator training series at the model's resolution", 2897,
                        (1.40625, 1.40625, 3.0), (320, 260, 316),
                        "count: arXiv 2406.00125 (2,897 series); spacing: README 'Versions' ID 100 (axial 1.41 mm, "
                        "S = 3 mm; inference resamples to the plans' spacing); shape: NAKO whole body - assumed"),),
        num_training=2897, dataset_extra={"orientation": ["R", "A", "S"]},
        sources={"labels": "robert-graf/TotalVibeSegmentator README 'Label overview' (dataset 100)",
                 "trainer": "not public: nnUNetTrainerNoMirroring inferred (lateral labels); inference never mirrors",
                 "orientation": "not public: TPTBox VibeSeg inference default ('R', 'A', 'S')",
                 "folds": "fold 0 (the paper trains 3-fold cross-validation)",
                 "dataset_name": "Dataset100 (README); the suffix is ours"},
        public_network="not found (release zips only)"),
    PublicShape(
        preset="total_mr", dataset_name="Dataset851_TotalSegMRI_part2_muscles_1088subj",
        trainer="nnUNetTrainer_2000epochs_NoMirroring", folds=(0,), epochs=2000, labels=TOTAL_MR_PART2_LABELS,
        channel_name="MR", reader="NibabelIOWithReorient",
        cohorts=(Cohort("TotalSegmentator MRI (with CT), resampled to 1.5 mm", 1088, (1.5, 1.5, 1.5),
                        (256, 256, 160),
                        "count: the dataset's name (1088subj); spacing: map_tasks_config.py total_mr resample 1.5; "
                        "shape assumed (384 x 384 x 240 mm), inside the range where the planner reproduces the "
                        "released network's stride pattern"),),
        num_training=1088,
        sources={"labels": "wasserth/TotalSegmentator map_to_binary.py class_map_parts_mr['class_map_part_muscles']",
                 "trainer": "map_tasks_config.py total_mr default (task 850/851, resample 1.5, folds [0])",
                 "reader": "resources/convert_dataset_to_nnunet.py overwrite_image_reader_writer",
                 "dataset_name": "map_tasks_config.py (v2.5.0-weights)"},
        public_network="third-party TorchScript port of Dataset850/851 (UnetCPP_1, mri=True): 6 stages, features "
                       "32, 64, 128, 256, 320, 320, strides 1, 2, 2, 2, 2, (1, 2, 2)"),
)}


def dataset_json(shape: PublicShape) -> dict:
    """The model folder's ``dataset.json``: the public label table, one channel, the reader and any extra entry."""
    return {"channel_names": {"0": shape.channel_name}, "labels": {n: i for i, n in enumerate(shape.labels)},
            "numTraining": shape.num_training, "file_ending": ".nii.gz",
            "overwrite_image_reader_writer": shape.reader, "name": shape.dataset_name,
            "description": "public-shaped model with random weights (cbp-platform benchmarks/public_models.py); "
                           "not the published model",
            **shape.dataset_extra}


def fingerprint(shape: PublicShape) -> dict:
    """``dataset_fingerprint.json`` as nnU-Net's fingerprint extractor would write it for the cohorts: one entry
    per case, in nnU-Net's array order (k, j, i), as its readers produce."""
    spacings, shapes = [], []
    for c in shape.cohorts:
        spacings += [list(c.spacing_xyz[::-1])] * c.n
        shapes += [list(c.shape_xyz[::-1])] * c.n
    return {"spacings": spacings, "shapes_after_crop": shapes,
            "foreground_intensity_properties_per_channel": {"0": dict(MR_INTENSITIES)},
            "median_relative_size_after_cropping": 1.0}


def _check_against_preset(shape: PublicShape) -> None:
    """The muscle ids and names of the label table are the preset's (registration checks them)."""
    from cbp_platform.segmentation.presets import PRESETS

    p = PRESETS[shape.preset]
    for lid, name in p.label_names.items():
        if lid >= len(shape.labels) or shape.labels[lid] != name:
            have = shape.labels[lid] if lid < len(shape.labels) else "none"
            raise ValueError(f"{shape.preset}: label {lid} is {have!r} here, the preset expects {name!r}")
    if p.folds and any(f not in p.folds for f in shape.folds):
        raise ValueError(f"{shape.preset}: folds {shape.folds} outside the preset's {p.folds}")


def _plan_in_child(work: str, dataset_name: str) -> None:
    """Child process: nnU-Net's ExperimentPlanner on ``work/raw`` and ``work/preprocessed`` (the ``nnUNet_*``
    variables are set by the parent before this interpreter imported nnU-Net); writes ``work/plans.json``."""
    import torch

    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    planner = ExperimentPlanner(dataset_name, preprocessor_name="DefaultPreprocessor", plans_name=PLANS_NAME)
    planner.lowres_creation_threshold = 0.0     # no 3d_lowres search: the platform runs 3d_fullres only
    # the planner builds a candidate network per patch size only to count its feature maps (arithmetic on strides
    # and channels): on the meta device no weights are allocated or initialised, and the plans are the same (checked
    # for the three presets: byte-identical plans.json, planning 3.5 s instead of 5-6.5 s)
    with torch.device("meta"):
        plans = planner.plan_experiment()
    (Path(work) / "plans.json").write_text(json.dumps(plans, indent=1))


def plan(shape: PublicShape, work: Path) -> dict:
    """nnU-Net's plans for data like the model's training data (the fingerprint of :func:`fingerprint`), planned in
    a fresh interpreter; ``work`` is scratch space."""
    raw = work / "raw" / shape.dataset_name
    pre = work / "preprocessed" / shape.dataset_name
    raw.mkdir(parents=True)
    pre.mkdir(parents=True)
    ds = dataset_json(shape)
    # one listed case: the planner only lists the cases to find a reader, which the dataset.json names already
    ds["dataset"] = {"case": {"images": ["imagesTr/case_0000.nii.gz"], "label": "labelsTr/case.nii.gz"}}
    (raw / "dataset.json").write_text(json.dumps(ds))
    (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint(shape)))
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results"), "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    code = "import sys; from benchmarks.public_models import _plan_in_child; _plan_in_child(sys.argv[1], sys.argv[2])"
    out = subprocess.run([sys.executable, "-c", code, str(work), shape.dataset_name], cwd=REPO, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"nnU-Net planning of {shape.preset} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads((work / "plans.json").read_text())


def shrink(plans: dict) -> dict:
    """The same plans with every stage's features capped at 4-8 (patch, stages, strides and kernels kept)."""
    small = json.loads(json.dumps(plans))
    kw = small["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]
    kw["features_per_stage"] = [min(SMALL_FEATURES_CAP, max(4, f // 8)) for f in kw["features_per_stage"]]
    return small


def network(plans: dict, ds: dict, seed: int):
    """The 3d_fullres network of ``plans`` with nnU-Net's He initialisation from ``torch.manual_seed(seed)`` (the
    caller's random state is restored afterwards)."""
    import torch

    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(CONFIGURATION)
    n_in = determine_num_input_channels(pm, cm, ds)
    n_out = pm.get_label_manager(ds).num_segmentation_heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                      cm.network_arch_init_kwargs_req_import, n_in, n_out, allow_init=True,
                                      deep_supervision=False)


def checkpoint(net, plans: dict, ds: dict, shape: PublicShape, fold: int) -> dict:
    """What ``nnUNetTrainer.save_checkpoint`` writes at the end of training: the weights, an SGD state of the same
    size (momentum buffers, zero here; the released checkpoints keep theirs, so file size and load time match), the
    trainer's name and init arguments, and its test-time mirroring axes (None for the NoMirroring trainers)."""
    import torch

    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    for p in net.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return {"network_weights": net.state_dict(), "optimizer_state": opt.state_dict(), "grad_scaler_state": None,
            "logging": {}, "_best_ema": None, "current_epoch": shape.epochs,
            "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": fold, "dataset_json": ds,
                          "device": torch.device("cuda")},
            "trainer_name": shape.trainer,
            "inference_allowed_mirroring_axes": None if "NoMirroring" in shape.trainer else (0, 1, 2)}


def build(preset: str, out: Path, *, folds=None, small: bool = False) -> Path:
    """Write ``<out>/<preset>/<trainer>__nnUNetPlans__3d_fullres`` (replaced if present) for ``preset`` (one of
    :data:`SHAPES`) and return it. ``folds``: the folds to write (default: the model's); ``small``: features capped
    at 4-8 per stage (:func:`shrink`)."""
    import torch

    if preset not in SHAPES:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(SHAPES)}")
    shape = SHAPES[preset]
    folds = tuple(int(f) for f in (folds if folds is not None else shape.folds))
    _check_against_preset(shape)
    base = Path(out).resolve() / preset
    folder = base / shape.trainer_folder
    if folder.exists():
        shutil.rmtree(folder)
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".planning-", dir=base))
    try:
        planned = plan(shape, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plans_s = time.perf_counter() - t0
    plans = shrink(planned) if small else planned
    ds = dataset_json(shape)
    folder.mkdir()
    (folder / "dataset.json").write_text(json.dumps(ds, indent=1))
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    index = list(SHAPES).index(preset)
    net = None
    for k in folds:
        net = network(plans, ds, SEED + 1000 * index + k)
        (folder / f"fold_{k}").mkdir()
        torch.save(checkpoint(net, plans, ds, shape, k), folder / f"fold_{k}" / "checkpoint_final.pth")
    info = {"preset": preset, "small": small, "folds": list(folds), "seed": SEED + 1000 * index,
            "planning_seconds": round(plans_s, 1), "nnunetv2": _version("nnunetv2"),
            "planned": summary(planned), "built": summary(plans, net), "public_network": shape.public_network,
            "sources": shape.sources, "cohorts": [asdict(c) for c in shape.cohorts],
            "weights": "random (nnU-Net's He initialisation, seeded); predictions are noise"}
    (folder / "public_shape.json").write_text(json.dumps(info, indent=1))
    return folder


def summary(plans: dict, net=None) -> dict:
    """Patch size, spacing (nnU-Net's array order after ``transpose_forward``), stages, features and strides of the
    plans' 3d_fullres network, and the parameter count of ``net`` (heads included) when given."""
    c = plans["configurations"][CONFIGURATION]
    kw = c["architecture"]["arch_kwargs"]
    out = {"patch_size": list(c["patch_size"]), "spacing": [round(float(s), 5) for s in c["spacing"]],
           "transpose_forward": plans["transpose_forward"], "median_shape": list(c["median_image_size_in_voxels"]),
           "n_stages": kw["n_stages"], "features_per_stage": list(kw["features_per_stage"]),
           "strides": [list(s) for s in kw["strides"]], "batch_size": c["batch_size"],
           "image_reader_writer": plans["image_reader_writer"]}
    if net is not None:
        out["parameters"] = int(sum(p.numel() for p in net.parameters()))
    return out


def forward_seconds(folder: Path, repeats: int = 1) -> dict:
    """Seconds of one forward pass of one patch (the plans' 3d_fullres patch, one case, float32) on the CPU with
    the current thread count, under ``torch.inference_mode``; the first pass, and the best of ``repeats``."""
    import torch

    folder = Path(folder)
    plans = json.loads((folder / "plans.json").read_text())
    ds = json.loads((folder / "dataset.json").read_text())
    net = network(plans, ds, SEED).eval()
    patch = plans["configurations"][CONFIGURATION]["patch_size"]
    x = torch.randn(1, len(ds["channel_names"]), *patch, generator=torch.Generator().manual_seed(SEED))
    times = []
    with torch.inference_mode():
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            y = net(x)
            times.append(time.perf_counter() - t)
    return {"patch_size": list(patch), "output_channels": int(y.shape[1]), "threads": torch.get_num_threads(),
            "first_s": round(times[0], 3), "best_s": round(min(times), 3)}


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.public_models", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True, choices=sorted(SHAPES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--small", action="store_true", help="features capped at 4-8 per stage (tests)")
    ap.add_argument("--folds", type=int, nargs="+", default=None, help="folds to write (default: the model's)")
    ap.add_argument("--forward", action="store_true", help="also time one forward pass of one patch on the CPU")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    folder = build(args.preset, Path(args.out), folds=args.folds, small=args.small)
    res = {"folder": str(folder), "build_seconds": round(time.perf_counter() - t, 1),
           **json.loads((folder / "public_shape.json").read_text())["built"]}
    if args.forward:
        res["forward"] = forward_seconds(folder)
    res.update(timm_imported="timm" in sys.modules, torchvision_imported="torchvision" in sys.modules)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
