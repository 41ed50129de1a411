"""Property-based test (hypothesis) of DICOM ingestion (issue 26): mutated scanner files never escape their stage.

A small participant (two overlapping stations, water and fat, written by the simulator's scanner) is delivered with
one DICOM file mutated: bytes flipped, inserted or deleted in its header, the file cut short, or its preamble
removed. ``inspect_dicom_participant`` (classification, geometry from the headers, identity, conversion with
dcm2niix, stitching) must either return volumes on a sane grid or raise ``ScanProblem`` with a registered reason:
never another exception. Deterministic (``derandomize``), no example database.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cbp_platform.ingest.dicom import DicomRules, inspect_dicom_participant
from cbp_platform.ingest.scans import ScanProblem
from cbp_platform.reasons import RAW_MRI_SCANS, emitted_at
from cbp_platform.synth.dicom import series_slices

P = "ABCDEFGHJK"
STATIONS = [(0, 12), (8, 20)]
RULES = DicomRules(min_coverage_mm=0.0)            # a small test volume: no minimum coverage


@pytest.fixture(scope="module")
def slices() -> dict[str, list[bytes]]:
    rng = np.random.default_rng(3)
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    affine[:3, 3] = [-24.0, -24.0, -40.0]
    water = (rng.random((24, 24, 20)) * 400 + 100).astype(np.float32)
    fat = (rng.random((24, 24, 20)) * 100 + 10).astype(np.float32)
    out = {}
    for contrast, vol in (("water", water), ("fat", fat)):
        files = []
        for s, rng_k in enumerate(STATIONS, start=1):
            _, payloads = series_slices(vol, affine, contrast=contrast, station=s, k_range=rng_k, pseudonym=P, seed=5,
                                        acquired=datetime(2020, 1, 1, 10, s))
            files += payloads
        out[contrast] = files
    return out


def _deliver(tmp: Path, slices: dict[str, list[bytes]]) -> tuple[Path, dict]:
    ddir = tmp / "d01"
    files = {}
    for contrast, payloads in slices.items():
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for n, b in enumerate(payloads):
                zf.writestr(f"{n:04d}.dcm", b)
        rel = f"dicom/{P}/{P}_dixon_{contrast}.zip"
        (ddir / rel).parent.mkdir(parents=True, exist_ok=True)
        (ddir / rel).write_bytes(buf.getvalue())
        files[rel] = {"path": rel, "size": len(buf.getvalue()), "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
    return ddir, files


def _mutate(data, payload: bytes) -> bytes:
    kind = data.draw(st.sampled_from(["flip", "insert", "delete", "cut", "no_preamble"]))
    buf = bytearray(payload)
    head = min(len(buf), 1600)                          # the header: where the parser's decisions are made
    if kind == "cut":
        return bytes(buf[:data.draw(st.integers(0, len(buf) - 1))])
    if kind == "no_preamble":
        return bytes(buf[128 + 4:]) if data.draw(st.booleans()) else bytes(buf[128:])
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, head - 1))
        if kind == "flip":
            buf[i] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=6))
        else:
            del buf[i:i + data.draw(st.integers(1, 6))]
    return bytes(buf)


def test_the_unmutated_participant_converts(tmp_path, slices):
    ddir, files = _deliver(tmp_path, slices)
    res = inspect_dicom_participant(ddir, P, files, out_dir=tmp_path / "out", rel_out="derived/out", rules=RULES)
    assert res.facts["stations"] == 2 and res.facts["shape_z"] == 20


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_dicom_file_is_converted_or_refused_never_raised(tmp_path_factory, slices, data):
    contrast = data.draw(st.sampled_from(sorted(slices)))
    k = data.draw(st.integers(0, len(slices[contrast]) - 1))
    mutated = {c: list(v) for c, v in slices.items()}
    mutated[contrast][k] = _mutate(data, slices[contrast][k])
    tmp = tmp_path_factory.mktemp("mut")
    ddir, files = _deliver(tmp, mutated)
    try:
        res = inspect_dicom_participant(ddir, P, files, out_dir=tmp / "out", rel_out="derived/out", rules=RULES)
    except ScanProblem as exc:
        event(f"refused: {exc.reason}")
        assert emitted_at(exc.reason, RAW_MRI_SCANS), exc.reason
        assert P not in exc.message and str(tmp) not in exc.message, exc.message
        return
    event("converted")
    f = res.facts
    assert f["stations"] >= 1 and 1 <= f["shape_z"] <= 40 and f["water_max"] >= 0
    assert all(np.isfinite([f["spacing_x"], f["spacing_y"], f["spacing_z"]]))
