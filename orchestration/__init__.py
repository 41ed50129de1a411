"""The orchestration layer: what drives the Dagster graph rather than defines it.

Above ``assets/``, ``checks/`` and ``resources/``; nothing below imports it (``tests/test_architecture.py``).

* :mod:`orchestration.profiles`: the deployment profile's resources and executor, chosen in one place; the
  configured warehouse and runtime for code outside a run (the CLI, the runner, the review app).
* :mod:`orchestration.instance`: what the CLI asks of the Dagster instance (pool limits, batch run states, the
  review store reporting to it).
* :mod:`orchestration.reaper`: the ``run_reaper`` sensor, which fails runs whose process died.
* :mod:`orchestration.runner`: the foreground driver of ``make demo`` (sensor, batches, cohort refresh) and of
  ``cbp model compare``.
* :mod:`orchestration.k8s_plan`: the Kubernetes Jobs of every step, rendered and validated without a cluster.

``cbp_platform.definitions`` merges the per-area definitions with :func:`orchestration.profiles.profile_definitions`;
the runner and the k8s plan load the assembled definitions, never the reverse.
"""
