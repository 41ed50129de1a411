"""Segmentation backends: read a model folder into a manifest, and load a manifest into a runner.

A runner has ``manifest``, ``device``, ``prepare(water, fat, affine)`` (CPU work, in DataLoader workers) and
``predict(prepared)`` (the platform's label map on the scan's grid). Adding a backend means a module with
``describe`` and a runner, and an entry in :data:`BACKENDS` of :mod:`cbp_platform.segmentation.manifest`.
"""

from __future__ import annotations

from pathlib import Path

from cbp_platform.segmentation.manifest import ManifestError, ModelManifest, verify_weights


def describe_monai_bundle(folder: str | Path, *, name: str | None = None, preset: str = "") -> ModelManifest:
    """The manifest of a MONAI bundle (``configs/metadata.json`` + ``models/model.pt``): inputs, classes and
    geometry as its metadata declares them. ``name`` defaults to ``bundle-<sha256[:12]>``."""
    from cbp_platform.segmentation.bundle import WEIGHTS, BundleError, load_bundle

    try:
        b = load_bundle(folder)
    except BundleError as exc:
        raise ManifestError(str(exc)) from None
    spacing, orientation = b.geometry
    import monai

    return ModelManifest(
        name=name or f"bundle-{b.sha256[:12]}", backend="monai-bundle", backend_version=f"monai {monai.__version__}", folder=str(b.path.resolve()),
        inputs=tuple(b.metadata["inputs"]["image"]["channels"]), labels=dict(b.classes), spacing_mm=spacing,
        orientation=orientation, weights={WEIGHTS: b.sha256}, preset=preset,
        options={"network": b.metadata["network"].get("name", "")},
        source={"labels": "configs/metadata.json outputs.pred.classes",
                "geometry": "configs/metadata.json inputs.image"})


def load_runner(manifest: ModelManifest, *, device: str = "auto", sw_batch_size: int = 2):
    """A runner for ``manifest``, after checking every weight file against the registration."""
    if manifest.backend == "monai-bundle":
        from cbp_platform.segmentation.bundle import BundleError, load_bundle
        from cbp_platform.segmentation.infer import Segmenter

        verify_weights(manifest)
        try:
            bundle = load_bundle(manifest.folder)
        except BundleError as exc:
            raise ManifestError(str(exc)) from None
        seg = Segmenter(bundle, device=device, sw_batch_size=sw_batch_size)
        seg.manifest = manifest
        return seg
    if manifest.backend == "nnunetv2":
        from cbp_platform.segmentation.backends.nnunet import NnunetRunner

        return NnunetRunner(manifest, device=device)
    raise ManifestError(f"model {manifest.name!r}: no backend {manifest.backend!r}")
