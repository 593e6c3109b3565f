"""The whole pipeline on an s3:// lake root (the moto S3 server on loopback): the world, a tiny model
trained with DeepSpeed, the nightly `trackstar_reindex` DAG, then scoring and the evaluation. Every
file lands beside the Delta tables on S3, nothing under the working directory, and every path
stored in a table resolves."""

import json

import pyarrow as pa
import pytest

from infra import storage
from infra.airflow_local import run_dag
from infra.lake import Lake
from infra.matrices import load_matrices
from demo import train_model, world
from evaluation import evaluate
from jobs import register_queries
from tests.fixtures import TINY, WORLD


def _objects(root: str, folder: str) -> list[str]:
    return [uri.removeprefix(f"{root}/") for uri in storage.list_objects(storage.join(root, folder))]


@pytest.mark.slow
def test_world_training_reindex_score_and_evaluate_on_an_s3_lake_write_nothing_locally(
    s3_bucket, tmp_path, monkeypatch
):
    root = f"s3://{s3_bucket}/lake"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("TRACKSTAR_LAKE_ROOT", root)
    monkeypatch.setenv("TRACKSTAR_PROJECTION_K", "4")  # a setting from the environment reaches the DAG's tasks

    world.run(world.WorldConfig(out_dir=root, **WORLD))
    assert _objects(root, "raw") == ["raw/c4-train.00000-of-00002.json.gz", "raw/c4-train.00001-of-00002.json.gz"]
    summary = train_model.run(train_model.TrainConfig(lake=root, optimizer="adam", **TINY))
    older, final = summary["checkpoints"]
    for checkpoint in summary["checkpoints"]:
        assert storage.exists(storage.join(root, "model", "checkpoints", checkpoint, "model.safetensors"))
    assert storage.exists(storage.join(root, "model", "tokenizer", "tokenizer.json"))
    register_queries.run(root)

    # trigger conf keys that name settings override them for the run
    result = run_dag(
        "trackstar_reindex",
        root,
        {"top_k": 3, "vector_dtype": "float16"},
        tmp_path / "airflow",
        TRACKSTAR_RETRY_DELAY_SECONDS=1,
    )
    assert result["state"] == "success", result["log"][-4000:]
    assert {t for t, state in result["tasks"].items() if state != "success"} == set()
    lake = Lake(root)
    queries = lake.read("queries").num_rows
    proponents = lake.read("proponents", filters=[("method", "=", "trackstar")])
    assert proponents.num_rows == queries * 3
    vectors = lake.read("train_gradients", columns=["dtype", "vector"])
    assert set(vectors["dtype"].to_pylist()) == {"float16"}
    (hessian,) = lake.read("hessians", filters=[("kind", "=", "inverse_root")]).to_pylist()
    assert set(hessian["shape"]) == {4 * 4}  # one k x k block per weight matrix, k from the environment
    assert {len(v) for v in vectors["vector"].to_pylist()} == {2 * sum(hessian["shape"])}

    report = evaluate.run(
        evaluate.EvaluateConfig(lake=root, projection_k=4, tail_patch_queries=2, reports=storage.join(root, "reports"))
    )
    stored = json.loads(storage.read_bytes(storage.join(root, "reports", "eval.json")))
    assert stored["methods"] == json.loads(json.dumps(report["methods"]))
    assert all(0 <= cell["mrr"] <= 1 and cell["n_queries"] == queries for cell in stored["methods"].values())

    # nothing beside the tables went anywhere but S3
    assert sorted(p.name for p in workdir.iterdir()) == []
    assert _objects(root, "_plans") and _objects(root, "_autocorrelation") and _objects(root, "_text_embeddings")
    reports = _objects(root, "reports")
    assert {"reports/eval.html", "reports/eval.json"} <= set(reports)
    plot = next(r for r in reports if r.startswith("reports/hessian_") and r.endswith(".png"))
    assert storage.read_bytes(storage.join(root, plot)).startswith(b"\x89PNG")
    page = storage.read_text(storage.join(root, "reports", "eval.html"))
    assert 'spectra, λ and damping</h2><img src="data:image/png;base64,iVBOR' in page  # the plot read back from S3

    # every stored path is relative to the lake's root and resolves to an s3:// URI under it, from this
    # or any other working directory
    for row in lake.read("hessians").to_pylist():
        assert row["path"].startswith("_matrices/") and lake.resolve(row["path"]).startswith(f"{root}/_matrices/")
        assert load_matrices(lake.resolve(row["path"]), row["sha256"])
    (checkpoint,) = lake.read("checkpoints").to_pylist()  # the newest arrival was indexed, not the older one
    location = lake.resolve(checkpoint["path"])
    assert location == storage.join(root, "model", "checkpoints", final) and checkpoint["checkpoint_id"] != older
    assert storage.exists(storage.join(location, "manifest.json"))
    (query_set,) = lake.read("query_sets").to_pylist()
    assert query_set["path"] == "world/queries.jsonl" and storage.exists(lake.resolve(query_set["path"]))

    # the weekly maintenance on S3: a partition rewritten by delta-rs' own writer (one file mixing the
    # fingerprints the evaluation extracted) is split again, a file per fingerprint, the rows unchanged
    from infra.maintenance import maintain_lake

    partition = lake.read("train_gradients", filters=[("partition", "=", 0)])
    assert len(set(partition["fingerprint"].to_pylist())) > 1
    lake.replace_slice("train_gradients", partition, checkpoint_id=partition["checkpoint_id"][0].as_py(), partition=0)
    order = [("fingerprint", "ascending"), ("partition", "ascending"), ("doc_id", "ascending"), ("chunk", "ascending")]
    before = lake.read("train_gradients").sort_by(order)
    results = maintain_lake(lake)
    assert results["train_gradients"]["files_removed"] >= 1
    files = pa.table(lake.open("train_gradients").get_add_actions(flatten=True)).to_pylist()
    assert all(f["min.fingerprint"] == f["max.fingerprint"] for f in files)
    assert lake.read("train_gradients").sort_by(order).equals(before)
    assert sorted(p.name for p in workdir.iterdir()) == []
