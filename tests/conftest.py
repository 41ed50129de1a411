"""Shared fixtures (built once per test session) and the layers of the suite.

Layers (markers, registered in pyproject.toml; README's "Tests" section):

* ``pipeline``: runs Dagster jobs (or drives the code location) against a temporary instance;
* ``model``: trains or builds a segmentation model (the default MONAI model, nnU-Net's planner and trainer);
* ``ui``: drives a browser (headless Debian Chromium through Playwright);
* ``postgres``: starts a real PostgreSQL server;
* ``unit``: everything else, given here to every test without one of the four above. ``make test-fast`` runs
  ``-m unit``.

A test gets its layers from what it uses, so they cannot drift from the code: the fixtures in ``FIXTURE_LAYERS``
(wherever the test lives), the folders in ``FOLDER_LAYERS``, and explicit marks (``pytestmark`` or a decorator)
for the rest. While a ``unit`` test runs, launching a Dagster job, training a model, building the test nnU-Net
model, driving a browser or starting PostgreSQL fails it with a message naming the marker it needs.

The two models are built once per session, and ``make test`` runs the suite as two streams of work, two pytest
processes side by side (``tools/run_tests.py``), each selected here by ``CBP_TEST_STREAM``: ``monai`` (the module
that trains the default MONAI model through Dagster, the ``monai_pipeline`` fixture's users, after the modules of
``MONAI_STREAM_ALSO`` that balance the two streams) and ``rest`` (everything else). Each runs torch on one thread (``OMP_NUM_THREADS=1``): two single-threaded streams use two
cores better than one stream on two threads. In the ``rest`` stream the modules that use the test nnU-Net model
(``nnunet_model``) run last; its build, a separate process, starts in the background as the stream's first test
starts (one thread, at low priority), so it overlaps the other tests. Without ``CBP_TEST_STREAM`` (plain
``pytest``) every test runs, in one process, in this order: everything else, the nnU-Net model's users, then the
MONAI module.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
# the pipelines' multiple-imputation sensitivity analysis with m = 5 instead of 20 (assets/analysis.py ModelConfig):
# the suite runs it a few dozen times; the statistics tests check the method itself at m = 20
os.environ.setdefault("CBP_MI_IMPUTATIONS", "5")

HEAVY = ("pipeline", "model", "ui", "postgres")
# fixtures that put every test using them (directly or through another fixture) in a layer
FIXTURE_LAYERS = {
    "postgres_server": ("postgres",),
    "own_postgres_server": ("postgres",),       # a test's own server (tests/lifecycle/test_erasure.py)
    "nnunet_model": ("model",),
    "monai_pipeline": ("model", "pipeline"),
}
# folders (under tests/) whose every test is in a layer
FOLDER_LAYERS = {
    "assets": ("pipeline",),      # the Dagster graph: jobs, the sensor, the code location
    "ui": ("ui",),
}
TESTS = Path(__file__).resolve().parent


# fixtures whose modules run last, in this order (see the module's docstring); the last one's modules form the
# stream ``monai``, every other test the stream ``rest``
LATE = ("nnunet_model", "monai_pipeline")
STREAMS = ("monai", "rest")
# modules that run in the stream ``monai`` too, before its MONAI module, so that both streams end together
# (measured: the releases module takes about 35 s, the killed-runs module about 40 s, the concurrent writers about
# 25 s; the MONAI module 10 min). The ``rest`` stream's length is mostly set by the test nnU-Net model's build in
# the background and its users after it (tests/lifecycle/test_erasure.py among them); with these three here the two
# streams measured 726 and 704 s on 2026-12-06, without the last two 754 and 680 s.
MONAI_STREAM_ALSO = ("tests/assets/test_releases.py", "tests/assets/test_killed_runs.py",
                     "tests/warehouse/test_concurrent_writers.py")
STREAM = os.environ.get("CBP_TEST_STREAM", "")


def _module(item) -> str:
    return item.nodeid.split("::")[0]


def _folder(item) -> str:
    """The folder under tests/ that holds the item's module ("" for tests/ itself or outside it)."""
    path = Path(str(item.path)).resolve()
    rel = path.relative_to(TESTS).parts if path.is_relative_to(TESTS) else ()
    return rel[0] if len(rel) > 1 else ""


def _late(item) -> int:
    names = getattr(item, "fixturenames", ())
    return max((k + 1 for k, name in enumerate(LATE) if name in names), default=0)


@pytest.hookimpl(tryfirst=True)         # before ``-m`` deselects by these markers
def pytest_collection_modifyitems(config, items):
    stage: dict[str, int] = {}
    for item in items:
        stage[_module(item)] = max(stage.get(_module(item), 0), _late(item))
    items.sort(key=lambda item: stage[_module(item)])     # stable: whole modules move, in collection order
    if STREAM:
        if STREAM not in STREAMS:
            raise pytest.UsageError(f"CBP_TEST_STREAM={STREAM!r}: one of {', '.join(STREAMS)}")
        mine = [item for item in items if _stream(stage[_module(item)], _module(item)) == STREAM]
        if len(mine) < len(items):
            kept = set(mine)
            config.hook.pytest_deselected(items=[item for item in items if item not in kept])
            items[:] = mine
    for item in items:
        layers = {m for name in getattr(item, "fixturenames", ()) for m in FIXTURE_LAYERS.get(name, ())}
        layers.update(FOLDER_LAYERS.get(_folder(item), ()))
        for m in sorted(layers):
            if not item.get_closest_marker(m):
                item.add_marker(m)
        if not any(item.get_closest_marker(m) for m in HEAVY):
            item.add_marker("unit")


def _stream(stage: int, module: str = "") -> str:
    return "monai" if stage == len(LATE) or module in MONAI_STREAM_ALSO else "rest"


# --- what a unit test may not do -----------------------------------------------------------------------------------
# (module, attribute path, what it does, the marker it needs). Wrapped as each unit test starts, in the modules
# imported by then: a name bound earlier (``from dagster import ...`` binds the class, which is wrapped; ``from
# cbp_platform.segmentation.train import train`` at a module's top binds the function, which escapes) or a module
# first imported inside the test escapes the guard. It is a safety net; the markers do not depend on it.

GUARDED = (
    ("dagster", "JobDefinition.execute_in_process", "launched a Dagster job", "pipeline"),
    ("cbp_platform.segmentation.train", "train", "trained a model", "model"),
    ("cbp_platform.segmentation.backends.nnunet_phantom", "build", "built an nnU-Net model", "model"),
    ("playwright.sync_api", "sync_playwright", "drove a browser", "ui"),
    ("tests.support.system", "PostgresServer.start", "started PostgreSQL", "postgres"),
)
_running_unit: list[str] = []       # the node id of the unit test now running (set up, called, torn down)


def _guard(owner, attr: str, what: str, marker: str) -> None:
    fn = getattr(owner, attr)
    if getattr(fn, "_layer_guard", False):
        return

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        if _running_unit:
            pytest.fail(f"{_running_unit[0]} {what}, which a unit test may not: mark it {marker} "
                        "(tests/conftest.py lists the layers)", pytrace=False)
        return fn(*args, **kwargs)

    guarded._layer_guard = True
    setattr(owner, attr, guarded)


def _install_guards() -> None:
    for module, path, what, marker in GUARDED:
        mod = sys.modules.get(module)
        if mod is None:
            continue
        *owners, attr = path.split(".")
        owner: object = mod
        for name in owners:
            owner = getattr(owner, name)
        if isinstance(owner, (type, types.ModuleType)):
            _guard(owner, attr, what, marker)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    unit = item.get_closest_marker("unit") is not None
    if unit:
        _install_guards()
        _running_unit.append(item.nodeid)
    try:
        yield
    finally:
        if unit:
            _running_unit.clear()


# --- shared fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """24 participants in 2 deliveries, no faults (fast preset)."""
    from cbp_platform.synth.delivery import synthesize

    root = tmp_path_factory.mktemp("small")
    res = synthesize(participants=24, deliveries=2, seed=7, data_root=root, workers=2)
    return root, res


@pytest.fixture(scope="session")
def faulty_cohort(tmp_path_factory):
    """40 participants in 2 deliveries, half of them with a delivery fault (each kind twice)."""
    from cbp_platform.synth.delivery import synthesize

    root = tmp_path_factory.mktemp("faulty")
    res = synthesize(participants=40, deliveries=2, seed=11, data_root=root, fault_rate=0.5, workers=2)
    return root, res


@pytest.fixture(scope="session")
def tables():
    """One simulated cohort's warehouse tables (3,000 participants, seed 5; tests/support/synthetic.py), read-only:
    the analysis tests (tests/analysis) and the model comparison's (tests/segmentation/test_compare.py) share it.
    A test that changes a table does so on a copy (``dict(tables)``)."""
    from tests.support.synthetic import warehouse_tables

    return types.MappingProxyType(warehouse_tables(3000, seed=5))


@pytest.fixture(scope="session")
def cohort(tables):
    """The analysis cohort of :func:`tables`."""
    from cbp_platform.analysis.cohort import build_analysis_cohort

    return build_analysis_cohort(tables["covariates"], tables["scans"], tables["metrics"], tables["quarantine"])


NNUNET_BUILD = [sys.executable, "-m", "cbp_platform.segmentation.backends.nnunet_phantom", "--out"]
_background: dict = {}          # whether decided, and the nnU-Net build started in the background: process, folder


def _nnunet_out(tmp_path_factory) -> Path:
    reuse = os.environ.get("CBP_TEST_NNUNET_OUT")
    return Path(reuse) if reuse else tmp_path_factory.mktemp("nnunet-model")


def _reusable() -> bool:
    reuse = os.environ.get("CBP_TEST_NNUNET_OUT")
    return bool(reuse) and (Path(reuse) / "report.json").exists()


@pytest.fixture(autouse=True)
def _nnunet_build_in_background(request, tmp_path_factory):
    """At the session's first test: start building the test nnU-Net model in the background when some of its tests
    use it and others come first (they run before its users: ``LATE``). One torch thread, ``nice`` 10, output to
    ``build.out``/``.err``; stopped at the session's end if still running."""
    if "decided" in _background:
        return
    _background["decided"] = True
    items = request.session.items
    users = sum("nnunet_model" in getattr(item, "fixturenames", ()) for item in items)
    if not users or users == len(items) or _reusable():
        return
    out = _nnunet_out(tmp_path_factory)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "build.out", "wb") as stdout, open(out / "build.err", "wb") as stderr:
        proc = subprocess.Popen(["nice", "-n", "10", *NNUNET_BUILD, str(out / "results"), "--threads", "1"],
                                stdout=stdout, stderr=stderr)
    _background.update(proc=proc, out=out)


def pytest_sessionfinish(session):
    proc = _background.get("proc")
    if proc is not None and proc.poll() is None:       # the session ended before a test needed the model
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def nnunet_model(tmp_path_factory):
    """A small nnU-Net v2 model folder trained here by nnU-Net itself (cbp_platform.segmentation.backends.
    nnunet_phantom), in a fresh interpreter: nnU-Net fixes its paths at import and plans with process pools.
    Built once per session (in the background when other tests run first: ``_nnunet_build_in_background``) for
    every test that uses it (tests/segmentation/test_nnunet.py, tests/ingest/test_dicom_pipeline.py). Returns
    (trained-model folder, the builder's report). ``CBP_TEST_NNUNET_OUT``: build into (and reuse from) that folder
    instead, to iterate on the tests without retraining; CI never sets it."""
    import json

    if _reusable():
        report = json.loads((Path(os.environ["CBP_TEST_NNUNET_OUT"]) / "report.json").read_text())
        return Path(report["folder"]), report
    if "proc" in _background:
        out = _background["out"]
        code = _background["proc"].wait(timeout=1500)
        stdout, stderr = ((out / f"build.{k}").read_text(errors="replace") for k in ("out", "err"))
    else:
        out = _nnunet_out(tmp_path_factory)
        threads = ["--threads", "1"] if STREAM else []
        done = subprocess.run([*NNUNET_BUILD, str(out / "results"), *threads], capture_output=True, text=True,
                              timeout=1500)
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    if code != 0:
        raise RuntimeError(f"building the test nnU-Net model failed ({code}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    report = json.loads(stdout.strip().splitlines()[-1])
    if os.environ.get("CBP_TEST_NNUNET_OUT"):
        (out / "report.json").write_text(json.dumps(report))
    return Path(report["folder"]), report


@pytest.fixture(scope="session")
def postgres_server():
    """One throw-away PostgreSQL server on loopback for the session (tests/support/system.py); each test that
    writes a warehouse takes its own schema."""
    from tests.support.system import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()
