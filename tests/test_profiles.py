"""Resources per deployment profile, chosen in one place (orchestration.profiles.resources_for): one data root
moves every path, environment values reach the resources through dg.EnvVar, and the warehouse follows the
profile unless CBP_WAREHOUSE says otherwise."""

from __future__ import annotations

import dagster as dg
import pytest

from cbp_platform.deployment import DeploymentError
from cbp_platform.paths import DataLayout


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("CBP_WAREHOUSE", "CBP_WAREHOUSE_SCHEMA", "CBP_DATA_ROOT"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def _configured(profile: str, data_root: str | None = None) -> dict:
    from orchestration.profiles import configured, resources_for

    return {k: configured(v) for k, v in resources_for(profile, data_root).items()}


def test_one_data_root_moves_every_path(clean_env, tmp_path):
    from orchestration.profiles import resources_for

    for name in ("a", "b"):                           # the EnvVar is read when the resources are configured
        clean_env.setenv("CBP_DATA_ROOT", str(tmp_path / name))
        r = _configured("local")
        layout = DataLayout(tmp_path / name)
        assert r["data_root"].path == layout.root and r["data_root"].landing == layout.landing
        assert r["data_root"].registry.dir == layout.batch_registry
        assert r["warehouse"].path == layout.warehouse_file == tmp_path / name / "warehouse" / "cbp.duckdb"
        assert r["runtime"].models_path == layout.models and r["runtime"].registry_path == layout.models / "registry"
    raw = resources_for("local")
    assert isinstance(raw["data_root"].root, dg.EnvVar) and raw["data_root"].root == "CBP_DATA_ROOT"
    # the CLI's --data-root overrides the environment, for every resource at once
    r = _configured("local", str(tmp_path / "cli"))
    assert r["warehouse"].path.parent.parent == r["runtime"].models_path.parent == tmp_path / "cli"


def test_the_profile_chooses_the_warehouse_and_configuration_overrides_it(clean_env):
    from orchestration.profiles import resources_for

    assert type(resources_for("local")["warehouse"]).__name__ == "DuckDBWarehouse"
    for profile in ("production", "kubernetes"):
        wh = resources_for(profile)["warehouse"]
        assert type(wh).__name__ == "PostgresWarehouse"
        assert isinstance(wh.host, dg.EnvVar) and isinstance(wh.password, dg.EnvVar)   # never a value in code
    assert resources_for("kubernetes")["warehouse"].password == "DAGSTER_PG_PASSWORD"
    assert resources_for("production")["warehouse"].password == "CBP_PG_PASSWORD"
    clean_env.setenv("CBP_WAREHOUSE", "postgres")
    clean_env.setenv("CBP_WAREHOUSE_SCHEMA", "study2")
    for k, v in {"CBP_PG_HOST": "db", "CBP_PG_PORT": "6543", "CBP_PG_USER": "u", "CBP_PG_PASSWORD": "secret",
                 "CBP_PG_DB": "d"}.items():
        clean_env.setenv(k, v)
    wh = _configured("local")["warehouse"]
    assert (wh.host, wh.port, wh.user, wh.password, wh.database, wh.schema_name) == (
        "db", 6543, "u", "secret", "d", "study2")
    assert "secret" not in wh.location
    clean_env.setenv("CBP_WAREHOUSE", "duckdb")
    assert type(resources_for("production")["warehouse"]).__name__ == "DuckDBWarehouse"
    clean_env.setenv("CBP_WAREHOUSE", "sqlite")
    with pytest.raises(DeploymentError, match="CBP_WAREHOUSE='sqlite'"):
        resources_for("local")


def test_a_production_deployment_without_its_settings_fails_naming_them(clean_env):
    """EnvVars are required where the profile reads them: a run would fail naming the missing variable."""
    from orchestration.profiles import resources_for

    for k in ("CBP_PG_HOST", "CBP_PG_PORT", "CBP_PG_USER", "CBP_PG_PASSWORD", "CBP_PG_DB"):
        clean_env.delenv(k, raising=False)
    with pytest.raises(Exception, match="CBP_DATA_ROOT|CBP_PG_HOST"):
        _configured("production")
    res = resources_for("production")
    with pytest.raises(Exception, match="CBP_PG_HOST"):
        from orchestration.profiles import configured

        configured(res["warehouse"])


@pytest.mark.parametrize("profile, override, kind", [("local", None, "duckdb"), ("production", None, "postgres"),
                                                     ("kubernetes", None, "postgres"), ("production", "duckdb", "duckdb")])
def test_the_code_location_shows_the_profiles_warehouse(clean_env, profile, override, kind):
    """Assets writing the warehouse declare the kind ``warehouse``; the code location shows the backend the profile
    (or CBP_WAREHOUSE) uses, and nothing else of the merged areas is lost on the way."""
    from cbp_platform.definitions import AREAS, build_definitions

    if override:
        clean_env.setenv("CBP_WAREHOUSE", override)
    defs = build_definitions(profile)
    kinds = {s.key.to_user_string(): set(s.kinds) for s in defs.resolve_all_asset_specs()}
    writers = {k for k, v in kinds.items() if {"duckdb", "postgres"} & v}
    assert {"raw_mri_scans", "participant_covariates", "muscle_metrics", "analysis_cohort", "qc_reviews"} <= writers
    assert all(kind in kinds[k] and not ({"duckdb", "postgres", "warehouse"} - {kind}) & kinds[k] for k in writers)
    assert kinds["raw_mri_scans"] == {kind, "nifti"} and kinds["landing_zone"] == {"filesystem"}
    area_assets = {k.to_user_string() for a in AREAS.values() for x in a.assets for k in getattr(x, "keys", [x.key])}
    assert set(kinds) == area_assets
    area_checks = {k for a in AREAS.values() for x in (a.asset_checks or ()) for k in x.check_keys}
    area_checks |= {k for a in AREAS.values() for x in a.assets for k in getattr(x, "check_keys", ())}
    assert set(defs.resolve_asset_graph().asset_check_keys) == area_checks and len(area_checks) >= 9
    jobs = {j.name for j in defs.resolve_all_job_defs()} - {"__ASSET_JOB"}
    assert jobs == {"ingest_batch", "process_batch", "train_segmentation_model", "cohort_refresh",
                    "compare_model_batch", "compare_models", "cut_release", "erase_withdrawn"}
    assert {s.name for s in defs.sensors} == ({"delivery_sensor"} if profile == "kubernetes"
                                              else {"delivery_sensor", "run_reaper"})
    assert {s.name for s in defs.schedules} == {"daily_cohort_refresh"}
