"""Segmentation backends, found by name: read a model folder into a manifest, and load a manifest into a runner.

:data:`BACKENDS` is the one registry (``name -> Backend``): registration (:func:`cbp_platform.segmentation.registry.
register`), the manifest check (:func:`cbp_platform.segmentation.manifest.validate`) and :func:`load_runner` all
look a backend up here with :func:`backend`, which names the known backends for an unknown name.

A backend is a module, imported on first use (so importing this registry never imports torch, MONAI or nnU-Net),
with two functions:

* ``describe_registration(req: Registration) -> ModelManifest``: read and check a model folder;
* ``load_runner(manifest, *, device, sw_batch_size)``: a runner, after checking every weight file against the
  registration. A runner has ``manifest``, ``device``, ``prepare(water, fat, affine)`` (CPU work, in DataLoader
  workers), ``predict(prepared)`` (the platform's label map on the scan's grid), ``predict_qc(prepared)`` and
  ``segment(water, fat, affine)``.

Adding a backend is adding that module and one :class:`Backend` entry below (and, for public models, a preset in
:mod:`cbp_platform.segmentation.presets`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from cbp_platform.segmentation.errors import ManifestError


class UnknownBackend(ManifestError):
    """A backend name that is not in :data:`BACKENDS`."""


@dataclass(frozen=True)
class Registration:
    """What ``cbp model register`` (or the ``segmentation_model`` asset's config) says about a model folder; a
    backend reads what it needs. ``preset``: the :class:`~cbp_platform.segmentation.presets.Preset` named
    ``preset_name`` (its key in ``PRESETS``), or None."""

    folder: str | Path
    name: str
    preset_name: str = ""
    preset: object | None = None
    labels: dict[int, str] | None = None
    inputs: tuple[str, ...] | None = None
    orientation: str = ""
    folds: list | None = None
    configuration: str = ""
    checkpoint: str = ""            # nnU-Net: the checkpoint file of each fold (default checkpoint_final.pth)
    roi: bool | None = None         # nnU-Net: region-of-interest inference (None: on with a preset, else off)


@dataclass(frozen=True)
class Backend:
    name: str            # the manifest's ``backend``
    module: str          # the module implementing it, imported on first use
    summary: str         # one line: what a model folder of this backend is

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def describe(self, req: Registration):
        """The checked :class:`~cbp_platform.segmentation.manifest.ModelManifest` of the folder ``req.folder``."""
        return self.load().describe_registration(req)

    def runner(self, manifest, *, device: str = "auto", sw_batch_size: int = 2):
        return self.load().load_runner(manifest, device=device, sw_batch_size=sw_batch_size)


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("monai-bundle", "cbp_platform.segmentation.backends.monai_bundle",
            "a MONAI bundle (configs/metadata.json, models/model.pt); the platform's default model is one"),
    Backend("nnunetv2", "cbp_platform.segmentation.backends.nnunet",
            "a trained nnU-Net v2 model folder (dataset.json, plans.json, fold_<k>/checkpoint_final.pth)"),
)}


def backend(name: str) -> Backend:
    """The backend registered as ``name``; :class:`UnknownBackend` naming the known ones otherwise."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise UnknownBackend(f"unknown segmentation backend {name!r}; known: {', '.join(sorted(BACKENDS))}") \
            from None


def describe_monai_bundle(folder: str | Path, *, name: str | None = None, preset: str = ""):
    """The manifest of a MONAI bundle (:func:`cbp_platform.segmentation.backends.monai_bundle.describe`)."""
    return backend("monai-bundle").load().describe(folder, name=name, preset=preset)


def load_runner(manifest, *, device: str = "auto", sw_batch_size: int = 2):
    """A runner for ``manifest`` (a :class:`~cbp_platform.segmentation.manifest.ModelManifest`) from its backend,
    after checking every weight file against the registration."""
    try:
        b = backend(manifest.backend)
    except UnknownBackend as exc:
        raise UnknownBackend(f"model {manifest.name!r}: {exc}") from None
    return b.runner(manifest, device=device, sw_batch_size=sw_batch_size)
