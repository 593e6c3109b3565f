"""The pipeline's configuration: one typed dataclass, from defaults < TOML file < environment.

    config = load_config("trackstar.toml")     # or TRACKSTAR_CONFIG=path, or no file at all
    TRACKSTAR_LAKE_ROOT=s3://bucket/lake TRACKSTAR_VECTOR_DTYPE=int8 python -m jobs ...

Every field can be set in the TOML file (top-level keys) or as TRACKSTAR_<FIELD> in the
environment. Secrets (AWS keys) are never part of it: storage credentials come from the standard
AWS environment (infra.storage), so `as_json()` can be stored in the `runs` table as is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from schemas.vectors import DTYPES

ENV_PREFIX = "TRACKSTAR_"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclass(frozen=True)
class Config:
    lake_root: str = "lake"                # local folder or s3://bucket/prefix
    spark_remote: str | None = None        # Spark Connect URL; None = embedded Sail
    seed: int = 0                          # world generation and training shuffles
    projection_seed: int = 0               # projection matrices are a pure function of this
    k_per_module: int = 16                 # projection size per side: a k x k block per weight matrix
    vector_dtype: str = "float32"          # float32, float16, bfloat16 or int8 (schemas.vectors)
    batch_token_budget: int = 4096         # padded tokens per gradient batch
    top_k: int = 10                        # proponents kept per query
    hessian_lambda: float | None = None    # R_query weight; None = choose by spectra crossing
    hessian_damping: float = 0.1           # damping = this × the mean eigenvalue of R

    def __post_init__(self):
        if self.vector_dtype not in DTYPES:
            raise ConfigError(f"vector_dtype {self.vector_dtype!r}: expected one of {DTYPES}")
        for name in ("k_per_module", "batch_token_budget", "top_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hessian_lambda is not None and not 0.0 <= self.hessian_lambda <= 1.0:
            raise ConfigError(f"hessian_lambda must lie in [0, 1], got {self.hessian_lambda}")

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def as_json(self) -> str:
        """The configuration as sorted JSON for the runs table, with any token in spark_remote hidden."""
        values = dataclasses.asdict(self)
        if values["spark_remote"]:
            values["spark_remote"] = re.sub(r"(token=)[^;]*", r"\1***", values["spark_remote"])
        return json.dumps(values, sort_keys=True)


def load_config(path: str | Path | None = None, environ: typing.Mapping[str, str] | None = None) -> Config:
    """Defaults, then the TOML file (`path`, else $TRACKSTAR_CONFIG if set), then TRACKSTAR_<FIELD> variables."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(f"{ENV_PREFIX}CONFIG")
    values = _from_toml(Path(path)) if path else {}
    for name in _field_types():
        variable = ENV_PREFIX + name.upper()
        if variable in environ:
            values[name] = _parse(name, environ[variable], variable)
    return Config(**values)


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
    """(the field's type, whether it may be None)."""
    hint = _field_types()[name]
    if isinstance(hint, types.UnionType):
        non_none = [t for t in typing.get_args(hint) if t is not type(None)]
        return non_none[0], True
    return hint, False


def _check_type(name: str, value, where: str):
    expected, optional = _base_type(name)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and (expected is bool or not isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {expected.__name__}{' or null' if optional else ''}, got {value!r}")


def _parse(name: str, text: str, where: str):
    """A typed value from an environment string: ints, floats, booleans, 'none' for optional fields."""
    expected, optional = _base_type(name)
    if optional and text.strip().lower() in ("", "none", "null"):
        return None
    if expected is bool:
        lowered = text.strip().lower()
        if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError(f"{where}={text!r}: expected a boolean (true/false)")
        return lowered in ("1", "true", "yes", "on")
    try:
        return expected(text.strip()) if expected in (int, float) else text
    except ValueError:
        raise ConfigError(f"{where}={text!r}: expected {expected.__name__}") from None
