"""Public-shaped model folders (benchmarks/public_models.py): each preset's folder, built small from nnU-Net's own
planner, registers with its preset as the real model would and runs through the nnunetv2 backend."""

import json
import sys

import numpy as np
import pytest

from benchmarks import public_models as pm
from cbp_platform.segmentation.backends import load_runner
from cbp_platform.segmentation.presets import PRESETS
from cbp_platform.segmentation.registry import register

# what registration must read from each folder: orientation and how, spacing along the model's voxel axes (i, j, k)
EXPECTED = {
    "mrsegmentator": ("LPS", "preset or operator", (1.5, 1.5, 3.0), ["0", "1", "2", "3", "4"], 41),
    "totalvibesegmentator": ("RAS", "dataset.json orientation", (1.40625, 1.40625, 3.0), ["0"], 73),
    "total_mr": ("RAS", "plans.json image_reader_writer NibabelIOWithReorient", (1.5, 1.5, 1.5), ["0"], 22),
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_a_small_public_shaped_folder_registers_with_its_preset_and_runs(preset, tmp_path):
    orientation, how, spacing, folds, n_labels = EXPECTED[preset]
    shape = pm.SHAPES[preset]
    folder = pm.build(preset, tmp_path / "models", small=True)
    assert folder == (tmp_path / "models" / preset / f"{shape.trainer}__nnUNetPlans__3d_fullres").resolve()
    ds = json.loads((folder / "dataset.json").read_text())
    assert len(ds["labels"]) == n_labels and ds["labels"]["background"] == 0 and len(ds["channel_names"]) == 1
    info = json.loads((folder / "public_shape.json").read_text())
    planned, built = info["planned"], info["built"]
    # small: the planned patch, stages and strides, features capped at 4-8
    assert built["patch_size"] == planned["patch_size"] and built["strides"] == planned["strides"]
    assert planned["features_per_stage"][0] == 32 and max(built["features_per_stage"]) <= pm.SMALL_FEATURES_CAP

    m, _ = register(tmp_path / "registry", folder, preset=preset)
    p = PRESETS[preset]
    assert m.labels == p.labels and m.inputs == p.inputs and m.preset == preset
    assert m.options["model_label_names"] == {str(k): v for k, v in sorted(p.label_names.items())}
    assert m.orientation == orientation and m.source["orientation"].startswith(how)
    assert m.spacing_mm == pytest.approx(spacing)
    assert m.options["configuration"] == "3d_fullres" and m.options["trainer_name"] == shape.trainer
    assert m.options["folds"] == folds and sorted(m.weights) == [f"fold_{f}/checkpoint_final.pth" for f in folds]
    assert m.options["mirror_axes"] is None            # every one of the three trains without mirroring

    rng = np.random.default_rng(3)
    water = rng.uniform(0, 400, (40, 32, 24)).astype(np.float32)
    fat = rng.uniform(0, 400, (40, 32, 24)).astype(np.float32)
    affine = np.diag([-4.0, 4.0, 6.0, 1.0])             # LAS, 4 x 4 x 6 mm
    lab = load_runner(m, device="cpu").segment(water, fat, affine)
    assert lab.dtype == np.uint8 and lab.shape == water.shape
    assert set(np.unique(lab)) <= {0, 1, 2, 3, 4}
    assert "timm" not in sys.modules and "torchvision" not in sys.modules


def test_the_label_tables_carry_the_presets_muscles_and_the_plans_are_nnunets():
    for preset, shape in pm.SHAPES.items():
        for lid, name in PRESETS[preset].label_names.items():
            assert shape.labels[lid] == name
        fp = pm.fingerprint(shape)
        assert len(fp["spacings"]) == len(fp["shapes_after_crop"]) == sum(c.n for c in shape.cohorts)
    assert pm.dataset_json(pm.SHAPES["totalvibesegmentator"])["orientation"] == ["R", "A", "S"]
    with pytest.raises(ValueError, match="unknown preset"):
        pm.build("cbp-default", "unused")
