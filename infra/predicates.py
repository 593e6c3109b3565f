"""SQL text built from Python values: the predicate that selects a slice (for delta-rs and for
Spark) and the values of a delta-rs update. A value of the wrong type is refused (SchemaError),
never pasted into the SQL.
"""

from __future__ import annotations

import datetime as dt

from schemas.tables import SchemaError, Table


def slice_predicate(spec: Table, keys: dict, quote: str = '"') -> str:
    """SQL predicate selecting one slice, values quoted as literals; `quote` quotes identifiers
    (double quotes for delta-rs, backticks for Spark)."""
    if not keys:
        raise SchemaError(f"table {spec.name}: a slice needs at least one key of {list(spec.key_columns)}")
    return " AND ".join(_equals(spec, name, value, quote) for name, value in sorted(keys.items()))


def _equals(spec: Table, name: str, value, quote: str) -> str:
    if name not in spec.key_columns:
        raise SchemaError(f"table {spec.name}: {name!r} is not a slice key; keys are {list(spec.key_columns)}")
    column = f"{quote}{name}{quote}"
    if value is None:
        return f"{column} IS NULL"
    if isinstance(value, (list, tuple)):  # several slices replaced at once
        if not value:
            raise SchemaError(f"table {spec.name}: an empty list of {name} values selects no slice")
        literals = [_literal(spec.column(name).type, v, f"{spec.name}.{name}", spark=quote == "`") for v in value]
        return f"{column} IN ({', '.join(literals)})"
    return f"{column} = {_literal(spec.column(name).type, value, f'{spec.name}.{name}', spark=quote == '`')}"


def _literal(sql_type: str, value, where: str, spark: bool = False) -> str:
    """A value as an SQL literal. Spark reads backslash escapes and takes 'a''b' for two adjacent
    literals ("ab"); delta-rs (DataFusion) reads '' as one quote and backslashes as themselves."""
    if sql_type in ("INT", "BIGINT") and isinstance(value, int) and not isinstance(value, bool):
        return str(int(value))
    if sql_type == "STRING" and isinstance(value, str) and spark:
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if sql_type == "STRING" and isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise SchemaError(f"{where}: slice key value {value!r} is not a {sql_type}")


def update_value(sql_type: str, value) -> str:
    """A value as a delta-rs SQL expression: strings quoted with quotes doubled, timestamps in microseconds."""
    if value is None:
        return "NULL"
    if isinstance(value, dt.datetime):
        return str(int(value.timestamp() * 1_000_000))
    if isinstance(value, str):
        return _literal("STRING", value, sql_type)
    if isinstance(value, (bool, int, float)):
        return str(value).lower() if isinstance(value, bool) else repr(value)
    raise SchemaError(f"cannot store a {type(value).__name__} in a {sql_type} column")
