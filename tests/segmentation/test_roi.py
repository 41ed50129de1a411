"""Region-of-interest inference (:mod:`cbp_platform.segmentation.roi`): locating the muscles, the margin, the border
rule; and, on the test nnU-Net model built by nnU-Net's own planner and trainer, the agreement of the region's run
with the whole volume's."""

import nibabel as nib
import numpy as np
import pytest

from cbp_platform.segmentation.data import box_in_model, ornt_to_model, to_model_orientation
from cbp_platform.segmentation.roi import Region, cut_muscles, located_box, margin_voxels, region_for


def _affine(codes: str, zooms=(4.0, 4.0, 6.0)) -> np.ndarray:
    """An affine whose voxel axes have the orientation ``codes`` (nibabel codes) and spacing ``zooms``."""
    ornt = nib.orientations.axcodes2ornt(tuple(codes))
    aff = np.zeros((4, 4))
    aff[3, 3] = 1.0
    for ax, (world, flip) in enumerate(ornt):
        aff[int(world), ax] = flip * zooms[ax]
    return aff


def test_the_located_box_is_that_of_each_class_largest_component_not_of_stray_islands():
    lab = np.zeros((40, 30, 20), np.uint8)
    lab[10:20, 5:12, 3:15] = 1
    lab[22:30, 5:12, 3:15] = 2
    lab[0, 0, 0] = 1                     # a stray voxel of class 1 far away
    lab[39, 29, 19] = 3                  # class 3 is only a stray voxel: its largest component is itself
    assert located_box(lab) == (slice(10, 40), slice(5, 30), slice(3, 20))
    lab[39, 29, 19] = 0
    assert located_box(lab) == (slice(10, 30), slice(5, 12), slice(3, 15))
    assert located_box(np.zeros((4, 4, 4), np.uint8)) is None


@pytest.mark.parametrize("codes", ["LAS", "RAS", "PSL", "SLP"])
def test_a_box_maps_onto_the_same_voxels_in_model_orientation(codes):
    rng = np.random.default_rng(3)
    shape = (9, 7, 5)
    aff = _affine(codes, (1.0, 2.0, 3.0))
    vol = rng.integers(0, 1000, shape)
    box = (slice(2, 6), slice(1, 4), slice(0, 3))
    model, _ = to_model_orientation(vol, aff, "LPS")
    mbox = box_in_model(box, shape, ornt_to_model(aff, "LPS"))
    assert sorted(model[mbox].ravel()) == sorted(vol[box].ravel())


def test_the_margin_is_counted_in_each_scan_axis_own_voxels():
    assert margin_voxels(_affine("LAS", (4.0, 4.0, 6.0)), 20.0) == (5, 5, 4)
    assert margin_voxels(_affine("SLA", (6.0, 1.40625, 1.40625)), 20.0) == (4, 15, 15)


def test_the_region_grows_by_the_margin_and_stops_at_the_scan():
    lab = np.zeros((40, 30, 20), np.uint8)
    lab[10:20, 5:12, 3:15] = 1
    r = region_for(lab, (4, 8, 2))
    assert r.box == (slice(6, 24), slice(0, 20), slice(1, 17)) and r.located == (slice(10, 20), slice(5, 12),
                                                                                    slice(3, 15))
    assert r.voxel_share == pytest.approx(18 * 20 * 16 / (40 * 30 * 20))
    assert region_for(np.zeros_like(lab), (1, 1, 1)) is None


def test_a_muscle_on_an_inner_face_across_the_body_is_cut_but_not_on_the_body_axis_or_the_image_border():
    aff = _affine("LAS")                 # axis 2 is the body axis
    shape = (40, 30, 20)
    region = Region(box=(slice(5, 30), slice(0, 25), slice(4, 16)), located=(slice(8, 27), slice(3, 22),
                                                                              slice(6, 14)), shape=shape)
    lab = np.zeros(shape, np.uint8)
    lab[10:20, 5:12, 4:16] = 1           # runs through the superior and inferior faces: anatomy, not a miss
    assert cut_muscles(lab, region, aff) == []
    lab[20:25, 0:3, 8:10] = 3            # on the posterior face, which is the image's own border
    assert cut_muscles(lab, region, aff) == []
    lab[29, 14:16, 8:10] = 2             # on the inner right-left face
    assert cut_muscles(lab, region, aff) == ["autochthonous_right"]


# ---- on the test nnU-Net model (built by nnU-Net's planner, preprocessor and trainer: the nnunet_model fixture)

@pytest.fixture(scope="module")
def phantom_runner(nnunet_model, tmp_path_factory):
    from cbp_platform.segmentation.backends import load_runner
    from tests.support.nnunet import register_phantom_model

    m, _ = register_phantom_model(tmp_path_factory.mktemp("roi") / "registry", nnunet_model[0])
    return load_runner(m, device="cpu")


def _lumbar(seed: int):
    from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom

    return render_phantom(Subject(seed % 2 == 0, 50, 172, 78, 7.0, 0.04, (420.0, 410.0, 135.0, 130.0)),
                          PRESETS["fast"], np.random.default_rng(seed))


def test_the_runner_gives_nnunets_own_label_map_and_uncertainty(phantom_runner):
    """The platform's steps (nnU-Net's preprocessing split at the region, its export one class at a time) give
    the label map of nnU-Net's own ``predict_single_npy_array`` voxel for voxel, and its entropy to 1e-4."""
    from cbp_platform.qc.features import entropy_in_muscle

    r = phantom_runner
    ph = _lumbar(11)
    ours, unc = r.predict_qc(r.prepare(ph.water, ph.fat, ph.affine))
    theirs, lab, probs = _nnunets_own(r, ph)
    assert ours.shape == ph.water.shape and set(np.unique(ours)) >= {0, 1, 2}
    assert np.array_equal(ours, theirs)
    assert unc == pytest.approx(entropy_in_muscle(probs, lab > 0), abs=1e-4)


def test_a_region_covering_the_scan_is_the_whole_volume_run(phantom_runner):
    ph = _lumbar(12)
    prepared = phantom_runner.prepare(ph.water, ph.fat, ph.affine)
    whole = phantom_runner.predict(prepared)
    shape = ph.water.shape
    everything = Region(box=tuple(slice(0, n) for n in shape), located=tuple(slice(0, n) for n in shape), shape=shape)
    assert np.array_equal(phantom_runner.predict(prepared, region=everything), whole)


@pytest.mark.parametrize("tool", ["total_mr", "totalvibesegmentator"])
def test_a_presets_own_preprocessing_runs_and_is_recorded(nnunet_model, tmp_path, tool):
    """The test model registered with a public tool's own steps (its resampling before nnU-Net, its step size and
    mirroring, its way back to the scan's grid): the manifest records them, the predictor uses them, and the
    label map is on the scan's grid and agrees with nnU-Net's own preprocessing (the same network; only the
    interpolation differs)."""
    from cbp_platform.metrics.body_composition import dice_per_class
    from cbp_platform.segmentation.backends import load_runner, nnunet_phantom as phantom
    from cbp_platform.segmentation.backends.nnunet import describe

    folder = nnunet_model[0]
    m = describe(folder, name=f"phantom-{tool}", labels=dict(phantom.PLATFORM_OF), inputs=("water", "fat"),
                 orientation=phantom.ORIENTATION, preprocessing=tool)
    steps = m.options["preprocessing"]
    assert steps["name"] == {"total_mr": "totalsegmentator"}.get(tool, tool) and steps["citation"]
    runner = load_runner(m, device="cpu")
    assert runner.predictor.tile_step_size == steps["tile_step_size"] and runner.mirror_axes == ()
    ph = _lumbar(13)
    prepared = runner.prepare(ph.water, ph.fat, ph.affine)
    assert prepared["steps"]["resampled"] and prepared["model_shape"] != prepared["model_shape_in"]
    lab = runner.predict(prepared)
    plain = load_runner(describe(folder, name="phantom-plain", labels=dict(phantom.PLATFORM_OF),
                                 inputs=("water", "fat"), orientation=phantom.ORIENTATION), device="cpu")
    ref = plain.segment(ph.water, ph.fat, ph.affine)
    assert lab.shape == ph.water.shape and lab.dtype == np.uint8
    dice = dice_per_class(lab, ref)
    assert min(dice[c] for c in (1, 2)) > 0.8, dice


def _whole_body(seed: int):
    from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom

    return render_phantom(Subject(seed % 2 == 1, 55, 178, 84, 8.0, 0.04, (420.0, 410.0, 135.0, 130.0)),
                          PRESETS["fast"], np.random.default_rng(seed), extent="whole-body")


def test_the_region_run_agrees_with_the_whole_volume_run_on_whole_body_scans(phantom_runner):
    """Whole-body scans (neck to thighs): the region located by a registered model (here the test model itself; in
    the pipeline, the platform's own) holds the labelled T10-S1 slab, and inside it the region's run gives the
    whole-volume run's label map (the same tiles of nnU-Net's grid, the same export): Dice 1 per class, and LMM
    and InterMAT equal. Outside it the region's map is background, and so not measured."""
    from cbp_platform.metrics.body_composition import dice_per_class, muscle_metrics
    from cbp_platform.segmentation.roi import RoiSegmenter

    r = phantom_runner
    ph = _whole_body(5)
    k0, k1 = ph.truth["slab_slices"]
    assert ph.water.shape[2] > 3 * (k1 - k0) // 2 and not ph.labels[..., :k0].any()
    seg = RoiSegmenter(r, r)
    prepared = seg.prepare(ph.water, ph.fat, ph.affine)
    region = prepared["region"]
    assert region.box[2].start == max(region.located[2].start - 4, 0)          # 20 mm at 6 mm slices
    assert region is not None and region.box[2].start <= k0 + 2 and region.box[2].stop >= k1 - 2
    whole, u_whole = r.predict_qc(prepared)
    roi, u_roi = seg.predict_qc(prepared)
    assert seg.stats.regions == 1 and seg.stats.reruns == 0
    inside = np.zeros(whole.shape, bool)
    inside[region.box] = True
    assert not roi[~inside].any()
    kept = np.where(inside, whole, 0)
    dice = dice_per_class(roi, kept)
    assert min(dice.values()) >= 0.99, dice
    vml = float(np.prod(np.abs(np.diag(ph.affine)[:3]))) / 1000
    for a, b in zip(muscle_metrics(roi, ph.water, ph.fat, vml), muscle_metrics(kept, ph.water, ph.fat, vml)):
        assert a["lean_ml"] == pytest.approx(b["lean_ml"], rel=0.005)
        assert a["imat_pct"] == pytest.approx(b["imat_pct"], rel=0.005)
    assert u_roi == pytest.approx(u_whole, abs=0.05)
    # a region of part of the volume (the labelled slab): only the tiles of the whole-volume grid that reach it
    # run, and inside it the labels are still the whole-volume run's
    slab = Region(box=(slice(0, ph.water.shape[0]), slice(0, ph.water.shape[1]), slice(k0, k1)),
                  located=region.located, shape=ph.water.shape)
    part = r.predict(prepared, region=slab)
    assert r.last_tiles[0] < r.last_tiles[1]
    assert np.array_equal(part[slab.box], whole[slab.box]) and not part[..., :k0].any()


def test_a_muscle_cut_by_the_region_is_segmented_again_on_the_whole_volume(phantom_runner):
    """A locator that misses part of a muscle (here a region cut through the autochthonous muscles across the
    body): the scan is run again on the whole volume, and the batch's count says so."""
    from cbp_platform.segmentation.roi import RoiSegmenter, located_box

    r = phantom_runner
    ph = _lumbar(14)
    prepared = r.prepare(ph.water, ph.fat, ph.affine)
    whole = r.predict(prepared)
    found = located_box(whole)
    mid = (found[0].start + found[0].stop) // 2
    cut = Region(box=(slice(found[0].start, mid), found[1], found[2]), located=found, shape=ph.water.shape)
    seg = RoiSegmenter(r, r)
    prepared.update(region=cut, scan_affine=ph.affine)
    out = seg.predict(prepared)
    assert seg.stats.reruns == 1 and seg.stats.regions == 0 and seg.stats.to_dict()["reruns_whole_volume"] == 1
    assert np.array_equal(out, whole)


def _nnunets_own(r, ph):
    """nnU-Net's own ``predict_single_npy_array`` of a phantom, as the platform's labels and entropy."""
    import contextlib
    import io

    from cbp_platform.segmentation.backends.nnunet import contrast_stack
    from cbp_platform.segmentation.data import from_model_orientation, spacing_in_model_orientation

    img, back = to_model_orientation(contrast_stack(r.manifest.inputs, ph.water, ph.fat), ph.affine,
                                     r.manifest.orientation)
    si, sj, sk = spacing_in_model_orientation(ph.affine, r.manifest.orientation)
    with contextlib.redirect_stdout(io.StringIO()):
        seg, probs = r.predictor.predict_single_npy_array(np.ascontiguousarray(img.transpose(0, 3, 2, 1)),
                                                          {"spacing": [sk, sj, si]}, None, None, True)
    lab = r.lut[np.asarray(seg)]
    return from_model_orientation(lab.transpose(2, 1, 0), back), lab, np.asarray(probs)


def test_a_whole_body_scan_streams_in_a_patch_of_planes_and_gives_nnunets_own_label_map(phantom_runner):
    """Bounded memory: the logits of a whole-body scan are accumulated over about one patch of planes at a time
    (nnU-Net holds them all, per fold), and the label map and uncertainty are still nnU-Net's own."""
    from cbp_platform.qc.features import entropy_in_muscle

    r = phantom_runner
    ph = _whole_body(7)
    ours, unc = r.predict_qc(r.prepare(ph.water, ph.fat, ph.affine))
    held, planes, _mb = r.last_accumulator
    assert held == r.cm.patch_size[0] + 2 and planes >= 2 * held       # several patches along the stream
    theirs, lab, probs = _nnunets_own(r, ph)
    assert np.array_equal(ours, theirs) and {1, 2, 3, 4} <= set(np.unique(ours))
    assert unc == pytest.approx(entropy_in_muscle(probs, lab > 0), abs=1e-4)


def test_an_ensemble_streams_with_nnunets_own_fold_average(nnunet_model, phantom_runner, tmp_path):
    """Two folds (the test model's and a perturbed copy): the streamed run adds the folds' logits plane by plane
    as nnU-Net adds its whole arrays, so the label map is still that of nnU-Net's own ensemble."""
    import shutil

    import torch

    from cbp_platform.segmentation.backends import load_runner
    from tests.support.nnunet import register_phantom_model

    folder = tmp_path / "model"
    shutil.copytree(nnunet_model[0], folder)
    ck = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    g = torch.Generator().manual_seed(3)
    ck["network_weights"] = {k: (v * (1 + 0.2 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v)
                             for k, v in ck["network_weights"].items()}
    (folder / "fold_1").mkdir(exist_ok=True)
    torch.save(ck, folder / "fold_1" / "checkpoint_final.pth")
    m, _ = register_phantom_model(tmp_path / "registry", folder, folds=["0", "1"])
    r = load_runner(m, device="cpu")
    assert len(r.predictor.list_of_parameters) == 2
    ph = _whole_body(9)
    ours = r.predict(r.prepare(ph.water, ph.fat, ph.affine))
    theirs, _lab, _probs = _nnunets_own(r, ph)
    assert np.array_equal(ours, theirs)
    assert not np.array_equal(ours, phantom_runner.predict(phantom_runner.prepare(ph.water, ph.fat, ph.affine)))


def test_the_batch_path_runs_the_region_in_its_dataloader_worker_and_counts_it(phantom_runner, tmp_path):
    """``segment_scans`` (the batch path of ``muscle_segmentations``): locating and preprocessing in the DataLoader
    worker, the region's run in the main process; the label maps written equal a direct region run's."""
    import nibabel as nib

    from cbp_platform.segmentation.pipeline import segment_scans
    from cbp_platform.segmentation.roi import RoiSegmenter

    ph = _whole_body(8)
    item = {"pseudonym": "wb1"}
    for c in ("water", "fat"):
        nib.save(nib.Nifti1Image(getattr(ph, c), ph.affine), tmp_path / f"wb1_{c}.nii.gz")
        item[c] = str(tmp_path / f"wb1_{c}.nii.gz")
    seg = RoiSegmenter(phantom_runner, phantom_runner)
    results, failures = segment_scans([item], seg, tmp_path, num_workers=1)
    assert failures == [] and seg.stats.scans == 1 and seg.stats.regions + seg.stats.reruns == 1
    written = np.asarray(nib.load(results[0]["label_path"]).dataobj)
    direct = RoiSegmenter(phantom_runner, phantom_runner).segment(ph.water, ph.fat, ph.affine)
    assert np.array_equal(written, direct)


def test_region_inference_without_the_platform_model_names_its_pointer_and_the_ways_out(nnunet_model, tmp_path):
    """A public model registered for region-of-interest inference on a deployment whose platform model was never
    trained: loading it fails before any scan, naming ``models/platform.json``, the training and ``--no-roi``."""
    from cbp_platform.segmentation.manifest import ManifestError
    from cbp_platform.segmentation.roi import load_segmenter
    from tests.support.nnunet import register_phantom_model

    m, _ = register_phantom_model(tmp_path / "models" / "registry", nnunet_model[0], roi=True)
    assert m.options["roi"] is True
    with pytest.raises(ManifestError, match=r"platform\.json: missing.*segmentation_model.*--no-roi"):
        load_segmenter(m, tmp_path / "models", device="cpu")
    plain, _ = register_phantom_model(tmp_path / "models" / "registry", nnunet_model[0], name="plain", roi=False)
    assert not hasattr(load_segmenter(plain, tmp_path / "models", device="cpu"), "locator")
