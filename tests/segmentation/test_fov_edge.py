"""A muscle cut by the field of view is flagged, never measured short."""

import nibabel as nib
import numpy as np
import pytest

from cbp_platform.classes import NAMES
from cbp_platform.segmentation.pipeline import MuscleAtFovEdge, metrics_for, muscles_at_fov_edge


def _write(tmp_path, labels):
    aff = np.diag([-4.0, 4.0, 6.0, 1.0])
    w = np.full(labels.shape, 800, np.int16)
    f = np.full(labels.shape, 100, np.int16)
    paths = []
    for name, arr in (("lab", labels), ("w", w), ("f", f)):
        nib.save(nib.Nifti1Image(arr, aff), tmp_path / f"{name}.nii.gz")
        paths.append(str(tmp_path / f"{name}.nii.gz"))
    return paths


def test_a_muscle_inside_the_image_is_measured_and_one_at_its_edge_is_refused(tmp_path):
    labels = np.zeros((20, 16, 8), np.uint8)
    labels[5:9, 4:8, :] = 1                    # touches the superior-inferior ends only: the measured slab
    labels[11:15, 4:8, :] = 2
    assert muscles_at_fov_edge(labels) == []
    rows = metrics_for(*_write(tmp_path, labels))
    assert {r["muscle"] for r in rows} >= {NAMES[1], NAMES[2]}
    labels[11:15, 12:16, 2:6] = 2              # now reaches the anterior edge (j = 15)
    assert muscles_at_fov_edge(labels) == [NAMES[2]]
    with pytest.raises(MuscleAtFovEdge) as e:
        metrics_for(*_write(tmp_path, labels))
    assert e.value.reason == "muscle_at_fov_edge" and NAMES[2] in str(e.value)
