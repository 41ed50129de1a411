"""The ``monai-bundle`` backend: a MONAI bundle (``configs/metadata.json`` + ``models/model.pt``), run with the
platform's own sliding-window :class:`~cbp_platform.segmentation.infer.Segmenter` (the default model is one).

Registered in :data:`cbp_platform.segmentation.backends.BACKENDS`; MONAI and torch are imported when a bundle is
described or loaded, never when the registry is.
"""

from __future__ import annotations

from pathlib import Path

from cbp_platform.segmentation.manifest import ManifestError, ModelManifest, verify_weights

NAME = "monai-bundle"


def describe(folder: str | Path, *, name: str | None = None, preset: str = "") -> ModelManifest:
    """The manifest of a MONAI bundle: inputs, classes and geometry as its metadata declares them. ``name``
    defaults to ``bundle-<sha256[:12]>``."""
    from cbp_platform.segmentation.bundle import WEIGHTS, BundleError, load_bundle

    try:
        b = load_bundle(folder)
    except BundleError as exc:
        raise ManifestError(str(exc)) from None
    spacing, orientation = b.geometry
    import monai

    return ModelManifest(
        name=name or f"bundle-{b.sha256[:12]}", backend=NAME, backend_version=f"monai {monai.__version__}",
        folder=str(b.path.resolve()),
        inputs=tuple(b.metadata["inputs"]["image"]["channels"]), labels=dict(b.classes), spacing_mm=spacing,
        orientation=orientation, weights={WEIGHTS: b.sha256}, preset=preset,
        options={"network": b.metadata["network"].get("name", "")},
        source={"labels": "configs/metadata.json outputs.pred.classes",
                "geometry": "configs/metadata.json inputs.image"})


def describe_registration(req) -> ModelManifest:
    """``cbp model register`` for a bundle: everything comes from the bundle's metadata (``req``:
    :class:`~cbp_platform.segmentation.backends.Registration`); an nnU-Net-only option is refused, not ignored."""
    if getattr(req, "checkpoint", ""):
        raise ManifestError(f"{req.folder}: --checkpoint names an nnU-Net fold's checkpoint; a MONAI bundle's "
                            "weights are models/model.pt")
    return describe(req.folder, name=req.name, preset=req.preset_name)


def load_runner(manifest: ModelManifest, *, device: str = "auto", sw_batch_size: int = 2):
    """A :class:`~cbp_platform.segmentation.infer.Segmenter` of the bundle, after checking its weights."""
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
