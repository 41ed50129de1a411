"""The phantom renderer realises its targets and varies anatomy with the participant."""

from __future__ import annotations

import numpy as np
import pytest

from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom


def _subject(**kw):
    base = dict(female=False, age=50, height_cm=178, weight_kg=82, imat_pct=7.0, mfi=0.04,
                lean_ml=(420.0, 410.0, 135.0, 130.0))
    base.update(kw)
    return Subject(**base)


@pytest.mark.parametrize("imat", [2.5, 7.0, 18.0])
def test_realised_intermat_and_lean_volume_hit_targets(imat):
    s = _subject(imat_pct=imat)
    ph = render_phantom(s, PRESETS["fast"], np.random.default_rng(1))
    assert abs(ph.truth["imat_pct"] - imat) < 0.1
    assert abs(ph.truth["lean_ml"] / sum(s.lean_ml) - 1) < 0.01
    for name, target in zip(("autochthonous_left", "autochthonous_right", "psoas_left", "psoas_right"), s.lean_ml):
        assert abs(ph.truth[f"{name}_lean_ml"] / target - 1) < 0.03, name


def test_anatomy_varies_with_bmi_and_sex():
    lean = render_phantom(_subject(weight_kg=62), PRESETS["fast"], np.random.default_rng(3))
    obese = render_phantom(_subject(weight_kg=118), PRESETS["fast"], np.random.default_rng(3))

    def fat_area(ph):  # voxels whose noise-free signal is fat-dominated, in the mid slice
        k = ph.fat.shape[2] // 2
        return int(((ph.fat[:, :, k] > ph.water[:, :, k]) & (ph.fat[:, :, k] > 300)).sum())

    assert fat_area(obese) > 1.5 * fat_area(lean)


def test_swaps_exchange_channels():
    s = _subject()
    normal = render_phantom(s, PRESETS["fast"], np.random.default_rng(5))
    swapped = render_phantom(_subject(swap="full"), PRESETS["fast"], np.random.default_rng(5))
    m = normal.labels > 0
    assert normal.water[m].mean() > 3 * normal.fat[m].mean()
    assert swapped.fat[m].mean() > 3 * swapped.water[m].mean()
    slab = render_phantom(_subject(swap="slab"), PRESETS["fast"], np.random.default_rng(5))
    k0, k1 = slab.truth["swap_slices"]
    assert 0.35 * 48 <= k1 - k0 <= 0.65 * 48
    np.testing.assert_array_equal(slab.labels, normal.labels)


def test_in_and_opposed_phase_follow_the_dixon_model():
    ph = render_phantom(_subject(), PRESETS["fast"], np.random.default_rng(2), in_opp=True)
    body = ph.labels > 0
    w, f = ph.water[body].astype(float), ph.fat[body].astype(float)
    ip, op = ph.in_phase[body].astype(float), ph.opp_phase[body].astype(float)
    assert abs(np.median(ip - (w + f))) < 0.1 * np.median(ip)
    assert abs(np.median(op - np.abs(w - f))) < 0.15 * np.median(ip)
