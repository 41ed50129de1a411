"""The Kubernetes Jobs the ``k8s_job_executor`` would create for a job's steps, rendered without a cluster.

Uses dagster-k8s's own merge (executor ``step_k8s_config`` < the step's ``dagster-k8s/config`` tag) and its own
``construct_dagster_k8s_job``, so what is checked here (``tests/deploy``, ``cbp k8s-plan``) is what a cluster
would receive. The run-launcher fields the step pods inherit (DAGSTER_HOME, the instance ConfigMap, the Postgres
password secret) are read from ``deploy/helm/values.yaml``.
"""

import contextlib
from types import SimpleNamespace

import yaml

from cbp_platform.definitions import build_definitions
from cbp_platform.deployment import DEPLOY_DIR, K8S_PG_PASSWORD_VAR, NODE_POOL_LABEL
from cbp_platform.processes import environment

HELM_VALUES = DEPLOY_DIR / "helm" / "values.yaml"


def helm_values() -> dict:
    return yaml.safe_load(HELM_VALUES.read_text())


def _run_launcher_stand_in(values: dict) -> SimpleNamespace:
    glob = values.get("global", {})
    return SimpleNamespace(job_image=None, dagster_home=glob.get("dagsterHome", "/opt/dagster/dagster_home"),
                           instance_config_map="dagster-instance",
                           postgres_password_secret=glob.get("postgresqlSecretName", "dagster-postgresql-secret"))


@contextlib.contextmanager
def run_worker_environment(values: dict):
    """The environment a run worker pod has (the run launcher's ``envVars`` of the Helm values, and the chart's
    Postgres password, here a stand-in), for planning outside the cluster: the kubernetes profile's resources
    read their configuration from it through ``dg.EnvVar``."""
    env = dict(e.split("=", 1) for e in values["runLauncher"]["config"]["k8sRunLauncher"]["envVars"] if "=" in e)
    env.setdefault(K8S_PG_PASSWORD_VAR, "<from the chart's Postgres secret>")
    with environment(env):
        yield env


def render_step_jobs(job_name: str = "process_batch", image: str | None = None) -> dict:
    """``{step_key: kubernetes.client.V1Job}`` for every step of ``job_name`` in the ``kubernetes`` profile."""
    values = helm_values()
    with run_worker_environment(values):
        return _render(values, job_name, image)


def _render(values: dict, job_name: str, image: str | None) -> dict:
    from dagster._core.execution.api import create_execution_plan
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import UserDefinedDagsterK8sConfig, construct_dagster_k8s_job, get_user_defined_k8s_config


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


# --------------------------------------------------------------------------------------------------------------
# Offline validation against the Kubernetes API schema (kubernetes-validate: the OpenAPI schemas of each release)

STORAGE_MANIFEST = DEPLOY_DIR / "k8s" / "storage.yaml"


def _env_list(pairs) -> list[dict]:
    out = []
    for e in pairs:
        if isinstance(e, dict):
            out.append(e)
        elif "=" in e:
            name, value = e.split("=", 1)
            out.append({"name": name, "value": value})
    return out


def helm_value_objects(values: dict | None = None) -> dict[str, dict]:
    """The Kubernetes objects the Helm values configure, built from the values' Kubernetes fields (env,
    volumes, mounts, resources, node selectors, ports): the code location's Deployment, a run worker's Job, the
    webserver's and the daemon's Deployments. The chart's own templates are not here (``helm repo add``
    downloads them); what the values contribute to those objects is, and each must be valid API content."""
    v = values or helm_values()
    ns = v["runLauncher"]["config"]["k8sRunLauncher"]["jobNamespace"]
    labels = {"app.kubernetes.io/name": "dagster"}

    def deployment(name: str, pod: dict) -> dict:
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
                "spec": {"selector": {"matchLabels": labels},
                         "template": {"metadata": {"labels": labels}, "spec": pod}}}

    out = {}
    for dep in v["dagster-user-deployments"]["deployments"]:
        img = dep["image"]
        out[f"values: user deployment {dep['name']}"] = deployment(dep["name"], {
            "containers": [{"name": dep["name"], "image": f"{img['repository']}:{img['tag']}",
                            "imagePullPolicy": img["pullPolicy"], "args": ["dagster", "api", "grpc",
                                                                           *dep["dagsterApiGrpcArgs"]],
                            "ports": [{"containerPort": int(dep["port"])}], "env": _env_list(dep["env"]),
                            "volumeMounts": dep["volumeMounts"], "resources": dep["resources"]}],
            "volumes": dep["volumes"], "nodeSelector": dep["nodeSelector"]})
    rl = v["runLauncher"]["config"]["k8sRunLauncher"]
    rk = rl["runK8sConfig"]
    out["values: run worker Job"] = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "dagster-run-example", "namespace": ns},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never", "volumes": rl["volumes"], **rk.get("podSpecConfig", {}),
            "containers": [{"name": "dagster", "image": "registry.example.org/cbp-platform:0",
                            "env": _env_list(rl["envVars"]), "volumeMounts": rl["volumeMounts"],
                            **rk.get("containerConfig", {})}]}}}}
    for key, name in (("dagsterWebserver", "dagster-webserver"), ("dagsterDaemon", "dagster-daemon")):
        part = v.get(key) or {}
        container = {"name": name, "image": "docker.io/dagster/dagster-k8s:1.13.0"}
        if part.get("resources"):
            container["resources"] = part["resources"]
        out[f"values: {name}"] = deployment(name, {"containers": [container],
                                                   **({"nodeSelector": part["nodeSelector"]}
                                                      if part.get("nodeSelector") else {})})
    return out


def manifests(jobs: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Every object a deployment applies or the platform creates, as API dicts: the storage manifest's
    documents, the objects the Helm values configure, and the Job of every step of every job."""
    from kubernetes.client import ApiClient


    out = {f"{STORAGE_MANIFEST.relative_to(DEPLOY_DIR.parent)}: {d['kind']} {d['metadata']['name']}": d
           for d in yaml.safe_load_all(STORAGE_MANIFEST.read_text()) if d}
    out.update(helm_value_objects())
    api = ApiClient()
    names = jobs or tuple(sorted(j.name for j in build_definitions("kubernetes").resolve_all_job_defs()
                                 if not j.name.startswith("__")))
    for job in names:
        for step, k8s_job in render_step_jobs(job).items():
            out[f"job {job}: step {step}"] = api.sanitize_for_serialization(k8s_job)
    return out


def validate_manifests(version: str | None = None, jobs: tuple[str, ...] | None = None) -> dict[str, str]:
    """``{manifest: ""}`` when valid against the Kubernetes ``version``'s API schema (strict: unknown fields are
    errors too), else the first error's message."""
    import kubernetes_validate

    from cbp_platform.deployment import K8S_VERSION

    out = {}
    for name, doc in manifests(jobs).items():
        try:
            kubernetes_validate.validate(doc, version or K8S_VERSION, strict=True)
            out[name] = ""
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            out[name] = f"{path}: {exc.message}"
        except kubernetes_validate.SchemaNotFoundError as exc:
            out[name] = f"no schema: {exc}"
    return out
