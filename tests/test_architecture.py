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
