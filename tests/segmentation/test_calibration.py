"""Border calibration: the counting shortcut is the segmenter's own decision rule, the offset is chosen where the
InterMAT bias crosses 0, and it travels inside the weights (so their sha256 covers it)."""

import numpy as np
import pytest
import torch

from cbp_platform.segmentation.bundle import (background_offset, build_network, load_bundle, save_bundle,
                                              set_background_offset)
from cbp_platform.metrics.body_composition import signal_fat_fraction
from cbp_platform.segmentation.calibrate import GRID, border_counts, choose_offset
from cbp_platform.segmentation.infer import Segmenter
from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom


@pytest.fixture(scope="module")
def scan():
    ph = render_phantom(Subject(True, 58, 166, 71, 9.0, 0.05, (300.0, 290.0, 90.0, 85.0)), PRESETS["fast"],
                        np.random.default_rng(21))
    return ph


def test_offset_travels_in_the_weights_and_the_segmenter_applies_it(tmp_path, scan):
    torch.manual_seed(0)
    net = build_network()
    sha0 = save_bundle(tmp_path / "a", net, {})
    set_background_offset(net, 0.7)
    sha1 = save_bundle(tmp_path / "b", net, {})
    assert sha0 != sha1                                          # the identity covers the decision rule
    b = load_bundle(tmp_path / "b")
    assert background_offset(b.network) == pytest.approx(0.7)
    seg = Segmenter(b, device="cpu", flip_tta=False)
    assert seg.offset == pytest.approx(0.7)
    prep = seg.prepare(scan.water, scan.fat, scan.affine)
    probs = seg.probabilities(prep)
    labels = seg.predict(prep)
    # the rule, written out: background wins iff p0 * e^offset >= every muscle class's probability
    p = probs.copy()
    p[0] *= np.exp(0.7)
    from cbp_platform.segmentation.data import from_model_orientation
    back = np.asarray(prep["back"])
    np.testing.assert_array_equal(labels, from_model_orientation(p.argmax(0).astype(np.uint8), back))
    # and the counting shortcut of the calibration agrees with it at that offset and at others
    ff = signal_fat_fraction(scan.water, scan.fat)
    native = from_model_orientation(probs, back)
    comp, fat = border_counts(native, ff)
    for off in (-0.5, 0.0, 0.7, 1.3):
        q = native.copy()
        q[0] *= np.exp(off)
        lab = q.argmax(0)
        k = int(np.flatnonzero(GRID == off)[0])
        assert comp[k] == int((lab > 0).sum()) and fat[k] == int(((lab > 0) & (ff >= 0.5)).sum())
    assert (np.diff(comp) <= 0).all()                           # a larger offset never adds compartment voxels


def test_old_bundles_without_an_offset_load_with_zero(tmp_path):
    net = build_network()
    state = {k: v for k, v in net.state_dict().items() if k != "background_logit_offset"}
    save_bundle(tmp_path / "old", net, {})
    torch.save(state, tmp_path / "old" / "models" / "model.pt")
    import json
    meta = json.loads((tmp_path / "old" / "configs" / "metadata.json").read_text())
    meta.pop("weights_sha256")
    (tmp_path / "old" / "configs" / "metadata.json").write_text(json.dumps(meta))
    assert background_offset(load_bundle(tmp_path / "old").network) == 0.0


def test_choose_offset_finds_the_zero_of_the_imat_bias():
    # two scans whose compartments shrink with the offset; fat falls faster (outside fat at the border)
    comp = np.stack([1000 - 40 * GRID, 2000 - 80 * GRID])
    fat = np.stack([100 - 30 * GRID, 160 - 50 * GRID])
    imat_true = np.array([100 * (100 - 30 * 0.4) / (1000 - 40 * 0.4), 100 * (160 - 50 * 0.4) / (2000 - 80 * 0.4)])
    lean_true = np.array([900.0, 1840.0])
    off, fig = choose_offset(comp, fat, imat_true, lean_true)
    assert off == pytest.approx(0.4) and fig["within_range"] and abs(fig["imat_bias_after"]) < 0.05
    assert fig["imat_bias_before"] > 5
    # no zero in range: the nearest end, flagged
    off, fig = choose_offset(comp, fat * 0 + 1, imat_true, lean_true)
    assert not fig["within_range"] and off in (GRID[0], GRID[-1])
