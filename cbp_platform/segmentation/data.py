"""Model-space preprocessing shared by training and inference.

* Orientation: images are brought to the orientation the model declares (the default model's is ``L A S``, index
  i towards the participant's left), so left and right labels keep their anatomical meaning whatever the
  delivery's orientation; labels are mapped back to the scan's own grid afterwards.
* Spacing: the network works at the spacing its bundle declares (the default model's 4 x 4 x 6 mm). Other
  spacings (NAKO's 1.41 x 1.41 x 3 mm) are resampled trilinearly to it, and class probabilities are resampled
  back to the native grid before the argmax, so label maps have the scan's shape and affine.
* Normalisation: both channels are divided by the 99th percentile of water + fat over the volume and clipped
  to [0, 2]: robust to scanner gain, coil bias scale and fat/water balance, and identical for both channels so
  the fat fraction is preserved.
"""

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F


def normalise(water: np.ndarray, fat: np.ndarray) -> np.ndarray:
    w = np.nan_to_num(np.asarray(water, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    f = np.nan_to_num(np.asarray(fat, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    ref = float(np.percentile(w + f, 99))
    ref = ref if ref > 0 else 1.0
    return np.clip(np.stack([w / ref, f / ref]), 0.0, 2.0).astype(np.float32)


def to_model_orientation(arr: np.ndarray, affine: np.ndarray, orientation: str) -> tuple[np.ndarray, np.ndarray]:
    """Reorient the last three axes of ``arr`` to ``orientation`` (nibabel axis codes of the voxel axes, e.g.
    ``LAS``); returns (array, orientation transform back)."""
    cur = nib.orientations.io_orientation(affine)
    tgt = nib.orientations.axcodes2ornt(tuple(orientation))
    fwd = nib.orientations.ornt_transform(cur, tgt)
    back = nib.orientations.ornt_transform(tgt, cur)
    if arr.ndim == 4:
        out = np.stack([nib.orientations.apply_orientation(a, fwd) for a in arr])
    else:
        out = nib.orientations.apply_orientation(arr, fwd)
    return np.ascontiguousarray(out), back


def ornt_to_model(affine: np.ndarray, orientation: str) -> np.ndarray:
    """The orientation transform (nibabel ``ornt``) from the scan's voxel axes to ``orientation``'s."""
    return nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt(tuple(orientation)))


def box_in_model(box: tuple[slice, slice, slice], shape: tuple[int, int, int],
                 fwd: np.ndarray) -> tuple[slice, slice, slice]:
    """A box of a scan (``shape``; slices with start and stop along its voxel axes) as the same voxels' box after
    :func:`to_model_orientation` with the transform ``fwd`` (:func:`ornt_to_model`): axes permuted, a flipped
    axis's range mirrored (index ``n - 1 - i``)."""
    out: list = [None, None, None]
    for ax, (new_ax, flip) in enumerate(np.asarray(fwd)):
        lo, hi, n = box[ax].start, box[ax].stop, shape[ax]
        out[int(new_ax)] = slice(lo, hi) if flip > 0 else slice(n - hi, n - lo)
    return tuple(out)


def from_model_orientation(arr: np.ndarray, back: np.ndarray) -> np.ndarray:
    if arr.ndim == 4:
        return np.ascontiguousarray(np.stack([nib.orientations.apply_orientation(a, back) for a in arr]))
    return np.ascontiguousarray(nib.orientations.apply_orientation(arr, back))


def spacing_in_model_orientation(affine: np.ndarray, orientation: str) -> tuple[float, float, float]:
    """The voxel spacing (mm) along the axes of ``orientation`` (after :func:`to_model_orientation`)."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    cur = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                          nib.orientations.axcodes2ornt(tuple(orientation)))
    out = [0.0, 0.0, 0.0]
    for ax, (tgt_ax, _) in enumerate(cur):
        out[int(tgt_ax)] = float(zooms[ax])
    return tuple(out)


def model_shape(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                model_spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    return tuple(max(8, int(round(n * s / m))) for n, s, m in zip(shape, spacing, model_spacing))


def resample(t: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear resampling of a (B, C, X, Y, Z) tensor; identity when the size already matches."""
    if tuple(t.shape[-3:]) == tuple(size):
        return t
    return F.interpolate(t, size=size, mode="trilinear", align_corners=False)

