"""Segmentation backends found by name (cbp_platform/segmentation/backends/__init__.py): lookup, the error for an
unknown name, lazy imports, and that a backend is one module plus one registry entry."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from cbp_platform.segmentation.backends import BACKENDS, Backend, UnknownBackend, backend, load_runner
from cbp_platform.segmentation.manifest import ManifestError, ModelManifest
from cbp_platform.segmentation.presets import PRESETS
from cbp_platform.segmentation.registry import register

ROOT = Path(__file__).resolve().parents[2]
LABELS = {1: "autochthonous_left", 2: "autochthonous_right", 3: "psoas_left", 4: "psoas_right"}


def test_backends_are_found_by_name_and_every_module_implements_the_protocol():
    assert set(BACKENDS) == {"monai-bundle", "nnunetv2"}
    for name, b in BACKENDS.items():
        assert backend(name) is b and b.name == name
        mod = b.load()
        assert callable(mod.describe_registration) and callable(mod.load_runner), name
    assert backend("nnunetv2").module == "cbp_platform.segmentation.backends.nnunet"
    assert {p.backend for p in PRESETS.values()} <= set(BACKENDS)          # every preset names a known backend


def test_an_unknown_backend_is_a_clear_error_listing_the_known_ones(tmp_path):
    with pytest.raises(UnknownBackend, match=r"unknown segmentation backend 'nnunet'; known: monai-bundle, nnunetv2"):
        backend("nnunet")
    assert issubclass(UnknownBackend, ManifestError)                          # the CLI reports ManifestError
    with pytest.raises(UnknownBackend, match=rf"{tmp_path}: unknown segmentation backend 'onnx'; known: "
                                             r"monai-bundle, nnunetv2"):
        register(tmp_path / "registry", tmp_path, name="m", backend="onnx")
    assert not (tmp_path / "registry").exists()
    fake = types.SimpleNamespace(name="old-model", backend="tensorflow")      # a manifest of another version
    with pytest.raises(UnknownBackend, match=r"model 'old-model': unknown segmentation backend 'tensorflow'; "
                                             r"known: monai-bundle, nnunetv2"):
        load_runner(fake)
    with pytest.raises(ManifestError, match=r"backend 'onnx' is not one of monai-bundle, nnunetv2"):
        ModelManifest(name="m", backend="onnx", backend_version="1", folder="/x", inputs=("water",), labels=LABELS,
                      spacing_mm=(1.0, 1.0, 1.0), orientation="RAS", weights={"w": "ab" * 32})


def test_importing_the_registry_imports_no_framework():
    """nnU-Net pulls torchvision through timm on some paths, which does not import next to the CPU torch: the
    registry (and the manifest check that reads it) must stay off every framework's import path."""
    code = ("import sys, json; import cbp_platform.segmentation.backends as b; "
            "import cbp_platform.segmentation.registry; b.backend('nnunetv2'); "
            "print(json.dumps(sorted(m for m in ('torch', 'monai', 'nnunetv2', 'timm', 'torchvision') "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(out.stdout) == []


TOY = textwrap.dedent('''
    """A toy backend: a folder holding labels.json; the runner labels nothing."""
    from pathlib import Path

    import numpy as np

    from cbp_platform.segmentation.manifest import ModelManifest, hash_weights, verify_weights


    def describe_registration(req):
        folder = Path(req.folder)
        labels = {int(k): v for k, v in __import__("json").loads((folder / "labels.json").read_text()).items()}
        return ModelManifest(name=req.name, backend="toy", backend_version="0", folder=str(folder),
                             inputs=tuple(req.inputs or ("water",)), labels=labels, spacing_mm=(1.0, 1.0, 1.0),
                             orientation=req.orientation or "RAS", weights=hash_weights(folder, ["labels.json"]),
                             preset=req.preset_name)


    class Runner:
        def __init__(self, manifest, device, sw_batch_size):
            verify_weights(manifest)
            self.manifest, self.device, self.sw_batch_size = manifest, device, sw_batch_size

        def segment(self, water, fat, affine):
            return np.zeros(np.shape(water), np.uint8)


    def load_runner(manifest, *, device="auto", sw_batch_size=2):
        return Runner(manifest, device, sw_batch_size)
''')


def test_a_backend_is_one_module_and_one_registry_entry(tmp_path, monkeypatch):
    (tmp_path / "toy_backend.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(BACKENDS, "toy", Backend("toy", "toy_backend", "a folder with labels.json (tests)"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "labels.json").write_text(json.dumps(LABELS))
    m, path = register(tmp_path / "registry", folder, name="toy-model", backend="toy", orientation="LPS")
    assert (m.backend, m.orientation, path.name) == ("toy", "LPS", "toy-model.json")
    runner = load_runner(m, device="cpu", sw_batch_size=3)
    assert (runner.device, runner.sw_batch_size, runner.manifest) == ("cpu", 3, m)
    assert runner.segment([[[1.0]]], None, None).shape == (1, 1, 1)
    monkeypatch.delitem(BACKENDS, "toy")                 # without its entry the same manifest is refused
    with pytest.raises(ManifestError, match="backend 'toy' is not one of monai-bundle, nnunetv2"):
        ModelManifest.from_json(path.read_text())


def test_each_registered_backend_reaches_its_own_runner(monkeypatch):
    """load_runner dispatches on the manifest's backend name to that backend's module (the runners themselves are
    tested with real models in test_manifest.py and test_nnunet.py)."""
    from cbp_platform.segmentation.backends import monai_bundle, nnunet

    seen = []
    monkeypatch.setattr(nnunet, "NnunetRunner", lambda manifest, device: seen.append(("nnunetv2", device)) or "nn")
    monkeypatch.setattr(monai_bundle, "load_runner",
                        lambda manifest, *, device, sw_batch_size: seen.append(("monai-bundle", device)) or "mb")
    kw = dict(name="m", backend_version="1", folder="/x", inputs=("water",), labels=LABELS,
              spacing_mm=(1.0, 1.0, 1.0), orientation="RAS", weights={"w": "ab" * 32})
    assert load_runner(ModelManifest(backend="nnunetv2", **kw), device="cpu") == "nn"
    assert load_runner(ModelManifest(backend="monai-bundle", **kw), device="cuda") == "mb"
    assert seen == [("nnunetv2", "cpu"), ("monai-bundle", "cuda")]
