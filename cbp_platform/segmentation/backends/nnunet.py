"""The ``nnunetv2`` backend: a trained nnU-Net v2 model folder, run with nnU-Net's own predictor.

A trained-model folder is what nnU-Net writes and what MRSegmentator, TotalVibeSegmentator and TotalSegmentator
ship::

    <folder>/dataset.json                 channel names, label names -> ids
    <folder>/plans.json                   configurations (spacing, network), normalisation, image reader
    <folder>/fold_<k>/checkpoint_final.pth   the weights of fold k (one fold, or several for an ensemble)

What the platform reads from the folder, never assumes: the channel count (``dataset.json``), the label ids
(``dataset.json``, checked against the manifest), the configuration's spacing (``plans.json``; nnU-Net resamples
to it itself), and the orientation where the model states it: an ``orientation`` entry of its ``dataset.json``
(TotalVibeSegmentator's convention), or a reader that reorients (``NibabelIOWithReorient``: RAS). Readers that keep
the stored voxel order (``SimpleITKIO``, ``NibabelIO``) leave the orientation to the training data, so it comes from
the preset's public source (the orientation the model's own inference code produces) or from the operator.

Inference: :class:`nnUNetPredictor` with nnU-Net's own preprocessing (cropping, normalisation, resampling) and
export resampling, sliding window with Gaussian weighting, the folds' logits averaged. The network is built from
the plans with ``get_network_from_plans`` and handed to ``manual_initialization``: nnU-Net's lookup of the trainer
class by name (``recursive_find_trainer_class_by_name``) imports every trainer variant until one matches, and some
variants import timm and torchvision, whose PyPI wheels do not import next to the CPU torch. Building from the plans
works whatever trainer name a checkpoint records. Mirroring test-time augmentation keeps the checkpoint's allowed
axes except the left-right axis: the platform's classes are lateral, and nnU-Net averages mirrored logits without
exchanging left and right.

The model is loaded once (``NnunetRunner``) and predicts every scan of a batch. Nothing here opens a socket.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import torch

from cbp_platform.classes import BACKGROUND
from cbp_platform.segmentation.data import (box_in_model, from_model_orientation, ornt_to_model,
                                            spacing_in_model_orientation, to_model_orientation)
from cbp_platform.segmentation.manifest import (ManifestError, ModelManifest, hash_weights, valid_orientation,
                                                verify_weights)

CHECKPOINT = "checkpoint_final.pth"
REORIENTING_READERS = {"NibabelIOWithReorient": "RAS"}     # readers that reorient: the orientation they produce
STORED_ORDER_READERS = ("SimpleITKIO", "NibabelIO", "Tiff3DIO")


def version() -> str:
    from importlib.metadata import version as v

    return v("nnunetv2")


def _import_nnunet():
    """nnU-Net prints a warning per unset nnUNet_* path variable on import; those paths are for training and
    planning, not for a predictor given its folder, so the import stays quiet."""
    with contextlib.redirect_stdout(io.StringIO()):
        import nnunetv2.inference.predict_from_raw_data as pred
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    return pred.nnUNetPredictor, get_network_from_plans, determine_num_input_channels, PlansManager


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ManifestError(f"{path}: missing (an nnU-Net v2 model folder has dataset.json, plans.json and "
                            f"fold_<k>/{CHECKPOINT})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None


def _folds(folder: Path, folds: list | tuple | None, checkpoint: str) -> list[str]:
    found = sorted(p.name.removeprefix("fold_") for p in folder.glob("fold_*") if (p / checkpoint).is_file())
    if folds:
        want = [str(f) for f in folds]
        missing = [f for f in want if f not in found]
        if missing:
            raise ManifestError(f"{folder / f'fold_{missing[0]}' / checkpoint}: missing (folds requested: "
                                f"{', '.join(want)}; found: {', '.join(found) or 'none'})")
        return want
    if not found:
        others = sorted({p.name for p in folder.glob("fold_*/*.pth")})
        raise ManifestError(f"{folder}: no fold_<k>/{checkpoint} found"
                            + (f" (the folds hold {', '.join(others)}: name one with --checkpoint)" if others else ""))
    return found


def describe(folder: str | Path, *, name: str, labels: dict[int, str], inputs: tuple[str, ...],
             orientation: str = "", orientation_key: str = "", folds: list | tuple | None = None,
             configuration: str = "", checkpoint: str = CHECKPOINT, preset: str = "",
             label_names: dict[int, str] | None = None, source: dict | None = None,
             roi: bool = False, preprocessing: str = "nnunet") -> ModelManifest:
    """Read and check an nnU-Net v2 model folder; the manifest to register.

    ``labels``: the model's label id -> platform class; ``label_names``: the names those ids must carry in the
    folder's ``dataset.json`` (a preset's label table), checked so that a folder of another model or version fails.
    ``roi``: run the model on the region the platform's own model locates (:mod:`cbp_platform.segmentation.roi`).
    ``preprocessing``: the tool whose own steps around nnU-Net the runner copies (:mod:`.tool_preprocessing`:
    a preset's tool, or ``nnunet``), recorded in the manifest's options with its sources.
    """
    from cbp_platform.segmentation.backends.tool_preprocessing import describe as describe_steps

    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise ManifestError(f"{folder}: model folder not found")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+\.pth", checkpoint or "") or checkpoint.startswith("."):
        raise ManifestError(f"checkpoint {checkpoint!r}: give the file name of each fold's checkpoint, e.g. "
                            f"{CHECKPOINT} or checkpoint_best.pth (no path)")
    ds = _read_json(folder / "dataset.json")
    plans = _read_json(folder / "plans.json")
    ds_labels = ds.get("labels")
    if not isinstance(ds_labels, dict):
        raise ManifestError(f"{folder / 'dataset.json'}: no 'labels' table")
    by_id = {}
    for lname, lid in ds_labels.items():
        if isinstance(lid, int):
            by_id[lid] = lname
    for lid, cls in sorted(labels.items()):
        if lid not in by_id:
            raise ManifestError(f"{folder / 'dataset.json'}: label {lid} (for {cls}) missing; the folder has "
                                f"{len(by_id)} labels, ids {min(by_id, default=0)}-{max(by_id, default=0)}")
        if label_names and label_names.get(lid) and _norm(by_id[lid]) != _norm(label_names[lid]):
            raise ManifestError(f"{folder / 'dataset.json'}: label {lid} is {by_id[lid]!r}, the preset expects "
                                f"{label_names[lid]!r} (another model or version? register it without the preset, "
                                "with --label for each class, if the mapping is known)")
    channels = ds.get("channel_names") or ds.get("modality") or {}
    if len(channels) != len(inputs):
        raise ManifestError(f"{folder / 'dataset.json'}: the model takes {len(channels)} channel(s) "
                            f"({', '.join(map(str, channels.values()))}), the manifest feeds {len(inputs)} "
                            f"({', '.join(inputs)})")
    confs = plans.get("configurations") or {}
    use_folds = _folds(folder, folds, checkpoint)
    ckpt = folder / f"fold_{use_folds[0]}" / checkpoint
    meta = _load_checkpoint(ckpt)
    for f in use_folds:            # every fold readable, with weights, from the same configuration
        other = meta if f == use_folds[0] else _load_checkpoint(folder / f"fold_{f}" / checkpoint)
        path = folder / f"fold_{f}" / checkpoint
        if "network_weights" not in other:
            raise ManifestError(f"{path}: no 'network_weights' in the checkpoint (not an nnU-Net v2 checkpoint?)")
        if other.get("init_args", {}).get("configuration") != meta.get("init_args", {}).get("configuration"):
            raise ManifestError(f"{path}: trained with configuration "
                                f"{other.get('init_args', {}).get('configuration')!r}, fold {use_folds[0]} with "
                                f"{meta.get('init_args', {}).get('configuration')!r}: not one ensemble")
        del other
    conf = configuration or meta.get("init_args", {}).get("configuration", "")
    if conf not in confs:
        raise ManifestError(f"{folder / 'plans.json'}: configuration {conf!r} (from {ckpt.name}) not among "
                            f"{', '.join(confs) or 'none'}")
    reader = str(plans.get("image_reader_writer", ""))
    if orientation_key and ds.get(orientation_key):
        stated = "".join(str(c) for c in ds[orientation_key]).upper()
        if not valid_orientation(stated):
            raise ManifestError(f"{folder / 'dataset.json'}: {orientation_key!r} is {ds[orientation_key]!r}, not "
                                "three axis codes")
        orientation, how = stated, f"dataset.json {orientation_key}"
    elif reader in REORIENTING_READERS:
        declared = REORIENTING_READERS[reader]
        if orientation and orientation.upper() != declared:
            raise ManifestError(f"{folder / 'plans.json'}: its reader {reader} reorients to {declared}, not the "
                                f"given orientation {orientation}")
        orientation, how = declared, f"plans.json image_reader_writer {reader}"
    elif not orientation and orientation_key:
        raise ManifestError(f"{folder / 'dataset.json'}: no {orientation_key!r} entry, and its reader "
                            f"{reader or '(none)'} keeps the stored voxel order: the orientation of the model's "
                            "training data cannot be established (the tool itself does not reorient without the "
                            "entry); state it with --orientation if it is known")
    elif not orientation:
        raise ManifestError(f"{folder / 'plans.json'}: its reader {reader or '(none)'} keeps the stored voxel order, "
                            "so the orientation of the model's training data must be given (a preset's, or "
                            "--orientation)")
    else:
        how = "preset or operator (the reader keeps the stored voxel order)"
    spacing = _spacing_ijk(plans, conf)
    rel = [f"fold_{f}/{checkpoint}" for f in use_folds]
    return ModelManifest(
        name=name, backend="nnunetv2", backend_version=version(), folder=str(folder), inputs=tuple(inputs),
        labels=dict(labels), spacing_mm=spacing, orientation=orientation.upper(), weights=hash_weights(folder, rel),
        preset=preset,
        options={"configuration": conf, "folds": use_folds, "checkpoint": checkpoint, "roi": bool(roi),
                 "preprocessing": describe_steps(preprocessing),
                 "trainer_name": str(meta.get("trainer_name", "")), "image_reader_writer": reader,
                 "mirror_axes": (None if meta.get("inference_allowed_mirroring_axes") is None
                                 else [int(a) for a in meta["inference_allowed_mirroring_axes"]]),
                 "model_label_names": {str(k): by_id[k] for k in sorted(labels)}},
        source={"spacing": f"plans.json configurations.{conf}.spacing", "orientation": how,
                "labels": "dataset.json labels, mapped by the preset or operator", **(source or {})})


def describe_registration(req) -> ModelManifest:
    """``cbp model register`` for an nnU-Net folder (``req``: :class:`~cbp_platform.segmentation.backends.
    Registration`): labels, inputs, orientation, folds and configuration from the operator, else from the preset."""
    p = req.preset
    labels = req.labels or (dict(p.labels) if p else None)
    inputs = tuple(req.inputs or (p.inputs if p else ()))
    if not labels or not inputs:
        raise ManifestError(f"{req.folder}: an nnunetv2 model without a preset needs its labels "
                            "(--label CLASS=ID for every platform class) and inputs (--inputs)")
    return describe(req.folder, name=req.name, labels=labels, inputs=inputs,
                    orientation=req.orientation or (p.orientation if p else ""),
                    orientation_key="" if req.orientation else (p.orientation_key if p else ""),
                    folds=req.folds or (p.folds if p else None),
                    configuration=req.configuration or (p.configuration if p else ""), preset=req.preset_name,
                    checkpoint=req.checkpoint or CHECKPOINT,
                    label_names=dict(p.label_names) if p else None,
                    source={"preset": p.citation} if p else {"labels": "operator (cbp model register)"},
                    roi=(p is not None) if req.roi is None else bool(req.roi),
                    preprocessing=req.preset_name or "nnunet")


def load_runner(manifest: ModelManifest, *, device: str = "auto", sw_batch_size: int = 2) -> "NnunetRunner":
    """The backend's runner (nnU-Net's predictor tiles by itself: ``sw_batch_size`` does not apply)."""
    return NnunetRunner(manifest, device=device)


def _norm(label_name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(label_name).lower())


def _spacing_ijk(plans: dict, conf: str) -> tuple[float, float, float]:
    """The configuration's spacing along the image's voxel axes i, j, k. nnU-Net arrays are (k, j, i) (SimpleITK
    order), and the plans' spacing follows ``transpose_forward`` of those axes."""
    c = plans["configurations"][conf]
    sp = c.get("spacing")
    if sp is None and c.get("inherits_from"):
        return _spacing_ijk(plans, c["inherits_from"])
    tf = plans.get("transpose_forward", [0, 1, 2])
    arr = [0.0, 0.0, 0.0]
    for t, a in enumerate(tf):
        arr[a] = float(sp[t])
    return (arr[2], arr[1], arr[0])


def _load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents. ``weights_only`` first; nnU-Net's own checkpoints need full unpickling (their
    ``init_args`` hold a ``torch.device`` and numpy values). At registration the operator vouches for the folder;
    at every later use the file is unpickled only after its sha256 matched the registration."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ManifestError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None


class NnunetRunner:
    """One loaded nnU-Net model (every fold of the manifest) that segments scans one after another."""

    def __init__(self, manifest: ModelManifest, device: str = "auto", tile_step_size: float | None = None,
                 mirroring: bool | None = None):
        """``tile_step_size`` and ``mirroring``: default the tool's own (the manifest's ``preprocessing``)."""
        from cbp_platform.segmentation.backends.tool_preprocessing import ToolPreprocessing, plan_for
        from cbp_platform.segmentation.infer import pick_device

        rec = dict(manifest.options.get("preprocessing") or {})
        rec.pop("sources", None)
        self.steps = ToolPreprocessing.from_dict(rec) if rec else plan_for("nnunet")
        tile_step_size = self.steps.tile_step_size if tile_step_size is None else tile_step_size
        mirroring = self.steps.use_mirroring if mirroring is None else mirroring

        verify_weights(manifest)
        self.manifest = manifest
        self.device = pick_device(device)
        nnUNetPredictor, get_network_from_plans, determine_num_input_channels, PlansManager = _import_nnunet()
        folder = Path(manifest.folder)
        ds = _read_json(folder / "dataset.json")
        plans = PlansManager(_read_json(folder / "plans.json"))
        opts = manifest.options
        cm = plans.get_configuration(opts["configuration"])
        n_in = determine_num_input_channels(plans, cm, ds)
        if n_in != len(manifest.inputs):
            raise ManifestError(f"{folder / 'dataset.json'}: {n_in} input channels, the manifest feeds "
                                f"{len(manifest.inputs)}")
        n_out = plans.get_label_manager(ds).num_segmentation_heads
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, n_in, n_out, allow_init=False,
                                     deep_supervision=False)
        params = []
        for rel in sorted(manifest.weights):
            ck = _load_checkpoint(folder / rel)
            if "network_weights" not in ck:
                raise ManifestError(f"{folder / rel}: no 'network_weights' in the checkpoint")
            params.append(ck["network_weights"])
        try:
            net.load_state_dict(params[0])
        except RuntimeError as exc:
            raise ManifestError(f"{folder / sorted(manifest.weights)[0]}: weights do not fit the network of "
                                f"plans.json ({str(exc)[:200]})") from None
        axes = opts.get("mirror_axes")
        if axes is not None:
            lr_array_axis = 2 - [c in "LR" for c in manifest.orientation].index(True)   # arrays are (k, j, i)
            tf = list(plans.transpose_forward)
            axes = tuple(a for a in axes if tf[a] != lr_array_axis)
        use_mirroring = bool(mirroring and axes)
        with contextlib.redirect_stdout(io.StringIO()):
            self.predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True,
                                             use_mirroring=use_mirroring,
                                             perform_everything_on_device=self.device.type == "cuda",
                                             device=self.device, verbose=False, verbose_preprocessing=False,
                                             allow_tqdm=False)
        self.predictor.manual_initialization(net.to(self.device).eval(), plans, cm, params, ds,
                                             opts.get("trainer_name") or "nnUNetTrainer", axes)
        self.mirror_axes = axes if use_mirroring else ()
        self.plans, self.cm = plans, cm
        if self.predictor.label_manager.has_regions:
            raise ManifestError(f"{folder / 'dataset.json'}: a region-based nnU-Net model (its labels are regions); "
                                "the platform's export takes one class per voxel")
        self.last_tiles, self.last_context_mm = (0, 0), None
        self.last_accumulator = None        # the streamed run's logit buffer: planes held, planes of the run, MB
        from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

        self._crop_to_nonzero = crop_to_nonzero
        self._preprocessor = DefaultPreprocessor(verbose=False)
        self.lut = np.zeros(max(max(manifest.labels) + 1, n_out), np.uint8)
        for model_id, platform_id in manifest.classes.items():
            self.lut[model_id] = platform_id

    def prepare(self, water: np.ndarray, fat: np.ndarray, affine: np.ndarray) -> dict:
        """CPU-side work (in DataLoader workers): the manifest's contrasts in channel order, in the model's
        orientation, through the tool's own steps (:mod:`.tool_preprocessing`; none for nnU-Net's default) and
        nnU-Net's own preprocessing of the whole volume (``DefaultPreprocessor.run_case_npy``:
        ``transpose_forward``, ``crop_to_nonzero``, the plans' normalisation, the resampling to the plans' spacing).
        :meth:`predict` then runs the network on the whole volume or on a region of it."""
        from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

        from cbp_platform.segmentation.backends.tool_preprocessing import preprocess_image

        img = contrast_stack(self.manifest.inputs, water, fat)
        fwd = ornt_to_model(affine, self.manifest.orientation)
        img, back = to_model_orientation(img, affine, self.manifest.orientation)
        spacing = spacing_in_model_orientation(affine, self.manifest.orientation)
        shape_ijk = img.shape[1:]
        img, (si, sj, sk), record = preprocess_image(self.steps, img, spacing, self.manifest.spacing_mm)
        data = np.ascontiguousarray(img.transpose(0, 3, 2, 1))          # nnU-Net's (k, j, i) order
        model_shape = tuple(int(n) for n in img.shape[1:])
        del img
        tf = list(self.plans.transpose_forward)
        data = data.transpose([0, *[t + 1 for t in tf]])
        shape_t = data.shape[1:]
        data, seg, bbox = self._crop_to_nonzero(data)
        data = self._preprocessor._normalize(data, seg, self.cm, self.plans.foreground_intensity_properties_per_channel)
        del seg
        spacing_t = [[sk, sj, si][t] for t in tf]
        shape_crop = tuple(int(n) for n in data.shape[1:])
        data = self.cm.resampling_fn_data(data, compute_new_shape(shape_crop, spacing_t, self.cm.spacing), spacing_t,
                                          self.cm.spacing)
        return {"data": np.ascontiguousarray(data, np.float32), "bbox": [list(map(int, b)) for b in bbox],
                "shape_t": tuple(int(n) for n in shape_t), "shape_crop": shape_crop, "spacing": [sk, sj, si],
                "back": back, "fwd": fwd, "scan_shape": tuple(int(n) for n in np.shape(water)),
                "model_shape_in": tuple(shape_ijk), "model_spacing_in": tuple(spacing), "model_shape": model_shape,
                "steps": record, "affine": np.asarray(affine)}

    def predict(self, prepared: dict, region=None) -> np.ndarray:
        """The platform's label map on the scan's grid; with ``region`` (:class:`cbp_platform.segmentation.roi.
        Region`), only the whole-volume run's own tiles that reach the region are run, and only the region is
        labelled (background elsewhere): inside it, the label map is the whole-volume run's (:meth:`_run`)."""
        return self._run(prepared, with_uncertainty=False, region=region)[0]

    def predict_qc(self, prepared: dict, region=None) -> tuple[np.ndarray, float]:
        """:meth:`predict`'s label map and nnU-Net's uncertainty over it: the mean normalised entropy of its
        probabilities (averaged over its mirrored passes and folds) over the voxels mapped to a platform muscle."""
        return self._run(prepared, with_uncertainty=True, region=region)

    @property
    def patch_mm(self) -> tuple[float, float, float]:
        """The network's patch extent (mm) along the model orientation's i, j, k axes."""
        tf = list(self.plans.transpose_forward)
        kji = [0.0, 0.0, 0.0]
        for t, (n, s) in enumerate(zip(self.cm.patch_size, self.cm.spacing)):
            kji[tf[t]] = float(n) * float(s)
        return (kji[2], kji[1], kji[0])

    def _box_in_data(self, prepared: dict, box) -> tuple[slice, ...]:
        """A scan-space box (slices along the scan's i, j, k) as slices of the non-zero box nnU-Net cropped
        (``prepared['shape_crop']``, before its resampling)."""
        model_ijk = box_in_model(box, prepared["scan_shape"], prepared["fwd"])
        if prepared["model_shape"] != prepared["model_shape_in"]:      # the tool resampled: the same box, scaled
            model_ijk = tuple(slice(max(int(np.floor(b.start * n / n0)) - 1, 0),
                                    min(int(np.ceil(b.stop * n / n0)) + 1, n))
                              for b, n, n0 in zip(model_ijk, prepared["model_shape"], prepared["model_shape_in"]))
        kji = model_ijk[::-1]
        tf = list(self.plans.transpose_forward)
        out = []
        for t in range(3):
            lo, hi = kji[tf[t]].start, kji[tf[t]].stop
            b0, b1 = prepared["bbox"][t]
            out.append(slice(min(max(lo - b0, 0), b1 - b0), min(max(hi - b0, 0), b1 - b0)))
        return tuple(out)

    def _region_plan(self, prepared: dict, region) -> dict | None:
        """Which of the whole-volume run's tiles reach ``region`` (None: the whole volume, every tile), and where:
        the region as a box of the cropped input grid (``box``), the box of the model grid its export reads
        (``need``), the tiles (nnU-Net's own slicers over the whole resampled volume) that overlap it and their
        union (``union``). None when the volume cannot be streamed: a volume smaller than the patch (nnU-Net pads
        it), or an export that is not a linear interpolation (a spline's prefilter reaches the whole volume)."""
        from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

        kw = dict(self.cm.configuration.get("resampling_fn_probabilities_kwargs") or {})
        data = np.asarray(prepared["data"])          # a tensor after the DataLoader's default_convert
        n_model = data.shape[1:]
        if (kw.get("order", 1) > 1 or len(self.cm.patch_size) != 3
                or any(n < p for n, p in zip(n_model, self.cm.patch_size))):
            return None
        box = (self._box_in_data(prepared, region.box) if region is not None
               else tuple(slice(0, n) for n in prepared["shape_crop"]))
        if any(b.stop <= b.start for b in box):
            return None
        tf = list(self.plans.transpose_forward)
        spacing_t = [prepared["spacing"][t] for t in tf]
        sep, axis = determine_do_sep_z_and_axis(kw.get("force_separate_z"), self.cm.spacing, spacing_t)
        need = []
        for d, (b, n_in, n_out) in enumerate(zip(box, n_model, prepared["shape_crop"])):
            s = n_in / n_out
            lo, hi = (b.start + 0.5) * s - 0.5, (b.stop - 0.5) * s - 0.5
            need.append(slice(max(int(np.floor(lo)) - 1, 0), min(int(np.floor(hi)) + 3, n_in)))
        every = self.predictor._internal_get_sliding_window_slicers(n_model)
        tiles = [sl for sl in every
                 if all(sl[d + 1].start < need[d].stop and sl[d + 1].stop > need[d].start for d in range(3))]
        union = tuple(slice(min(t[d + 1].start for t in tiles), max(t[d + 1].stop for t in tiles)) for d in range(3))
        return {"box": box, "need": need, "tiles": tiles, "union": union, "separate_axis": axis if sep else None,
                "order": int(kw.get("order", 1)), "n_all": len(every)}

    def _reads(self, plan: dict, n_model, n_out) -> tuple[np.ndarray, np.ndarray]:
        """For each output plane of ``plan['box']`` along the first axis: the lowest and highest model plane its
        export reads (:func:`_resample_box`: linear, or nearest on a separate low-resolution axis; clamped)."""
        s = n_model[0] / n_out[0]
        c = (np.arange(plan["box"][0].start, plan["box"][0].stop) + 0.5) * s - 0.5
        if plan["separate_axis"] == 0:
            lo = hi = np.floor(c + 0.5)
        else:
            lo, hi = np.floor(c), np.floor(c) + 1
        top = n_model[0] - 1
        return np.clip(lo, 0, top).astype(int), np.clip(hi, 0, top).astype(int)

    def _stream(self, data: np.ndarray, plan: dict, n_out, with_uncertainty: bool):
        """nnU-Net's sliding window, Gaussian weighting, fold average and export over ``plan``'s tiles, streamed
        along the model grid's first axis; returns the box's model labels (the argmax, :func:`export_argmax`) and
        the sum and count of the normalised entropy over the voxels mapped to a platform muscle.

        nnU-Net accumulates every tile's logits into one half-precision array of classes x the whole volume, per
        fold, divides by the Gaussian weights' sum, checks it for inf (a boolean copy as large), and only then
        exports. Its tiles come in order of their start along the first axis (``_internal_get_sliding_window_
        slicers``), so once every tile starting at ``sx`` has run, no later tile touches a plane below the next
        start: those planes are final. Here the accumulator holds only the planes still open, about one patch
        (``last_accumulator``); each plane, once final, is divided, checked, fold-averaged (the folds' halves
        added in nnU-Net's order, then divided by the fold count) and exported as soon as the interpolation's
        reads are final. Every operation on a voxel is nnU-Net's, in nnU-Net's order and dtype, so the label map
        is nnU-Net's, voxel for voxel; the tiles of a group run once per fold (the fold's weights loaded per
        group)."""
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian

        pred = self.predictor
        res = self.device if pred.perform_everything_on_device else torch.device("cpu")
        u, box, tiles = plan["union"], plan["box"], plan["tiles"]
        n_model = data.shape[1:]
        lo_read, hi_read = self._reads(plan, n_model, n_out)
        heads = pred.label_manager.num_segmentation_heads
        folds = pred.list_of_parameters
        p0 = int(self.cm.patch_size[0])
        cap = p0 + 2
        size = (cap, u[1].stop - u[1].start, u[2].stop - u[2].start)
        acc = [torch.zeros((heads, *size), dtype=torch.half, device=res) for _ in folds]
        n_pred = torch.zeros(size, dtype=torch.half, device=res)
        gaussian = (compute_gaussian(tuple(self.cm.patch_size), sigma_scale=1. / 8, value_scaling_factor=10,
                                     device=res) if pred.use_gaussian else 1)
        self.last_accumulator = (cap, u[0].stop - u[0].start,
                                 round(len(folds) * heads * float(np.prod(size)) * 2 / 2**20, 1))
        net = getattr(pred.network, "_orig_mod", pred.network)
        source = torch.from_numpy(data)
        labels = np.zeros(tuple(b.stop - b.start for b in box), np.uint8)
        state = {"w0": u[0].start, "final": u[0].start, "out": 0, "esum": 0.0, "ecount": 0}
        autocast = torch.autocast(self.device.type) if self.device.type == "cuda" else contextlib.nullcontext()

        def settle(final: int):
            """Planes [state final, final) are complete: divide, check, average the folds, export what can be."""
            w0, a, b = state["w0"], state["final"] - state["w0"], final - state["w0"]
            if b > a:
                for f in range(len(folds)):
                    for c in range(heads):          # class by class: no temporary of the buffer's size
                        rows = acc[f][c, a:b]
                        torch.div(rows, n_pred[a:b], out=rows)
                        if torch.any(torch.isinf(rows)):
                            raise RuntimeError("nnU-Net's logits overflowed half precision (inf) in the sliding "
                                               "window: nnU-Net itself aborts on this")
                        if f:
                            acc[0][c, a:b] += rows
                if len(folds) > 1:
                    for c in range(heads):
                        acc[0][c, a:b] /= len(folds)
                state["final"] = final
            o0 = state["out"]
            o1 = o0
            while o1 < len(hi_read) and (hi_read[o1] < final or final >= u[0].stop):
                o1 += 1
            if o1 > o0:
                sub = dict(plan, union=(slice(w0, final), u[1], u[2]),
                           box=(slice(box[0].start + o0, box[0].start + o1), box[1], box[2]))
                chunk = acc[0][:, :final - w0].to("cpu")
                seg, entropy = export_argmax(lambda c: _resample_box(chunk[c], sub, n_model, n_out), heads,
                                             with_entropy=with_uncertainty)
                lab = self._platform_labels(seg)
                labels[o0:o1] = lab
                if with_uncertainty:
                    muscle = lab > 0
                    state["esum"] += float(entropy[muscle].sum(dtype=np.float64))
                    state["ecount"] += int(np.count_nonzero(muscle))
                state["out"] = o1
            # keep the planes from the lowest one a pending output plane reads; shift them to the buffer's top
            keep = min(int(lo_read[o1]), final) if o1 < len(lo_read) else final
            k = keep - w0
            if k > 0:
                for t in [n_pred, *(buf[c] for buf in acc for c in range(heads))]:     # planes, in-plane
                    t[:cap - k] = t[k:].clone()
                    t[cap - k:] = 0
                state["w0"] = keep

        with autocast:
            i = 0
            while i < len(tiles):
                sx = tiles[i][1].start
                j = i
                while j < len(tiles) and tiles[j][1].start == sx:
                    j += 1
                settle(sx)
                if sx + p0 - state["w0"] > cap:
                    raise RuntimeError(f"streamed sliding window: planes {state['w0']}..{sx + p0} exceed the "
                                       f"buffer of {cap}")
                for f, params in enumerate(folds):
                    if len(folds) > 1 or i == 0:
                        net.load_state_dict(params)
                    for t in tiles[i:j]:
                        work = torch.clone(source[t][None], memory_format=torch.contiguous_format).to(self.device)
                        prediction = pred._internal_maybe_mirror_and_predict(work)[0].to(res)
                        if pred.use_gaussian:
                            prediction *= gaussian
                        sl = (slice(t[1].start - state["w0"], t[1].stop - state["w0"]),
                              slice(t[2].start - u[1].start, t[2].stop - u[1].start),
                              slice(t[3].start - u[2].start, t[3].stop - u[2].start))
                        for c in range(heads):      # half += float32: nnU-Net's rounding, a class at a time
                            acc[f][(c, *sl)] += prediction[c]
                        del prediction
                        if f == 0:
                            n_pred[sl] += gaussian
                i = j
            settle(u[0].stop)
        return labels, state["esum"], state["ecount"]

    def _platform_labels(self, seg: np.ndarray) -> np.ndarray:
        """The model's labels as the platform's classes (background for any label the manifest does not map)."""
        return np.where(seg < self.lut.size, self.lut[np.clip(seg, 0, self.lut.size - 1)], BACKGROUND).astype(np.uint8)

    @torch.inference_mode()
    def _run(self, prepared: dict, with_uncertainty: bool, region=None) -> tuple[np.ndarray, float | None]:
        """nnU-Net's inference on the prepared volume (its predictor's sliding window over every fold, its export:
        the logits resampled back to the input grid, then the argmax), equal to ``predict_single_npy_array``,
        streamed in bounded memory (:meth:`_stream`). With ``region``: only the tiles of the whole-volume run that
        reach the region, and the export of the region only, with the whole volume's interpolation
        (:func:`_resample_box`): inside the region, the whole-volume run's label map."""
        data = np.asarray(prepared["data"])          # a tensor after the DataLoader's default_convert
        tf = list(self.plans.transpose_forward)
        plan = self._region_plan(prepared, region)
        uncertainty = None
        if plan is None:       # smaller than a patch, or a spline export: nnU-Net's own run of the whole volume
            spacing_t = [prepared["spacing"][t] for t in tf]
            box = tuple(slice(0, n) for n in prepared["shape_crop"])
            with contextlib.redirect_stdout(io.StringIO()):
                logits = self.predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
            resample = self.cm.resampling_fn_probabilities
            channel = lambda c, lg=logits: np.asarray(resample(lg[c:c + 1], prepared["shape_crop"],  # noqa: E731
                                                               self.cm.spacing, spacing_t))[0]
            seg, entropy = export_argmax(channel, int(logits.shape[0]), with_entropy=with_uncertainty)
            del logits
            lab = self._platform_labels(seg)
            if with_uncertainty:
                muscle = lab > 0
                uncertainty = float(entropy[muscle].mean()) if muscle.any() else 1.0
            self.last_tiles, self.last_accumulator = (0, 0), None
        else:
            box = plan["box"]
            lab, esum, ecount = self._stream(data, plan, prepared["shape_crop"], with_uncertainty)
            if with_uncertainty:
                uncertainty = esum / ecount if ecount else 1.0
            self.last_tiles = (len(plan["tiles"]), plan["n_all"])
            self.last_context_mm = _context_mm(plan, data.shape[1:], self.cm.spacing) if region is not None else None
        full_t = np.zeros(prepared["shape_t"], np.uint8)
        full_t[tuple(slice(b[0] + d.start, b[0] + d.stop) for b, d in zip(prepared["bbox"], box))] = lab
        full = full_t.transpose(list(self.plans.transpose_backward)).transpose(2, 1, 0)     # model (i, j, k)
        if full.shape != tuple(prepared["model_shape_in"]):      # the tool's own way back onto the input grid
            from cbp_platform.segmentation.backends.tool_preprocessing import labels_to_original

            full = labels_to_original(self.steps, full, prepared["model_shape_in"],
                                      spacing_xyz=(prepared["spacing"][2], prepared["spacing"][1],
                                                   prepared["spacing"][0]),
                                      original_spacing_xyz=prepared["model_spacing_in"])
        return from_model_orientation(full, np.asarray(prepared["back"])), uncertainty

    def segment(self, water: np.ndarray, fat: np.ndarray, affine: np.ndarray, region=None) -> np.ndarray:
        return self.predict(self.prepare(water, fat, affine), region=region)


def export_argmax(channel, n: int, with_entropy: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """nnU-Net's export of ``n`` logit channels to a label map, one class at a time: ``channel(c)`` gives class
    ``c``'s logits on the output grid (nnU-Net's resampling of that channel alone).

    nnU-Net resamples all C logit channels at once (``resampling_fn_probabilities`` makes a float64 copy of them,
    then a C-channel result) and takes the argmax: for a whole-body scan and a 40-100 class model that is tens of
    GB. Its resampling treats each channel on its own, so one channel after another with a running argmax (a later
    class wins only when strictly greater, as ``argmax`` keeps the first maximum) gives the same label map with two
    channels in memory. With ``with_entropy``, the normalised entropy of the softmax per voxel comes along (online
    log-sum-exp: running maximum, sum of exponentials and their logit-weighted sum), for the QC uncertainty."""
    arg = best = m = s = t = None
    for c in range(n):
        z = channel(c)
        if arg is None:
            arg = np.zeros(z.shape, np.uint8 if n < 256 else np.uint16)
            best = z.copy()
        else:
            upd = z > best
            best[upd] = z[upd]
            arg[upd] = c
        if with_entropy:
            zf = z.astype(np.float32)
            if m is None:
                m, s, t = zf.copy(), np.ones_like(zf), zf.copy()
                continue
            m_new = np.maximum(m, zf)
            scale = np.exp(m - m_new)
            e = np.exp(zf - m_new)
            s = s * scale + e
            t = t * scale + e * zf
            m = m_new
    entropy = None
    if with_entropy:
        entropy = ((m + np.log(s)) - t / s) / np.float32(np.log(n))        # H = logsumexp(z) - E_p[z]
        np.clip(entropy, 0.0, 1.0, out=entropy)
    return arg, entropy


def _context_mm(plan: dict, n_model, spacing) -> float:
    """The smallest reach (mm, model grid) of the region's tiles beyond the region's model-grid box, over the faces
    that are not the scan's own border."""
    reach = []
    for d in range(3):
        need, u = plan["need"][d], plan["union"][d]
        if need.start > 0:
            reach.append((need.start - u.start) * float(spacing[d]))
        if need.stop < n_model[d]:
            reach.append((u.stop - need.stop) * float(spacing[d]))
    return min(reach) if reach else float("inf")


def _resample_box(logits: torch.Tensor, plan: dict, n_model, n_out) -> np.ndarray:
    """One class's logits (over ``plan['union']`` of the model grid) on ``plan['box']`` of the output grid, read
    as nnU-Net's export reads them for the whole volume (``resample_data_or_seg``: float64, scikit-image's
    ``resize`` with ``order`` 1 and edge mode, i.e. ``scipy.ndimage.zoom`` with ``grid_mode``: output voxel o reads
    input coordinate (o + 0.5) n_in / n_out - 0.5; with a separate low-resolution axis, that axis by nearest
    neighbour), then stored in the logits' dtype (half)."""
    from scipy import ndimage

    u, box, axis = plan["union"], plan["box"], plan["separate_axis"]
    src = logits.numpy().astype(np.float64)
    scale = [n_in / n_o for n_in, n_o in zip(n_model, n_out)]
    offset = [(b.start + 0.5) * s - 0.5 - us.start for b, s, us in zip(box, scale, u)]
    shape = tuple(b.stop - b.start for b in box)
    if axis is None:
        out = ndimage.affine_transform(src, scale, offset=offset, output_shape=shape, order=plan["order"],
                                       mode="nearest")
        return out.astype(logits.numpy().dtype)
    # the low-resolution axis by nearest neighbour (as map_coordinates with order 0: floor(x + 0.5), clamped)
    k = np.clip(np.floor(np.arange(shape[axis]) * scale[axis] + offset[axis] + 0.5).astype(int), 0,
                src.shape[axis] - 1)
    planes = np.take(src, k, axis=axis)
    rest = [d for d in range(3) if d != axis]
    out = np.empty(shape, np.float64)
    for i in range(shape[axis]):
        sl = [slice(None)] * 3
        sl[axis] = i
        out[tuple(sl)] = ndimage.affine_transform(np.take(planes, i, axis=axis), [scale[d] for d in rest],
                                                  offset=[offset[d] for d in rest],
                                                  output_shape=[shape[d] for d in rest], order=plan["order"],
                                                  mode="nearest")
    return out.astype(logits.numpy().dtype)


def contrast_stack(inputs: tuple[str, ...], water: np.ndarray, fat: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) float32: each contrast of ``inputs`` from the water and fat images (see ``CONTRASTS``)."""
    w = np.nan_to_num(np.asarray(water, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    f = np.nan_to_num(np.asarray(fat, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    make = {"water": lambda: w, "fat": lambda: f, "in_phase": lambda: w + f, "opposed_phase": lambda: np.abs(w - f)}
    return np.stack([make[c]() for c in inputs]).astype(np.float32)
