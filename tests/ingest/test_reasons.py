"""The quarantine-reason registry (cbp_platform/reasons.py): every reason the code can emit is registered, every
registered reason is emitted (or reserved), a misspelt code fails, the simulator's faults map onto registered
reasons, a faulty cohort is quarantined with registered reasons only, and the docs' tables are the registry's."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cbp_platform import reasons
from cbp_platform.reasons import (CHECKS, DOC_TABLES, PARTICIPANT_COVARIATES, RAW_MRI_SCANS, REASONS, R, Reason,
                                  UnknownReason, emitted_at, explain, reason)

ROOT = Path(__file__).resolve().parents[2]
# the code that may write quarantine rows (reasons.py itself is the registry)
CODE_DIRS = ("cbp_platform", "assets", "orchestration", "resources", "checks")


def _sources() -> list[Path]:
    return [p for d in CODE_DIRS if (ROOT / d).is_dir() for p in sorted((ROOT / d).rglob("*.py"))
            if p != ROOT / "cbp_platform" / "reasons.py"]


def _registry_names(tree: ast.AST) -> set[str]:
    """The local names bound to ``cbp_platform.reasons.R`` in a module (``from cbp_platform.reasons import R``)."""
    return {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.module == "cbp_platform.reasons" for a in node.names if a.name == "R"}


def _is_reason_slot(node: ast.AST) -> bool:
    """``<x>.reason``, ``getattr(<x>, "reason", ...)`` or ``pl.col("reason")``: what a literal compared with is a
    reason code."""
    if isinstance(node, ast.Attribute):
        return node.attr == "reason"
    if not isinstance(node, ast.Call):
        return False
    fn = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
    args = [a.value for a in node.args if isinstance(a, ast.Constant)]
    return (fn == "col" and args == ["reason"]) or (fn == "getattr" and args[:1] == ["reason"])


def scan(path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(``R.<code>`` references, string literals in the places a quarantine reason is written) of one module.

    The places: ``reason=<literal>``, ``{"reason": <literal>}``, ``ScanProblem(<literal>, ...)``, the checked
    constructors ``reason(<literal>)`` / ``code_of(<literal>)``, a class attribute ``reason = <literal>`` and a
    comparison of ``<x>.reason`` or ``pl.col("reason")`` with a literal (or a tuple of literals)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = _registry_names(tree)
    refs, literals = [], []

    def lit(node, line):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            literals.append((line, node.value))
        elif isinstance(node, ast.JoinedStr):
            literals.append((line, "<f-string>"))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            for e in node.elts:
                lit(e, line)
        elif isinstance(node, ast.IfExp):
            lit(node.body, line)
            lit(node.orelse, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in names:
            refs.append((node.lineno, node.attr))
        elif isinstance(node, ast.keyword) and node.arg == "reason":
            lit(node.value, node.value.lineno)
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "reason":
                    lit(v, v.lineno)
        elif isinstance(node, ast.Call) and node.args:
            fn = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if fn in ("ScanProblem", "reason", "code_of"):
                lit(node.args[0], node.lineno)
        elif isinstance(node, ast.ClassDef):
            for st in node.body:
                if isinstance(st, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "reason" for t in st.targets):
                    lit(st.value, st.lineno)
        elif isinstance(node, ast.Compare) and len(node.comparators) == 1:
            a, b = node.left, node.comparators[0]
            if _is_reason_slot(a):
                lit(b, node.lineno)
            elif _is_reason_slot(b):
                lit(a, node.lineno)
    return refs, literals


def _all_refs() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in _sources():
        refs, _ = scan(p)
        for line, code in refs:
            out.setdefault(code, []).append(f"{p.relative_to(ROOT)}:{line}")
    return out


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The AST scan below is only as good as its patterns: each one, on a crafted module."""
    src = tmp_path / "m.py"
    src.write_text('from cbp_platform.reasons import R as Q\n'
                   'x = Q.checksum_mismatch.code\n'
                   'raise ScanProblem("bogus_one", "m")\n'
                   'rows.append(dict(pseudonym=p, reason="bogus_two", message=""))\n'
                   'rows.append({"pseudonym": p, "reason": "bogus_three"})\n'
                   'class E(ValueError):\n    reason = "bogus_four"\n'
                   'if exc.reason in ("bogus_five", "station_gap"): pass\n'
                   'q.filter(pl.col("reason") == "bogus_six")\n'
                   'ScanProblem(f"missing_{c}", "m")\n'
                   'cut = getattr(exc, "reason", "") == "bogus_seven"\n'
                   'rows.append({"reason": "bogus_eight" if cut else "bogus_nine"})\n')
    refs, literals = scan(src)
    assert refs == [(2, "checksum_mismatch")]
    assert sorted(v for _, v in literals) == sorted(["bogus_one", "bogus_two", "bogus_three", "bogus_four",
                                                     "bogus_five", "station_gap", "bogus_six", "<f-string>",
                                                     "bogus_seven", "bogus_eight", "bogus_nine"])


def test_every_reason_the_code_spells_is_registered_and_spelt_through_the_registry():
    unknown, spelt = [], []
    for p in _sources():
        refs, literals = scan(p)
        rel = p.relative_to(ROOT)
        unknown += [f"{rel}:{line} R.{code}" for line, code in refs if code not in REASONS]
        unknown += [f"{rel}:{line} {code!r}" for line, code in literals if code not in REASONS]
        spelt += [f"{rel}:{line} {code!r}" for line, code in literals]
    assert unknown == [], "reasons not in cbp_platform/reasons.py"
    assert spelt == [], "quarantine reasons spelt as strings: write R.<code> (cbp_platform/reasons.py)"
    assert len(_all_refs()) > 40          # the scan reads the emitting modules (they import R)


def test_every_registered_reason_is_emitted_by_some_code_path_or_reserved():
    refs = _all_refs()
    silent = [r.code for r in REASONS.values() if not r.reserved and r.code not in refs]
    used_reserved = {r.code: refs[r.code] for r in REASONS.values() if r.reserved and r.code in refs}
    assert silent == [], "registered but emitted nowhere: emit them, or mark them reserved=True"
    assert used_reserved == {}, "marked reserved but still emitted"


def test_the_registry_is_well_formed():
    assert len(REASONS) == len(reasons._ALL) and all(code == r.code for code, r in REASONS.items())
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", code) for code in REASONS)
    assert all(r.explanation and "\n" not in r.explanation for r in REASONS.values())
    assert set(c for block in DOC_TABLES.values() for c in block) == set(CHECKS)     # every check in a table
    assert {r.check for r in REASONS.values()} <= set(CHECKS)
    assert emitted_at("metrics_failed", "comparison_metrics:phantom-nnunet")    # a comparison's stage value
    assert not emitted_at("checksum_mismatch", "muscle_metrics") and not emitted_at("no_such_code", RAW_MRI_SCANS)


def test_a_misspelt_or_unknown_code_fails_where_it_is_written():
    from cbp_platform.ingest.scans import ScanProblem

    with pytest.raises(AttributeError, match="did you mean checksum_mismatch"):
        R.chcksum_mismatch  # noqa: B018
    with pytest.raises(UnknownReason, match="'checksum' is not a registered quarantine reason"):
        reason("checksum")
    with pytest.raises(UnknownReason):
        ScanProblem("chcksum_mismatch", "water image (files[0]): ...")
    p = ScanProblem(R.checksum_mismatch, "water image (files[0]): ...")
    assert p.reason == "checksum_mismatch" and type(p.reason) is str and str(p).startswith("checksum_mismatch: ")
    assert ScanProblem("checksum_mismatch", "m").reason == "checksum_mismatch"
    assert reason(R.trailing_data) is R.trailing_data and isinstance(R.trailing_data, Reason)
    assert explain("no_such_code").startswith("not a registered quarantine reason")


def test_the_explanations_state_the_rules_the_code_applies():
    """The limits the explanations (and so the docs) quote are the ones ingestion enforces."""
    from cbp_platform.ingest.covariates import RULES as COV
    from cbp_platform.ingest.dicom import DICOM_RULES as D
    from cbp_platform.ingest.scans import MAX_EXTENSION_BYTES, RULES, TRAILING_PROBE

    def says(code: str, *parts: str) -> None:
        for part in parts:
            assert part in REASONS[code].explanation, (code, part)

    says("absurd_size", f"{RULES.max_image_bytes >> 20} MiB")
    says("implausible_shape", f"{RULES.shape[0]}-{RULES.shape[1]} voxels")
    says("invalid_spacing", f"{RULES.spacing_mm[0]:g}-{RULES.spacing_mm[1]:g} mm")
    says("invalid_data_offset", f"{MAX_EXTENSION_BYTES >> 20} MiB")
    says("trailing_data", f"{TRAILING_PROBE >> 10} KiB")
    says("zip_too_large", f"{D.max_members:,} files", f"{D.max_member_bytes >> 20} MiB",
         f"{D.max_participant_bytes >> 30} GiB")
    says("series_too_large", f"{RULES.max_image_bytes >> 20} MiB")
    says("in_phase_inconsistent", f"{D.in_phase_tolerance:.0%}".replace("%", " %"))
    says("fov_too_short", f"{D.min_coverage_mm:.0f} mm")
    assert D.station_swap_reversed == 0.5
    says("station_fat_water_swap", "half or more")
    says("out_of_range", f"age {COV['age'].lo}-{COV['age'].hi}")


# ------------------------------------------------------------------------------------------------------------
# the simulator's faults


def test_every_fault_kind_declares_its_registered_reasons_once():
    from cbp_platform.synth import faults as F

    assert set(F.FAULTS) == set(F.FAULT_KINDS) | set(F.DICOM_FAULT_KINDS)
    assert set(F.EXPECTED_REASONS) == set(F.FAULTS)
    for kind, codes in F.EXPECTED_REASONS.items():
        assert all(emitted_at(c, RAW_MRI_SCANS) or emitted_at(c, PARTICIPANT_COVARIATES) for c in codes), kind
        assert bool(codes) != (kind in F.HANDLED_FAULTS), kind
    assert F.HANDLED_FAULTS == {"repeated_station", "non_dicom_file", "other_modality"}
    assert F.COVARIATE_FAULTS | F.IMAGE_FAULTS | F.MANIFEST_FAULTS <= set(F.FAULT_KINDS)


def _ingest_like_the_assets(root: Path):
    """Register each delivery of ``root``'s landing zone (registration order, as the sensor) and ingest its batch
    with the assets' functions: (facts, [(stage, row)]) per delivery."""
    from cbp_platform.ingest.batch import ingest_scans
    from cbp_platform.ingest.covariates import parse_covariates
    from cbp_platform.ingest.deliveries import check_delivery
    from cbp_platform.ingest.registry import duplicates_of, register_delivery
    from cbp_platform.landing import COVARIATES_NAME
    from cbp_platform.paths import DataLayout

    layout = DataLayout(root)
    ready = [check_delivery(d) for d in sorted(layout.landing.iterdir())]
    ready.sort(key=lambda st: (st.manifest["created_at"], st.delivery_id))
    batches = {st.delivery_id: register_delivery(root, st.path, st.manifest, st.manifest_bytes, 1000)
               for st in ready}
    out = {}
    for st in ready:
        (batch,) = batches[st.delivery_id]
        dups = duplicates_of(root, st.delivery_id)
        facts, q_scans = ingest_scans(batch, st.path, st.manifest, duplicates=dups, threads=2, layout=layout)
        k, entry = next((i, f) for i, f in enumerate(st.manifest["files"]) if f["path"] == COVARIATES_NAME)
        cov = parse_covariates(st.path / COVARIATES_NAME, batch.participants, dups, delivery_dir=st.path,
                               entry=entry, verify=True, label=f"{st.delivery_id}: {COVARIATES_NAME} (files[{k}])")
        out[st.delivery_id] = (facts, [(RAW_MRI_SCANS, r) for r in q_scans]
                               + [(PARTICIPANT_COVARIATES, r) for r in cov.quarantine])
    return out


def test_the_faulty_cohort_is_quarantined_with_registered_reasons_its_faults_declare(faulty_cohort):
    import polars as pl

    from cbp_platform.synth.faults import EXPECTED_REASONS

    root, _ = faulty_cohort
    faults = pl.concat([pl.read_csv(p, infer_schema=False) for p in sorted((root / "truth").glob("*/faults.csv"))])
    got = _ingest_like_the_assets(root)
    rows = [(did, stage, r) for did, (_, q) in got.items() for stage, r in q]
    assert rows and all(emitted_at(r["reason"], stage) for _, stage, r in rows), \
        sorted({(stage, r["reason"]) for _, stage, r in rows if not emitted_at(r["reason"], stage)})
    by = {}
    for did, _, r in rows:
        by.setdefault((did, r["pseudonym"]), set()).add(r["reason"])
    for f in faults.iter_rows(named=True):
        assert by.get((f["delivery_id"], f["pseudonym"]), set()) & EXPECTED_REASONS[f["fault"]], (f["fault"], by.get(
            (f["delivery_id"], f["pseudonym"])))
    faulty = set(zip(faults["delivery_id"], faults["pseudonym"]))
    assert set(by) == faulty                    # the good participants around them are not quarantined
    assert all(p not in r["message"] for _, _, r in rows for p in [r["pseudonym"]])


# ------------------------------------------------------------------------------------------------------------
# the docs and cbp status


def test_the_docs_tables_are_the_registrys():
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "reasons_doc.py"), "--check"], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    docs = (ROOT / "docs" / "ingestion.md").read_text() + (ROOT / "docs" / "landing-zone.md").read_text()
    for code in REASONS:                                    # each reason in exactly one generated table
        assert len(re.findall(rf"^\| [^|]*\| `{code}` \||^\| `{code}` \|", docs, re.M)) == 1, code


def test_the_docs_check_fails_when_a_table_disagrees(tmp_path):
    for rel in ("docs/ingestion.md", "docs/landing-zone.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((ROOT / rel).read_text())
    doc = tmp_path / "docs" / "landing-zone.md"
    doc.write_text(doc.read_text().replace("| `fov_too_short` |", "| `fov_too_short_typo` |"))
    tool = [sys.executable, str(ROOT / "tools" / "reasons_doc.py"), "--root", str(tmp_path)]
    run = subprocess.run(tool + ["--check"], capture_output=True, text=True)
    assert run.returncode == 1 and "docs/landing-zone.md (dicom)" in run.stderr
    assert subprocess.run(tool, capture_output=True).returncode == 0          # rewriting repairs it
    assert subprocess.run(tool + ["--check"], capture_output=True).returncode == 0
    assert doc.read_text() == (ROOT / "docs" / "landing-zone.md").read_text()


def test_status_labels_and_explains_reasons_through_the_registry():
    from cbp_platform.ingest.status import DeliveryReport, format_report

    reps = [DeliveryReport("d1", "registered", participants=5, batches=1, scans_valid=3, covariates_valid=4,
                           quarantined=2, quarantine_reasons={"checksum_mismatch": 1, "retired_code": 1})]
    plain = format_report(reps)
    assert "checksum_mismatch 1" in plain and "retired_code (unregistered) 1" in plain
    assert R.checksum_mismatch.explanation not in plain
    text = format_report(reps, explain_reasons=True)
    assert (f"  checksum_mismatch [raw_mri_scans, participant_covariates]: {R.checksum_mismatch.explanation}"
            in text.splitlines())
    assert "  retired_code (unregistered): not a registered quarantine reason" in text
    d = json.loads(json.dumps(reps[0].as_dict()))
    assert d["quarantine_reasons"] == {"checksum_mismatch": 1, "retired_code": 1}
    assert d["quarantine_explained"]["checksum_mismatch"] == R.checksum_mismatch.explanation
    assert d["quarantine_explained"]["retired_code"].startswith("not a registered")
