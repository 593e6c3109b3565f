"""The pipeline's configuration: one typed dataclass, from defaults < TOML file < environment < Airflow params.

    config = load_config("trackstar.toml")     # or TRACKSTAR_CONFIG=path, or no file at all
    TRACKSTAR_LAKE_ROOT=s3://bucket/lake TRACKSTAR_VECTOR_DTYPE=int8 python -m jobs ...

Every field can be set in the TOML file (top-level keys), as TRACKSTAR_<FIELD> in the environment,
and, inside an Airflow task, as a DAG param or trigger conf key of the same name (a null param is
unset). Every CLI command and every DAG task reads it through `load_config()`. Secrets (AWS keys)
are never part of it: storage credentials come from the standard AWS environment (infra.storage),
so `as_json()` can be stored in the `runs` table as is.

`python -m infra.config` prints the settings table of infra/README.md from this declaration.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

ENV_PREFIX = "TRACKSTAR_"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


def setting(default, meaning: str):
    """A Config field with the one-line meaning shown in the settings table."""
    return dataclasses.field(default=default, metadata={"meaning": meaning})


# The codecs of schemas.vectors (a test keeps the two equal); named here so that reading the
# configuration, as every DAG file does at parse time, imports neither numpy nor pyarrow.
VectorDtype = typing.Literal["float32", "float16", "bfloat16", "int8"]


@dataclass(frozen=True)
class Config:
    lake_root: str = setting(
        "lake", "local folder or s3://bucket/prefix; every table and file of the lake lives under it"
    )
    checkpoints: str | None = setting(
        None, "where new checkpoints arrive (folder or s3:// prefix); none = <lake_root>/model/checkpoints"
    )
    cache_dir: str = setting("~/.cache/trackstar", "local folder for copies of s3:// checkpoints and tokenizers")
    spark_remote: str | None = setting(None, "Spark Connect URL (also SPARK_REMOTE); none = the embedded Sail engine")
    world_seed: int = setting(0, "the generated demo world and the demo model's training shuffles")
    query_set: str = setting(
        "fact-world", "the query set a command or DAG run works on when none is given (the embedded world's)"
    )
    projection_seed: int = setting(0, "seed of the projection matrices")
    projection_k: int = setting(16, "projection size per side: a k x k block per weight matrix")
    vector_dtype: VectorDtype = setting("float32", "storage encoding of gradient vectors")
    batch_token_budget: int = setting(4096, "padded tokens per gradient batch")
    extract_ranks: int = setting(
        0, "DeepSpeed ranks of one extraction task: 0 = one per GPU of its node, else 2 CPU ranks"
    )
    extract_group_size: int = setting(
        8, "partitions per mapped extraction task of the reindex and backfill DAGs (one node's ranks each)"
    )
    device_pool_slots: int = setting(
        1, "slots of the Airflow pool trackstar_device: extraction tasks (GPU nodes) that run at once"
    )
    cpu_threads: int = setting(
        0, "threads of a CPU process (per rank): 0 = the cores idle when it starts; OMP_NUM_THREADS, when set, wins"
    )
    top_k: int = setting(10, "proponents kept per query")
    hessian_lambda: float | None = setting(None, "R_query weight in [0, 1]; none = chosen where the spectra cross")
    hessian_damping: float = setting(0.1, "damping = this x the mean eigenvalue of R")
    hessian_outlier_z: float = setting(
        4.0,
        "train chunks whose log gradient norm lies this many robust deviations above the median are left out of R_train",
    )
    outlier_proponent_ratio: float = setting(
        100.0,
        "score does not propose train outliers this many times the median norm or more (junk; the corpus's own tail stays)",
    )
    hessian_alarm_factor: float = setting(
        100.0, "fit-hessian warns when λ or the damping moved by more than this factor since the last fit"
    )
    refit_threshold: float = setting(0.1, "refit the Hessian when the training sample changed by more than this share")
    keep_checkpoints: int = setting(
        2, "a pipeline run that brings a new model keeps the vectors of the newest N checkpoints (0: all)"
    )
    task_retries: int = setting(2, "Airflow retries of every task (exponential backoff)")
    retry_delay_seconds: float = setting(60.0, "Airflow delay before the first retry")

    def __post_init__(self):
        if self.vector_dtype not in typing.get_args(VectorDtype):
            raise ConfigError(f"vector_dtype {self.vector_dtype!r}: expected one of {typing.get_args(VectorDtype)}")
        for name in ("projection_k", "batch_token_budget", "top_k", "extract_group_size", "device_pool_slots"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in (
            "task_retries",
            "retry_delay_seconds",
            "refit_threshold",
            "extract_ranks",
            "cpu_threads",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.hessian_lambda is not None and not 0.0 <= self.hessian_lambda <= 1.0:
            raise ConfigError(f"hessian_lambda must lie in [0, 1], got {self.hessian_lambda}")

    @property
    def checkpoints_folder(self) -> str:
        """Where new checkpoints arrive: the setting `checkpoints`, else the lake's model/checkpoints."""
        from infra import layout

        return self.checkpoints or layout.checkpoints(self.lake_root)

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def as_json(self) -> str:
        """The configuration as sorted JSON for the runs table, with any token in spark_remote hidden."""
        values = dataclasses.asdict(self)
        if values["spark_remote"]:
            values["spark_remote"] = re.sub(r"(token=)[^;]*", r"\1***", values["spark_remote"])
        return json.dumps(values, sort_keys=True)


def load_config(
    path: str | Path | None = None,
    environ: typing.Mapping[str, str] | None = None,
    params: typing.Mapping | None = None,
) -> Config:
    """Defaults, then the TOML file (`path`, else $TRACKSTAR_CONFIG if set), then TRACKSTAR_<FIELD>
    variables, then `params` (default: the running Airflow task's params) that name a setting."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(f"{ENV_PREFIX}CONFIG")
    values = _from_toml(Path(path)) if path else {}
    for name in _field_types():
        variable = ENV_PREFIX + name.upper()
        if variable in environ:
            values[name] = _parse(name, environ[variable], variable)
    params = airflow_params() if params is None else params
    for name, value in params.items():
        if name in _field_types() and value is not None:
            values[name] = _check_type(name, value, f"Airflow param {name}")
    return Config(**values)


def from_settings(name: str, **cli):
    """A stage config field whose default is the setting `name`, read when the object is made, so
    that a CLI command, a DAG task and any other caller get the same value. `cli`: the field's
    command-line metadata (help, choices, flags; see infra/cli.py)."""
    return dataclasses.field(default_factory=lambda: getattr(load_config(), name), metadata=cli)


def airflow_params() -> dict:
    """The params (DAG params merged with the trigger conf) of the Airflow task running in this
    process; {} outside one. Airflow is only asked when it is loaded already: a CLI never imports it."""
    if "airflow.sdk" not in sys.modules:
        return {}
    from airflow.sdk import get_current_context

    try:
        return dict(get_current_context()["params"])
    except RuntimeError:  # "no context was found": not inside a running task
        return {}


def settings_table() -> str:
    """The Markdown table of every setting: field, variable, default, meaning."""
    lines = ["| setting | env | default | meaning |", "|---|---|---|---|"]
    for spec in dataclasses.fields(Config):
        default = "none" if spec.default is None else json.dumps(spec.default).strip('"')
        meaning = spec.metadata["meaning"]
        if typing.get_origin(_field_types()[spec.name]) is typing.Literal:
            meaning += ": " + ", ".join(typing.get_args(_field_types()[spec.name]))
        lines.append(f"| {spec.name} | {ENV_PREFIX}{spec.name.upper()} | {default} | {meaning} |")
    return "\n".join(lines)


def _field_types() -> dict[str, type]:
    return typing.get_type_hints(Config)


def _from_toml(path: Path) -> dict:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"config file {path}: {error}") from error
    values = {}
    for name, value in raw.items():
        if name not in _field_types():
            raise ConfigError(f"config file {path}: unknown setting {name!r}; known: {', '.join(_field_types())}")
        values[name] = _check_type(name, value, f"{path}: {name}")
    return values


def _base_type(name: str) -> tuple[type, bool]:
    """(the field's type, whether it may be None); a Literal of strings is a str (checked by Config)."""
    hint = _field_types()[name]
    if typing.get_origin(hint) is typing.Literal:
        return str, False
    if isinstance(hint, types.UnionType):
        return next(t for t in typing.get_args(hint) if t is not type(None)), True
    return hint, False


def _check_type(name: str, value, where: str):
    """A TOML or Airflow value, which carries its own type: validated strictly by pydantic (an int is
    a float, a bool is no int, a string no number)."""
    from pydantic import TypeAdapter, ValidationError

    expected, optional = _base_type(name)
    try:
        return TypeAdapter(expected | None if optional else expected).validate_python(value, strict=True)
    except ValidationError:
        raise ConfigError(
            f"{where}: expected {expected.__name__}{' or null' if optional else ''}, got {value!r}"
        ) from None


def _parse(name: str, text: str, where: str):
    """An environment string parsed by pydantic (numbers, true/false/yes/no/on/off/1/0); 'none',
    'null' or nothing for an optional setting."""
    from pydantic import TypeAdapter, ValidationError

    expected, optional = _base_type(name)
    if optional and text.strip().lower() in ("", "none", "null"):
        return None
    try:
        return TypeAdapter(expected).validate_strings(text.strip() if expected is not str else text)
    except ValidationError:
        raise ConfigError(f"{where}={text!r}: expected {expected.__name__}") from None


if __name__ == "__main__":
    print(settings_table())
