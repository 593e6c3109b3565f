"""Names that reach Delta predicates, SQL text and file paths: query sets, checkpoints, runs.

The rule: a name is an identifier, 1 to 128 characters of ASCII letters, digits, `.`, `_` and `-`,
starting with a letter or digit, never `..`. So a name can be pasted into a path (no `/`, no
`..`) or an SQL literal (no quote, no backslash) without any further escaping, on every engine.
A name outside the rule, even a harmless one such as "o'brien-set", is refused with a message
saying what is allowed: a quote that works in one place (delta-rs) but is read differently in
another (Spark's backslash escapes, a file name) is how names corrupt data. Values that are not
names (counts, error messages, configurations) are quoted instead (`infra.lake`).
"""

from __future__ import annotations

import re

NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # also a JSON-schema pattern (Airflow params)
RULE = "1-128 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit, without '..'"


class InvalidName(ValueError):
    """A name that could be read as code or as a path."""


def check_name(value, what: str = "name") -> str:
    """`value` if it is a valid identifier, else InvalidName saying which rule it breaks."""
    if not isinstance(value, str) or not re.fullmatch(NAME_PATTERN, value):
        raise InvalidName(f"{what} {value!r} is not a valid name: use {RULE}")
    return value


def check_names(**names) -> None:
    """check_name on each given name (keyword = what it is); None and "" mean "the default" and pass."""
    for what, value in names.items():
        if value not in (None, ""):
            check_name(value, what.replace("_", " "))
