"""Segmentation and metrics: bundle handling, augmentation, and the batch stage end to end against truth (the default
model trained through Dagster: the ``monai_pipeline`` fixture, markers ``model`` and ``pipeline``)."""

import json

import dagster as dg
import nibabel as nib
import numpy as np
import polars as pl
import pytest
import torch

from cbp_platform.metrics.agreement import bland_altman, icc_a1, proportional_bias
from cbp_platform.metrics.body_composition import muscle_metrics
from cbp_platform.paths import DataLayout, resolve_under
from cbp_platform.segmentation.bundle import BundleError, background_offset, build_network, load_bundle, save_bundle
from cbp_platform.segmentation.train import RandFlipLRd
from cbp_platform.synth.cohort import CohortParameters
from cbp_platform.synth.delivery import synthesize
from cbp_platform.synth.phantom import PRESETS, Subject, render_phantom
from tests.support.warehouse import query as _q


def test_bundle_roundtrip_and_clear_errors(tmp_path):
    net = build_network()
    sha = save_bundle(tmp_path / "b", net, {"training": {"note": "untrained"}})
    b = load_bundle(tmp_path / "b")
    assert b.sha256 == sha and b.metadata["weights_sha256"] == sha
    assert b.metadata["inputs"]["image"]["channels"] == ["water", "fat"]
    x = torch.rand(1, 2, 32, 32, 16)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), b.network(x))
    with pytest.raises(BundleError, match="folder not found"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "b" / "models" / "model.pt").write_bytes(b"garbage")
    with pytest.raises(BundleError, match=r"models/model.pt: sha256 .* differs"):
        load_bundle(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "configs" / "metadata.json").read_text())
    meta.pop("weights_sha256")
    (tmp_path / "b" / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"models/model.pt: cannot load weights"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / "configs" / "metadata.json").write_text("{")
    with pytest.raises(BundleError, match=r"configs/metadata.json: not valid JSON"):
        load_bundle(tmp_path / "b")


def test_lr_flip_swaps_left_and_right_labels():
    """LAS: index i runs to the participant's left. After mirroring, whatever lies at high i is a left muscle."""
    img = torch.zeros(2, 8, 4, 4)
    img[0, 6:] = 1.0                          # a marker on the left side only
    lab = torch.zeros(1, 8, 4, 4, dtype=torch.long)
    lab[0, 6:] = 1                            # left autochthonous (high i)
    lab[0, :2] = 2                            # right autochthonous (low i)
    lab[0, 4] = 3                             # left psoas
    out = RandFlipLRd(prob=1.0)({"image": img, "label": lab})
    assert (out["image"][0, :2] == 1).all() and (out["image"][0, 6:] == 0).all()   # the image is mirrored
    assert (out["label"][0, 6:] == 1).all() and (out["label"][0, :2] == 2).all()   # sides keep their names
    assert (out["label"][0, 3] == 4).all() and (out["label"][0, 4] == 0).all()     # left psoas became right


def test_metrics_on_a_phantom_match_its_truth():
    s = Subject(female=True, age=60, height_cm=165, weight_kg=70, imat_pct=9.0, mfi=0.05,
                lean_ml=(300.0, 290.0, 90.0, 85.0))
    ph = render_phantom(s, PRESETS["fast"], np.random.default_rng(4))
    rows = {r["muscle"]: r for r in muscle_metrics(ph.labels, ph.water, ph.fat, PRESETS["fast"].voxel_ml)}
    assert abs(rows["back_total"]["compartment_ml"] - ph.truth["compartment_ml"]) < 1e-6
    # noisy images, true labels: InterMAT within half a percentage point, lean volume within 1 %
    assert abs(rows["back_total"]["imat_pct"] - ph.truth["imat_pct"]) < 0.5
    assert abs(rows["back_total"]["lean_ml"] / ph.truth["lean_ml"] - 1) < 0.01
    nan_w = ph.water.astype(np.float32)
    nan_w[0, 0, 0] = np.nan
    assert all(np.isfinite(r["imat_pct"]) for r in muscle_metrics(ph.labels, nan_w, ph.fat, 0.096))


def test_agreement_statistics():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert icc_a1(x, x) == pytest.approx(1.0)
    assert icc_a1(x, x + 1.0) < icc_a1(x, x + 0.1)
    ba = bland_altman(x * 1.02, x)
    assert ba["bias"] == pytest.approx(2.0) and ba["loa_low"] == pytest.approx(2.0)
    # the border error's shape: a mean relative bias near 0 can hide a level-dependent one, which the
    # Bland-Altman regression recovers (here: +1 pp of outside fat, 12 % of the true fat missed)
    t = np.random.default_rng(3).uniform(3.0, 15.0, 400)
    noise = np.random.default_rng(4).normal(0.0, 0.3, 400)
    pb = proportional_bias(1.0 + 0.88 * t + noise, t)
    assert pb["intercept"] == pytest.approx(1.0, abs=0.15)
    assert pb["slope"] == pytest.approx(-0.12, abs=3 * pb["slope_se"])
    assert 0.002 < pb["slope_se"] < 0.02
    assert np.isnan(proportional_bias(x, np.ones(4))["slope"])


@pytest.mark.model
def test_training_is_a_function_of_its_seed():
    """Same seed, same weights, whatever the process's torch generator did before (the network passed in is built
    from that state: training re-initialises it from the seed); another seed, other weights."""
    from cbp_platform.segmentation.train import train

    def weights(seed: int) -> list[torch.Tensor]:
        torch.rand(int(torch.randint(1, 1000, (1,))))          # disturb the global generator
        net = train(build_network(), n_train=2, max_iterations=2, seed=seed).network
        return [t.clone() for t in net.state_dict().values()]

    a, b, c = weights(5), weights(5), weights(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.model
@pytest.mark.pipeline
def test_training_cap_fails_instead_of_shortening_the_model(tmp_path):
    """A wall-clock cap never yields a shorter-trained model: train() raises, the asset fails with the reason and
    no model pointer is written. Without a cap the iteration count is exactly the configured one."""
    from orchestration.runner import pipeline_environment
    from cbp_platform.definitions import build_definitions
    from cbp_platform.segmentation.train import TrainingCapReached, train

    with pytest.raises(TrainingCapReached, match=r"cap of 1e-09 s after 1 of 40 iterations"):
        train(build_network(), n_train=2, max_iterations=40, budget_s=1e-9)
    assert train(build_network(), n_train=2, max_iterations=3, budget_s=None).iterations == 3
    with pipeline_environment(tmp_path):
        res = build_definitions().resolve_job_def("train_segmentation_model").execute_in_process(
            instance=dg.DagsterInstance.get(), raise_on_error=False,
            run_config={"ops": {"segmentation_model": {"config": {"max_iterations": 40, "n_train": 2,
                                                                   "train_budget_s": 1e-9}}}})
        assert not res.success
        failure = next(e for e in res.all_events if e.event_type_value == "STEP_FAILURE")
        assert "wall-clock cap" in failure.step_failure_data.error.message
        assert not (tmp_path / "models" / "current.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_path_matches_cpu(tmp_path):
    from cbp_platform.segmentation.infer import Segmenter

    save_bundle(tmp_path / "b", build_network(), {})
    b = load_bundle(tmp_path / "b")
    ph = render_phantom(Subject(False, 50, 178, 80, 7.0, 0.04, (400, 400, 120, 120)), PRESETS["fast"],
                        np.random.default_rng(1))
    cpu = Segmenter(load_bundle(tmp_path / "b"), device="cpu").segment(ph.water, ph.fat, ph.affine)
    gpu = Segmenter(b, device="cuda").segment(ph.water, ph.fat, ph.affine)
    assert (cpu == gpu).mean() > 0.99


# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def monai_pipeline(tmp_path_factory):
    """One delivery (with a few fat-water swaps) through the training of the default model (its network, 120
    training scans, 900 iterations, seed 1000, its border calibrated on 120 held-out scans: the asset's defaults, as
    ``make demo`` trains it) and the whole batch job. Built once per test run: this module is its only user.

    120 participants (110 segmented with truth): the mean relative InterMAT bias has a per-participant SD of
    about 5 %, so this many put its standard error near 0.5 %, small enough to test the 2 % target; 30 did not."""
    from orchestration.runner import pipeline_environment, run_pending

    root = tmp_path_factory.mktemp("seg")
    synthesize(participants=120, deliveries=1, seed=8, data_root=root, workers=2,
               params=CohortParameters(p_fat_water_swap=0.12))
    with pipeline_environment(root):
        inst = dg.DagsterInstance.get()
        # 120 participants are too few for the association models (their checks would fail by design); the
        # cohort-level half is tested in tests/assets/test_analysis.py
        summary = run_pending(inst, log=lambda *_: None, refresh=False,
                              model_config={"max_iterations": 900, "n_train": 120, "n_val": 6})
        yield root, inst, summary


@pytest.fixture(scope="module")
def accuracy_report(monai_pipeline) -> dict:
    """``cbp accuracy --json`` on the processed delivery, run once for the tests that read it."""
    import contextlib
    import io

    from cbp_platform.cli import main

    root, _, _ = monai_pipeline
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["accuracy", "--data-root", str(root), "--json"]) == 0
    return json.loads(out.getvalue())


def test_model_trains_passes_dice_and_is_identified_by_its_weights(monai_pipeline):
    root, inst, summary = monai_pipeline
    assert summary["failed"] == [], summary
    cur = json.loads((root / "models" / "current.json").read_text())
    b = load_bundle(resolve_under(root / "models", cur["path"]))     # stored relative to models/
    assert b.sha256 == cur["weights_sha256"] and min(cur["validation_dice"].values()) >= 0.90
    # trained for exactly the configured iterations, then its border calibrated on its own held-out scans
    assert b.metadata["training"]["iterations"] == 900
    cal = b.metadata["calibration"]
    assert cal["n"] == 120 and cal["seed"] == 3000 and cal["within_range"] and abs(cal["imat_bias_after"]) < 0.5
    assert background_offset(b.network) == pytest.approx(cal["offset"])
    ev = inst.get_latest_materialization_event(dg.AssetKey("segmentation_model")).asset_materialization
    assert ev.metadata["weights_sha256"].value == b.sha256
    key = dg.AssetCheckKey(dg.AssetKey("segmentation_model"), "segmentation_model_dice")
    rec = inst.event_log_storage.get_asset_check_execution_history(key, limit=1)[0]
    assert rec.event.dagster_event.event_specific_data.passed


def test_batch_segmentations_metrics_and_swap_policy(monai_pipeline):
    root, inst, _ = monai_pipeline
    truth = pl.read_csv(root / "truth" / "sim8-d01" / "participants.csv")
    swapped = set(truth.filter(pl.col("fat_water_swap") != "none")["pseudonym"].to_list())
    assert swapped, "the fixture must contain swapped scans"
    segs = _q(root, "SELECT * FROM muscle_segmentations")
    q = _q(root, "SELECT pseudonym, reason FROM quarantine WHERE stage = 'muscle_segmentations'")
    assert set(q.filter(pl.col("reason") == "fat_water_swap_suspected")["pseudonym"].to_list()) == swapped
    assert set(segs["pseudonym"].to_list()) == set(truth["pseudonym"].to_list()) - swapped
    cur = json.loads((root / "models" / "current.json").read_text())
    assert set(segs["model_sha256"].to_list()) == {cur["weights_sha256"]}
    for r in segs.head(3).iter_rows(named=True):
        lab = nib.load(DataLayout(root).resolve(r["label_path"]))         # stored relative to the data root
        scan = nib.load(root / "landing" / "sim8-d01" / "mri" / r["pseudonym"] / f"{r['pseudonym']}_water.nii.gz")
        np.testing.assert_allclose(lab.affine, scan.affine)
        assert lab.shape == scan.shape
    m = _q(root, "SELECT * FROM muscle_metrics")
    assert m.height == 5 * segs.height and m["imat_pct"].is_finite().all()
    prov = _q(root, "SELECT * FROM provenance WHERE stage = 'muscle_segmentations'")
    assert all(json.loads(x)["model"] == cur["weights_sha256"] for x in prov["input_checksums"])
    key = dg.AssetCheckKey(dg.AssetKey("muscle_metrics"), "segmentation_plausibility")
    rec = inst.event_log_storage.get_asset_check_execution_history(key, limit=1)[0]
    assert rec.event.dagster_event.event_specific_data.passed
    # accuracy against the simulator's truth travels with the batch's materialisation
    md = inst.get_latest_materialization_event(dg.AssetKey("muscle_metrics")).asset_materialization.metadata
    assert md["accuracy_n"].value == segs.height
    assert min(md["accuracy_dice"].value.values()) >= 0.90
    assert md["accuracy_lmm_icc"].value >= 0.95


def test_accuracy_meets_dice_icc_and_lmm_bias_targets(accuracy_report):
    """The issue's targets on a delivery the model never saw: Dice >= 0.90, ICC >= 0.95, LMM |bias| < 2 %."""
    rep = accuracy_report
    assert min(rep["dice"].values()) >= 0.90, rep["dice"]
    assert rep["lmm"]["icc"] >= 0.95 and abs(rep["lmm"]["bias"]) < 2.0, rep["lmm"]
    assert rep["imat"]["icc"] >= 0.95, rep["imat"]


def test_imat_bias_target(accuracy_report):
    """InterMAT's mean relative bias < 2 % on the 110 unseen participants, for the model this machine trained.
    The threshold is the target itself: five calibrated models from five training seeds (benchmarks/bench_seeds.py,
    docs/segmentation.md) lie within -0.45 % to +0.35 % on 120 held-out scans, and this sample's standard error is
    about 0.5 %, so a model trained on any machine stays a point inside it; uncalibrated, two of the five missed.
    Its proportional part (low InterMAT over-, high under-estimated at the fascial border) stays within what the
    mean can carry: a slope of measured - true on true well short of -0.3 (a third of the fat missed)."""
    rep = accuracy_report
    prop = rep["imat"]["proportional"]
    assert -0.3 < prop["slope"] < 0.1 and abs(prop["intercept"]) < 2.5, prop
    assert abs(rep["imat"]["bias"]) < 2.0, rep["imat"]


def test_cpu_inference_is_deterministic(monai_pipeline):
    from cbp_platform.segmentation.infer import Segmenter

    root, _, _ = monai_pipeline
    cur = json.loads((root / "models" / "current.json").read_text())
    segs = _q(root, "SELECT pseudonym, label_sha256, label_path FROM muscle_segmentations ORDER BY pseudonym LIMIT 1")
    p = segs["pseudonym"][0]
    w = nib.load(root / "landing" / "sim8-d01" / "mri" / p / f"{p}_water.nii.gz")
    f = nib.load(root / "landing" / "sim8-d01" / "mri" / p / f"{p}_fat.nii.gz")
    seg = Segmenter(load_bundle(resolve_under(root / "models", cur["path"])), device="cpu")
    a = seg.segment(np.asarray(w.dataobj), np.asarray(f.dataobj), w.affine)
    b = seg.segment(np.asarray(w.dataobj), np.asarray(f.dataobj), w.affine)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, np.asarray(nib.load(DataLayout(root).resolve(segs["label_path"][0])).dataobj))


def test_a_rescan_correction_re_segments_its_participant_and_nobody_else(monai_pipeline):
    """Issue 27: a correction of the processed delivery (two covariate rows, one re-scan) through the sensor and the
    per-batch job. The re-scan's batch runs the image stages for its one participant; the covariates' batch runs
    participant_covariates alone (no segmentation); the re-scan's label map and metrics are in force, the old ones
    stay, closed. Runs last in this module (it adds versions the tests above would count)."""
    from cbp_platform.synth.correction import synthesize_correction
    from orchestration.profiles import warehouse
    from orchestration.runner import run_pending

    root, inst, _ = monai_pipeline
    res = synthesize_correction(of="sim8-d01", seed=3, data_root=root, covariates=2, rescans=1)
    cid = res.delivery_ids[0]
    man = json.loads((root / "landing" / cid / "manifest.json").read_text())
    (p,) = [e["pseudonym"] for e in man["corrections"] if e["parts"] == ["scan"]]
    wh = warehouse()
    before = {t: wh.table(t, versions="all").height for t in ("muscle_segmentations", "muscle_metrics",
                                                              "segmentation_qc", "raw_mri_scans")}
    summary = run_pending(inst, log=lambda *_: None, refresh=False)
    assert summary["failed"] == [] and summary["ran"] == 2, summary
    after = {t: wh.table(t, versions="all").height for t in before}
    # exactly one participant's image stages ran: one scan, one label map, one QC row, five metric rows
    assert {t: after[t] - before[t] for t in before} == {"muscle_segmentations": 1, "muscle_metrics": 5,
                                                         "segmentation_qc": 1, "raw_mri_scans": 1}
    segs = wh.table("muscle_segmentations", where={"pseudonym": p}, versions="all")
    assert segs.filter(pl.col("superseded_by") == "")["delivery_id"].to_list() == [cid]
    assert wh.table("muscle_metrics", where={"pseudonym": p})["delivery_id"].unique().to_list() == [cid]
    # what each run materialised (the run requests' asset selections, as the sensor made them)
    mats = {}
    for key in (f"{cid}.b001", f"{cid}.b002"):
        (run,) = inst.get_runs(filters=dg.RunsFilter(tags={"cbp/batch": key}))
        mats[key] = sorted(k.to_user_string() for k in run.asset_selection)
    assert mats == {f"{cid}.b001": ["muscle_metrics", "muscle_segmentations", "raw_mri_scans"],
                    f"{cid}.b002": ["participant_covariates"]}
    ev = inst.get_latest_materialization_event(dg.AssetKey("muscle_segmentations")).asset_materialization
    assert ev.partition == f"{cid}.b001" and ev.metadata["dagster/row_count"].value == 1
