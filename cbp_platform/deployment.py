"""Deployment profiles: one code base, chosen by configuration (``CBP_DEPLOYMENT``), never by editing code.

* ``local`` (default): embedded SQLite Dagster instance under ``$DAGSTER_HOME``, multiprocess executor.
* ``production``: one shared host. Postgres run/event/schedule storage (``dagster-postgres``), the queued run
  coordinator with a run limit, the ``gpu`` pool sized to the GPU count, run monitoring freeing the slots of
  crashed runs (``free_slots_after_run_end_seconds``). Executor: multiprocess.
* ``kubernetes``: ``production`` on a cluster. The Helm chart (``deploy/helm/values.yaml``) writes the instance
  (same Postgres, queue and pools, plus the ``K8sRunLauncher``); the code location runs every step as its own
  Kubernetes Job (``k8s_job_executor``), with the step resources in :data:`STEP_RESOURCES` attached to each
  asset as a ``dagster-k8s/config`` tag: GPU steps on GPU nodes, everything else on CPU nodes.

The instance file (``$DAGSTER_HOME/dagster.yaml``) is rendered from ``deploy/dagster.<profile>.yaml`` by
``cbp instance init``. This module does not import Dagster; :mod:`orchestration.profiles` applies it.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import yaml

PROFILES = ("local", "production", "kubernetes")
DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy"
GPU_POOL = "gpu"
# The Kubernetes release the manifests are written for and validated against (``cbp k8s-plan --validate``).
K8S_VERSION = "1.31"
# The production warehouse's connection in step pods: passed through from the run worker (the Helm values' run
# launcher envVars), the password from the chart's Postgres secret (DAGSTER_PG_PASSWORD in every run/step pod).
K8S_PG_PASSWORD_VAR = "DAGSTER_PG_PASSWORD"
WAREHOUSE_PASSTHROUGH = ("CBP_PG_HOST", "CBP_PG_PORT", "CBP_PG_USER", "CBP_PG_DB")
WAREHOUSE_OPTIONAL = ("CBP_WAREHOUSE", "CBP_WAREHOUSE_SCHEMA")     # passed on when the code location has them
K8S_CONFIG_TAG = "dagster-k8s/config"
NODE_POOL_LABEL = "cbp.io/node-pool"


class DeploymentError(ValueError):
    pass


def profile() -> str:
    """The active profile from ``CBP_DEPLOYMENT`` (default ``local``)."""
    name = os.environ.get("CBP_DEPLOYMENT", "local").strip().lower() or "local"
    if name not in PROFILES:
        raise DeploymentError(f"CBP_DEPLOYMENT={name!r} is not a deployment profile; use one of {', '.join(PROFILES)}")
    return name


def automation_running() -> bool:
    """Default status of the sensor and schedule: running, unless ``CBP_AUTOMATION=stopped`` (start an instance
    with automation paused, e.g. for maintenance, a backfill by hand or the UI tests; the UI toggles it)."""
    raw = os.environ.get("CBP_AUTOMATION", "running").strip().lower() or "running"
    if raw not in ("running", "stopped"):
        raise DeploymentError(f"CBP_AUTOMATION={raw!r}: use running or stopped")
    return raw == "running"


def gpu_count() -> int:
    """GPUs on this host: ``CBP_GPU_COUNT`` when set, else the lines of ``nvidia-smi -L``, else 0."""
    raw = os.environ.get("CBP_GPU_COUNT")
    if raw is not None and raw.strip():
        try:
            n = int(raw)
        except ValueError:
            raise DeploymentError(f"CBP_GPU_COUNT={raw!r} is not a whole number") from None
        if n < 0:
            raise DeploymentError(f"CBP_GPU_COUNT={n} is negative")
        return n
    exe = shutil.which("nvidia-smi")
    if not exe:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def gpu_pool_limit(gpus: int) -> int:
    """Segmentation steps allowed at once: one per GPU; on a CPU-only host one (a step uses every core)."""
    return max(1, int(gpus))


def instance_template(name: str) -> Path:
    # kubernetes: the Helm chart renders the instance; a host that talks to the same database uses the
    # production file
    return DEPLOY_DIR / f"dagster.{'production' if name == 'kubernetes' else name}.yaml"


def instance_config(name: str | None = None, gpus: int | None = None) -> dict:
    """The ``dagster.yaml`` content for a profile, with the ``gpu`` pool sized to the GPU count."""
    name = name or profile()
    path = instance_template(name)
    if not path.exists():
        raise DeploymentError(f"{path}: instance template for profile {name!r} is missing")
    doc = yaml.safe_load(path.read_text()) or {}
    pools = (doc.get("concurrency") or {}).get("pools")
    if pools is not None:       # the profile limits pools: size them to the GPU count
        pools["default_limit"] = gpu_pool_limit(gpu_count() if gpus is None else gpus)
    return doc


def write_instance_config(home: Path, name: str | None = None, gpus: int | None = None) -> tuple[Path, dict]:
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    doc = instance_config(name, gpus)
    header = (f"# Rendered by `cbp instance init` from {instance_template(name or profile()).name} "
              f"(profile {name or profile()}); edit the template, not this file.\n")
    target = home / "dagster.yaml"
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, target)
    return target, doc


# --------------------------------------------------------------------------------------------------------
# Kubernetes step resources (applied as op tags; only the k8s_job_executor reads them)

STEP_RESOURCES: dict[str, dict] = {
    # segmentation (training and inference): one GPU per step pod, on the GPU node pool
    "gpu": {
        "requests": {"cpu": "4", "memory": "16Gi"},
        "limits": {"cpu": "8", "memory": "24Gi", "nvidia.com/gpu": "1"},
        "node_pool": "gpu",
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    # per-batch ingestion and metrics: NIfTI reading and numpy, two cores
    "cpu": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}, "node_pool": "cpu"},
    # cohort-level steps: the whole cohort in memory (30,868 + 20,000 participants, mixed models)
    "cpu-large": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "32Gi"},
                  "node_pool": "cpu"},
}


def k8s_step_config(kind: str) -> dict:
    """The ``dagster-k8s/config`` value (container resources, node selector, tolerations) of a step kind."""
    try:
        spec = STEP_RESOURCES[kind]
    except KeyError:
        raise DeploymentError(f"unknown step kind {kind!r}; known: {', '.join(STEP_RESOURCES)}") from None
    pod: dict = {"node_selector": {NODE_POOL_LABEL: spec["node_pool"]}}
    if spec.get("tolerations"):
        pod["tolerations"] = copy.deepcopy(spec["tolerations"])
    return {"container_config": {"resources": {"requests": dict(spec["requests"]), "limits": dict(spec["limits"])}},
            "pod_spec_config": pod}


def k8s_step_tags(kind: str) -> dict:
    """Op tags for a step kind: ``{"dagster-k8s/config": ...}`` plus ``cbp/resource`` for the UI and filters."""
    return {K8S_CONFIG_TAG: k8s_step_config(kind), "cbp/resource": kind}


def k8s_executor_config() -> dict:
    """``k8s_job_executor`` config shared by every step pod: namespace, the data-root volume, environment.

    The data root (landing zone, NIfTI derivatives, model bundles, reports) is one ReadWriteMany
    PersistentVolumeClaim (``CBP_DATA_PVC``, default ``cbp-data``) mounted at ``/data`` in every pod. The warehouse
    is PostgreSQL: its connection variables pass through from the run worker (:data:`WAREHOUSE_PASSTHROUGH`), the
    password comes from the Helm chart's secret."""
    claim = os.environ.get("CBP_DATA_PVC", "cbp-data")
    mount = os.environ.get("CBP_DATA_MOUNT", "/data")
    return {
        "job_namespace": os.environ.get("CBP_K8S_NAMESPACE", "cbp"),
        "max_concurrent": int(os.environ.get("CBP_K8S_MAX_PODS_PER_RUN", "8")),
        "volumes": [{"name": "cbp-data", "persistent_volume_claim": {"claim_name": claim}}],
        "volume_mounts": [{"name": "cbp-data", "mount_path": mount}],
        "env_vars": [f"CBP_DATA_ROOT={mount}", "CBP_DEPLOYMENT=kubernetes", "GX_ANALYTICS_ENABLED=False",
                     *WAREHOUSE_PASSTHROUGH, *(v for v in WAREHOUSE_OPTIONAL if os.environ.get(v))],
    }
