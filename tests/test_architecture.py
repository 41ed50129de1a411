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


DEFINITIONS = ROOT / "cbp_platform" / "definitions.py"  # the code location: merges the areas' definitions
CLI = ROOT / "cbp_platform" / "cli"                       # the command line: on top of everything


def _files(folder: Path, *, but: tuple[Path, ...] = ()) -> list[Path]:
    return [p for p in folder.rglob("*.py") if not any(p.is_relative_to(b) for b in but)]


def test_domain_core_does_not_import_dagster():
    offenders = [str(p.relative_to(ROOT)) for p in _files(ROOT / "cbp_platform", but=(DEFINITIONS,))
                 if {"dagster", "dagster_duckdb", "dagster_k8s"} & _imports(p)]
    assert offenders == []


def test_domain_core_does_not_import_the_orchestration_layers():
    offenders = [str(p.relative_to(ROOT)) for p in _files(ROOT / "cbp_platform", but=(DEFINITIONS, CLI))
                 if {"assets", "resources", "checks", "orchestration"} & _imports(p)]
    assert offenders == []


def _module_imports(path: Path) -> set[str]:
    """Every module ``path`` imports, inside functions too, as dotted names (``from a.b import c`` gives ``a.b`` and
    ``a.b.c``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


# Who may import whom, bottom to top: the domain core < resources < assets < checks < the code location
# (cbp_platform.definitions) < orchestration's drivers (runner, k8s plan) < the CLI. orchestration.profiles,
# .reaper and .instance are the environment the code location is deployed with: they sit below the definitions
# and import no asset beyond assets.writes (the run-liveness reads the reaper shares).
LAYER_RULES = {
    "resources": ("assets", "checks", "orchestration", "cbp_platform.definitions", "cbp_platform.cli"),
    "assets": ("checks", "orchestration", "cbp_platform.definitions", "cbp_platform.cli"),
    "checks": ("orchestration", "cbp_platform.definitions", "cbp_platform.cli"),
    "orchestration": ("cbp_platform.cli",),
}
ENVIRONMENT = ("profiles.py", "reaper.py", "instance.py", "erasure.py")


def test_each_layer_imports_only_the_layers_below_it():
    offenders = []
    for layer, forbidden in LAYER_RULES.items():
        for p in (ROOT / layer).rglob("*.py"):
            bad = {m for m in _module_imports(p) for f in forbidden if m == f or m.startswith(f + ".")}
            if layer == "orchestration" and p.name in ENVIRONMENT:   # below the code location, above assets.writes
                bad |= {m for m in _module_imports(p) if m.startswith(("cbp_platform.definitions", "checks"))
                        or (m.startswith("assets") and not m.startswith("assets.writes"))}
            offenders += [f"{p.relative_to(ROOT)} imports {m}" for m in sorted(bad)]
    for p in (DEFINITIONS,):
        offenders += [f"{p.relative_to(ROOT)} imports {m}" for m in sorted(_module_imports(p))
                      if m.startswith(("cbp_platform.cli", "orchestration.runner", "orchestration.k8s_plan"))]
    assert offenders == []


def _import_graph(packages=("cbp_platform", "assets", "resources", "checks", "orchestration")) -> dict[str, set[str]]:
    """Module -> the project's modules it imports, inside functions and under ``TYPE_CHECKING`` too (a type hint
    that needs a cycle is a design smell as well). A package's ``__init__`` importing its own submodules and a
    module importing its parent package are not edges of a cycle."""
    mods = {}
    for pkg in packages:
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    graph: dict[str, set[str]] = {}
    for m, p in mods.items():
        edges = set()
        for n in _module_imports(p) | _relative_imports(m, p):
            while n and n not in mods:
                n = n.rpartition(".")[0]
            if n and n != m and not m.startswith(n + ".") and not n.startswith(m + "."):
                edges.add(n)
        graph[m] = edges
    return graph


def _relative_imports(module: str, path: Path) -> set[str]:
    pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(pkg[: len(pkg) - (node.level - 1)] + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_import_graph_has_no_cycle():
    assert _cycles(_import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    """The guard above can fail: a cycle through three modules, and one through a function-level import."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = _import_graph()
    graph["cbp_platform.paths"] = graph["cbp_platform.paths"] | {"orchestration.runner"}
    assert any({"cbp_platform.paths", "orchestration.runner"} <= set(c) for c in _cycles(graph))


def test_cbp_commands_load_only_what_they_use(tmp_path):
    """The parser loads no Dagster, torch or asset; ``cbp status`` opens the warehouse and reads the landing zone
    without loading the code location (no asset, check or definitions module, no torch)."""
    import subprocess
    import sys

    code = ("import sys; from cbp_platform.cli import build_parser, main; build_parser(); "
            "before = sorted(m for m in sys.modules if m.split('.')[0] in {'dagster', 'torch', 'assets', 'checks'}); "
            "main(['status', '--data-root', sys.argv[1], '--json']); "
            "after = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'assets', 'checks', 'monai'} "
            "or m.startswith('cbp_platform.definitions')); print(before, after, file=sys.stderr)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "DAGSTER_HOME"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "[] []"


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
LAYERS = ("assets", "checks", "orchestration")


def _strings(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(v.value for v in node.values if isinstance(v, ast.Constant))


def test_the_warehouse_layer_owns_the_sql():
    """Assets, checks and the CLI call named warehouse operations; no SQL text and no database driver there."""
    files = [p for d in LAYERS for p in (ROOT / d).rglob("*.py")] + list(CLI.rglob("*.py"))
    sql = [f"{p.relative_to(ROOT)}:{line}" for p in files for line, s in _strings(p) if SQL.search(s)]
    drivers = [str(p.relative_to(ROOT)) for p in files
               if {"duckdb", "adbc_driver_postgresql", "psycopg2", "sqlalchemy"} & _imports(p)]
    assert sql == [] and drivers == []


def test_versioned_rows_are_never_updated_but_by_the_one_close_of_a_superseded_version():
    """Nothing is updated in place (issue 27): the only UPDATE statement of the code base is the close of a
    replaced version in resources/warehouse.py (on PostgreSQL a trigger refuses any other; DuckDB has none)."""
    import re

    update = re.compile(r"(^|;)\s*UPDATE\s", re.IGNORECASE)          # a statement that starts with UPDATE
    files = [p for d in ("cbp_platform", "assets", "resources", "checks", "orchestration", "benchmarks", "tools")
             for p in (ROOT / d).rglob("*.py")]
    found = sorted({f"{p.relative_to(ROOT)}:{line}" for p in files for line, s in _strings(p) if update.search(s)})
    assert len(found) == 1 and found[0].startswith("resources/warehouse.py:"), found


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


def _test_module_imports(source: str, package: str) -> set[str]:
    """The ``test_*`` modules a test file's ``source`` imports (absolute or relative, at the top or inside a
    function), as dotted names; ``package`` is the file's own package (``tests.qc``), for relative imports."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        out.update(n for n in names if any(part.startswith("test_") for part in n.split(".")))
    return out


def test_no_test_module_imports_another_test_module():
    """Helpers that test modules share live in tests/support/ (fixtures in conftest.py): a test module that imports
    from another one runs that module's import-time code and couples the two suites (running one alone collects
    the other's names)."""
    offenders = []
    for p in sorted((ROOT / "tests").rglob("*.py")):
        package = ".".join(p.relative_to(ROOT).parent.parts)
        imported = _test_module_imports(p.read_text(), package)
        offenders += [f"{p.relative_to(ROOT)} imports {m}" for m in sorted(imported)]
    assert offenders == []


def test_the_test_import_check_sees_every_form():
    found = {src: _test_module_imports(src, "tests.ui") for src in (
        "from tests.qc.test_review_store import build_warehouse", "from tests.qc import test_review_store",
        "import tests.segmentation.test_nnunet", "def f():\n    from .test_other import helper",
        "from ..qc.test_review_store import x", "from tests.support.review import build_warehouse",
        "from . import conftest")}
    assert [bool(v) for v in found.values()] == [True, True, True, True, True, False, False]
    assert "tests.qc.test_review_store" in found["from ..qc.test_review_store import x"]
    assert "tests.ui.test_other" in found["def f():\n    from .test_other import helper"]
