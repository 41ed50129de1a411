"""Domain-core ingestion rules, without Dagster."""

import gzip
import io
import json

import nibabel as nib
import numpy as np
import pytest

from cbp_platform.imaging.nifti import nifti_bytes, sha256_bytes
from cbp_platform.ingest.covariates import parse_covariates
from cbp_platform.ingest.deliveries import (ManifestError, batch_key, check_delivery, load_manifest, plan_batches,
                                            split_batch_key)
from cbp_platform.ingest.scans import ScanProblem, inspect_participant
from cbp_platform.landing import COVARIATE_COLUMNS

HEADER = ",".join(COVARIATE_COLUMNS)
ROW = "{p},Berlin,2016-03-04,45,F,168.0,64.5,1,5,1200,0,0,0,1"


def test_batch_keys_are_readable_and_stable():
    assert batch_key("sim1-d01", 2) == "sim1-d01.b002"
    assert split_batch_key("nako.2019-03.b010") == ("nako.2019-03", 10)
    man = {"delivery_id": "x", "participants": [f"P{i:09d}" for i in range(7)]}
    b = plan_batches(man, 3)
    assert [x.key for x in b] == ["x.b001", "x.b002", "x.b003"] and [len(x.participants) for x in b] == [3, 3, 1]
    with pytest.raises(ValueError):
        split_batch_key("no-batch-here")


def test_covariates_duplicates_and_missing_rows(tmp_path):
    p = tmp_path / "covariates.csv"
    lines = [HEADER, ROW.format(p="AAAAAAAAAA"), ROW.format(p="BBBBBBBBBB"), ROW.format(p="BBBBBBBBBB"),
             ROW.format(p="CCCCCCCCCC").replace(",45,", ",,")]
    p.write_text("\n".join(lines) + "\n")
    res = parse_covariates(p, ["AAAAAAAAAA", "BBBBBBBBBB", "CCCCCCCCCC", "DDDDDDDDDD"], {"EEEEEEEEEE"})
    assert res.rows["pseudonym"].to_list() == ["AAAAAAAAAA"]
    got = {(q["pseudonym"], q["reason"]) for q in res.quarantine}
    assert got == {("BBBBBBBBBB", "duplicate_pseudonym"), ("CCCCCCCCCC", "missing_required"),
                   ("DDDDDDDDDD", "no_covariate_row")}
    assert all(str(p) in q["message"] for q in res.quarantine)
    row = res.rows.row(0, named=True)
    assert row["age"] == 45 and row["cbp"] is True and row["osteoarthritis"] is True and str(row["site"]) == "Berlin"


def test_manifest_errors_name_the_file(tmp_path):
    d = tmp_path / "d1"
    d.mkdir()
    with pytest.raises(ManifestError, match="manifest.json: missing"):
        load_manifest(d)
    (d / "manifest.json").write_text(json.dumps({"schema_version": "1.0", "delivery_id": "other", "created_at": "x",
                                                 "participants": [], "files": []}))
    with pytest.raises(ManifestError, match="does not match folder"):
        load_manifest(d)
    (d / "_SUCCESS").write_text("")
    st = check_delivery(d)
    assert st.state == "refused" and "manifest.json" in st.reason


def _write(d, name, payload):
    path = d / "mri" / "PPPPPPPPPP" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return {"path": f"mri/PPPPPPPPPP/{name}", "size": len(payload), "sha256": sha256_bytes(payload)}


def test_absurd_header_is_refused_before_decompressing(tmp_path):
    aff = np.diag([4.0, 4.0, 6.0, 1.0])
    good = nifti_bytes(np.ones((20, 20, 20), np.int16), aff)
    raw = bytearray(gzip.decompress(good))
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])))
    hdr.set_data_shape((2000, 2000, 2000))
    raw[:348] = hdr.binaryblock
    bomb = gzip.compress(bytes(raw), mtime=0)
    files = {e["path"]: e for e in (_write(tmp_path, "PPPPPPPPPP_water.nii.gz", bomb),
                                     _write(tmp_path, "PPPPPPPPPP_fat.nii.gz", good))}
    with pytest.raises(ScanProblem) as exc:
        inspect_participant(tmp_path, "PPPPPPPPPP", files)
    assert exc.value.reason == "absurd_size" and exc.value.message.startswith("water image (files[0]): ")
    assert "PPPPPPPPPP" not in exc.value.message
