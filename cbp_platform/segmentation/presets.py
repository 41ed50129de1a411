"""Presets of the public whole-body MRI models: their own label ids of the platform's classes, and their input.

An operator names the preset and the folder (``cbp model register --preset mrsegmentator --folder ...``);
registration checks the folder against the preset (ids and names in its ``dataset.json``, channel count) and reads
spacing, reader and trainer from it. Sources (read from the models' repositories; see docs/segmentation-models.md):

* MRSegmentator (hhaentze/MRSegmentator, README class table; ``inference.py``; ``simpleitk_reader_writer.py``):
  40 classes, ``left/right_autochthonous_muscle`` 31/32, ``left/right_iliopsoas_muscle`` 33/34; one channel, any MR
  sequence (on NAKO its Dice is highest on the in-phase image); its own reader orients every image to ITK "LPS"
  (nibabel codes L, P, S) before nnU-Net; trainer ``nnUNetTrainerNoMirroring``, 3d_fullres, folds 0-4.
* TotalVibeSegmentator / VIBESegmentator (robert-graf/TotalVibeSegmentator README "Label Model 100";
  ``inference/inference_nnunet.py``; ``run_TotalVibeSegmentator_multi.py``): dataset 100, ``autochthon_left/right``
  59/60, ``iliopsoas_left/right`` 61/62; one image per run, muscle labels taken from the water image; the
  orientation is the ``orientation`` entry of the model's own ``dataset.json``. Without that entry its inference
  code does not reorient at all (it keeps the stored voxel order), so a folder without it has no orientation the
  platform can establish: registration refuses it and names the missing entry, unless the operator states the
  orientation (``--orientation``). Its loader takes ``checkpoint_final.pth`` and falls back to
  ``checkpoint_best.pth``: register such a folder with ``--checkpoint checkpoint_best.pth``.
* TotalSegmentator ``total_mr`` >= 2.5 (wasserth/TotalSegmentator ``map_to_binary.py`` ``class_map_parts_mr``,
  ``nnunet.py``, ``map_tasks_config.py``): the muscles are in ``Dataset851_TotalSegMRI_part2_muscles_1088subj``,
  own ids ``autochthon_left/right`` 17/18, ``iliopsoas_left/right`` 19/20 (46-49 in the combined map; 44-47 before
  2.5, whose folders the name check refuses); one channel, any MR; inputs canonicalised to RAS; trainer
  ``nnUNetTrainer_2000epochs_NoMirroring``, 3d_fullres, fold 0.

The platform's ``psoas`` classes take the models' iliopsoas: at the lumbar levels the platform measures, the
iliopsoas compartment is the psoas major (iliacus joins it below the iliac crest).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    name: str
    backend: str
    inputs: tuple[str, ...]                       # contrasts fed, in channel order
    labels: dict[int, str] = field(default_factory=dict)        # model id -> platform class
    label_names: dict[int, str] = field(default_factory=dict)   # model id -> the model's own label name
    orientation: str = ""                          # for readers that keep the stored voxel order
    orientation_key: str = ""                      # a dataset.json entry holding the orientation, when there is one
    folds: tuple = ()                              # () = every fold in the folder
    configuration: str = ""                        # "" = the checkpoint's
    citation: str = ""


def _nn(names: dict[int, tuple[str, str]], **kw) -> dict:
    return {"labels": {k: v[0] for k, v in names.items()}, "label_names": {k: v[1] for k, v in names.items()}, **kw}


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(name="mrsegmentator", backend="nnunetv2", inputs=("in_phase",), orientation="LPS",
           folds=(0, 1, 2, 3, 4), configuration="3d_fullres",
           citation="hhaentze/MRSegmentator README class table; src/mrsegmentator/inference.py, "
                    "simpleitk_reader_writer.py (DICOMOrient LPS)",
           **_nn({31: ("autochthonous_left", "left_autochthonous_muscle"),
                  32: ("autochthonous_right", "right_autochthonous_muscle"),
                  33: ("psoas_left", "left_iliopsoas_muscle"), 34: ("psoas_right", "right_iliopsoas_muscle")})),
    Preset(name="totalvibesegmentator", backend="nnunetv2", inputs=("water",), orientation_key="orientation",
           configuration="3d_fullres",
           citation="robert-graf/TotalVibeSegmentator README (Label Model 100), inference/inference_nnunet.py, "
                    "run_TotalVibeSegmentator_multi.py (muscles from the water image)",
           **_nn({59: ("autochthonous_left", "autochthon_left"), 60: ("autochthonous_right", "autochthon_right"),
                  61: ("psoas_left", "iliopsoas_left"), 62: ("psoas_right", "iliopsoas_right")})),
    Preset(name="total_mr", backend="nnunetv2", inputs=("in_phase",), orientation="RAS", folds=(0,),
           configuration="3d_fullres",
           citation="wasserth/TotalSegmentator totalsegmentator/map_to_binary.py class_map_parts_mr "
                    "(Dataset851), nnunet.py (as_closest_canonical), map_tasks_config.py",
           **_nn({17: ("autochthonous_left", "autochthon_left"), 18: ("autochthonous_right", "autochthon_right"),
                  19: ("psoas_left", "iliopsoas_left"), 20: ("psoas_right", "iliopsoas_right")})),
    Preset(name="cbp-default", backend="monai-bundle", inputs=("water", "fat"),
           citation="this platform's own bundle (configs/metadata.json)"),
)}
