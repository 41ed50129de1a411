"""Model manifests, the class registry and the monai-bundle backend (no nnU-Net training here)."""

import json

import numpy as np
import pytest
import torch

from cbp_platform import classes
from cbp_platform.segmentation.backends import describe_monai_bundle, load_runner
from cbp_platform.segmentation.bundle import build_network, save_bundle
from cbp_platform.segmentation.infer import Segmenter
from cbp_platform.segmentation.manifest import (ManifestError, ModelManifest, load_manifest, save_manifest,
                                                verify_weights)
from cbp_platform.segmentation.registry import manifest_for_pointer, register
from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom


def _manifest(**kw) -> ModelManifest:
    d = dict(name="m", backend="nnunetv2", backend_version="2.8.1", folder="/x", inputs=("water",),
             labels={11: "autochthonous_left", 12: "autochthonous_right", 7: "psoas_left", 8: "psoas_right"},
             spacing_mm=(1.5, 1.5, 3.0), orientation="RAS", weights={"fold_0/checkpoint_final.pth": "ab" * 32})
    d.update(kw)
    return ModelManifest(**d)


def test_class_registry_is_consistent():
    assert classes.NUM_CLASSES == len(classes.MUSCLE_CLASSES) + 1
    for left, right in classes.LR_PAIRS:
        assert classes.LR_SWAP[left.id] == right.id and classes.LR_SWAP[right.id] == left.id
        assert left.muscle == right.muscle and (left.side, right.side) == ("left", "right")
    lab = np.array([0, 1, 2, 3, 4], np.uint8)
    np.testing.assert_array_equal(classes.swap_lr(lab), [0, 2, 1, 4, 3])
    np.testing.assert_array_equal(classes.swap_lr(torch.as_tensor(lab)).numpy(), [0, 2, 1, 4, 3])


def test_manifest_rejects_what_inference_cannot_use():
    m = _manifest()
    assert m.classes == {11: 1, 12: 2, 7: 3, 8: 4}
    assert m.sha256 == "ab" * 32                        # one weight file: its own sha256 is the identity
    two = _manifest(weights={"fold_0/c.pth": "ab" * 32, "fold_1/c.pth": "cd" * 32})
    assert two.sha256 not in ("ab" * 32, "cd" * 32) and len(two.sha256) == 64
    assert ModelManifest.from_json(m.to_json()) == m
    with pytest.raises(ManifestError, match=r"no model label is mapped onto the platform classes \['psoas_right'\]"):
        _manifest(labels={11: "autochthonous_left", 12: "autochthonous_right", 7: "psoas_left"})
    with pytest.raises(ManifestError, match="mapped from more than one model label"):
        _manifest(labels={11: "autochthonous_left", 12: "autochthonous_right", 7: "psoas_left", 8: "psoas_right",
                          9: "psoas_right"})
    with pytest.raises(ManifestError, match="unknown platform classes"):
        _manifest(labels={11: "autochthonous_left", 12: "autochthonous_right", 7: "psoas_left", 8: "psoas_right",
                          9: "gluteus"})
    with pytest.raises(ManifestError, match="inputs"):
        _manifest(inputs=("t2",))
    with pytest.raises(ManifestError, match="orientation 'RAR'"):
        _manifest(orientation="RAR")
    with pytest.raises(ManifestError, match="spacing_mm"):
        _manifest(spacing_mm=(1.5, 0.0, 3.0))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(3)
    net = build_network()
    path = tmp_path_factory.mktemp("bundle") / "b"
    save_bundle(path, net, {"training": {"note": "untrained, for the backend tests"}})
    return path


def test_monai_bundle_backend_gives_the_segmenters_results_and_keeps_its_identity(bundle, tmp_path):
    from cbp_platform.segmentation.bundle import load_bundle

    m, path = register(tmp_path / "registry", bundle, backend="monai-bundle", name="own")
    assert path == tmp_path / "registry" / "own.json" and load_manifest(tmp_path / "registry", "own") == m
    b = load_bundle(bundle)
    assert m.sha256 == b.sha256 and m.orientation == "LAS" and m.spacing_mm == tuple(PRESETS["fast"].spacing)
    assert m.labels == classes.NAMES and m.inputs == ("water", "fat")
    ph = render_phantom(Subject(female=False, age=50, height_cm=178, weight_kg=80, imat_pct=8, mfi=0.06,
                                lean_ml=(900, 880, 300, 310)), PRESETS["fast"], np.random.default_rng(5))
    a = load_runner(m, device="cpu").segment(ph.water, ph.fat, ph.affine)
    ref = Segmenter(b, device="cpu").segment(ph.water, ph.fat, ph.affine)
    np.testing.assert_array_equal(a, ref)


def test_changed_weights_stop_the_model_naming_the_file(bundle, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(bundle, folder)
    m = describe_monai_bundle(folder, name="copy")
    verify_weights(m)
    with open(folder / "models" / "model.pt", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestError, match=r"models/model.pt: weights changed since registration of model 'copy'"):
        verify_weights(m)
    with pytest.raises(ManifestError, match="weights changed since registration"):
        load_runner(m, device="cpu")
    (folder / "models" / "model.pt").unlink()
    with pytest.raises(ManifestError, match=r"models/model.pt: weight file of model 'copy' missing"):
        verify_weights(m)


def test_a_pointer_from_before_manifests_is_registered_on_first_use(bundle, tmp_path):
    m0 = describe_monai_bundle(bundle, name="x")
    m = manifest_for_pointer({"path": str(bundle), "weights_sha256": m0.sha256}, tmp_path / "reg")
    assert m.sha256 == m0.sha256 and (tmp_path / "reg" / f"{bundle.name}.json").exists()
    with pytest.raises(ManifestError, match="differ from models/current.json"):
        manifest_for_pointer({"path": str(bundle), "weights_sha256": "0" * 64}, tmp_path / "reg2")
    with pytest.raises(ManifestError, match="no registered model 'nope'"):
        load_manifest(tmp_path / "reg", "nope")


def test_registering_other_weights_under_the_primarys_name_never_swaps_the_primary(bundle, tmp_path):
    m0, _ = register(tmp_path / "reg", bundle, name="primary", backend="monai-bundle")
    pointer = {"name": "primary", "path": str(bundle), "weights_sha256": m0.sha256}
    assert manifest_for_pointer(pointer, tmp_path / "reg").sha256 == m0.sha256
    torch.manual_seed(4)
    other = tmp_path / "other"                                   # other weights, registered under the same name
    save_bundle(other, build_network(), {"training": {"note": "another model"}})
    m1, _ = register(tmp_path / "reg", other, name="primary", backend="monai-bundle")
    assert m1.sha256 != m0.sha256
    with pytest.raises(ManifestError, match=rf"primary.json: weights {m1.sha256[:12]}\.\.\. differ from the "
                                            rf"primary model's {m0.sha256[:12]}"):
        manifest_for_pointer(pointer, tmp_path / "reg")


def test_bundle_metadata_must_declare_geometry_and_every_class(bundle, tmp_path):
    import shutil

    from cbp_platform.segmentation.bundle import BundleError, load_bundle

    folder = tmp_path / "b"
    shutil.copytree(bundle, folder)
    meta_p = folder / "configs" / "metadata.json"
    meta = json.loads(meta_p.read_text())
    meta["inputs"]["image"]["spacing_mm"] = [4, 4]
    meta_p.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"metadata.json: inputs.image.spacing_mm must be three positive numbers"):
        load_bundle(folder)
    meta["inputs"]["image"]["spacing_mm"] = [4, 4, 6]
    del meta["outputs"]["pred"]["classes"]["4"]
    meta_p.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"lacks the platform classes \['psoas_right'\]"):
        load_bundle(folder)


def test_register_cli_reports_a_bad_folder_and_writes_nothing(tmp_path, capsys):
    from cbp_platform.cli import main

    assert main(["model", "register", "--folder", str(tmp_path / "nope"), "--backend", "nnunetv2", "--name", "x",
                 "--label", "autochthonous_left=1", "--inputs", "water", "--models-dir", str(tmp_path)]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert not (tmp_path / "registry").exists()


def _public_like_folder(root, preset, *, reader="SimpleITKIO", extra_ds=None, folds=(0,), channels=1):
    """A folder shaped like a public model's (its dataset.json label table from the preset, nnU-Net's plans and
    checkpoint keys) with a stand-in checkpoint: enough for registration, which reads no weights' values."""
    from cbp_platform.segmentation.presets import PRESETS

    p = PRESETS[preset]
    names = {**{f"other_{i}": i for i in range(1, max(p.label_names) + 3)},
             **{n: i for i, n in p.label_names.items()}}
    labels = {"background": 0, **{n: i for n, i in sorted(names.items(), key=lambda x: x[1])}}
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {str(i): "MR" for i in range(channels)},
                                                   "labels": labels, "file_ending": ".nii.gz", **(extra_ds or {})}))
    (root / "plans.json").write_text(json.dumps({
        "configurations": {"3d_fullres": {"spacing": [3.0, 1.5, 1.5]}}, "transpose_forward": [0, 1, 2],
        "image_reader_writer": reader}))
    for f in folds:
        (root / f"fold_{f}").mkdir()
        torch.save({"trainer_name": "nnUNetTrainer_2000epochs_NoMirroring", "network_weights": {},
                    "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": None},
                   root / f"fold_{f}" / "checkpoint_final.pth")
    return root


def test_presets_map_the_public_models_labels_and_read_geometry_from_the_folder(tmp_path):
    reg = tmp_path / "registry"
    mrs = _public_like_folder(tmp_path / "mrs", "mrsegmentator", folds=range(5))
    m, _ = register(reg, mrs, preset="mrsegmentator")
    assert m.labels == {31: "autochthonous_left", 32: "autochthonous_right", 33: "psoas_left", 34: "psoas_right"}
    assert (m.inputs, m.orientation, m.options["folds"]) == (("in_phase",), "LPS", ["0", "1", "2", "3", "4"])
    assert m.spacing_mm == (1.5, 1.5, 3.0) and len(m.weights) == 5
    assert m.options["trainer_name"] == "nnUNetTrainer_2000epochs_NoMirroring"   # any trainer name registers
    # TotalVibeSegmentator states its orientation in its dataset.json: read from there
    tvs = _public_like_folder(tmp_path / "tvs", "totalvibesegmentator", extra_ds={"orientation": ["P", "I", "R"]},
                              folds=(0, 1, 2))
    m, _ = register(reg, tvs, preset="totalvibesegmentator")
    assert (m.orientation, m.inputs, m.source["orientation"]) == ("PIR", ("water",), "dataset.json orientation")
    # TotalSegmentator's Dataset851 with a reorienting reader: RAS from plans.json
    tmr = _public_like_folder(tmp_path / "tmr", "total_mr", reader="NibabelIOWithReorient")
    m, _ = register(reg, tmr, preset="total_mr")
    assert m.orientation == "RAS" and m.labels[17] == "autochthonous_left" and m.options["folds"] == ["0"]
    # MRSegmentator's preset orientation (LPS) contradicts a reorienting reader: refused, not guessed
    bad = _public_like_folder(tmp_path / "mrs2", "mrsegmentator", reader="NibabelIOWithReorient", folds=range(5))
    with pytest.raises(ManifestError, match="reorients to RAS, not the given orientation LPS"):
        register(reg, bad, preset="mrsegmentator")


def test_a_folder_of_another_model_or_version_is_refused_by_name(tmp_path):
    f = _public_like_folder(tmp_path / "old", "total_mr")
    ds = json.loads((f / "dataset.json").read_text())
    ds["labels"] = {("vertebrae_L1" if v == 17 else k): v for k, v in ds["labels"].items()}
    (f / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(ManifestError, match=r"dataset.json: label 17 is 'vertebrae_L1', the preset expects "
                                            r"'autochthon_left'"):
        register(tmp_path / "r", f, preset="total_mr")
    two = _public_like_folder(tmp_path / "two", "mrsegmentator", channels=2, folds=range(5))
    with pytest.raises(ManifestError, match=r"the model takes 2 channel\(s\) \(MR, MR\), the manifest feeds 1"):
        register(tmp_path / "r", two, preset="mrsegmentator")
    four = _public_like_folder(tmp_path / "four", "mrsegmentator", folds=range(4))
    with pytest.raises(ManifestError, match=r"fold_4/checkpoint_final.pth: missing \(folds requested: 0, 1, 2, 3, 4"):
        register(tmp_path / "r", four, preset="mrsegmentator")
    with pytest.raises(ManifestError, match="unknown preset 'mrseg'"):
        register(tmp_path / "r", four, preset="mrseg")


def test_every_fold_of_an_ensemble_is_checked_at_registration(tmp_path):
    f = _public_like_folder(tmp_path / "mrs", "mrsegmentator", folds=range(5))
    torch.save({"trainer_name": "nnUNetTrainer", "network_weights": {}, "init_args": {"configuration": "2d"}},
               f / "fold_3" / "checkpoint_final.pth")
    with pytest.raises(ManifestError, match=r"fold_3/checkpoint_final.pth: trained with configuration '2d'"):
        register(tmp_path / "r", f, preset="mrsegmentator")
    (f / "fold_3" / "checkpoint_final.pth").write_bytes(b"\x00garbage")
    with pytest.raises(ManifestError, match=r"fold_3/checkpoint_final.pth: unreadable checkpoint"):
        register(tmp_path / "r", f, preset="mrsegmentator")
    torch.save({"trainer_name": "nnUNetTrainer"}, f / "fold_3" / "checkpoint_final.pth")
    with pytest.raises(ManifestError, match=r"fold_3/checkpoint_final.pth: no 'network_weights'"):
        register(tmp_path / "r", f, preset="mrsegmentator")
    assert not (tmp_path / "r").exists()


def test_a_folder_whose_orientation_cannot_be_established_is_refused_naming_what_is_missing(tmp_path):
    """TotalVibeSegmentator reorients to its dataset.json 'orientation' and not at all without it: such a folder
    is refused (never registered as RAS), unless the operator states the orientation."""
    tvs = _public_like_folder(tmp_path / "tvs", "totalvibesegmentator")
    with pytest.raises(ManifestError, match=r"dataset.json: no 'orientation' entry, and its reader SimpleITKIO keeps "
                                            r"the stored voxel order"):
        register(tmp_path / "r", tvs, preset="totalvibesegmentator")
    assert not (tmp_path / "r").exists()
    m, _ = register(tmp_path / "r", tvs, preset="totalvibesegmentator", orientation="LPS")
    assert m.orientation == "LPS" and m.source["orientation"].startswith("preset or operator")
    # a reorienting reader establishes it without the entry
    tvs2 = _public_like_folder(tmp_path / "tvs2", "totalvibesegmentator", reader="NibabelIOWithReorient")
    assert register(tmp_path / "r", tvs2, preset="totalvibesegmentator")[0].orientation == "RAS"


def test_register_takes_a_named_checkpoint_and_records_it(tmp_path, capsys):
    from cbp_platform.cli import main

    f = _public_like_folder(tmp_path / "tvs", "totalvibesegmentator", extra_ds={"orientation": ["R", "A", "S"]},
                            folds=(0,))
    (f / "fold_0" / "checkpoint_final.pth").rename(f / "fold_0" / "checkpoint_best.pth")
    with pytest.raises(ManifestError, match=r"no fold_<k>/checkpoint_final.pth found \(the folds hold "
                                            r"checkpoint_best.pth: name one with --checkpoint\)"):
        register(tmp_path / "r", f, preset="totalvibesegmentator")
    for bad in ("../x.pth", "fold_0/checkpoint_best.pth", "checkpoint_best", ".pth"):
        with pytest.raises(ManifestError, match="give the file name of each fold's checkpoint"):
            register(tmp_path / "r", f, preset="totalvibesegmentator", checkpoint=bad)
    assert main(["model", "register", "--folder", str(f), "--preset", "totalvibesegmentator",
                 "--checkpoint", "checkpoint_best.pth", "--models-dir", str(tmp_path / "models")]) == 0
    m = json.loads((tmp_path / "models" / "registry" / "totalvibesegmentator.json").read_text())
    assert m["options"]["checkpoint"] == "checkpoint_best.pth"
    assert list(m["weights"]) == ["fold_0/checkpoint_best.pth"]
    assert "registered totalvibesegmentator" in capsys.readouterr().out
