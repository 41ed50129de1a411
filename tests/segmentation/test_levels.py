"""The vertebral-level regressor (:mod:`cbp_platform.segmentation.levels`): slices as the network sees them, its
training, storage and check, and the region of interest it bounds along the body axis."""

import json

import nibabel as nib
import numpy as np
import pytest

from cbp_platform.segmentation.levels import load_levels, slices, train_levels, validate_levels
from cbp_platform.segmentation.manifest import ManifestError


def _whole_body(seed: int):
    from cbp_platform.segmentation.train import cohort_subjects
    from cbp_platform.synth.phantom import PRESETS, render_phantom

    return render_phantom(cohort_subjects(1, seed)[0], PRESETS["fast"], np.random.default_rng(seed),
                          extent="whole-body")


@pytest.fixture(scope="module")
def levels():
    """A short training (12 scans, 600 iterations, about 30 s; the default is 24 and 1500)."""
    return train_levels(n_scans=12, iterations=600, seed=4000)


def test_a_scan_gives_the_same_slices_in_any_voxel_order():
    """Slices are taken in RAS with their world position, so a scan stored LPS and upside down (as DICOM
    stacks can be) gives the network the same input at the same positions."""
    ph = _whole_body(3)
    x, z = slices(ph.water, ph.fat, ph.affine)
    ornt = nib.orientations.axcodes2ornt(("R", "P", "I"))
    cur = nib.orientations.io_orientation(ph.affine)
    t = nib.orientations.ornt_transform(cur, ornt)
    flip = lambda a: nib.orientations.apply_orientation(a, t)       # noqa: E731
    aff = ph.affine @ nib.orientations.inv_ornt_aff(t, ph.water.shape)
    x2, z2 = slices(flip(ph.water), flip(ph.fat), aff)
    order = np.argsort(z2)
    assert np.allclose(z2[order], z) and np.allclose(x2[order], x, atol=1e-5)
    assert x.shape == (ph.water.shape[2], 2, 48, 40) and np.all(np.diff(z) > 0)


def test_a_short_training_finds_t10_and_s1_on_held_out_whole_body_scans(levels):
    """Within 100 mm (about three vertebrae) after a short training, on a 1080 mm scan; the default training's
    held-out errors (44 mm at most on 8 scans) are measured by ``cbp model train-levels``."""
    check = validate_levels(levels, n_scans=3, seed=4001)
    assert check["not_found"] == 0 and check["max_abs_error_mm"] < 100.0, check


def test_the_level_model_is_stored_hashed_and_recorded_beside_the_platform_model(tmp_path):
    from cbp_platform.paths import DataLayout
    from cbp_platform.segmentation.registry import (platform_levels, platform_model, set_platform_model,
                                                    train_level_model)

    path, model = train_level_model(tmp_path, n_scans=1, iterations=3, n_val=0)
    pointer = DataLayout.platform_model_pointer(tmp_path)
    assert json.loads(pointer.read_text())["levels"] == {"file": path.name, "sha256": model.sha256}
    with pytest.raises(ManifestError, match=r"platform\.json: missing.*--no-roi"):   # levels, but no model yet
        platform_model(tmp_path)
    again = platform_levels(tmp_path)
    x, _ = slices(*(lambda p: (p.water, p.fat, p.affine))(_whole_body(4)))
    assert np.array_equal(again.predict(x), model.predict(x))

    class Named:                      # a manifest's two fields that the pointer records
        name, sha256 = "cbp_back_muscles-000000000000", "0" * 64
    set_platform_model(tmp_path, Named())           # retraining the platform model keeps the level model
    assert json.loads(pointer.read_text())["levels"]["sha256"] == model.sha256
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="sha256"):
        load_levels(path, model.sha256)
    path.unlink()
    with pytest.raises(ManifestError, match="train-levels"):
        platform_levels(tmp_path)


def test_with_levels_the_region_runs_from_s1_to_t10_not_up_to_the_neck(levels, nnunet_model, tmp_path):
    """On a whole-body scan the platform's model (here the test nnU-Net model, trained on lumbar slabs) finds the
    back muscles far above T10; the levels bound the region along the body axis to T10-S1 and its allowance."""
    from cbp_platform.segmentation.backends import load_runner
    from cbp_platform.segmentation.roi import LEVEL_ALLOWANCE_MM, MARGIN_MM, RoiSegmenter
    from tests.support.nnunet import register_phantom_model

    m, _ = register_phantom_model(tmp_path / "registry", nnunet_model[0])
    runner = load_runner(m, device="cpu")
    ph = _whole_body(5)
    k0, k1 = ph.truth["slab_slices"]
    dz = float(ph.affine[2, 2])
    reach = (LEVEL_ALLOWANCE_MM + MARGIN_MM + 100.0) / dz      # allowance, margin, the short training's error
    plain = RoiSegmenter(runner, runner).prepare(ph.water, ph.fat, ph.affine)["region"]
    seg = RoiSegmenter(runner, runner, levels=levels)
    prepared = seg.prepare(ph.water, ph.fat, ph.affine)
    bounded = prepared["region"]
    assert prepared["levels"]["found"]
    assert bounded.box[2].start >= k0 - reach and bounded.box[2].stop <= k1 + reach
    assert (bounded.box[2].stop - bounded.box[2].start) < (plain.box[2].stop - plain.box[2].start)
    seg.predict(prepared)
    assert seg.stats.levels_found == 1 and seg.stats.to_dict()["levels_found"] == 1


def test_train_levels_from_the_command_line_records_it_and_warns_when_its_check_falls_short(tmp_path, capsys):
    """``cbp model train-levels``: a too-short training still saves and records its model, and says that its
    held-out check does not cover the region's allowance."""
    from cbp_platform.cli import main
    from cbp_platform.segmentation.registry import platform_levels

    assert main(["model", "train-levels", "--scans", "1", "--iterations", "3", "--validation-scans", "1",
                 "--models-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "saved" in out and "platform.json" in out and "warning: levels not found on" in err
    assert platform_levels(tmp_path).provenance["validation"]["n_scans"] == 1
