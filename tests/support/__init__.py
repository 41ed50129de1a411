"""Helpers the test modules share (and the benchmarks reuse); no tests and no fixtures here.

* :mod:`tests.support.warehouse`: read a test data root's DuckDB warehouse, read-only.
* :mod:`tests.support.registration`: what the delivery sensor's tick does, for tests that launch runs themselves.
* :mod:`tests.support.system`: the system services (a throw-away PostgreSQL server, Debian's Chromium, a served
  process) and the rule that ``make test`` fails rather than skips when one is missing.
* :mod:`tests.support.synthetic`: warehouse-shaped tables from the simulated cohort's truth (no MRI).
* :mod:`tests.support.writers`: batch writers of the warehouse tests and benchmark, importable by spawned processes.
* :mod:`tests.support.nnunet`: registering the test nnU-Net model (``nnunet_model`` fixture) with its label mapping.
* :mod:`tests.support.review`: a small QC-review warehouse (what the pipeline would have written for 6 participants).
* :mod:`tests.support.dicom`: zipping and editing the simulator's DICOM files (the DICOM corpus of issue 26).

Test modules import from here, never from one another (``tests/test_architecture.py`` checks it); the fixtures
live in the ``conftest.py`` files.
"""
