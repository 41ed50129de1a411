"""cbp-platform: the domain core (imaging I/O, simulated cohort, segmentation, metrics, statistics).

Nothing in this package imports Dagster except :mod:`cbp_platform.definitions`, which assembles the
code location from ``assets/``, ``resources/`` and ``checks/``.
"""

__version__ = "0.1.0"
