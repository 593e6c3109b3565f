"""The one configuration: the settings table is the declared one, Airflow params override the
environment, the DAG tasks build every stage's configuration from it, and nothing reads a
TRACKSTAR_* variable behind its back."""

import re
import typing
from pathlib import Path

import pytest

from infra.config import ConfigError, VectorDtype, load_config, settings_table
from schemas.vectors import DTYPES

REPO = Path(__file__).resolve().parent.parent


def test_the_readme_settings_table_is_the_declared_one():
    assert settings_table() in (REPO / "infra" / "README.md").read_text()


def test_the_vector_dtype_setting_names_the_codecs():
    assert typing.get_args(VectorDtype) == DTYPES


def test_airflow_params_override_the_environment_and_are_type_checked():
    config = load_config(
        environ={"TRACKSTAR_TOP_K": "20", "TRACKSTAR_HESSIAN_LAMBDA": "0.5"},
        params={"top_k": 5, "hessian_lambda": None, "checkpoint": "not a setting"},
    )
    assert config.top_k == 5 and config.hessian_lambda == 0.5  # a null param leaves the setting as it was
    with pytest.raises(ConfigError, match="Airflow param top_k: expected int"):
        load_config(environ={}, params={"top_k": "5"})
    with pytest.raises(ConfigError, match="vector_dtype 'float8'"):
        load_config(environ={}, params={"vector_dtype": "float8"})


def test_outside_airflow_no_params_apply():
    assert load_config(environ={"TRACKSTAR_TOP_K": "7"}).top_k == 7


def test_stage_configs_take_their_defaults_from_the_settings_when_made(monkeypatch):
    from jobs import extract, score

    before = extract.ExtractConfig()
    for name, value in {
        "LAKE_ROOT": "s3://bucket/lake",
        "PROJECTION_K": "8",
        "PROJECTION_SEED": "3",
        "VECTOR_DTYPE": "int8",
        "BATCH_TOKEN_BUDGET": "512",
        "TOP_K": "25",
    }.items():
        monkeypatch.setenv(f"TRACKSTAR_{name}", value)
    config = extract.ExtractConfig()
    assert (
        (config.projection_k, config.projection_seed, config.vector_dtype, config.token_budget)
        == (8, 3, "int8", 512)
        != (before.projection_k, before.projection_seed, before.vector_dtype, before.token_budget)
    )
    assert extract.ExtractConfig(projection_k=4).projection_k == 4 and score.ScoreConfig().top_k == 25
    assert load_config().checkpoints_folder == "s3://bucket/lake/model/checkpoints"


def test_the_configured_spark_remote_is_the_endpoint(monkeypatch):
    from infra.spark import configured_remote

    monkeypatch.delenv("SPARK_REMOTE", raising=False)
    monkeypatch.setenv("TRACKSTAR_SPARK_REMOTE", "sc://spark.example:15002")
    assert configured_remote() == "sc://spark.example:15002"  # no embedded engine started
    monkeypatch.setenv("SPARK_REMOTE", "sc://other:15002")
    assert configured_remote() == "sc://other:15002"


def test_no_setting_is_read_from_the_environment_behind_the_configuration():
    read = set()
    for path in (
        p
        for package in ("jobs", "infra", "dags", "demo", "evaluation", "explorer")
        for p in REPO.glob(f"{package}/*.py")
    ):
        if path.name != "config.py":
            read |= set(re.findall(r"""environ(?:\.get\(|\[)\s*["'](TRACKSTAR_\w+)""", path.read_text()))
    # the explorer's access token (a secret, never stored) and the pid of the driver that launched a
    # stage's ranks (process plumbing, not a setting)
    assert read == {"TRACKSTAR_EXPLORER_TOKEN", "TRACKSTAR_DRIVER_PID"}
