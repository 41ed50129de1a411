"""Registering models: a folder (and a preset, or explicit labels and inputs) becomes a checked manifest.

``cbp model register --preset mrsegmentator --folder /secure/models/...`` and the ``segmentation_model`` asset's
``model`` config both end here. Registration reads the folder, checks it against the preset (label ids and names,
channel count, readable checkpoints), hashes every weight file and writes ``<registry>/<name>.json``. From then on
every use hashes the files again (:func:`~cbp_platform.segmentation.manifest.verify_weights`).
"""

from __future__ import annotations

from pathlib import Path

from cbp_platform.paths import resolve_under
from cbp_platform.segmentation.manifest import (ManifestError, ModelManifest, load_manifest, save_manifest)
from cbp_platform.segmentation.presets import PRESETS


def register(registry_dir: Path, folder: str | Path, *, preset: str = "", name: str = "", backend: str = "",
             labels: dict[int, str] | None = None, inputs: tuple[str, ...] | None = None, orientation: str = "",
             folds: list | None = None, configuration: str = "", checkpoint: str = "",
             roi: bool | None = None) -> tuple[ModelManifest, Path]:
    """Describe ``folder`` with ``preset`` (or explicit ``backend``/``labels``/``inputs``), check it, save it. The
    backend is looked up by name (:data:`cbp_platform.segmentation.backends.BACKENDS`). ``roi``: an nnU-Net
    model's region-of-interest inference (default: on for a preset's public model, off otherwise)."""
    from cbp_platform.segmentation.backends import Registration, UnknownBackend
    from cbp_platform.segmentation.backends import backend as find_backend

    p = None
    if preset:
        if preset not in PRESETS:
            raise ManifestError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
        p = PRESETS[preset]
    backend = backend or (p.backend if p else "")
    name = name or (p.name if p else "")
    if not name:
        raise ManifestError("a model without a preset needs --name")
    try:
        b = find_backend(backend)
    except UnknownBackend as exc:
        raise UnknownBackend(f"{folder}: {exc}") from None
    m = b.describe(Registration(folder=folder, name=name, preset_name=preset, preset=p, labels=labels,
                                inputs=inputs, orientation=orientation, folds=folds, configuration=configuration,
                                checkpoint=checkpoint, roi=roi))
    return m, save_manifest(registry_dir, m)


def train_default_model(models_dir: Path, registry_dir: Path, *, n_train: int, budget_s: float | None, seed: int,
                        max_iterations: int, n_calibration: int, device: str = "auto", sw_batch_size: int = 2,
                        log=None, calibration_progress=None):
    """Train the default model from ``seed``, calibrate its border, save it as the bundle
    ``<models_dir>/cbp_back_muscles-<sha256[:12]>`` and register it; returns (manifest, training result,
    calibration). Raises :class:`~cbp_platform.segmentation.train.TrainingCapReached` at a wall-clock cap."""
    import shutil

    from cbp_platform.segmentation.backends import describe_monai_bundle
    from cbp_platform.segmentation.bundle import build_network, save_bundle
    from cbp_platform.segmentation.calibrate import calibrate_network
    from cbp_platform.segmentation.train import train

    res = train(build_network(), n_train=n_train, budget_s=budget_s, seed=seed, max_iterations=max_iterations,
                log=log)
    cal = calibrate_network(res.network, n=n_calibration, seed=seed + 2000, device=device,
                            sw_batch_size=sw_batch_size, progress=calibration_progress)
    tmp = Path(models_dir) / ".training"
    sha = save_bundle(tmp, res.network, {"training": {**res.provenance, "iterations": res.iterations,
                                                      "seconds": round(res.seconds, 1), "final_loss": res.final_loss},
                                         "calibration": cal.as_dict()})
    final = Path(models_dir) / f"cbp_back_muscles-{sha[:12]}"
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    manifest = describe_monai_bundle(final, name=final.name)
    save_manifest(registry_dir, manifest)
    set_platform_model(models_dir, manifest)
    return manifest, res, cal


def _platform_pointer(models_dir: Path) -> tuple[Path, dict]:
    """The platform model's pointer file and its entries (none yet: empty)."""
    import json

    from cbp_platform.paths import DataLayout

    path = DataLayout.platform_model_pointer(models_dir)
    return path, (json.loads(path.read_text()) if path.is_file() else {})


def _update_platform_pointer(models_dir: Path, **entries) -> Path:
    """Set ``entries`` in the platform model's pointer, keeping the others (the model and the level regressor are
    trained apart: retraining one keeps the other)."""
    import json

    from cbp_platform.imaging.nifti import atomic_write_bytes

    path, entry = _platform_pointer(models_dir)
    atomic_write_bytes(path, json.dumps({**entry, **entries}).encode())
    return path


def set_platform_model(models_dir: Path, manifest: ModelManifest) -> Path:
    """Name ``manifest`` the platform's own model: the locator of region-of-interest inference."""
    return _update_platform_pointer(models_dir, name=manifest.name, weights_sha256=manifest.sha256)


def train_level_model(models_dir: Path, *, n_scans: int = 24, iterations: int = 1500, seed: int = 4000,
                      n_val: int = 4, log=None):
    """Train the vertebral-level regressor (:func:`cbp_platform.segmentation.levels.train_levels`), check it on
    ``n_val`` held-out simulated whole-body scans (recorded in its provenance), save it under ``models_dir`` and
    record it in the platform model's pointer, for region-of-interest inference on whole-body scans; returns
    (path, model)."""
    from cbp_platform.paths import DataLayout
    from cbp_platform.segmentation.levels import save_levels, train_levels, validate_levels

    model = train_levels(n_scans=n_scans, iterations=iterations, seed=seed, log=log)
    if n_val:
        model.provenance["validation"] = validate_levels(model, n_scans=n_val, seed=seed + 1)
    path, sha = save_levels(lambda digest: DataLayout.level_model(models_dir, digest), model)
    _update_platform_pointer(models_dir, levels={"file": path.name, "sha256": sha})
    return path, model


def platform_levels(models_dir: Path):
    """The vertebral-level regressor the platform model's pointer records (verified by its sha256), or None when
    none was trained (``cbp model train-levels``)."""
    from cbp_platform.paths import DataLayout
    from cbp_platform.segmentation.levels import load_levels

    pointer, entries = _platform_pointer(models_dir)
    entry = entries.get("levels")
    if not entry:
        return None
    path = DataLayout.level_model(models_dir, entry["sha256"])
    if path.name != entry["file"] or not path.is_file():
        raise ManifestError(f"{pointer}: the level model {entry['file']} is missing from {models_dir}; train it "
                            "again (cbp model train-levels)")
    return load_levels(path, entry["sha256"])


def platform_model(models_dir: Path) -> ModelManifest:
    """The platform's own model (:func:`set_platform_model`), checked against its registration."""
    from cbp_platform.paths import DataLayout

    path, entry = _platform_pointer(models_dir)
    if not entry.get("name"):          # no pointer, or one naming the level regressor only
        raise ManifestError(f"{path}: missing. Region-of-interest inference needs the platform's own model to "
                            "locate the back muscles: train it once (materialise segmentation_model without "
                            "`model`), or register the public model with --no-roi")
    return manifest_for_pointer(entry, DataLayout.model_registry(models_dir))


def manifest_for_pointer(pointer: dict, registry_dir: Path) -> ModelManifest:
    """The manifest the primary-model pointer (``models/current.json``) names. A pointer written before manifests
    existed (a trained bundle's path only) is registered on first use."""
    if pointer.get("name"):
        m = load_manifest(registry_dir, pointer["name"])
        want = pointer.get("weights_sha256")
        if want and m.sha256 != want:
            # the name was registered again with other weights: never swap the primary model silently
            raise ManifestError(f"{registry_dir}/{m.name}.json: weights {m.sha256[:12]}... differ from the "
                                f"primary model's {want[:12]}... named in models/current.json; register the new model under "
                                "another name, or make it primary with the segmentation_model asset")
        return m
    from cbp_platform.segmentation.backends import describe_monai_bundle

    folder = resolve_under(Path(registry_dir).parent, pointer["path"])
    m = describe_monai_bundle(folder, name=folder.name)
    if m.sha256 != pointer.get("weights_sha256"):
        raise ManifestError(f"{folder}: weights {m.sha256[:12]}... differ from models/current.json's "
                            f"{str(pointer.get('weights_sha256'))[:12]}...")
    save_manifest(registry_dir, m)
    return m
