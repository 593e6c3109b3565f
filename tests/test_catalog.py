"""jobs/catalog.py: one definition of "the latest checkpoint", on real Delta tables and folders."""

import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from infra.lake import Lake
from jobs import catalog
from schemas.tables import TABLES

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def register(lake: Lake, checkpoint_id: str, step: int, registered_at: datetime) -> None:
    row = {
        "checkpoint_id": checkpoint_id,
        "step": step,
        "path": f"/checkpoints/{checkpoint_id}",
        "optimizer": "adam",
        "learning_rate": 1e-3,
        "tokens_seen": step * 100,
        "model_fingerprint": f"fp-{checkpoint_id}",
        "registered_at": registered_at,
        "run_id": f"run-{checkpoint_id}",
    }
    lake.append("checkpoints", pa.Table.from_pylist([row], schema=TABLES["checkpoints"].arrow_schema))


def test_a_backfilled_older_checkpoint_does_not_become_the_latest(tmp_path):
    lake = Lake(tmp_path / "lake")
    register(lake, "step-0200", 200, T0)
    register(lake, "step-0400", 400, T0 + timedelta(hours=1))
    register(lake, "step-0100", 100, T0 + timedelta(days=3))  # backfilled last, and its id sorts after none
    register(lake, "a-retrained", 400, T0 + timedelta(hours=2))  # same step as step-0400, registered later
    assert catalog.checkpoint_ids_by_step(lake) == ["step-0100", "step-0200", "step-0400", "a-retrained"]
    assert catalog.latest_checkpoint_id(lake) == "a-retrained"  # not the newest registration, not the largest id
    assert catalog.latest_checkpoint_id(lake, among={"step-0100", "step-0200"}) == "step-0200"
    with pytest.raises(ValueError, match="no registered checkpoints"):
        catalog.latest_checkpoint_id(lake, among={"unknown"})
    assert catalog.registered_location(lake, "step-0200") == "/checkpoints/step-0200"


def test_the_newest_checkpoint_folder_is_judged_by_its_manifest_step(tmp_path):
    for name, step in (("z-early", 10), ("b-late", 300), ("m-middle", 50)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"checkpoint_id": name, "step": step}))
    (tmp_path / "not-a-checkpoint").mkdir()  # no manifest: not a checkpoint folder
    ordered = catalog.checkpoint_folders_by_step(str(tmp_path))
    assert [path.rsplit("/", 1)[-1] for path in ordered] == ["z-early", "m-middle", "b-late"]
    assert catalog.newest_checkpoint_folder(str(tmp_path)).endswith("/b-late")
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        catalog.newest_checkpoint_folder(str(tmp_path / "not-a-checkpoint"))
    # a retrained model at the same step: the later save wins, whatever the folder names
    for name, saved in (("z-first-model", "2026-01-01T00:00:00+00:00"), ("a-retrained", "2026-02-01T00:00:00+00:00")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"step": 300, "saved_at": saved}))
    assert catalog.newest_checkpoint_folder(str(tmp_path)).endswith("/a-retrained")
