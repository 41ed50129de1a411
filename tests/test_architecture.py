"""House rules of the layering (the design's architecture document) that code review alone would let slip."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    mods: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def test_domain_core_does_not_import_dagster():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "cbp_platform").rglob("*.py")
                 if p.name != "definitions.py" and {"dagster", "dagster_duckdb"} & _imports(p)]
    assert offenders == []


def test_domain_core_does_not_import_the_orchestration_layers():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "cbp_platform").rglob("*.py")
                 if p.name != "definitions.py" and {"assets", "resources", "checks"} & _imports(p)]
    assert offenders == []


def test_torch_is_pinned_to_the_cpu_build():
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    assert "torch==2.13.0" in lock
    assert not any(line.startswith(("nvidia-", "triton")) for line in lock)


def test_the_repository_cites_only_files_inside_it():
    """A user's clone has no file outside the repository: no citation of the design's external study file or an
    absolute path of a developer's machine, and every relative Markdown link of the docs resolves."""
    import re

    texts = [p for d in ("cbp_platform", "assets", "resources", "checks", "tests", "docs", "benchmarks", "tools")
             for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md", ".yaml")] + [ROOT / "README.md"]
    outside = re.compile(r"STUDY\.md|\.\./shared|/work/main|/work/shared")
    offenders = [str(p.relative_to(ROOT)) for p in texts if p.name != "test_architecture.py"
                 and outside.search(p.read_text(errors="replace"))]
    assert offenders == []
    broken = []
    for md in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if "://" not in target and not (md.parent / target).exists():
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert broken == []


SQL = __import__("re").compile(r"\b(SELECT\s.+\sFROM|INSERT\s+INTO|DELETE\s+FROM|CREATE\s+(UNIQUE\s+)?(TABLE|INDEX)|"
                               r"ALTER\s+TABLE|DROP\s+TABLE|GROUP\s+BY)\b", __import__("re").I | __import__("re").S)
LAYERS = ("assets", "checks")


def _strings(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(v.value for v in node.values if isinstance(v, ast.Constant))


def test_the_warehouse_layer_owns_the_sql():
    """Assets, checks and the CLI call named warehouse operations; no SQL text and no database driver there."""
    files = [p for d in LAYERS for p in (ROOT / d).rglob("*.py")] + [ROOT / "cbp_platform" / "cli.py"]
    sql = [f"{p.relative_to(ROOT)}:{line}" for p in files for line, s in _strings(p) if SQL.search(s)]
    drivers = [str(p.relative_to(ROOT)) for p in files
               if {"duckdb", "adbc_driver_postgresql", "psycopg2", "sqlalchemy"} & _imports(p)]
    assert sql == [] and drivers == []


def test_data_root_subpaths_are_spelt_only_in_the_data_layout():
    """``<root> / "warehouse"``, ``/ "published"`` ...: only cbp_platform/paths.py joins the data root's names."""
    # ("models" is left out: a MONAI bundle has its own models/ folder, a different vocabulary)
    names = {"landing", "truth", "derived", "registry", "warehouse", "cbp.duckdb", "published", "segmentations",
             "comparisons", "batches", "deliveries", "latest.json", "dagster_home"}
    offenders = []
    for d in ("cbp_platform", "assets", "resources", "checks", "benchmarks", "tools"):
        for p in (ROOT / d).rglob("*.py"):
            if p == ROOT / "cbp_platform" / "paths.py":
                continue
            for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
                if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
                        and node.right.value in names):
                    offenders.append(f"{p.relative_to(ROOT)}:{node.lineno} / {node.right.value!r}")
    assert offenders == []
