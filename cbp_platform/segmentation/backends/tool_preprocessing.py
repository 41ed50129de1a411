"""Each public tool's own preprocessing around nnU-Net, per preset (issue 30, item 4).

By default the platform hands the image to nnU-Net, which resamples it to the plans' spacing (order 3, the
low-resolution axis with order 0 when the spacing is anisotropic by more than 3) and resamples the logits back
(order 1) before the argmax. The public tools do otherwise; this module records, per tool, what its own inference
code does, and implements those steps as pure numpy/scipy functions so that the platform can run a model the way its
authors run it. Behaviour is copied, not code: every step cites the repository, file and function it follows (read
at the commits named in :data:`SOURCES`).

* TotalSegmentator ``total_mr`` (:data:`PREPROCESSING` ``["totalsegmentator"]``): RAS canonical orientation,
  the image resampled by TotalSegmentator itself to 1.5 mm with ``scipy.ndimage.zoom`` (order 1, ``mode="nearest"``)
  and stored as int32 (truncation), nnU-Net with ``tile_step_size`` 0.8 and no mirroring, the label map zoomed back
  onto the canonical input grid with order 0 (exact shape).
* TotalVibeSegmentator (``["totalvibesegmentator"]``): the orientation of the model's ``dataset.json``, the image
  rescaled by TPTBox to the plans' spacing (cubic spline, order 3; ``mode="nearest"`` is scipy's boundary mode, not
  the interpolation), every channel whose maximum exceeds 10,000 divided by ``max / 1000``, the array cast to
  float16, nnU-Net with ``tile_step_size`` 0.5 and no mirroring, the label map resampled back with order 0 through
  TPTBox's ``resample_from_to`` (voxel centres matched, voxel 0 of both grids the same point).
* MRSegmentator (``["mrsegmentator"]``): every image oriented to LPS, nnU-Net's own preprocessing and export,
  ``tile_step_size`` 0.5, ``use_mirroring=True`` (the checkpoint's allowed axes decide; the preset records the
  weights' trainer as ``nnUNetTrainerNoMirroring``, which allows none).
* ``"nnunet"``: the platform's default, nnU-Net's own preprocessing, step 0.5.

:func:`plan_for` maps a preset name to its entry (unknown or empty: ``"nnunet"``); :meth:`ToolPreprocessing.to_dict`
is what a manifest or a run's metadata records. The pure functions (:func:`resample_image`,
:func:`resample_labels_back`, :func:`rescale_intensity`) and the two wrappers (:func:`preprocess_image`,
:func:`labels_to_original`) work on the platform's arrays, ``(C, X, Y, Z)`` float32 images and ``(X, Y, Z)`` label
maps already in the model's orientation, with spacings given along those same axes. Orientation itself is the
caller's (the platform's ``to_model_orientation`` with the manifest's orientation, which for these presets is the
tool's). Nothing here imports nnU-Net or opens a file.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

# The stored snapshots the behaviour below was read from.
SOURCES: dict[str, str] = {
    "totalsegmentator": "wasserth/TotalSegmentator @ 0e65a448d557 (release 2.18.0, 2026-08-13)",
    "totalvibesegmentator": "robert-graf/TotalVibeSegmentator @ 5b20e045f95b (2025-07-03)",
    "tptbox": "Hendrik-code/TPTBox @ dc7a5505dbb2 (2025-07-03) and @ f43f7fb51a15 (2026-08-20)",
    "mrsegmentator": "hhaentze/MRSegmentator @ 1c47a0484ecf (2025-04-25)",
}

RESAMPLE_METHODS = ("ndimage_zoom", "tptbox_rescale")
LABELS_BACK_METHODS = ("ndimage_zoom", "tptbox_resample_from_to")
_SPLINE_PAD = 12        # scipy.ndimage's own pre-padding before a spline filter with mode "nearest"


@dataclass(frozen=True)
class IntensityRule:
    """An intensity step a tool applies to the image before nnU-Net (nnU-Net's own normalisation follows).

    ``kind``: ``"none"``; ``"truncate"`` (the values stored as ``cast``, an integer type: truncation toward zero);
    ``"squash_max"`` (per channel: if its maximum is above ``threshold``, the channel is divided by
    ``maximum / new_max``, so that its new maximum is ``new_max``; then, if ``cast`` is given, the array is cast to
    that type and back to float32). ``only_if_resampled``: the step belongs to the tool's resampling and is skipped
    when the tool skips resampling (spacing already the target)."""

    kind: str = "none"
    threshold: float | None = None
    new_max: float | None = None
    cast: str | None = None
    only_if_resampled: bool = False

    def __post_init__(self):
        if self.kind not in ("none", "truncate", "squash_max"):
            raise ValueError(f"intensity rule kind {self.kind!r}: one of none, truncate, squash_max")
        if self.kind == "squash_max" and (self.threshold is None or not self.new_max or self.new_max <= 0):
            raise ValueError("a squash_max rule needs a threshold and a positive new_max")
        if self.kind == "truncate" and self.cast not in ("int16", "int32", "int64"):
            raise ValueError("a truncate rule needs an integer cast (int16, int32 or int64)")
        if self.cast is not None and self.cast not in ("float16", "int16", "int32", "int64"):
            raise ValueError(f"cast {self.cast!r}: one of float16, int16, int32, int64")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IntensityRule":
        return cls(**d)


NO_INTENSITY = IntensityRule()
TS_INT32 = IntensityRule(kind="truncate", cast="int32", only_if_resampled=True)
TVS_SQUASH = IntensityRule(kind="squash_max", threshold=10000.0, new_max=1000.0, cast="float16")


@dataclass(frozen=True)
class ToolPreprocessing:
    """What a tool does around nnU-Net, and so what the platform does for a preset that follows it.

    ``orientation``: nibabel axis codes the tool orients every image to, or None (the manifest's orientation).
    ``resample_to``: None (nnU-Net resamples, as by default); ``"plans"`` (the tool resamples to the plans'
    spacing itself before nnU-Net, which then has nothing left to resample); or a fixed spacing (mm, x y z).
    ``resample_method`` / ``image_order``: how (:data:`RESAMPLE_METHODS`) and with which spline order the image is
    resampled. ``labels_back_method`` / ``labels_back_order``: how the label map returns to the input grid
    (:data:`LABELS_BACK_METHODS`; None: nnU-Net's export resamples the logits, order 1, before the argmax).
    ``tile_step_size`` and ``use_mirroring``: the tool's ``nnUNetPredictor`` arguments (mirroring only ever uses
    the axes the checkpoint allows, minus the platform's left-right exclusion). ``intensity``: see
    :class:`IntensityRule`. ``citation``: repository, file and function of each step."""

    name: str
    tool: str
    orientation: str | None = None
    resample_to: str | tuple[float, float, float] | None = None
    resample_method: str | None = None
    image_order: int | None = None
    labels_back_method: str | None = None
    labels_back_order: int | None = None
    tile_step_size: float = 0.5
    use_mirroring: bool = True
    intensity: IntensityRule = field(default_factory=IntensityRule)
    citation: str = ""
    notes: str = ""

    def __post_init__(self):
        if isinstance(self.resample_to, (list, tuple)):
            object.__setattr__(self, "resample_to", tuple(float(s) for s in self.resample_to))
            if len(self.resample_to) != 3 or any(not s > 0 for s in self.resample_to):
                raise ValueError(f"{self.name}: resample_to {self.resample_to}: three positive spacings (mm)")
        elif self.resample_to not in (None, "plans"):
            raise ValueError(f"{self.name}: resample_to {self.resample_to!r}: None, 'plans' or three spacings")
        if (self.resample_to is None) != (self.resample_method is None) or (
                self.resample_method is not None and self.resample_method not in RESAMPLE_METHODS):
            raise ValueError(f"{self.name}: resample_method {self.resample_method!r} with resample_to "
                             f"{self.resample_to!r} (a method of {RESAMPLE_METHODS} exactly when resampling)")
        if (self.resample_method is None) != (self.image_order is None):
            raise ValueError(f"{self.name}: image_order is given exactly when the platform resamples")
        if (self.resample_to is None) != (self.labels_back_method is None) or (
                self.labels_back_method is not None and self.labels_back_method not in LABELS_BACK_METHODS):
            raise ValueError(f"{self.name}: labels_back_method {self.labels_back_method!r}: one of "
                             f"{LABELS_BACK_METHODS} exactly when the image was resampled by the platform")
        if self.labels_back_method is not None and self.labels_back_order != 0:
            raise ValueError(f"{self.name}: label maps go back with order 0 (nearest neighbour)")
        if not 0 < self.tile_step_size <= 1:
            raise ValueError(f"{self.name}: tile_step_size {self.tile_step_size} not in (0, 1]")
        if self.orientation is not None and (len(self.orientation) != 3 or
                                             sorted(_AXIS.get(c, "?") for c in self.orientation.upper()) !=
                                             ["x", "y", "z"]):
            raise ValueError(f"{self.name}: orientation {self.orientation!r} is not three axis codes")

    def target_spacing(self, plans_spacing_xyz: Sequence[float] | None = None) -> tuple[float, float, float] | None:
        """The spacing the platform resamples the image to before nnU-Net (None: it does not)."""
        if self.resample_to is None:
            return None
        if self.resample_to == "plans":
            if plans_spacing_xyz is None:
                raise ValueError(f"{self.name}: resamples to the plans' spacing; give plans_spacing_xyz")
            return tuple(float(s) for s in plans_spacing_xyz)
        return tuple(self.resample_to)

    def to_dict(self) -> dict:
        """JSON-able: what the manifest or a run's metadata records (``from_dict`` reads it back)."""
        d = asdict(self)
        d["resample_to"] = list(self.resample_to) if isinstance(self.resample_to, tuple) else self.resample_to
        d["intensity"] = self.intensity.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ToolPreprocessing":
        d = dict(d)
        d["intensity"] = IntensityRule.from_dict(d.get("intensity") or {})
        if isinstance(d.get("resample_to"), list):
            d["resample_to"] = tuple(d["resample_to"])
        return cls(**d)


_AXIS = {"L": "x", "R": "x", "A": "y", "P": "y", "S": "z", "I": "z"}

PREPROCESSING: dict[str, ToolPreprocessing] = {p.name: p for p in (
    ToolPreprocessing(
        name="nnunet", tool="nnU-Net v2 (the platform's default)",
        tile_step_size=0.5, use_mirroring=True,
        citation="MIC-DKFZ/nnUNet nnunetv2/inference/predict_from_raw_data.py nnUNetPredictor (tile_step_size 0.5 "
                 "default), nnunetv2/preprocessing/preprocessors/default_preprocessor.py DefaultPreprocessor."
                 "run_case_npy, nnunetv2/preprocessing/resampling/default_resampling.py "
                 "resample_data_or_seg_to_shape, nnunetv2/inference/export_prediction.py "
                 "convert_predicted_logits_to_segmentation_with_correct_shape",
        notes="nnU-Net crops to the non-zero box, normalises, resamples to the plans' spacing (order 3, the "
              "low-resolution axis with order 0 when anisotropic > 3) and resamples the logits back (order 1). "
              "Orientation: the manifest's."),
    ToolPreprocessing(
        name="totalsegmentator", tool="TotalSegmentator total_mr",
        orientation="RAS", resample_to=(1.5, 1.5, 1.5), resample_method="ndimage_zoom", image_order=1,
        labels_back_method="ndimage_zoom", labels_back_order=0, tile_step_size=0.8, use_mirroring=False,
        intensity=TS_INT32,
        citation="wasserth/TotalSegmentator: totalsegmentator/nnunet.py nnUNet_predict_image (as_closest_canonical; "
                 "change_spacing(img_in, resample, order=resampling_order, dtype=np.int32); step_size 0.8 for "
                 "task_name total/total_v3/total_mr; change_spacing(img_pred, resample, img_in_shape, order=0, "
                 "dtype=np.uint8, force_affine=img_in.affine); undo_canonical) and nnUNetv2_predict "
                 "(nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=not tta)); "
                 "totalsegmentator/resampling.py change_spacing (zoom = spacing / new_spacing) and resample_img "
                 "(scipy.ndimage.zoom(..., mode='nearest', order=order), joblib over channels, nr_cpus = "
                 "nr_thr_resamp, default 1); totalsegmentator/alignment.py as_closest_canonical "
                 "(nibabel.as_closest_canonical), undo_canonical; totalsegmentator/map_tasks_config.py "
                 "TASK_CONFIGS['total_mr'] default sub-mode (task_id [850, 851], resample 1.5, trainer "
                 "nnUNetTrainer_2000epochs_NoMirroring); totalsegmentator/python_api.py totalsegmentator "
                 "(resampling_order=1, nr_thr_resamp=1, tta off); totalsegmentator/bin/TotalSegmentator.py "
                 "(--resampling_order default 1)",
        notes="resampling_order defaults to 1 since release 2.16.0; 2.15.0 added the option with default 3, and "
              "earlier releases used order 3 throughout. No cropping for total_mr without roi_subset (the "
              "crop/roi_subset path and --fast/--fastest are not followed). The int32 cast happens only when "
              "change_spacing resamples (an image already at 1.5 mm is passed on unchanged)."),
    ToolPreprocessing(
        name="totalvibesegmentator", tool="TotalVibeSegmentator",
        orientation=None, resample_to="plans", resample_method="tptbox_rescale", image_order=3,
        labels_back_method="tptbox_resample_from_to", labels_back_order=0, tile_step_size=0.5,
        use_mirroring=False, intensity=TVS_SQUASH,
        citation="robert-graf/TotalVibeSegmentator: inference/inference_nnunet.py run_inference_on_file "
                 "(orientation from dataset.json; zoom from plans.json configurations.3d_fullres.spacing via "
                 "transpose_backward, reversed; i.reorient(orientation); i.rescale_(zoom, mode='nearest'); "
                 "squash_so_it_fits_in_float16: if max > 10000: x /= max / 1000; "
                 "seg_nii.resample_from_to_(og_nii, mode='nearest') unless keep_size) and "
                 "spineps_/utils/inference_api.py load_inf_model (step_size=0.5, "
                 "use_mirroring=inference_augmentation=False) and run_inference "
                 "(sitk.GetArrayFromImage(...).astype(np.float16); predict_single_npy_array); "
                 "Hendrik-code/TPTBox: TPTBox/core/nii_wrapper.py NII.rescale (order None -> 3 for images, 0 for "
                 "segmentations; new shape np.rint(shape * zoom / spacing); origin of voxel 0 kept), "
                 "NII.resample_from_to_ (align_corners=False), TPTBox/core/internal/nii_help.py "
                 "_resample_from_to (scipy.ndimage.affine_transform of inv(from_affine) @ to_affine)",
        notes="The orientation is the dataset.json 'orientation' entry, which the manifest already holds. nnU-Net "
              "then finds the image at its plans' spacing and does not resample it (its cropping and "
              "normalisation still run). The float16 cast is TotalVibeSegmentator's own (run_inference)."),
    ToolPreprocessing(
        name="mrsegmentator", tool="MRSegmentator",
        orientation="LPS", tile_step_size=0.5, use_mirroring=True,
        citation="hhaentze/MRSegmentator: src/mrsegmentator/inference.py infer (nnUNetPredictor(tile_step_size=0.5, "
                 "use_gaussian=True, use_mirroring=True); predict_from_list_of_npy_arrays, or "
                 "predict_single_npy_array with split_level > 0); src/mrsegmentator/simpleitk_reader_writer.py "
                 "SimpleITKIO.read_image (sitk.DICOMOrient(itk_image, 'LPS'); float32; spacing reversed) and "
                 "write_seg (DICOMOrient back to the input's orientation)",
        notes="Everything else is nnU-Net's own preprocessing and export. use_mirroring=True; the checkpoint's "
              "allowed axes decide (the preset records the trainer nnUNetTrainerNoMirroring: none). Its reader "
              "takes the spacing before DICOMOrient, so for inputs whose axes DICOMOrient permutes the spacing "
              "handed to nnU-Net is in the wrong order; the platform passes the spacing of the reoriented axes."),
)}

# A preset's name (cbp_platform.segmentation.presets.PRESETS) -> its tool's entry.
PRESET_TOOL: dict[str, str] = {"total_mr": "totalsegmentator", "totalvibesegmentator": "totalvibesegmentator",
                               "mrsegmentator": "mrsegmentator"}


def plan_for(preset_name: str | None) -> ToolPreprocessing:
    """The preprocessing for a preset (``total_mr``, ``totalvibesegmentator``, ``mrsegmentator``) or a registry
    name; an unknown or empty name (a model registered without a preset, the platform's own bundle) -> ``nnunet``."""
    key = (preset_name or "").strip().lower()
    return PREPROCESSING[PRESET_TOOL.get(key, key if key in PREPROCESSING else "nnunet")]


# --------------------------------------------------------------------------------------------------------------
# Pure functions


def _as_spacing(v: Sequence[float], what: str) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    if a.size != 3 or not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"{what} {tuple(np.ravel(v))}: three positive spacings (mm)")
    return a


def resampled_shape(shape: Sequence[int], spacing_xyz: Sequence[float], target_spacing_xyz: Sequence[float],
                    method: str = "ndimage_zoom") -> tuple[int, int, int]:
    """The shape each tool's resampling produces.

    ``ndimage_zoom`` (TotalSegmentator ``change_spacing``: ``zoom = spacing / new_spacing``, then
    ``scipy.ndimage.zoom``'s own rule): ``round(n * zoom)``, Python's round (half to even).
    ``tptbox_rescale`` (TPTBox ``NII.rescale``): ``np.rint(n * spacing / new_spacing)`` (half to even)."""
    sp, tg = _as_spacing(spacing_xyz, "spacing"), _as_spacing(target_spacing_xyz, "target spacing")
    if method == "ndimage_zoom":
        zoom = sp / tg
        out = tuple(int(round(int(n) * float(z))) for n, z in zip(shape, zoom))
    elif method == "tptbox_rescale":
        out = tuple(int(v) for v in np.rint([int(shape[i]) * sp[i] / tg[i] for i in range(3)]).astype(int))
    else:
        raise ValueError(f"resample method {method!r}: one of {RESAMPLE_METHODS}")
    if any(n < 1 for n in out):
        raise ValueError(f"resampling {tuple(shape)} from {tuple(sp)} to {tuple(tg)} mm leaves an empty axis")
    return out


def needs_resampling(spacing_xyz: Sequence[float], target_spacing_xyz: Sequence[float],
                     method: str = "ndimage_zoom") -> bool:
    """Whether the tool resamples at all. TotalSegmentator's ``change_spacing`` returns the image unchanged when
    the spacings are exactly equal (``np.array_equal``); TPTBox's ``NII.rescale`` when they agree within 0.001 mm
    (``np.isclose(..., atol=0.001)``; releases before 2026 compared exactly)."""
    sp, tg = _as_spacing(spacing_xyz, "spacing"), _as_spacing(target_spacing_xyz, "target spacing")
    if method == "ndimage_zoom":
        return not np.array_equal(sp, tg)
    if method == "tptbox_rescale":
        return not bool(np.isclose(tg, sp, atol=0.001).all())
    raise ValueError(f"resample method {method!r}: one of {RESAMPLE_METHODS}")


def _spline_coefficients(channel: np.ndarray, order: int) -> np.ndarray:
    """scipy.ndimage's prefilter for ``mode="nearest"`` (edge padding of 12 voxels, then ``spline_filter``), kept
    in float32 instead of scipy's float64 copy of the whole volume; the interpolation then adds the 12 voxels to
    its input coordinates."""
    padded = np.pad(channel, _SPLINE_PAD, mode="edge")
    return ndimage.spline_filter(padded, order, output=np.float32, mode="nearest")


_SLAB_VOXELS = 1 << 22      # voxels per slab of output (16 MiB as float32)


def _interpolate(src: np.ndarray, matrix: np.ndarray, offset: np.ndarray, out: np.ndarray, order: int,
                 threads: int, truncate_to: str | None = None) -> None:
    """``out[o] = src(matrix * o + offset)`` (axis-wise, spline ``order``, ``mode="nearest"``), computed in slabs
    along the first axis (by several threads if asked: scipy's interpolation releases the GIL); a slab's offset is
    ``matrix[0] * x0`` more along that axis, the coordinates of one whole call. With ``truncate_to`` each slab is
    interpolated in float64, truncated toward zero and clipped to that integer type, then stored as float32: what
    a tool computes in float64 and stores as integers, without a float64 copy of the whole volume."""
    n0 = out.shape[0]
    plane = max(1, int(np.prod(out.shape[1:])))
    step = max(1, _SLAB_VOXELS // plane)
    starts = list(range(0, n0, step))
    lim = np.iinfo(np.dtype(truncate_to)) if truncate_to else None

    def run(x0: int) -> None:
        x1 = min(x0 + step, n0)
        off = np.array(offset, dtype=np.float64)
        off[0] += matrix[0] * x0
        shape = (x1 - x0, *out.shape[1:])
        if lim is None:
            ndimage.affine_transform(src, matrix, offset=off, output_shape=shape, output=out[x0:x1], order=order,
                                     mode="nearest", prefilter=False)
            return
        tmp = ndimage.affine_transform(src, matrix, offset=off, output_shape=shape, output=np.float64, order=order,
                                       mode="nearest", prefilter=False)
        np.trunc(tmp, out=tmp)
        np.clip(tmp, lim.min, lim.max, out=tmp)
        out[x0:x1] = tmp

    threads = max(1, min(int(threads), len(starts)))
    if threads == 1:
        for x0 in starts:
            run(x0)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, starts))


def resample_image(arr: np.ndarray, spacing_xyz: Sequence[float], target_spacing_xyz: Sequence[float],
                   order: int, *, method: str = "ndimage_zoom", threads: int = 1,
                   truncate_to: str | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Resample a ``(C, X, Y, Z)`` (or ``(X, Y, Z)``) image to ``target_spacing_xyz`` the way a tool does; returns
    the float32 array and the spacing the tool records for it (the target).

    ``ndimage_zoom`` (TotalSegmentator, ``resampling.py`` ``change_spacing`` -> ``resample_img`` ->
    ``scipy.ndimage.zoom(img, spacing / new_spacing, order=order, mode="nearest")``): shape ``round(n * zoom)``;
    corner-aligned grid (``grid_mode=False``): output voxel ``o`` samples input ``o * (n_in - 1) / (n_out - 1)``.
    ``tptbox_rescale`` (TotalVibeSegmentator, ``NII.rescale_(zoom, mode="nearest")`` -> ``_resample_from_to`` ->
    ``scipy.ndimage.affine_transform(order=3, mode="nearest")``): shape ``rint(n * spacing / new_spacing)``; voxel
    0 kept in place: output voxel ``o`` samples input ``o * new_spacing / spacing``.

    Both with ``mode="nearest"`` at the border. Orders 0 and 1 are scipy's own computation (bit-identical to
    ``ndimage.zoom`` / ``affine_transform`` on the float32 input); for orders >= 2 the spline prefilter is kept in
    float32 rather than scipy's float64 (differences of the order of float32 rounding). ``truncate_to``
    (``"int32"``: TotalSegmentator's ``change_spacing(..., dtype=np.int32)``) interpolates in float64 slab by slab
    and truncates before storing, so that with order 0 or 1 the values are exactly TotalSegmentator's. Memory: the
    output, one 16 MiB slab per thread and, for order >= 2, one padded float32 channel. An image already at the
    target spacing (the tool's skip rule, :func:`needs_resampling`) comes back unchanged, as float32, with its own
    spacing. Deterministic for any ``threads``.
    """
    if method not in RESAMPLE_METHODS:
        raise ValueError(f"resample method {method!r}: one of {RESAMPLE_METHODS}")
    if not 0 <= int(order) <= 5:
        raise ValueError(f"spline order {order}: 0 to 5")
    if truncate_to not in (None, "int16", "int32", "int64"):
        raise ValueError(f"truncate_to {truncate_to!r}: None, int16, int32 or int64")
    a = np.asarray(arr)
    squeeze = a.ndim == 3
    if squeeze:
        a = a[None]
    if a.ndim != 4:
        raise ValueError(f"image of shape {a.shape}: (C, X, Y, Z) or (X, Y, Z)")
    a = np.asarray(a, dtype=np.float32)
    sp, tg = _as_spacing(spacing_xyz, "spacing"), _as_spacing(target_spacing_xyz, "target spacing")
    if not needs_resampling(sp, tg, method):
        return (a[0] if squeeze else a), tuple(float(s) for s in sp)
    shape_in = a.shape[1:]
    shape = resampled_shape(shape_in, sp, tg, method)
    if method == "ndimage_zoom":
        # scipy.ndimage.zoom, grid_mode=False: (n_in - 1) / (n_out - 1), 1 where the output has one voxel
        matrix = np.array([(ni - 1) / (no - 1) if no > 1 else 1.0 for ni, no in zip(shape_in, shape)])
    else:
        matrix = tg / sp
    out = np.empty((a.shape[0], *shape), dtype=np.float32)
    for c in range(a.shape[0]):
        if order > 1:
            src, offset = _spline_coefficients(a[c], int(order)), np.full(3, float(_SPLINE_PAD))
        else:
            src, offset = a[c], np.zeros(3)
        _interpolate(src, matrix, offset, out[c], int(order), threads, truncate_to)
        del src
    return (out[0] if squeeze else out), tuple(float(s) for s in tg)


def resample_labels_back(labels: np.ndarray, target_shape: Sequence[int], order: int = 0, *,
                         method: str = "ndimage_zoom", spacing_xyz: Sequence[float] | None = None,
                         target_spacing_xyz: Sequence[float] | None = None) -> np.ndarray:
    """A label map on the tool's resampled grid back onto the input grid (``target_shape``, exactly), nearest
    neighbour, in the label map's dtype.

    ``ndimage_zoom`` (TotalSegmentator, ``nnunet.py`` ``nnUNet_predict_image`` ->
    ``change_spacing(img_pred, resample, img_in_shape, order=0, ...)``: ``zoom = target_shape / shape``,
    ``scipy.ndimage.zoom(order=0, mode="nearest")``, corner-aligned: input-grid voxel ``j`` takes label voxel
    ``round(j * (n_m - 1) / (n_s - 1))``; needs no spacing).

    ``tptbox_resample_from_to`` (TotalVibeSegmentator, ``seg_nii.resample_from_to_(og_nii, mode="nearest")``;
    TPTBox ``NII.resample_from_to_`` passes ``align_corners=False`` to ``_resample_from_to``, so the voxel centres
    of the two affines are matched, ``scipy.ndimage.affine_transform(order=0, mode="nearest")``): voxel 0 of both
    grids is the same point (``NII.rescale`` kept it), so input-grid voxel ``j`` takes label voxel
    ``round(j * s / m)`` (``s``: ``target_spacing_xyz``, the input grid's spacing; ``m``: ``spacing_xyz``, the
    label map's). The same in either direction of an axis, so flips between the scan's and the model's orientation
    do not matter. Where ``j * s / m`` falls exactly half-way between two voxels, TPTBox's choice depends on the
    float rounding of its world affines (their origins); this function rounds such ties up, as scipy does for an
    exact coordinate.
    """
    if int(order) != 0:
        raise ValueError("label maps go back with order 0 (nearest neighbour); interpolating label ids mixes classes")
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise ValueError(f"label map of shape {lab.shape}: (X, Y, Z)")
    tshape = tuple(int(n) for n in target_shape)
    if len(tshape) != 3 or any(n < 1 for n in tshape):
        raise ValueError(f"target shape {tuple(target_shape)}: three positive sizes")
    if method == "ndimage_zoom":
        zoom = np.array(tshape, dtype=np.float64) / np.array(lab.shape, dtype=np.float64)
        out = ndimage.zoom(lab, zoom, order=0, mode="nearest")
        if out.shape != tshape:        # cannot happen with scipy's rule round(n * t / n); kept as a guard
            raise RuntimeError(f"zoom gave {out.shape}, not {tshape}")
        return out
    if method != "tptbox_resample_from_to":
        raise ValueError(f"labels-back method {method!r}: one of {LABELS_BACK_METHODS}")
    if spacing_xyz is None or target_spacing_xyz is None:
        raise ValueError("tptbox_resample_from_to needs spacing_xyz (the label map's) and target_spacing_xyz "
                         "(the input grid's)")
    m, s = _as_spacing(spacing_xyz, "spacing"), _as_spacing(target_spacing_xyz, "target spacing")
    if lab.shape == tshape and np.allclose(m, s, rtol=0, atol=1e-6):
        return lab.copy()                  # TPTBox: "resample_from_to skipped; already in space"
    # a 2-D (diagonal) matrix: scipy's general path, as TPTBox calls it (coordinates matrix @ o + offset)
    return ndimage.affine_transform(lab, np.diag(s / m), offset=np.zeros(3), output_shape=tshape, order=0,
                                    mode="nearest", prefilter=False)


def rescale_intensity(arr: np.ndarray, rule: IntensityRule | str, *, copy: bool = True) -> np.ndarray:
    """Apply a tool's intensity rule to a ``(C, X, Y, Z)`` (or ``(X, Y, Z)``: one channel) float32 image.

    ``squash_max`` (TotalVibeSegmentator ``inference_nnunet.py`` ``squash_so_it_fits_in_float16``, per input image:
    ``m = x.max(); if m > 10000: x /= m / 1000``, then ``run_inference``'s ``astype(np.float16)``): channels whose
    maximum is strictly above the threshold end with maximum ``new_max``; others are untouched apart from the cast.
    ``truncate`` (TotalSegmentator ``change_spacing(..., dtype=np.int32)``: ``astype(np.int32)``): truncation toward
    zero, kept as float32. ``rule`` may be a rule or the name of a :data:`PREPROCESSING` entry. With
    ``copy=False`` a float32 input is changed in place."""
    if isinstance(rule, str):
        rule = PREPROCESSING[rule].intensity
    a = np.array(arr, dtype=np.float32, copy=True) if copy else np.asarray(arr, dtype=np.float32)
    if rule.kind == "none":
        return a
    chans = a[None] if a.ndim == 3 else a
    if rule.kind == "truncate":
        info = np.iinfo(np.dtype(rule.cast))
        np.trunc(chans, out=chans)
        np.clip(chans, info.min, info.max, out=chans)
        return a
    for c in range(chans.shape[0]):
        ch = chans[c]
        if ch.size == 0:
            continue
        peak = float(ch.max())
        if peak > rule.threshold:
            np.divide(ch, np.float32(peak / rule.new_max), out=ch)
    if rule.cast == "float16":
        for c in range(chans.shape[0]):          # one channel at a time: no float16 copy of the whole stack
            chans[c] = chans[c].astype(np.float16)
    elif rule.cast is not None:
        info = np.iinfo(np.dtype(rule.cast))
        np.trunc(chans, out=chans)
        np.clip(chans, info.min, info.max, out=chans)
    return a


# --------------------------------------------------------------------------------------------------------------
# The steps of a preset, composed


def preprocess_image(plan: ToolPreprocessing, arr: np.ndarray, spacing_xyz: Sequence[float],
                     plans_spacing_xyz: Sequence[float] | None = None, *,
                     threads: int = 1) -> tuple[np.ndarray, tuple[float, float, float], dict]:
    """The tool's steps before nnU-Net on an image already in the model's orientation: its resampling (if any)
    and its intensity rule, in the tool's order. Returns the image, its spacing (the one to hand nnU-Net) and a
    JSON-able record (``resampled``, shapes, spacings, ``intensity`` applied or not)."""
    a = np.asarray(arr, dtype=np.float32)
    sp = tuple(float(s) for s in _as_spacing(spacing_xyz, "spacing"))
    target = plan.target_spacing(plans_spacing_xyz)
    resampled = bool(target is not None and needs_resampling(sp, target, plan.resample_method))
    record = {"preprocessing": plan.name, "shape_in": list(a.shape[-3:]), "spacing_in": list(sp),
              "resampled": resampled}
    out, out_sp = a, sp
    rule = plan.intensity
    apply = rule.kind != "none" and (resampled or not rule.only_if_resampled)
    fused = apply and resampled and rule.kind == "truncate"        # truncated slab by slab, from float64
    if resampled:
        out, out_sp = resample_image(a, sp, target, plan.image_order, method=plan.resample_method, threads=threads,
                                     truncate_to=rule.cast if fused else None)
    if apply and not fused:
        out = rescale_intensity(out, rule, copy=out is a)
    record.update(shape_out=list(out.shape[-3:]), spacing_out=list(out_sp), intensity=plan.intensity.kind if apply
                  else "none")
    return out, out_sp, record


def labels_to_original(plan: ToolPreprocessing, labels: np.ndarray, original_shape: Sequence[int], *,
                       spacing_xyz: Sequence[float], original_spacing_xyz: Sequence[float]) -> np.ndarray:
    """The tool's way back: the label map nnU-Net returned on the resampled grid, onto the grid the image had
    before :func:`preprocess_image` (still in the model's orientation). A plan that does not resample returns the
    map as it is (nnU-Net's export already put it on the input grid)."""
    lab = np.asarray(labels)
    shape = tuple(int(n) for n in original_shape)
    if plan.labels_back_method is None:
        if lab.shape != shape:
            raise ValueError(f"label map {lab.shape} is not on the input grid {shape}, and {plan.name} does not "
                             "resample")
        return lab
    return resample_labels_back(lab, shape, plan.labels_back_order, method=plan.labels_back_method,
                                spacing_xyz=spacing_xyz, target_spacing_xyz=original_spacing_xyz)


def describe(preset_name: str | None) -> dict:
    """``plan_for(preset_name).to_dict()`` with the source snapshots it was read from: for a manifest's options or
    a run's metadata."""
    plan = plan_for(preset_name)
    keys = {"totalvibesegmentator": ("totalvibesegmentator", "tptbox")}.get(plan.name, (plan.name,))
    return {**plan.to_dict(), "sources": {k: SOURCES[k] for k in keys if k in SOURCES}}


__all__ = ["IntensityRule", "LABELS_BACK_METHODS", "PREPROCESSING", "PRESET_TOOL", "RESAMPLE_METHODS", "SOURCES",
           "ToolPreprocessing", "describe", "labels_to_original", "needs_resampling", "plan_for",
           "preprocess_image", "resample_image", "resample_labels_back", "resampled_shape", "rescale_intensity"]
