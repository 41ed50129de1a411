"""The nnunetv2 backend for real: a small nnU-Net v2 model trained here by nnU-Net itself (planning,
preprocessing, the stock nnUNetTrainer), registered, run through Dagster's process_batch, and compared."""

import json
import shutil
import socket
import sys
from pathlib import Path

import dagster as dg
import nibabel as nib
import numpy as np
import polars as pl
import pytest

from cbp_platform.paths import DataLayout
from cbp_platform.segmentation.backends import nnunet_phantom as phantom
from cbp_platform.segmentation.manifest import ManifestError, load_manifest
from cbp_platform.segmentation.registry import register
from tests.support.nnunet import LABEL_ARGS, register_phantom_model
from tests.support.warehouse import query as _q


def _scan(root: Path, delivery: str, p: str):
    w = nib.load(root / "landing" / delivery / "mri" / p / f"{p}_water.nii.gz")
    f = nib.load(root / "landing" / delivery / "mri" / p / f"{p}_fat.nii.gz")
    return np.asarray(w.dataobj), np.asarray(f.dataobj), w.affine


def test_the_model_folder_is_nnunets_own_and_needed_neither_timm_nor_torchvision(nnunet_model):
    folder, report = nnunet_model
    assert not report["timm_imported"] and not report["torchvision_imported"]
    assert folder.name == phantom.TRAINER_FOLDER
    assert {p.name for p in folder.iterdir()} >= {"dataset.json", "plans.json", "fold_0"}
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["labels"] == phantom.LABELS and ds["channel_names"] == {"0": "water", "1": "fat"}
    import torch

    ck = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["trainer_name"] == "nnUNetTrainer"


def test_registration_reads_labels_channels_and_geometry_from_the_folder(nnunet_model, tmp_path):
    folder, _ = nnunet_model
    m, path = register_phantom_model(tmp_path / "registry", folder)
    assert load_manifest(tmp_path / "registry", m.name) == m and path.exists()
    plans = json.loads((folder / "plans.json").read_text())
    sp = plans["configurations"]["3d_fullres"]["spacing"]          # nnU-Net's (k, j, i) order
    assert m.spacing_mm == pytest.approx(tuple(reversed(sp)))
    assert m.spacing_mm == pytest.approx((8.0, 8.0, 12.0))
    assert m.orientation == "LAS" and m.inputs == ("water", "fat") and m.backend == "nnunetv2"
    assert m.options["trainer_name"] == "nnUNetTrainer" and m.options["folds"] == ["0"]
    assert m.options["model_label_names"] == {"2": "iliopsoas_left", "3": "iliopsoas_right", "4": "autochthon_left",
                                              "5": "autochthon_right"}
    assert m.classes == {4: 1, 5: 2, 2: 3, 3: 4}
    # the model was trained without left-right mirroring, and its checkpoint says so: the classes are lateral
    assert plans["transpose_forward"].index(2) not in (m.options["mirror_axes"] or [])


def test_folders_that_do_not_fit_fail_naming_the_file_and_the_problem(nnunet_model, tmp_path, capsys):
    from cbp_platform.cli import main
    from cbp_platform.segmentation.backends import load_runner

    folder, _ = nnunet_model
    copy = tmp_path / "copy" / folder.name
    shutil.copytree(folder, copy)
    reg = tmp_path / "registry"
    with pytest.raises(ManifestError, match=r"dataset.json: label 31 \(for autochthonous_left\) missing"):
        register(reg, copy, preset="mrsegmentator")
    with pytest.raises(ManifestError, match=r"dataset.json: the model takes 2 channel\(s\) \(water, fat\), the "
                                            r"manifest feeds 1 \(water\)"):
        register_phantom_model(reg, copy, inputs=("water",))
    with pytest.raises(ManifestError, match="keeps the stored voxel order, so the orientation"):
        register_phantom_model(reg, copy, orientation="")
    ds = json.loads((copy / "dataset.json").read_text())
    ds["labels"].pop("iliopsoas_right")
    (copy / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(ManifestError, match=r"dataset.json: label 3 \(for psoas_right\) missing"):
        register_phantom_model(reg, copy)
    shutil.copy(folder / "dataset.json", copy / "dataset.json")
    m, _ = register_phantom_model(reg, copy)
    ck = copy / "fold_0" / "checkpoint_final.pth"
    ck.write_bytes(ck.read_bytes()[:-1000])
    with pytest.raises(ManifestError, match=r"fold_0/checkpoint_final.pth: weights changed since registration"):
        load_runner(m, device="cpu")
    ck.write_bytes(b"not a checkpoint")
    with pytest.raises(ManifestError, match=r"fold_0/checkpoint_final.pth: unreadable checkpoint"):
        register_phantom_model(reg, copy)
    (copy / "plans.json").unlink()
    assert main(["model", "register", "--folder", str(copy), "--backend", "nnunetv2", "--name", "x", "--inputs",
                 "water,fat", "--orientation", "LAS", "--models-dir", str(tmp_path / "m")]
                + [a for c, i in LABEL_ARGS.items() for a in ("--label", f"{c}={i}")]) == 2
    assert "plans.json: missing" in capsys.readouterr().err


class _NoNetwork:
    """Records every attempt to open an internet socket or resolve a name while active (a CPython audit hook:
    it sees what any library does, not only what a patched function would)."""

    events: list = []
    active = False
    installed = False

    @classmethod
    def hook(cls, event, args):
        if not cls.active:
            return
        if event == "socket.__new__" and args and args[1] in (socket.AF_INET, socket.AF_INET6):
            cls.events.append((event, args))
        elif event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request"):
            cls.events.append((event, args))

    def __enter__(self):
        if not _NoNetwork.installed:
            sys.addaudithook(_NoNetwork.hook)
            _NoNetwork.installed = True
        _NoNetwork.events = []
        _NoNetwork.active = True
        return self

    def __exit__(self, *exc):
        _NoNetwork.active = False


def test_registration_loading_and_inference_open_no_network_socket(nnunet_model, tmp_path):
    from cbp_platform.segmentation.backends import load_runner
    from cbp_platform.segmentation.train import simulated_set

    folder, _ = nnunet_model
    item = simulated_set(1, 77)[0]
    with _NoNetwork():
        # the audit hook is live: this socket is what it must see
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        assert _NoNetwork.events, "the audit hook does not see sockets"
        _NoNetwork.events = []
        m, _ = register_phantom_model(tmp_path / "registry", folder)
        labels = load_runner(m, device="cpu").segment(item["water"], item["fat"], item["affine"])
        seen = list(_NoNetwork.events)
    assert seen == []
    assert labels.shape == item["labels"].shape


def test_labels_are_nnunets_prediction_mapped_onto_the_platforms_classes(nnunet_model, tmp_path):
    """The runner's label map equals nnU-Net's own prediction on the same arrays, mapped through the manifest:
    model ids 4/5/2/3 become 1/2/3/4, the model's adipose_tissue (1) becomes background."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from cbp_platform.segmentation.backends import load_runner
    from cbp_platform.segmentation.train import simulated_set

    folder, _ = nnunet_model
    m, _ = register_phantom_model(tmp_path / "registry", folder)
    item = simulated_set(1, 78)[0]
    runner = load_runner(m, device="cpu")
    ours = runner.segment(item["water"], item["fat"], item["affine"])
    pm = PlansManager(json.loads((folder / "plans.json").read_text()))
    cm = pm.get_configuration("3d_fullres")
    ds = json.loads((folder / "dataset.json").read_text())
    ck = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 2, 6, allow_init=False,
                                 deep_supervision=False)
    pred = nnUNetPredictor(tile_step_size=0.5, use_mirroring=bool(runner.mirror_axes),
                           perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    pred.manual_initialization(net, pm, cm, [ck["network_weights"]], ds, "nnUNetTrainer", runner.mirror_axes or None)
    img = np.stack([item["water"], item["fat"]]).astype(np.float32).transpose(0, 3, 2, 1)   # phantoms are LAS
    sp = np.sqrt((item["affine"][:3, :3] ** 2).sum(0))
    raw = np.asarray(pred.predict_single_npy_array(img, {"spacing": list(sp[::-1])}, None, None, False))
    raw = raw.transpose(2, 1, 0)
    expected = np.zeros_like(raw, dtype=np.uint8)
    for model_id, platform_id in m.classes.items():
        expected[raw == model_id] = platform_id
    np.testing.assert_array_equal(ours, expected)
    found = set(np.unique(raw).tolist())
    assert found & {2, 3, 4, 5}, f"the test model predicts no muscle at all ({found})"
    assert set(np.unique(ours).tolist()) <= {0, 1, 2, 3, 4}


def test_an_ensemble_of_folds_is_one_identity_and_averages_the_folds(nnunet_model, tmp_path):
    from cbp_platform.segmentation.backends import load_runner
    from cbp_platform.segmentation.train import simulated_set

    folder, _ = nnunet_model
    two = tmp_path / folder.name
    shutil.copytree(folder, two)
    shutil.copytree(two / "fold_0", two / "fold_1")
    single, _ = register_phantom_model(tmp_path / "r", folder, name="one")
    m, _ = register_phantom_model(tmp_path / "r", two, name="two")
    assert m.options["folds"] == ["0", "1"] and len(m.weights) == 2 and m.sha256 not in m.weights.values()
    item = simulated_set(1, 79)[0]
    a = load_runner(single, device="cpu").segment(item["water"], item["fat"], item["affine"])
    b = load_runner(m, device="cpu").segment(item["water"], item["fat"], item["affine"])
    assert np.mean(a == b) > 0.999          # two identical folds average to the single fold (float rounding aside)


def _nifti_items(tmp_path: Path, seed: int) -> list[dict]:
    """Two simulated scans written as NIfTI: segment_scans items P0 and P1."""
    from cbp_platform.segmentation.train import simulated_set

    items = []
    for i, it in enumerate(simulated_set(2, seed)):
        for c in ("water", "fat"):
            nib.save(nib.Nifti1Image(it[c], it["affine"]), tmp_path / f"p{i}_{c}.nii.gz")
        items.append({"pseudonym": f"P{i}", "water": str(tmp_path / f"p{i}_water.nii.gz"),
                      "fat": str(tmp_path / f"p{i}_fat.nii.gz")})
    return items


def test_one_unreadable_scan_is_reported_and_the_rest_segmented(nnunet_model, tmp_path):
    from cbp_platform.segmentation.backends import load_runner
    from cbp_platform.segmentation.pipeline import segment_scans

    folder, _ = nnunet_model
    m, _ = register_phantom_model(tmp_path / "registry", folder)
    items = _nifti_items(tmp_path, seed=80)
    (tmp_path / "p1_water.nii.gz").write_bytes(b"\x1f\x8b damaged")
    results, failures = segment_scans(items, load_runner(m, device="cpu"), tmp_path / "out", num_workers=0)
    assert [r["pseudonym"] for r in results] == ["P0"]
    assert [f["pseudonym"] for f in failures] == ["P1"] and "p1_water.nii.gz" in failures[0]["message"]


def test_a_failed_qc_keeps_the_label_map_and_tops_the_queue(nnunet_model, tmp_path):
    """The QC hook fails for one scan (its image cannot be written): the batch keeps every label map, the failed
    one is ranked first with a flag naming the error type (never its message, which names files)."""
    from cbp_platform.qc.pipeline import ScanQC, batch_qc
    from cbp_platform.segmentation.backends import load_runner
    from cbp_platform.segmentation.pipeline import segment_scans

    folder, _ = nnunet_model
    m, _ = register_phantom_model(tmp_path / "registry", folder)
    items = _nifti_items(tmp_path, seed=81)
    out = tmp_path / "out"
    out.mkdir()
    (out / "P1_qc.png").mkdir()          # a directory where P1's QC image should go: the write fails
    results, failures = segment_scans(items, load_runner(m, device="cpu"), out, num_workers=0, qc=ScanQC(out))
    assert failures == [] and [r["pseudonym"] for r in results] == ["P0", "P1"]
    assert all(Path(r["label_path"]).exists() for r in results)
    assert "qc" in results[0] and results[1]["qc_error"] in ("IsADirectoryError", "PermissionError", "OSError")
    qc = batch_qc(results, batch_key="b", delivery_id="d", model_sha256=m.sha256, model_name=m.name, sites={})
    top = qc.sort("triage_rank").row(0, named=True)
    assert top["pseudonym"] == "P1" and top["triage_flags"].startswith("QC failed (") and top["qc_image"] is None
    assert qc["triage_rank"].to_list() == [1, 2]


# ---------------------------------------------------------------------------------------------------------
# process_batch through Dagster with the nnU-Net model as the primary model, then a comparison


@pytest.fixture(scope="module")
def nnunet_pipeline(nnunet_model, tmp_path_factory):
    from orchestration.runner import compare_with, pipeline_environment, run_pending
    from cbp_platform.segmentation.registry import set_platform_model
    from cbp_platform.synth.cohort import CohortParameters
    from cbp_platform.synth.delivery import synthesize

    folder, _ = nnunet_model
    root = tmp_path_factory.mktemp("nnunet-pipeline")
    synthesize(participants=12, deliveries=1, seed=31, data_root=root, workers=2,
               params=CohortParameters(p_fat_water_swap=0.2))
    two = root / "models-in" / "ensemble" / folder.name
    shutil.copytree(folder, two)
    shutil.copytree(two / "fold_0", two / "fold_1")
    with pipeline_environment(root):
        primary, _ = register_phantom_model(root / "models" / "registry", folder)
        # the compared model runs by region of interest, located by the test model standing in for the platform's
        # own (the platform's trained model belongs to the other test stream)
        register_phantom_model(root / "models" / "registry", two, name="phantom-ensemble", roi=True)
        set_platform_model(root / "models", primary)
        inst = dg.DagsterInstance.get()
        summary = run_pending(inst, log=lambda *_: None, refresh=False,
                              model_config={"model": "phantom-nnunet", "n_val": 2})
        compared = compare_with(inst, "phantom-ensemble", log=lambda *_: None, refresh=False)
        yield root, inst, summary, compared



@pytest.mark.pipeline
def test_process_batch_runs_the_registered_nnunet_model_with_its_identity_in_lineage(nnunet_pipeline):
    """Segmentation, metrics, lineage and quarantine with the nnU-Net model. The test model's psoas (Dice 0.3-0.7
    after its minutes of training; nnU-Net's augmentation is not seeded, so each build differs a little) may trip
    the blocking per-batch plausibility check, as it must: the platform's QC holds every model to the same rules.
    Either the run succeeds with the check passed, or that check is the only failed step, with its counts."""
    root, inst, summary, _ = nnunet_pipeline
    key = dg.AssetCheckKey(dg.AssetKey("muscle_metrics"), "segmentation_plausibility")
    rec = inst.event_log_storage.get_asset_check_execution_history(key, limit=1)[0]
    ev = rec.event.dagster_event.event_specific_data
    bad = {k: ev.metadata[k].value for k in ("empty_masks", "lr_ratio_out_of_bounds", "volume_out_of_range")}
    run = inst.get_run_by_id(rec.run_id)
    failed = [s.step_key for s in inst.get_run_step_stats(run.run_id) if s.status.value == "FAILURE"]
    if ev.passed:
        assert summary["failed"] == [] and failed == [] and sum(bad.values()) == 0, (summary, failed, bad)
    else:
        assert summary["failed"] == ["sim31-d01.b001"], summary
        assert failed == ["muscle_metrics_segmentation_plausibility"] and sum(bad.values()) > 0, (failed, bad)
    m = load_manifest(root / "models" / "registry", "phantom-nnunet")
    cur = json.loads((root / "models" / "current.json").read_text())
    assert (cur["name"], cur["backend"], cur["source"], cur["weights_sha256"]) == \
        ("phantom-nnunet", "nnunetv2", "registered", m.sha256)
    key = dg.AssetCheckKey(dg.AssetKey("segmentation_model"), "segmentation_model_dice")
    rec = inst.event_log_storage.get_asset_check_execution_history(key, limit=1)[0]
    assert rec.event.dagster_event.event_specific_data.passed     # weights match the registration
    md = inst.get_latest_materialization_event(dg.AssetKey("muscle_segmentations")).asset_materialization.metadata
    assert md["backend"].value == "nnunetv2" and md["model_sha256"].value == m.sha256
    assert md["model_folder"].value == m.folder
    segs = _q(root, "SELECT * FROM muscle_segmentations")
    truth = pl.read_csv(root / "truth" / "sim31-d01" / "participants.csv")
    swapped = set(truth.filter(pl.col("fat_water_swap") != "none")["pseudonym"].to_list())
    assert swapped and set(segs["pseudonym"].to_list()) == set(truth["pseudonym"].to_list()) - swapped
    q = _q(root, "SELECT pseudonym, reason FROM quarantine WHERE stage = 'muscle_segmentations'")
    assert set(q["pseudonym"].to_list()) == swapped
    assert set(segs["model_sha256"].to_list()) == {m.sha256}
    prov = _q(root, "SELECT input_checksums FROM provenance WHERE stage = 'muscle_segmentations'")
    assert {json.loads(x)["model"] for x in prov["input_checksums"]} == {m.sha256}
    any_muscle = False
    for r in segs.iter_rows(named=True):
        assert not r["label_path"].startswith("/")                     # stored relative to the data root
        lab = nib.load(DataLayout(root).resolve(r["label_path"]))
        w, f, aff = _scan(root, "sim31-d01", r["pseudonym"])
        np.testing.assert_allclose(lab.affine, aff)
        vals = set(np.unique(np.asarray(lab.dataobj)).tolist())
        assert vals <= {0, 1, 2, 3, 4}, vals
        any_muscle |= bool(vals - {0})
    assert any_muscle
    met = _q(root, "SELECT * FROM muscle_metrics")
    assert met.height == 5 * segs.height


@pytest.mark.pipeline
def test_each_segmentation_gets_its_qc_image_features_and_triage(nnunet_pipeline):
    """muscle_segmentations writes, with its rows, one segmentation_qc row per label map (the same map's sha256,
    lean volume equal to muscle_metrics', nnU-Net's own uncertainty, a rank in the batch) and a QC image beside
    the map; its materialisation carries the batch's montage and the review app's link, and no pseudonym."""
    root, inst, _, _ = nnunet_pipeline
    segs = _q(root, "SELECT pseudonym, batch_key, label_path, label_sha256 FROM muscle_segmentations")
    qc = _q(root, "SELECT * FROM segmentation_qc")
    assert sorted(qc["pseudonym"].to_list()) == sorted(segs["pseudonym"].to_list())
    joined = qc.join(segs, on="pseudonym", suffix="_seg")
    assert (joined["label_sha256"] == joined["label_sha256_seg"]).all()
    for r in joined.iter_rows(named=True):
        png = DataLayout(root).resolve(r["qc_image"])
        assert png.parent == DataLayout(root).resolve(r["label_path"]).parent
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert qc["triage_rank"].sort().to_list() == list(range(1, qc.height + 1))
    assert qc["triage_score"].is_finite().all() and (qc["triage_score"] >= 0).all()
    assert ((qc["uncertainty"] > 0) & (qc["uncertainty"] < 1)).all()
    assert qc["site"].null_count() == 0            # the covariates give the site (a dependency of the asset)
    met = _q(root, "SELECT pseudonym, lean_ml FROM muscle_metrics WHERE muscle = 'back_total'")
    both = qc.select("pseudonym", "lean_ml").join(met, on="pseudonym", suffix="_metrics")
    assert both.height and np.allclose(both["lean_ml"], both["lean_ml_metrics"], rtol=1e-9)
    ev = inst.get_latest_materialization_event(dg.AssetKey("muscle_segmentations")).asset_materialization
    md = ev.metadata
    assert "qc_montage" not in md and "base64" not in json.dumps({k: str(v.value) for k, v in md.items()})
    assert md["qc_review_app"].value.endswith(f"/?batch={ev.partition}")
    assert Path(md["qc_montage_path"].value).read_bytes()[:4] == b"\x89PNG"
    text = json.dumps({k: str(v.value) for k, v in md.items()})
    assert not any(p in text for p in segs["pseudonym"].to_list())


@pytest.mark.pipeline
def test_compare_keeps_the_primary_untouched_and_two_equal_models_agree(nnunet_pipeline):
    root, inst, _, compared = nnunet_pipeline
    assert compared["failed"] == [], compared
    segs = _q(root, "SELECT * FROM muscle_segmentations")
    other = _q(root, "SELECT * FROM comparison_segmentations")
    assert set(other["pseudonym"].to_list()) == set(segs["pseudonym"].to_list())
    assert set(other["model_name"].to_list()) == {"phantom-ensemble"}
    assert not set(other["label_path"].to_list()) & set(segs["label_path"].to_list())
    assert set(segs["model_sha256"].to_list()) == {load_manifest(root / "models" / "registry",
                                                                 "phantom-nnunet").sha256}
    row = _q(root, "SELECT * FROM model_comparisons")
    assert row.height == 1
    c = json.loads(row["comparison"][0])
    assert c["primary"]["name"] == "phantom-nnunet" and c["other"]["name"] == "phantom-ensemble"
    for cls, d in c["label_dice"].items():
        if d["n"]:
            assert d["mean"] > 0.99, (cls, d)
    md = inst.get_latest_materialization_event(dg.AssetKey("model_comparison")).asset_materialization.metadata
    assert md["participants"].value == segs.height
    ran = {k: v["inference"] for k, v in md["how_each_ran"].value.items()}
    assert ran == {"phantom-nnunet": "whole volume", "phantom-ensemble": "region of interest"}, ran
    cm = inst.get_latest_materialization_event(dg.AssetKey("comparison_metrics")).asset_materialization.metadata
    roi = cm["roi"].value
    assert cm["inference"].value == "region of interest" and roi["scans"] == segs.height, roi
    assert roi["regions"] + roi["reruns_whole_volume"] + roi["not_located"] == roi["scans"] and roi["regions"] > 0


@pytest.mark.pipeline
def test_compare_again_skips_batches_already_compared_with_the_same_weights(nnunet_pipeline):
    from orchestration.runner import compare_with, pipeline_environment

    root, inst, _, _ = nnunet_pipeline
    before = len(inst.get_run_records(filters=dg.RunsFilter(job_name="compare_model_batch")))
    lines = []
    with pipeline_environment(root):
        again = compare_with(inst, "phantom-ensemble", log=lines.append, refresh=False)
    assert again["failed"] == [], again
    assert any("1 of 1 batches already compared with these weights" in x for x in lines), lines
    assert len(inst.get_run_records(filters=dg.RunsFilter(job_name="compare_model_batch"))) == before
    assert _q(root, "SELECT count(*) AS n FROM model_comparisons")["n"][0] == 1
