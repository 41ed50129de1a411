"""The Kubernetes Jobs the ``k8s_job_executor`` would create for a job's steps, rendered without a cluster.

Uses dagster-k8s's own merge (executor ``step_k8s_config`` < the step's ``dagster-k8s/config`` tag) and its own
``construct_dagster_k8s_job``, so what is checked here (``tests/deploy``, ``cbp k8s-plan``) is what a cluster
would receive. The run-launcher fields the step pods inherit (DAGSTER_HOME, the instance ConfigMap, the Postgres
password secret) are read from ``deploy/helm/values.yaml``.
"""

from types import SimpleNamespace

import yaml

from cbp_platform.deployment import DEPLOY_DIR, NODE_POOL_LABEL

HELM_VALUES = DEPLOY_DIR / "helm" / "values.yaml"


def helm_values() -> dict:
    return yaml.safe_load(HELM_VALUES.read_text())


def _run_launcher_stand_in(values: dict) -> SimpleNamespace:
    glob = values.get("global", {})
    return SimpleNamespace(job_image=None, dagster_home=glob.get("dagsterHome", "/opt/dagster/dagster_home"),
                           instance_config_map="dagster-instance",
                           postgres_password_secret=glob.get("postgresqlSecretName", "dagster-postgresql-secret"))


def render_step_jobs(job_name: str = "process_batch", image: str | None = None) -> dict:
    """``{step_key: kubernetes.client.V1Job}`` for every step of ``job_name`` in the ``kubernetes`` profile."""
    from dagster._core.execution.api import create_execution_plan
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import UserDefinedDagsterK8sConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    from cbp_platform.definitions import build_definitions

    values = helm_values()
    if image is None:
        img = values["dagster-user-deployments"]["deployments"][0]["image"]
        image = f"{img['repository']}:{img['tag']}"
    job = build_definitions("kubernetes").resolve_job_def(job_name)
    cfg = job.executor_def.apply_config_mapping({}).value["config"]
    base = K8sContainerContext(env_vars=cfg.get("env_vars"), volume_mounts=cfg.get("volume_mounts"),
                               volumes=cfg.get("volumes"), namespace=cfg.get("job_namespace"),
                               run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(cfg.get("step_k8s_config", {})))
    launcher = _run_launcher_stand_in(values)
    out = {}
    # the comparison jobs need a model name to be planned (the steps do not depend on which)
    model = {"config": {"model": "<registered model>"}}
    run_config = {"compare_model_batch": {"ops": {"comparison_metrics": model}},
                  "compare_models": {"ops": {"model_comparison": model}}}.get(job_name, {})
    for step in create_execution_plan(job, run_config=run_config).steps:
        ctx = base.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step.tags)))
        # a readable Job name; its pod adds "-pod", and Kubernetes names stop at 63 characters
        name = f"dagster-step-{step.key.replace('_', '-')}"[:59].rstrip("-")
        k8s_job = construct_dagster_k8s_job(ctx.get_k8s_job_config(image, launcher), args=["dagster", "api",
                                            "execute_step"], job_name=name,
                                            component="step_worker", user_defined_k8s_config=ctx.run_k8s_config,
                                            labels={"dagster/job": job_name, "dagster/op": step.key})
        k8s_job.metadata.namespace = ctx.namespace
        out[step.key] = k8s_job
    return out


def step_summary(jobs: dict) -> list[dict]:
    """One row per step: node pool, CPU/memory requests and limits, GPUs."""
    rows = []
    for key, job in sorted(jobs.items()):
        spec = job.spec.template.spec
        res = spec.containers[0].resources
        req, lim = (res.requests or {}), (res.limits or {})
        rows.append({"step": key, "node_pool": (spec.node_selector or {}).get(NODE_POOL_LABEL, "-"),
                     "cpu": f"{req.get('cpu', '-')}/{lim.get('cpu', '-')}",
                     "memory": f"{req.get('memory', '-')}/{lim.get('memory', '-')}",
                     "gpu": lim.get("nvidia.com/gpu", "0"), "namespace": job.metadata.namespace})
    return rows
