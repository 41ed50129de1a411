"""cbp-platform: the domain core (imaging I/O, simulated cohort, segmentation, metrics, statistics).

Nothing in this package imports Dagster except the :mod:`cbp_platform.definitions` module, which merges the
code location's per-area definitions from ``assets/``, ``checks/`` and ``resources/`` with the deployment
profile's (:mod:`orchestration.profiles`). The ``cbp`` command line (:mod:`cbp_platform.cli`) sits on top of
everything and reaches Dagster only through :mod:`orchestration`.
"""

__version__ = "0.1.0"
