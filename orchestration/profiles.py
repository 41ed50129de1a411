"""One place per environment: the resources and the executor of each deployment profile.

The deployment profile (``CBP_DEPLOYMENT``, :mod:`cbp_platform.deployment`) picks, here and nowhere else:

* the resources (:func:`resources_for`): the data root, the warehouse (embedded DuckDB for ``local``, PostgreSQL
  for ``production`` and ``kubernetes``; ``CBP_WAREHOUSE`` overrides) and the segmentation runtime. Environment
  values reach them through :class:`dagster.EnvVar`; the data root is set once and every resource derives its
  paths from it (:class:`~cbp_platform.paths.DataLayout`);
* the executor (:func:`executor_for`): multiprocess for ``local`` and ``production``, ``k8s_job_executor`` (one
  Kubernetes Job per step, resources from each asset's ``dagster-k8s/config`` tag, CPU-node defaults for the rest)
  for ``kubernetes``;
* the run reaper, outside ``kubernetes`` (:mod:`orchestration.reaper`).

:func:`profile_definitions` hands these to ``cbp_platform.definitions`` as one more ``Definitions`` to merge.
Code outside a run (the CLI, the runner, the review app) takes its warehouse and runtime from :func:`warehouse`
and :func:`runtime`, which load no asset.
"""

from __future__ import annotations

import os

import dagster as dg

from cbp_platform import deployment
from cbp_platform.paths import ENV_VAR as DATA_ROOT_VAR
from resources import (WAREHOUSE_KIND, DataRootResource, DuckDBWarehouse, PostgresWarehouse, SegmentationRuntime,
                       Warehouse)

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


def executor_for(profile: str) -> dg.ExecutorDefinition:
    if profile == "kubernetes":
        from dagster_k8s import k8s_job_executor

        cfg = deployment.k8s_executor_config()
        cfg["step_k8s_config"] = deployment.k8s_step_config("cpu")   # checks and any untagged step
        return k8s_job_executor.configured(cfg, name="k8s_job_executor")
    return dg.multiprocess_executor


def profile_definitions(profile: str) -> dg.Definitions:
    """What the environment adds to the code location: its resources, its executor and, where pids mean something
    (not ``kubernetes``, whose run launcher monitors its pods), the run reaper. (Imported here: the CLI's
    warehouse and runtime come from this module and load no asset, and the reaper reads run liveness from
    :mod:`assets.writes`.)"""
    from orchestration.reaper import run_reaper

    return dg.Definitions(resources=resources_for(profile), executor=executor_for(profile),
                          sensors=[] if profile == "kubernetes" else [run_reaper])


def show_warehouse_kind(defs: dg.Definitions, profile: str) -> dg.Definitions:
    """The assets that write the warehouse declare the kind ``warehouse``; the UI shows the profile's backend
    (``duckdb`` or ``postgres``) in its place. (:func:`dagster.map_asset_specs` is public; ``Definitions``' own
    mapper is a preview API, so the definitions are rebuilt around the mapped assets.)"""
    backend = warehouse_backend(profile)

    def relabel(spec: dg.AssetSpec) -> dg.AssetSpec:
        if WAREHOUSE_KIND not in spec.kinds:
            return spec
        return spec.replace_attributes(kinds=(set(spec.kinds) - {WAREHOUSE_KIND}) | {backend})

    assets = list(defs.assets or [])
    sources = [a for a in assets if isinstance(a, dg.SourceAsset)]       # observable source assets: no kinds
    mapped = dg.map_asset_specs(relabel, [a for a in assets if not isinstance(a, dg.SourceAsset)])
    return dg.Definitions(assets=[*mapped, *sources], asset_checks=defs.asset_checks,
                          jobs=defs.jobs, sensors=defs.sensors, schedules=defs.schedules, resources=defs.resources,
                          executor=defs.executor, loggers=defs.loggers)


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
