"""The project as a package: what pyproject.toml installs, and DAG files that parse without
importing the jobs (torch, deltalake, pyarrow)."""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from infra.airflow_local import airflow_environment

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "deltalake", "pyarrow", "transformers", "deepspeed", "jobs")

PARSE_DAGS = r"""
import json, os, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
print(json.dumps({"dags": sorted(bag.dag_ids), "errors": {k: str(v) for k, v in bag.import_errors.items()},
                  "loaded": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def test_dag_files_parse_without_importing_the_jobs_or_their_libraries(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", PARSE_DAGS],
        env=airflow_environment("lake", tmp_path),
        capture_output=True,
        text=True,
        check=True,
    )
    parsed = json.loads(out.stdout.strip().splitlines()[-1])
    assert parsed["errors"] == {}
    assert parsed["dags"] == ["trackstar_backfill", "trackstar_maintenance", "trackstar_reindex", "trackstar_score"]
    assert parsed["loaded"] == []


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower()


def test_every_dependency_is_pinned_in_the_lock():
    project = _pyproject()["project"]
    pinned = {
        _name(line): line
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    optional = [r for group in project["optional-dependencies"].values() for r in group]
    for requirement in project["dependencies"] + optional:
        assert "==" in pinned.get(_name(requirement), ""), f"{requirement} is not pinned in requirements.txt"
    declared = {_name(r) for r in project["dependencies"] + optional}
    assert set(pinned) == declared  # and nothing in the lock is missing from the package


def test_the_package_holds_every_project_folder_the_pipeline_imports():
    folders = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests", "bench"}
    assert set(_pyproject()["tool"]["setuptools"]["packages"]) == folders


def test_the_helm_values_fan_extraction_out_over_gpu_pods_sized_by_the_settings(monkeypatch):
    """No Kubernetes here: the values are checked for what the DAGs rely on, and the cluster policy
    they carry is run against stand-ins of the kubernetes client models (a test double: the client
    is not installed)."""
    import types

    import yaml

    from infra.config import load_config

    values = yaml.safe_load((REPO / "infra" / "deploy" / "helm" / "values.yaml").read_text())
    assert values["executor"] == "KubernetesExecutor"
    settings = {e["name"]: e["value"] for e in values["env"] if e["name"].startswith("TRACKSTAR_")}
    config = load_config(environ=settings, params={})  # every TRACKSTAR_ variable is a valid setting
    assert config.device_pool_slots == 4 and config.extract_group_size == 8 and config.extract_ranks == 0
    assert values["migrateDatabaseJob"]["args"] == ["bash /opt/trackstar/infra/deploy/airflow.sh migrate"]

    models = types.SimpleNamespace(
        **{
            name: lambda **kw: kw
            for name in ("V1Pod", "V1PodSpec", "V1Container", "V1ResourceRequirements", "V1Toleration")
        }
    )
    monkeypatch.setitem(sys.modules, "kubernetes", types.SimpleNamespace(client=types.SimpleNamespace(models=models)))
    monkeypatch.setitem(sys.modules, "kubernetes.client", types.SimpleNamespace(models=models))
    policy: dict = {}
    exec(values["airflowLocalSettings"], policy)
    extraction, other = types.SimpleNamespace(pool="trackstar_device"), types.SimpleNamespace(pool="default_pool")
    policy["task_policy"](extraction)
    policy["task_policy"](other)
    (container,) = extraction.executor_config["pod_override"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert not hasattr(other, "executor_config")
