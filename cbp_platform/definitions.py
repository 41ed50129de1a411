"""The Dagster code location: assembles ``Definitions`` from ``assets/``, ``resources/`` and ``checks/``.

This is the only module of :mod:`cbp_platform` that imports Dagster. Heavy libraries (torch, Great
Expectations) are imported inside the functions that use them, so the location loads in seconds.

The deployment profile (``CBP_DEPLOYMENT``, :mod:`cbp_platform.deployment`) picks, in one place each:

* the resources (:func:`resources_for`): the data root, the warehouse (embedded DuckDB for ``local``, PostgreSQL
  for ``production`` and ``kubernetes``; ``CBP_WAREHOUSE`` overrides) and the segmentation runtime. Environment
  values reach them through :class:`dagster.EnvVar`; the data root is set once and every resource derives its
  paths from it (:class:`~cbp_platform.paths.DataLayout`);
* the executor: multiprocess for ``local`` and ``production``, ``k8s_job_executor`` (one Kubernetes Job per step,
  resources from each asset's ``dagster-k8s/config`` tag, CPU-node defaults for the rest) for ``kubernetes``.
"""

from __future__ import annotations

import os

import dagster as dg

from assets.analysis import (analysis_cohort, cbp_association_model, pain_intensity_model,
                             physical_activity_prevalence, published_results, stratified_comparisons, table_one)
from assets.ingestion import landing_zone, participant_covariates, raw_mri_scans
from assets.comparison import comparison_metrics, model_comparison
from assets.schedules import (cohort_refresh_job, compare_batch_job, daily_cohort_refresh, ingest_batch_job,
                              model_comparison_job, model_job, process_batch_job)
from assets.segmentation import muscle_metrics, muscle_segmentations, segmentation_model, segmentation_model_dice
from assets.reaper import run_reaper
from assets.sensors import delivery_sensor
from assets.summary import ingestion_summary
from checks.analysis import analysis_cohort_expectations, cbp_model_checks, pain_model_checks
from checks.ingestion import (cohort_one_row_per_participant, covariates_expectations, fat_water_swap_qc,
                              scan_facts_expectations)
from checks.segmentation import segmentation_plausibility
from cbp_platform import deployment
from cbp_platform.paths import ENV_VAR as DATA_ROOT_VAR
from resources import DataRootResource, DuckDBWarehouse, PostgresWarehouse, SegmentationRuntime, Warehouse
from resources.reviews import reviews_spec

# The warehouse each profile uses unless CBP_WAREHOUSE says otherwise (docs/warehouse.md).
WAREHOUSE_BY_PROFILE = {"local": "duckdb", "production": "postgres", "kubernetes": "postgres"}
WAREHOUSE_VAR = "CBP_WAREHOUSE"
# The production warehouse's connection: the Dagster instance's server (the same CBP_PG_* variables), its own
# schema (CBP_WAREHOUSE_SCHEMA, default cbp). In Kubernetes the password is the DAGSTER_PG_PASSWORD that the
# Dagster Helm chart puts into every run and step pod from its Postgres secret.
PG_VARS = {"host": "CBP_PG_HOST", "port": "CBP_PG_PORT", "user": "CBP_PG_USER", "password": "CBP_PG_PASSWORD",
           "database": "CBP_PG_DB"}
PG_VARS_BY_PROFILE = {"local": PG_VARS, "production": PG_VARS,
                      "kubernetes": {**PG_VARS, "password": deployment.K8S_PG_PASSWORD_VAR}}
PG_SCHEMA_VAR = "CBP_WAREHOUSE_SCHEMA"


def warehouse_backend(profile: str) -> str:
    """``CBP_WAREHOUSE`` (duckdb or postgres) when set, else the profile's default."""
    raw = os.environ.get(WAREHOUSE_VAR, "").strip().lower()
    if raw and raw not in ("duckdb", "postgres"):
        raise deployment.DeploymentError(f"{WAREHOUSE_VAR}={raw!r}: use duckdb or postgres")
    return raw or WAREHOUSE_BY_PROFILE[profile]


def _postgres_warehouse(profile: str) -> PostgresWarehouse:
    env = PG_VARS_BY_PROFILE[profile]
    schema = dg.EnvVar(PG_SCHEMA_VAR) if os.environ.get(PG_SCHEMA_VAR) else "cbp"
    return PostgresWarehouse(host=dg.EnvVar(env["host"]), port=dg.EnvVar.int(env["port"]),
                             user=dg.EnvVar(env["user"]), password=dg.EnvVar(env["password"]),
                             database=dg.EnvVar(env["database"]), schema_name=schema)


def resources_for(profile: str, data_root: str | None = None) -> dict[str, dg.ConfigurableResource]:
    """The resources of a deployment profile: the one place where an environment chooses them.

    The data root comes from ``CBP_DATA_ROOT`` (an EnvVar; ``local`` falls back to ``./data`` when it is unset,
    ``data_root`` overrides it for the CLI) and is handed to every resource that keeps files."""
    if data_root is not None:
        root = DataRootResource(root=str(data_root))
    elif profile == "local" and not os.environ.get(DATA_ROOT_VAR):
        root = DataRootResource()
    else:
        root = DataRootResource(root=dg.EnvVar(DATA_ROOT_VAR))
    warehouses = {"duckdb": lambda: DuckDBWarehouse(data_root=root), "postgres": lambda: _postgres_warehouse(profile)}
    return {"data_root": root, "warehouse": warehouses[warehouse_backend(profile)](),
            "runtime": SegmentationRuntime(data_root=root)}


def configured(resource: dg.ConfigurableResource):
    """A resource with its EnvVars read now, for code outside a run (the CLI, the demo runner, the review app)."""
    with resource.process_config_and_initialize_cm() as value:
        return value


def warehouse(data_root: str | None = None, profile: str | None = None, *,
              lock_timeout_s: float | None = None) -> Warehouse:
    """The active profile's warehouse, configured from the environment now. ``lock_timeout_s``: how long an
    embedded (DuckDB) warehouse waits for a run's write lock (a status line does not wait minutes)."""
    wh = configured(resources_for(profile or deployment.profile(), data_root)["warehouse"])
    if lock_timeout_s is not None and isinstance(wh, DuckDBWarehouse):
        wh = DuckDBWarehouse(database=str(wh.path), lock_timeout_s=lock_timeout_s)
    return wh


def runtime(data_root: str | None = None, profile: str | None = None) -> SegmentationRuntime:
    return configured(resources_for(profile or deployment.profile(), data_root)["runtime"])


def set_pool_limit(home, pool: str, limit: int) -> str:
    """Set a concurrency pool's limit in the instance at ``home`` (``cbp instance init``); returns the run
    storage's class name. Opening the instance creates its schema (Postgres) on first use."""
    with dg.DagsterInstance.from_config(str(home)) as inst:
        inst.event_log_storage.set_concurrency_slots(pool, int(limit))
        return type(inst.run_storage).__name__


def render_step_jobs(job_name: str = "process_batch", image: str | None = None) -> dict:
    """The Kubernetes Job of every step of ``job_name`` in the kubernetes profile (:mod:`assets.k8s_plan`)."""
    from assets.k8s_plan import render_step_jobs as render

    return render(job_name, image)


def validate_manifests(version: str | None = None) -> dict[str, str]:
    """Every Kubernetes manifest of the deployment checked against the API schema (:mod:`assets.k8s_plan`)."""
    from assets.k8s_plan import validate_manifests as validate

    return validate(version)


def step_summary(jobs: dict) -> list[dict]:
    from assets.k8s_plan import step_summary as summary

    return summary(jobs)


def compare_models(name: str, log=print) -> dict:
    """``cbp model compare``: the registered model ``name`` on every processed batch, the comparison, the report
    (:func:`assets.runner.compare_with`)."""
    from assets.runner import compare_with

    return compare_with(dg.DagsterInstance.get(), name, log=log)


def batch_run_states(job_names: tuple[str, ...] = ("process_batch", "ingest_batch")) -> dict[str, str]:
    """``cbp status``: batch key -> status of its latest run of ``job_names`` (``$DAGSTER_HOME``'s instance)."""
    out: dict[str, str] = {}
    with dg.DagsterInstance.get() as inst:
        for rec in inst.get_run_records(order_by="create_timestamp", ascending=True):
            run = rec.dagster_run
            key = run.tags.get("cbp/batch")
            if key and run.job_name in job_names:
                out[key] = run.status.value
    return out


def executor_for(profile: str) -> dg.ExecutorDefinition:
    if profile == "kubernetes":
        from dagster_k8s import k8s_job_executor

        cfg = deployment.k8s_executor_config()
        cfg["step_k8s_config"] = deployment.k8s_step_config("cpu")   # checks and any untagged step
        return k8s_job_executor.configured(cfg, name="k8s_job_executor")
    return dg.multiprocess_executor


def build_definitions(profile: str | None = None) -> dg.Definitions:
    profile = profile or deployment.profile()
    return dg.Definitions(
        assets=[landing_zone, raw_mri_scans, participant_covariates, ingestion_summary, segmentation_model,
                muscle_segmentations, muscle_metrics, analysis_cohort, cbp_association_model, pain_intensity_model,
                table_one, stratified_comparisons, physical_activity_prevalence, published_results,
                comparison_metrics, model_comparison, reviews_spec()],
        asset_checks=[covariates_expectations, scan_facts_expectations, fat_water_swap_qc,
                      cohort_one_row_per_participant, segmentation_model_dice, segmentation_plausibility,
                      analysis_cohort_expectations, cbp_model_checks, pain_model_checks],
        jobs=[ingest_batch_job, process_batch_job, model_job, cohort_refresh_job, compare_batch_job,
              model_comparison_job],
        sensors=[delivery_sensor] + ([] if profile == "kubernetes" else [run_reaper]),
        schedules=[daily_cohort_refresh],
        resources=resources_for(profile),
        executor=executor_for(profile),
    )


def review_store(data_root: str | None = None):
    """``cbp qc``'s review store: the warehouse under the data root, and ``$DAGSTER_HOME``'s instance (when set) so
    that every decision is reported as a materialisation of ``qc_reviews``. The caller disposes of
    ``store.instance`` when it is not None (:func:`cbp_platform.cli._qc_store`)."""
    from resources.reviews import ReviewStore

    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else None
    return ReviewStore(warehouse(data_root), instance=instance)


defs = build_definitions()
