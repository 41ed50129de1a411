"""A DICOM cohort through Dagster: `cbp synth --format dicom` with every DICOM fault, then the batch job (ingestion,
conversion and stitching, segmentation with a registered nnU-Net model, metrics). Every faulty participant is
quarantined with its reason, every good one is measured, and the fake identifying header values appear nowhere."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json

import dagster as dg
import polars as pl
import pytest

from cbp_platform.synth.dicom import UID_ROOT, FakeIdentity
from cbp_platform.reasons import R
from cbp_platform.synth.faults import DICOM_FAULT_KINDS, EXPECTED_REASONS, HANDLED_FAULTS
from tests.support.nnunet import register_phantom_model
from tests.support.warehouse import query as _q

pytestmark = pytest.mark.pipeline          # (and model: the nnunet_model fixture)


def _landing_digest(root):
    h = hashlib.sha256()
    for p in sorted((root / "landing").rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def dicom_run(nnunet_model, tmp_path_factory):
    from cbp_platform.cli import main as cbp
    from cbp_platform.synth.delivery import synthesize
    from orchestration.runner import pipeline_environment, run_pending

    folder, _ = nnunet_model
    root = tmp_path_factory.mktemp("dicom-pipeline")
    synthesize(participants=16, deliveries=2, seed=41, data_root=root, fault_rate=0.7, in_opp=True, workers=2,
               scan_format="dicom")
    before = _landing_digest(root)
    lines: list[str] = []
    with pipeline_environment(root):
        register_phantom_model(root / "models" / "registry", folder)
        inst = dg.DagsterInstance.get()
        summary = run_pending(inst, log=lines.append, refresh=False,
                              model_config={"model": "phantom-nnunet", "n_val": 2})
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert cbp(["status", "--json"]) == 0
        status = {r["delivery_id"]: r for r in json.loads(buf.getvalue())}
        yield dict(root=root, inst=inst, summary=summary, lines=lines, before=before, status=status)


def test_every_faulty_participant_is_quarantined_with_its_reason_and_every_good_one_measured(dicom_run):
    root = dicom_run["root"]
    faults = pl.concat([pl.read_csv(p) for p in sorted((root / "truth").glob("*/faults.csv"))])
    truth = pl.concat([pl.read_csv(p) for p in sorted((root / "truth").glob("*/participants.csv"))])
    assert set(faults["fault"].to_list()) == set(DICOM_FAULT_KINDS)          # every kind injected
    q = _q(root, "SELECT stage, pseudonym, delivery_id, reason, message FROM quarantine")
    by = {(r["delivery_id"], r["pseudonym"]): r for r in q.iter_rows(named=True)}
    for f in faults.iter_rows(named=True):
        if f["outcome"] == "handled":
            continue
        got = by.get((f["delivery_id"], f["pseudonym"]))
        assert got is not None and got["reason"] in EXPECTED_REASONS[f["fault"]], (f, got)
    # a cohort swap is one exchanged station in DICOM: refused per station
    swapped = {(r["delivery_id"], r["pseudonym"]) for r in truth.filter(pl.col("fat_water_swap") != "none")
               .iter_rows(named=True)}
    for k in swapped:
        assert by[k]["reason"] == R.station_fat_water_swap.code, by.get(k)
    bad_scan = {(f["delivery_id"], f["pseudonym"]) for f in faults.iter_rows(named=True)
                if f["outcome"] == "quarantine" and f["fault"] not in ("malformed_covariate_row",
                                                                       "out_of_range_covariate")} | swapped
    measured = _q(root, "SELECT DISTINCT delivery_id, pseudonym FROM muscle_metrics")
    got = set(zip(measured["delivery_id"], measured["pseudonym"]))
    want = {(r["delivery_id"], r["pseudonym"]) for r in truth.iter_rows(named=True)} - bad_scan
    assert got == want
    handled = {(f["delivery_id"], f["pseudonym"]) for f in faults.iter_rows(named=True) if f["fault"] in HANDLED_FAULTS}
    assert handled and handled <= got
    for step in ("raw_mri_scans", "muscle_segmentations"):
        md = dicom_run["inst"].get_latest_materialization_event(dg.AssetKey(step))
        assert md is not None


def test_segmentations_lie_on_the_stitched_grid_and_lineage_names_every_dicom_file(dicom_run):
    import nibabel as nib

    root = dicom_run["root"]
    scans = _q(root, "SELECT * FROM raw_mri_scans")
    assert set(scans["source_format"].to_list()) == {"dicom"} and (scans["stations"] == 4).all()
    segs = _q(root, "SELECT s.label_path, r.water_path FROM muscle_segmentations s JOIN raw_mri_scans r "
                    "USING (batch_key, pseudonym)")
    assert segs.height
    for r in segs.head(3).iter_rows(named=True):
        assert r["water_path"].startswith("derived/dicom/")
        lab, scan = nib.load(root / r["label_path"]), nib.load(root / r["water_path"])   # both relative to the root
        assert lab.shape == scan.shape and abs(lab.affine - scan.affine).max() < 1e-3
    prov = _q(root, "SELECT pseudonym, input_checksums FROM provenance WHERE stage = 'raw_mri_scans'")
    files = {r["pseudonym"]: r["dicom_files"] for r in scans.iter_rows(named=True)}
    for r in prov.iter_rows(named=True):
        inputs = json.loads(r["input_checksums"])
        assert sum(1 for k in inputs if "#" in k) == files[r["pseudonym"]] > 100
        assert sum(1 for k in inputs if k.endswith(".zip")) == 4
    assert _landing_digest(root) == dicom_run["before"]                      # the landing zone is never written


def test_identifying_header_values_reach_no_table_log_event_or_derived_file(dicom_run):
    root = dicom_run["root"]
    ident = FakeIdentity()
    secrets = [ident.patient_name, "Mustermann", ident.birth_date, ident.institution, "Musterstadt",
               ident.referring, UID_ROOT.rstrip(".")]
    blobs = [("log", "\n".join(dicom_run["lines"]).encode())]
    for sub in ("dagster_home", "derived", "registry", "published"):
        for p in (root / sub).rglob("*") if (root / sub).exists() else []:
            if p.is_file() and p.suffix != ".duckdb":
                data = p.read_bytes()
                blobs.append((str(p.relative_to(root)), gzip.decompress(data) if p.suffix == ".gz" else data))
    assert any(name.endswith("_dixon.json") for name, _ in blobs)
    tables = _q(root, "SELECT table_name FROM information_schema.tables")["table_name"].to_list()
    for t in tables:
        df = _q(root, f'SELECT * FROM "{t}"')
        text = df.select([c for c, d in df.schema.items() if d == pl.String]).write_csv()
        blobs.append((f"warehouse:{t}", text.encode()))
    assert len(blobs) > 50 and any(name.startswith("warehouse:raw_mri_scans") for name, _ in blobs)
    leaks = sorted({(s, name) for s in secrets for name, b in blobs if s.encode() in b})
    assert leaks == []


def test_every_file_and_covariate_row_of_the_dicom_deliveries_is_accounted_for(dicom_run):
    st = dicom_run["status"]
    assert len(st) == 2
    for did, r in st.items():
        acc = r["accounting"]
        assert r["state"] == "registered" and acc["adds_up"], (did, acc)
        assert acc["files"]["pending"] == acc["covariate_rows"]["pending"] == 0
        zips = len(list((dicom_run["root"] / "landing" / did / "dicom").rglob("*.zip")))
        assert acc["files"]["total"] == zips + 3                # manifest, _SUCCESS, covariates.csv
        assert acc["files"]["stored"] + acc["files"]["quarantined"] == zips + 2
