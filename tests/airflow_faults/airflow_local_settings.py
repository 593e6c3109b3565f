"""Test-only Airflow local settings (Airflow imports `airflow_local_settings` from the path when it
starts): fault injection for the retry tests, kept out of the project's own code.

With TRACKSTAR_TEST_FAIL_ONCE="<function of dags.orchestrate>:<marker file>" that task function fails
once, after its work is written, so the retry must cope with its own earlier output. The DAG tasks
call `dags.orchestrate.<function>` by attribute, so the replaced function is the one they run.
"""

import os
from pathlib import Path


def _fail_once_after(function, marker: Path):
    def fail_once(*args, **kwargs):
        result = function(*args, **kwargs)
        if not marker.exists():
            marker.write_text("failed once")
            raise RuntimeError(f"injected failure of {function.__name__} (TRACKSTAR_TEST_FAIL_ONCE)")
        return result

    return fail_once


_wanted = os.environ.get("TRACKSTAR_TEST_FAIL_ONCE", "")
if _wanted:
    import dags.orchestrate

    _name, _, _marker = _wanted.partition(":")
    setattr(dags.orchestrate, _name, _fail_once_after(getattr(dags.orchestrate, _name), Path(_marker)))
