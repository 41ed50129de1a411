"""Each tool's own preprocessing (issue 30, item 4): the registry, and the resampling / intensity functions on small
arrays whose results can be checked by hand or against the scipy call the tool itself makes."""

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from cbp_platform.segmentation.backends import tool_preprocessing as tp
from cbp_platform.segmentation.backends.tool_preprocessing import (PREPROCESSING, IntensityRule, ToolPreprocessing,
                                                                   labels_to_original, plan_for, preprocess_image,
                                                                   resample_image, resample_labels_back,
                                                                   resampled_shape, rescale_intensity)

NAKO = (1.40625, 1.40625, 3.0)


def _smooth(shape, seed=0, scale=4000.0):
    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.random(shape), 1.5) * scale).astype(np.float32)


# --- the registry ---------------------------------------------------------------------------------------------


def test_registry_has_the_four_tools_each_cited_with_its_repository():
    assert set(PREPROCESSING) == {"nnunet", "totalsegmentator", "totalvibesegmentator", "mrsegmentator"}
    repos = {"nnunet": "MIC-DKFZ/nnUNet", "totalsegmentator": "wasserth/TotalSegmentator",
             "totalvibesegmentator": "robert-graf/TotalVibeSegmentator", "mrsegmentator": "hhaentze/MRSegmentator"}
    for name, plan in PREPROCESSING.items():
        assert plan.name == name
        assert repos[name] in plan.citation and ".py" in plan.citation
    assert "Hendrik-code/TPTBox" in PREPROCESSING["totalvibesegmentator"].citation


def test_what_each_tool_does():
    ts, tvs, mrs, nn = (PREPROCESSING[k] for k in ("totalsegmentator", "totalvibesegmentator", "mrsegmentator",
                                                     "nnunet"))
    assert (ts.orientation, ts.resample_to, ts.resample_method, ts.image_order) == (
        "RAS", (1.5, 1.5, 1.5), "ndimage_zoom", 1)
    assert (ts.labels_back_method, ts.labels_back_order, ts.tile_step_size, ts.use_mirroring) == (
        "ndimage_zoom", 0, 0.8, False)
    assert ts.intensity == IntensityRule(kind="truncate", cast="int32", only_if_resampled=True)
    assert (tvs.orientation, tvs.resample_to, tvs.resample_method, tvs.image_order) == (
        None, "plans", "tptbox_rescale", 3)
    assert (tvs.labels_back_method, tvs.labels_back_order, tvs.tile_step_size, tvs.use_mirroring) == (
        "tptbox_resample_from_to", 0, 0.5, False)
    assert (tvs.intensity.kind, tvs.intensity.threshold, tvs.intensity.new_max, tvs.intensity.cast) == (
        "squash_max", 10000.0, 1000.0, "float16")
    for plan in (mrs, nn):
        assert (plan.resample_to, plan.resample_method, plan.labels_back_method, plan.tile_step_size) == (
            None, None, None, 0.5)
        assert plan.intensity.kind == "none" and plan.use_mirroring
    assert mrs.orientation == "LPS" and nn.orientation is None


def test_plan_for_maps_presets_and_falls_back_to_nnunet():
    assert plan_for("total_mr").name == "totalsegmentator"
    assert plan_for("totalvibesegmentator").name == "totalvibesegmentator"
    assert plan_for("mrsegmentator").name == "mrsegmentator"
    assert plan_for(" MRSegmentator ").name == "mrsegmentator"
    assert plan_for("totalsegmentator").name == "totalsegmentator"
    for other in ("", None, "cbp-default", "no-such-preset"):
        assert plan_for(other).name == "nnunet"


def test_every_nnunet_preset_has_its_tools_preprocessing():
    from cbp_platform.segmentation.presets import PRESETS

    nn_presets = {n for n, p in PRESETS.items() if p.backend == "nnunetv2"}
    assert nn_presets == set(tp.PRESET_TOOL)
    for n in nn_presets:
        plan = plan_for(n)
        assert plan.name != "nnunet"
        if plan.orientation is not None:       # a tool that fixes the orientation agrees with the preset's
            assert PRESETS[n].orientation == plan.orientation


def test_to_dict_round_trips_json():
    for plan in PREPROCESSING.values():
        d = plan.to_dict()
        text = json.dumps(d, sort_keys=True)
        assert json.loads(text) == d
        assert ToolPreprocessing.from_dict(json.loads(text)) == plan
    d = tp.describe("totalvibesegmentator")
    assert d["name"] == "totalvibesegmentator" and set(d["sources"]) == {"totalvibesegmentator", "tptbox"}
    assert json.loads(json.dumps(d)) == d


def test_inconsistent_entries_are_refused():
    with pytest.raises(ValueError, match="resample_method"):
        ToolPreprocessing(name="x", tool="x", resample_to=(1.5, 1.5, 1.5))
    with pytest.raises(ValueError, match="order 0"):
        ToolPreprocessing(name="x", tool="x", resample_to="plans", resample_method="tptbox_rescale", image_order=3,
                          labels_back_method="tptbox_resample_from_to", labels_back_order=1)
    with pytest.raises(ValueError, match="tile_step_size"):
        ToolPreprocessing(name="x", tool="x", tile_step_size=1.5)
    with pytest.raises(ValueError, match="axis codes"):
        ToolPreprocessing(name="x", tool="x", orientation="RAR")
    with pytest.raises(ValueError, match="threshold"):
        IntensityRule(kind="squash_max")
    with pytest.raises(ValueError, match="plans_spacing"):
        PREPROCESSING["totalvibesegmentator"].target_spacing(None)


def test_importing_it_imports_neither_nnunet_nor_torch_nor_dagster():
    code = ("import sys, cbp_platform.segmentation.backends.tool_preprocessing; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('nnunetv2', 'torch', 'dagster')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- shapes ---------------------------------------------------------------------------------------------------


def test_resampled_shape_rules():
    assert resampled_shape((288, 224, 360), NAKO, (1.5, 1.5, 1.5)) == (270, 210, 720)
    assert resampled_shape((288, 224, 360), NAKO, (1.5, 1.5, 1.5), "tptbox_rescale") == (270, 210, 720)
    # both round half to even: 5 * 0.5 = 2.5 -> 2, 7 * 0.5 = 3.5 -> 4
    for method in tp.RESAMPLE_METHODS:
        assert resampled_shape((5, 7, 4), (1, 1, 1), (2, 2, 2), method) == (2, 4, 2)
    with pytest.raises(ValueError, match="empty axis"):
        resampled_shape((1, 4, 4), (1, 1, 1), (3, 1, 1))


def test_zoom_shape_rule_is_scipys():
    rng = np.random.default_rng(3)
    for _ in range(30):
        shape = tuple(int(n) for n in rng.integers(3, 40, 3))
        sp = tuple(float(s) for s in rng.uniform(0.5, 4, 3))
        tg = tuple(float(s) for s in rng.uniform(0.5, 4, 3))
        want = ndimage.zoom(np.zeros(shape, np.float32), np.array(sp) / np.array(tg), order=0).shape
        assert resampled_shape(shape, sp, tg) == want


# --- resample_image -------------------------------------------------------------------------------------------


def test_linear_ramp_by_hand_both_grids():
    ramp = np.broadcast_to(np.arange(5, dtype=np.float32)[:, None, None], (5, 2, 2)).copy()
    # TotalSegmentator (ndimage.zoom, corners aligned): 10 voxels, voxel o samples o * 4 / 9
    out, sp = resample_image(ramp, (2, 1, 1), (1, 1, 1), 1)
    assert out.shape == (10, 2, 2) and sp == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(out[:, 0, 0], np.arange(10) * 4 / 9, rtol=0, atol=1e-6)
    # TotalVibeSegmentator (TPTBox rescale, voxel 0 kept): voxel o samples o / 2, the last beyond the edge -> 4
    out, _ = resample_image(ramp, (2, 1, 1), (1, 1, 1), 1, method="tptbox_rescale")
    np.testing.assert_allclose(out[:, 0, 0], [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4], rtol=0, atol=1e-6)


@pytest.mark.parametrize("order", [0, 1])
def test_low_orders_are_bit_identical_to_scipy_zoom_in_slabs_and_threads(order, monkeypatch):
    img = _smooth((23, 17, 11))
    want = ndimage.zoom(img, np.array(NAKO) / 1.5, order=order, mode="nearest")
    got, _ = resample_image(img, NAKO, (1.5, 1.5, 1.5), order)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    monkeypatch.setattr(tp, "_SLAB_VOXELS", 50)          # many slabs, several threads: the same numbers
    got2, _ = resample_image(img[None], NAKO, (1.5, 1.5, 1.5), order, threads=3)
    assert got2.shape == (1, *want.shape) and np.array_equal(got2[0], want)


def test_cubic_matches_scipy_float64_within_float32_rounding():
    img = _smooth((21, 19, 9), seed=1)
    want = ndimage.zoom(img.astype(np.float64), np.array(NAKO) / 1.5, order=3, mode="nearest")
    got, _ = resample_image(img, NAKO, (1.5, 1.5, 1.5), 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
    # TPTBox's call: affine_transform with the 3 x 3 matrix diag(new / old), offset 0, order 3, mode nearest
    shape = resampled_shape(img.shape, NAKO, (1.5, 1.5, 1.5), "tptbox_rescale")
    want = ndimage.affine_transform(img.astype(np.float64), np.diag(1.5 / np.array(NAKO)), np.zeros(3), shape,
                                    order=3, mode="nearest")
    got, _ = resample_image(img, NAKO, (1.5, 1.5, 1.5), 3, method="tptbox_rescale")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_cubic_keeps_a_constant_and_channels_stay_apart():
    img = np.stack([np.full((9, 8, 5), 7.0, np.float32), _smooth((9, 8, 5), seed=2)])
    out, _ = resample_image(img, (2.0, 2.0, 3.0), (1.5, 1.5, 1.5), 3, method="tptbox_rescale")
    np.testing.assert_allclose(out[0], 7.0, rtol=1e-6)
    alone, _ = resample_image(img[1], (2.0, 2.0, 3.0), (1.5, 1.5, 1.5), 3, method="tptbox_rescale")
    assert np.array_equal(out[1], alone)


def test_truncation_is_totalsegmentators_int32_from_float64():
    img = _smooth((15, 13, 8), seed=4) - 2000.0          # negative values too: truncation toward zero
    want = ndimage.zoom(img.astype(np.float64), np.array(NAKO) / 1.5, order=1, mode="nearest").astype(np.int32)
    got, _ = resample_image(img, NAKO, (1.5, 1.5, 1.5), 1, truncate_to="int32")
    assert np.array_equal(got, want.astype(np.float32))
    assert np.any(want < 0)


def test_no_resampling_at_the_target_spacing():
    img = _smooth((6, 5, 4))
    out, sp = resample_image(img, (1.5, 1.5, 1.5), (1.5, 1.5, 1.5), 3)
    assert np.array_equal(out, img) and sp == (1.5, 1.5, 1.5)
    # TPTBox skips within 0.001 mm, TotalSegmentator only when exactly equal
    assert not tp.needs_resampling((1.5004, 1.5, 1.5), (1.5, 1.5, 1.5), "tptbox_rescale")
    assert tp.needs_resampling((1.5004, 1.5, 1.5), (1.5, 1.5, 1.5), "ndimage_zoom")


# --- resample_labels_back -------------------------------------------------------------------------------------


def test_labels_back_by_hand():
    lab = np.array([1, 2, 3], np.uint8)[:, None, None]
    # zoom 3 -> 5, corners aligned: voxel j takes round(j / 2), ties up: 0, 1, 1, 2, 2
    back = resample_labels_back(lab, (5, 1, 1))
    assert back.dtype == np.uint8 and back[:, 0, 0].tolist() == [1, 2, 2, 3, 3]
    # TPTBox, voxel centres from voxel 0: label spacing 2 mm, input 1 mm, 6 voxels: j takes round(j / 2)
    back = resample_labels_back(lab, (6, 1, 1), method="tptbox_resample_from_to", spacing_xyz=(2, 1, 1),
                                target_spacing_xyz=(1, 1, 1))
    assert back[:, 0, 0].tolist() == [1, 2, 2, 3, 3, 3]


@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_labels_forward_then_back_are_identical_on_multiple_grids(dtype):
    rng = np.random.default_rng(5)
    lab = rng.integers(0, 9, size=(7, 6, 5)).astype(dtype)
    # corner-aligned zoom: n -> 2n - 1 (every second voxel an original one) and back
    fine = resample_labels_back(lab, tuple(2 * n - 1 for n in lab.shape))
    back = resample_labels_back(fine, lab.shape)
    assert back.dtype == lab.dtype and np.array_equal(back, lab)
    # TPTBox: 3 mm -> 1.5 mm (2n voxels) and back
    fine = resample_labels_back(lab, tuple(2 * n for n in lab.shape), method="tptbox_resample_from_to",
                                spacing_xyz=(3, 3, 3), target_spacing_xyz=(1.5, 1.5, 1.5))
    back = resample_labels_back(fine, lab.shape, method="tptbox_resample_from_to", spacing_xyz=(1.5, 1.5, 1.5),
                                target_spacing_xyz=(3, 3, 3))
    assert np.array_equal(back, lab)


def test_labels_back_exact_shape_and_refusals():
    lab = np.zeros((270, 21, 72), np.uint8)
    assert resample_labels_back(lab, (288, 22, 36)).shape == (288, 22, 36)
    with pytest.raises(ValueError, match="order 0"):
        resample_labels_back(lab, (288, 22, 36), order=1)
    with pytest.raises(ValueError, match="spacing"):
        resample_labels_back(lab, (288, 22, 36), method="tptbox_resample_from_to")


# --- rescale_intensity ----------------------------------------------------------------------------------------


def test_tvs_rule_triggers_above_10000_only_per_channel():
    rule = PREPROCESSING["totalvibesegmentator"].intensity
    high = np.array([0.0, 10000.0, 20000.0], np.float32)
    at = np.array([0.0, 5000.0, 10000.0], np.float32)
    img = np.stack([high, at])[:, :, None, None]
    out = rescale_intensity(img, rule)
    assert out[0, :, 0, 0].tolist() == [0.0, 500.0, 1000.0]        # max 20000 > 10000: divided by 20000 / 1000
    assert out[1, :, 0, 0].tolist() == [0.0, 5000.0, 10000.0]      # max exactly 10000: not rescaled
    just = rescale_intensity(np.array([10001.0, 5000.5], np.float32)[:, None, None], rule)
    assert float(just.max()) == 1000.0
    # then the float16 cast (TotalVibeSegmentator's run_inference): steps of 1 between 1024 and 2048
    assert rescale_intensity(np.array([1500.3], np.float32)[:, None, None], rule)[0, 0, 0] == 1500.0
    assert img[0, 2, 0, 0] == 20000.0                              # the input is left alone (copy=True)


def test_truncate_and_none_rules_and_in_place():
    ts = PREPROCESSING["totalsegmentator"].intensity
    a = np.array([-1.7, 2.9, 3.0, -0.2], np.float32)[:, None, None]
    assert rescale_intensity(a, ts)[:, 0, 0].tolist() == [-1.0, 2.0, 3.0, 0.0]
    assert rescale_intensity(a, "totalsegmentator")[:, 0, 0].tolist() == [-1.0, 2.0, 3.0, 0.0]
    same = rescale_intensity(a, "nnunet")
    assert np.array_equal(same, a) and same is not a
    rescale_intensity(a, ts, copy=False)
    assert a[:, 0, 0].tolist() == [-1.0, 2.0, 3.0, 0.0]


# --- the steps composed ---------------------------------------------------------------------------------------


def test_preprocess_image_per_preset():
    img = (_smooth((1, 12, 10, 6), seed=6) + 0.25).astype(np.float32)
    for name in ("mrsegmentator", "nnunet"):
        out, sp, rec = preprocess_image(plan_for(name), img, NAKO, (1.5, 1.5, 1.5))
        assert out is img and sp == NAKO and rec["resampled"] is False and rec["intensity"] == "none"
    out, sp, rec = preprocess_image(plan_for("total_mr"), img, NAKO)
    assert out.shape == (1, 11, 9, 12) and sp == (1.5, 1.5, 1.5) and rec["intensity"] == "truncate"
    assert np.array_equal(out, np.trunc(out))
    # already at 1.5 mm: TotalSegmentator neither resamples nor truncates
    out, _, rec = preprocess_image(plan_for("total_mr"), img, (1.5, 1.5, 1.5))
    assert np.array_equal(out, img) and rec["resampled"] is False and rec["intensity"] == "none"
    # TotalVibeSegmentator: the plans' spacing; the squash applies without resampling too
    loud = img * 10.0
    loud[0, 0, 0, 0] = 40000.0
    out, sp, rec = preprocess_image(plan_for("totalvibesegmentator"), loud, (2.0, 2.0, 2.0), (2.0, 2.0, 2.0))
    assert rec["resampled"] is False and rec["intensity"] == "squash_max" and float(out.max()) == 1000.0
    with pytest.raises(ValueError, match="plans_spacing"):
        preprocess_image(plan_for("totalvibesegmentator"), img, NAKO)
    assert json.loads(json.dumps(rec)) == rec


def test_labels_to_original_round_trip_and_refusal():
    lab = np.random.default_rng(7).integers(0, 5, size=(8, 6, 4)).astype(np.uint8)
    plan = plan_for("totalvibesegmentator")
    fine = resample_labels_back(lab, (16, 12, 8), method="tptbox_resample_from_to", spacing_xyz=(3, 3, 3),
                                target_spacing_xyz=(1.5, 1.5, 1.5))
    back = labels_to_original(plan, fine, lab.shape, spacing_xyz=(1.5, 1.5, 1.5), original_spacing_xyz=(3, 3, 3))
    assert np.array_equal(back, lab)
    assert labels_to_original(plan_for(""), lab, lab.shape, spacing_xyz=NAKO, original_spacing_xyz=NAKO) is lab
    with pytest.raises(ValueError, match="does not resample"):
        labels_to_original(plan_for("mrsegmentator"), lab, (9, 6, 4), spacing_xyz=NAKO, original_spacing_xyz=NAKO)
