"""The kubernetes profile, checked on paper: the definitions load with the k8s_job_executor, every step's
Kubernetes Job is rendered by dagster-k8s itself, and only segmentation asks for a GPU. The Helm values agree
with the code (namespace, data volume, profile, Postgres driver, run queue, pool, slot release)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestration.k8s_plan import helm_values, render_step_jobs, step_summary
from cbp_platform import deployment

ROOT = Path(__file__).resolve().parents[2]
GPU_STEPS = {"muscle_segmentations", "segmentation_model", "comparison_metrics"}


@pytest.fixture(scope="module")
def k8s_env():
    old = os.environ.get("CBP_DEPLOYMENT")
    os.environ["CBP_DEPLOYMENT"] = "kubernetes"
    yield
    if old is None:
        os.environ.pop("CBP_DEPLOYMENT")
    else:
        os.environ["CBP_DEPLOYMENT"] = old


def test_profile_selects_the_executor_by_configuration_only(k8s_env):
    from cbp_platform.definitions import build_definitions

    for job in ("process_batch", "cohort_refresh", "train_segmentation_model"):
        assert build_definitions().resolve_job_def(job).executor_def.name == "k8s_job_executor"
        assert build_definitions("local").resolve_job_def(job).executor_def.name == "multiprocess"
    os.environ["CBP_DEPLOYMENT"] = "staging"
    try:
        with pytest.raises(deployment.DeploymentError, match="CBP_DEPLOYMENT='staging'"):
            deployment.profile()
    finally:
        os.environ["CBP_DEPLOYMENT"] = "kubernetes"


@pytest.mark.parametrize("job", ["process_batch", "cohort_refresh", "train_segmentation_model",
                                 "compare_model_batch", "compare_models"])
def test_rendered_step_jobs_gpu_only_on_segmentation(k8s_env, job):
    jobs = render_step_jobs(job)
    assert jobs
    for key, k8s_job in jobs.items():
        pod = k8s_job.spec.template.spec
        c = pod.containers[0]
        limits = c.resources.limits or {}
        pool = (pod.node_selector or {}).get(deployment.NODE_POOL_LABEL)
        if key in GPU_STEPS:
            assert limits.get("nvidia.com/gpu") == "1", key
            assert pool == "gpu" and any(t.key == "nvidia.com/gpu" for t in pod.tolerations or []), key
        else:
            assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in (c.resources.requests or {}), key
            assert pool == "cpu" and not pod.tolerations, key
            assert limits.get("memory"), key
        # every step pod sees the shared data root and runs the same profile
        assert [(m.name, m.mount_path) for m in c.volume_mounts] == [("cbp-data", "/data")]
        assert pod.volumes[0].persistent_volume_claim.claim_name == "cbp-data"
        env = {e.name: e.value for e in c.env}
        assert env["CBP_DATA_ROOT"] == "/data" and env["CBP_DEPLOYMENT"] == "kubernetes"
        # the production warehouse: the connection from the Helm values, the password from the chart's secret
        assert {k: env[k] for k in deployment.WAREHOUSE_PASSTHROUGH} == WAREHOUSE_ENV
        pw = next(e for e in c.env if e.name == deployment.K8S_PG_PASSWORD_VAR)
        assert pw.value is None and pw.value_from.secret_key_ref.name == helm_values()["global"]["postgresqlSecretName"]
        assert k8s_job.metadata.namespace == "cbp"
        assert c.args[:3] == ["dagster", "api", "execute_step"]
    if job == "process_batch":
        assert {"muscle_segmentations", "raw_mri_scans", "muscle_metrics"} <= set(jobs)
        rows = {r["step"]: r for r in step_summary(jobs)}
        assert rows["muscle_segmentations"]["gpu"] == "1" and rows["muscle_metrics"]["gpu"] == "0"
    if job == "cohort_refresh":   # whole-cohort steps get the large CPU profile
        lim = jobs["cbp_association_model"].spec.template.spec.containers[0].resources.limits
        assert lim["memory"] == deployment.STEP_RESOURCES["cpu-large"]["limits"]["memory"]


def test_gpu_requests_and_the_gpu_pool_cover_the_same_steps():
    from cbp_platform.definitions import build_definitions

    defs = build_definitions("kubernetes")
    graph = defs.resolve_asset_graph()
    ops = {k.to_user_string(): defs.resolve_assets_def(k).op for k in graph.get_all_asset_keys()
           if graph.get(k).is_executable}                      # not the observed landing zone
    assert {k for k, op in ops.items() if op.pool == deployment.GPU_POOL} == GPU_STEPS
    assert {k for k, op in ops.items() if op.tags.get("cbp/resource") == "gpu"} == GPU_STEPS


def test_helm_values_agree_with_the_code():
    v = helm_values()
    assert v["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = v["runLauncher"]["config"]["k8sRunLauncher"]
    exe = deployment.k8s_executor_config()
    assert launcher["jobNamespace"] == exe["job_namespace"]
    assert launcher["volumes"][0]["persistentVolumeClaim"]["claimName"] == exe["volumes"][0][
        "persistent_volume_claim"]["claim_name"]
    assert launcher["volumeMounts"][0]["mountPath"] == exe["volume_mounts"][0]["mount_path"]
    assert "CBP_DEPLOYMENT=kubernetes" in launcher["envVars"]
    dep = v["dagster-user-deployments"]["deployments"][0]
    env = {e["name"]: e["value"] for e in dep["env"]}
    assert env["CBP_DEPLOYMENT"] == "kubernetes" and env["CBP_DATA_ROOT"] == "/data"
    assert dep["dagsterApiGrpcArgs"] == ["--module-name", "cbp_platform.definitions"]
    assert v["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    daemon = v["dagsterDaemon"]
    assert daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert daemon["runMonitoring"]["freeSlotsAfterRunEndSeconds"] > 0
    assert v["concurrency"]["pools"]["defaultLimit"] >= 1
    # the storage manifest provides what the values refer to
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "storage.yaml").read_text()))
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("PersistentVolumeClaim", "cbp-data") in kinds
    assert ("Secret", v["global"]["postgresqlSecretName"]) in kinds
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_instance_templates_and_gpu_pool_sizing(tmp_path, monkeypatch):
    monkeypatch.setenv("CBP_GPU_COUNT", "3")
    path, doc = deployment.write_instance_config(tmp_path, "production")
    assert doc["concurrency"]["pools"]["default_limit"] == 3
    assert doc["run_monitoring"]["free_slots_after_run_end_seconds"] == 300
    assert doc["storage"]["postgres"]["postgres_db"]["hostname"] == {"env": "CBP_PG_HOST"}
    assert yaml.safe_load(path.read_text()) == doc
    _, local = deployment.write_instance_config(tmp_path / "l", "local")
    assert "storage" not in local and "pools" not in local.get("concurrency", {})
    monkeypatch.setenv("CBP_GPU_COUNT", "0")       # CPU-only production host: one segmentation step at a time
    assert deployment.instance_config("production")["concurrency"]["pools"]["default_limit"] == 1
    monkeypatch.setenv("CBP_GPU_COUNT", "two")
    with pytest.raises(deployment.DeploymentError, match="CBP_GPU_COUNT='two'"):
        deployment.gpu_count()


def test_cli_k8s_plan_prints_the_gpu_step():
    out = subprocess.run([str(Path(sys.executable).with_name("cbp")), "k8s-plan", "--job", "process_batch"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("muscle_segmentations "))
    assert line.split()[1] == "gpu" and line.split()[-1] == "1"


WAREHOUSE_ENV = {"CBP_PG_HOST": "cbp-postgres.cbp.svc.cluster.local", "CBP_PG_PORT": "5432", "CBP_PG_USER": "dagster",
                 "CBP_PG_DB": "dagster"}


def test_every_manifest_is_valid_against_the_kubernetes_api_schema(k8s_env):
    """Every step Job of every job, the objects the Helm values configure and the storage manifest, validated
    offline against the targeted release's API schema, strict (an unknown field is an error)."""
    from orchestration.k8s_plan import manifests, validate_manifests

    res = validate_manifests()
    assert {k: v for k, v in res.items() if v} == {}
    assert sum(k.startswith("job process_batch: step ") for k in res) >= 6
    assert any(k.startswith("values: run worker") for k in res) and any("PersistentVolumeClaim" in k for k in res)
    # the validator bites: a misspelt field and a wrong type in a rendered step Job are errors
    import copy

    import kubernetes_validate

    job = copy.deepcopy(manifests(("process_batch",))["job process_batch: step muscle_segmentations"])
    c = job["spec"]["template"]["spec"]["containers"][0]
    bad = copy.deepcopy(job)
    bad["spec"]["template"]["spec"]["containers"][0]["resource"] = c["resources"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, deployment.K8S_VERSION, strict=True)
    bad = copy.deepcopy(job)
    bad["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "X", "value": 5}]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, deployment.K8S_VERSION, strict=True)


def test_the_kubernetes_profile_uses_the_production_warehouse(k8s_env, monkeypatch):
    from orchestration.k8s_plan import run_worker_environment
    from orchestration.profiles import resources_for, warehouse

    monkeypatch.delenv("CBP_WAREHOUSE", raising=False)
    assert type(resources_for("kubernetes")["warehouse"]).__name__ == "PostgresWarehouse"
    assert type(resources_for("local")["warehouse"]).__name__ == "DuckDBWarehouse"
    with run_worker_environment(helm_values()) as env:      # what a run worker pod has
        wh = warehouse(profile="kubernetes")
        assert (wh.host, str(wh.port), wh.user, wh.database, wh.schema_name) == (
            env["CBP_PG_HOST"], env["CBP_PG_PORT"], env["CBP_PG_USER"], env["CBP_PG_DB"], "cbp")
        assert wh.password == env[deployment.K8S_PG_PASSWORD_VAR]
