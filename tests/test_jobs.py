"""The pipeline jobs end to end on a small world: tokenize (Sail), extract (DeepSpeed CPU ranks),
fit-hessian, score (Sail); each checked against a direct computation with the kernels."""

import gzip
import shutil
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gradient_kernels.hessian import (
    Autocorrelation,
    crossing_component,
    crossing_lambda,
    damped_inverse_power,
    mix,
    spectrum,
    train_relative_damping,
)
from gradient_kernels.hooks import GradientProjector
from gradient_kernels.losses import document_batch
from gradient_kernels.modules import weight_matrices
from gradient_kernels.normalizers import normalizers_from_state
from gradient_kernels.projection import ProjectionSpec
from gradient_kernels.scoring import FingerprintMismatch, Preconditioner, prepare
from infra.lake import Lake
from infra.matrices import ChecksumMismatch, load_matrices
from infra import layout, storage
from jobs import catalog, extract, fit_hessian, launch, register_queries, score, tokenize
from jobs.checkpoints import CheckpointMismatch, load_second_moments
from jobs.second_moments import SAMPLE_CHUNKS, load_data_moments
from schemas.vectors import decode_vectors
from tests.fixtures import copy_lake, running_ranks

BAD_LINES = [
    b'{"text": "no closing brace", "url": "https://x.example/1"',  # malformed JSON
    b'{"text": "no url here", "timestamp": "2019-01-01T00:00:00Z"}',  # missing field
    b'{"text": "   ", "url": "https://x.example/2", "timestamp": "t"}',  # empty text
    b'{"text": "caf\xe9", "url": "https://x.example/3", "timestamp": "t"}',  # not UTF-8
    b'{"text": "bin\\u0000ary", "url": "https://x.example/4", "timestamp": "t"}',  # binary junk
]


def _write_extra_partition(raw_dir, long_text):
    good = [
        json.dumps(
            {"text": long_text, "url": "https://long.example/doc", "timestamp": "2019-05-05T00:00:00Z"}
        ).encode(),
        json.dumps({"text": "x" * 10_000_000, "url": "https://huge.example/doc", "timestamp": "t"}).encode(),
    ]
    with gzip.open(raw_dir / "c4-train.00002-of-00005.json.gz", "wb") as fh:
        fh.write(b"\n".join(good[:1] + BAD_LINES + good[1:]) + b"\n")
    with gzip.open(raw_dir / "c4-train.00003-of-00005.json.gz", "wb"):
        pass  # an empty partition file
    (raw_dir / "c4-train.00004-of-00005.json.gz").write_bytes(b"this is not gzip")


@pytest.fixture(scope="module")
def indexed(adam_run, tmp_path_factory):
    source, summary = adam_run
    lake_dir = copy_lake(source, tmp_path_factory.mktemp("jobs") / "lake")
    long_text = " ".join(f"Sentence number {i} talks about the weather in a quiet town." for i in range(40))
    _write_extra_partition(lake_dir / "raw", long_text)
    lake = Lake(lake_dir)
    results = {"tokenize": tokenize.run(tokenize.TokenizeConfig(lake=str(lake_dir)))}
    register_queries.run(str(lake_dir))
    results["extract"] = extract.run(extract.ExtractConfig(lake=str(lake_dir), projection_k=4, token_budget=512))
    results["fit"] = fit_hessian.run(fit_hessian.FitHessianConfig(lake=str(lake_dir)))
    results["score"] = score.run(
        score.ScoreConfig(
            lake=str(lake_dir), methods=["trackstar", "trak", "trackstar-no-hessian"], top_k=5, index="float32"
        )
    )  # int8 index: tests/test_index.py
    checkpoint = layout.checkpoint_path(lake_dir, summary["checkpoints"][-1])
    return lake, checkpoint, results, long_text


def test_tokenize_quarantines_bad_lines_and_chunks_long_documents(indexed):
    lake, checkpoint, results, long_text = indexed
    reasons = lake.read("quarantine", filters=[("stage", "=", "tokenize")]).to_pylist()
    assert sorted(r["position"] for r in reasons) == sorted(
        [f"c4-train.00002-of-00005.json.gz:{n}" for n in range(2, 8)]
        + ["c4-train.00003-of-00005.json.gz:0", "c4-train.00004-of-00005.json.gz:1"]
    )
    text = " | ".join(r["reason"] for r in reasons)
    for expected in (
        "malformed JSON",
        "missing field 'url'",
        "empty text",
        "not UTF-8",
        "binary junk",
        "document too large: line longer than",
        "empty partition file",
        "unreadable file",
    ):
        assert expected in text
    assert all(len(r["raw_value"] or "") <= 1000 for r in reasons)
    assert results["tokenize"]["quarantined"] == 8
    documents = lake.read("documents")
    assert documents.num_rows == results["tokenize"]["documents"]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = [tokenizer.eos_token_id] + tokenizer(long_text, add_special_tokens=False)["input_ids"]
    chunks = sorted(
        (r["chunk"], r["token_start"], r["token_end"], r["input_ids"])
        for r in lake.read("tokens", filters=[("doc_id", "=", "https://long.example/doc")]).to_pylist()
    )
    assert len(chunks) > 1 and all(len(c[3]) <= 64 for c in chunks)
    assert [c[3] for c in chunks] == [ids[s:e] for _, s, e, _ in chunks]
    assert chunks[-1][2] == len(ids) and all(a[2] - 1 == b[1] for a, b in zip(chunks, chunks[1:]))  # one shared token


def test_tokenize_again_skips_and_force_replaces_without_duplicates(indexed):
    lake, checkpoint, results, _ = indexed
    before = {t: lake.version(t) for t in ("documents", "tokens", "quarantine")}
    rows = lake.read("tokens").num_rows
    again = tokenize.run(tokenize.TokenizeConfig(lake=lake.root, context=64))
    assert again["tokenized"] == [] and {t: lake.version(t) for t in before} == before
    tokenize.run(tokenize.TokenizeConfig(lake=lake.root, context=64, force=True))
    tokens = lake.read("tokens", columns=["doc_id", "chunk"])
    assert tokens.num_rows == rows
    assert len(set(zip(tokens["doc_id"].to_pylist(), tokens["chunk"].to_pylist()))) == rows
    assert lake.read("quarantine").num_rows == 8


def _table_vectors(lake, table, filters):
    rows = lake.read(table, filters=filters)
    dim = len(rows["vector"][0].as_py()) // 4
    return rows, decode_vectors(rows["vector"], "float32", None, dim)


def test_extract_equals_the_kernels_on_the_same_chunks(indexed):
    lake, checkpoint, results, _ = indexed
    tokens = lake.read("tokens")
    rows, vectors = _table_vectors(
        lake, "train_gradients", [("checkpoint_id", "=", results["extract"]["checkpoint_id"])]
    )
    assert rows.num_rows == tokens.num_rows
    assert set(rows["fingerprint"].to_pylist()) == {results["extract"]["fingerprint"]}
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    matrices = weight_matrices(model)
    spec = ProjectionSpec(seed=0, k={m.name: 4 for m in matrices}, normalizer="adam-half")
    assert spec.fingerprint() == results["extract"]["fingerprint"]
    projector = GradientProjector(
        model, spec, normalizers_from_state(load_second_moments(checkpoint), matrices, "adam-half")
    )
    by_key = {
        (d, c): ids
        for d, c, ids in zip(tokens["doc_id"].to_pylist(), tokens["chunk"].to_pylist(), tokens["input_ids"].to_pylist())
    }
    sample = list(range(0, rows.num_rows, max(1, rows.num_rows // 6)))
    keys = [(rows["doc_id"][i].as_py(), rows["chunk"][i].as_py()) for i in sample]
    direct = projector(document_batch([by_key[k] for k in keys])).numpy()
    np.testing.assert_allclose(vectors[sample], direct, rtol=1e-4, atol=1e-4 * np.abs(direct).max())
    np.testing.assert_allclose(rows["norm"].to_numpy(), np.linalg.norm(vectors, axis=1), rtol=1e-5)


def test_an_extraction_group_extracts_every_query_set_and_other_projections_in_one_launch(
    indexed, tmp_path, monkeypatch
):
    """The DAGs' extract_group: its partitions, two query sets and the
    `also_extract` projections, from one start of the ranks (one plan file); one run per
    fingerprint; its result and "extracted" are the index's own."""
    from dags import orchestrate

    source, checkpoint, results, _ = indexed
    lake = Lake(copy_lake(source.root, tmp_path / "lake"))
    register_queries.run(lake.root, name="second-set")
    monkeypatch.setenv("TRACKSTAR_LAKE_ROOT", lake.root)
    monkeypatch.setenv("TRACKSTAR_PROJECTION_K", "3")  # not yet extracted: every slice is missing
    monkeypatch.setenv("TRACKSTAR_BATCH_TOKEN_BUDGET", "512")
    query_sets, also = ["fact-world", "second-set"], [{"projection_seed": 1, "normalizer": "none"}]
    with pytest.raises(ValueError, match="unknown key"):
        orchestrate.plan_extraction(str(checkpoint), query_sets, None, [{"seed": 1}])
    plan = orchestrate.plan_extraction(str(checkpoint), query_sets, None, also)
    (group,) = plan["groups"]
    assert group["query_sets"] == query_sets and group["also"] == also
    plans_before, runs_before = storage.list_objects(storage.join(lake.root, "_plans")), lake.read("runs")
    done = orchestrate.extract_group(group)

    assert len(storage.list_objects(storage.join(lake.root, "_plans"))) == len(plans_before) + 1  # one launch
    partitions = sorted(set(lake.read("tokens", columns=["partition"])["partition"].to_pylist()))
    assert done["fingerprint"] == plan["fingerprint"]
    assert done["extracted"] == sorted([f"query:{q}" for q in query_sets] + [f"train:{p}" for p in partitions])
    runs = (
        lake.read("runs", filters=[("command", "=", "extract")]).num_rows
        - runs_before.filter(pc.equal(runs_before["command"], "extract")).num_rows
    )
    assert runs == 2  # the index's own and the other projection
    fingerprints = set(lake.read("query_gradients", columns=["fingerprint"])["fingerprint"].to_pylist())
    prompts = source.count_rows("query_gradients", [("fingerprint", "=", results["extract"]["fingerprint"])])
    other = ProjectionSpec(
        seed=1,
        k={m.name: 3 for m in weight_matrices(AutoModelForCausalLM.from_pretrained(checkpoint))},
        normalizer="none",
    ).fingerprint()
    for fingerprint in (plan["fingerprint"], other):
        assert fingerprint in fingerprints
        for query_set in query_sets:
            where = [("fingerprint", "=", fingerprint), ("query_set", "=", query_set)]
            assert lake.count_rows("query_gradients", where) == prompts  # the second set holds the same queries
        train = lake.count_rows("train_gradients", [("fingerprint", "=", fingerprint)])
        assert train == lake.read("tokens", columns=["doc_id"]).num_rows
    assert orchestrate.extract_group(group)["extracted"] == []  # a retry: nothing left to do


def test_extractions_launched_together_equal_the_kernels_each(indexed, tmp_path):
    """run_many: other seeds and normalisers in one start of the ranks; each is its own run with its
    own fingerprint, equal to the kernels; done ones and repeats are not extracted again."""
    source, checkpoint, results, _ = indexed
    lake = Lake(copy_lake(source.root, tmp_path / "lake"))
    runs_before = lake.read("runs").num_rows
    configs = [
        extract.ExtractConfig(
            lake=lake.root, projection_k=4, token_budget=512, projection_seed=seed, normalizer=normalizer
        )
        for seed, normalizer in ((0, "auto"), (1, "auto"), (1, "none"), (1, "adam-half"))
    ]
    done, seed1, plain, repeat = extract.run_many(configs)
    assert done["items"] == [] and done["fingerprint"] == results["extract"]["fingerprint"]
    assert repeat is seed1 and len({done["fingerprint"], seed1["fingerprint"], plain["fingerprint"]}) == 3
    assert lake.read("runs").num_rows == runs_before + 2  # one run each, one launch
    tokens = lake.read("tokens")
    by_key = {
        (d, c): ids
        for d, c, ids in zip(tokens["doc_id"].to_pylist(), tokens["chunk"].to_pylist(), tokens["input_ids"].to_pylist())
    }
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    matrices = weight_matrices(model)
    for result, seed, normalizer in ((seed1, 1, "adam-half"), (plain, 1, "none")):
        rows, vectors = _table_vectors(lake, "train_gradients", [("fingerprint", "=", result["fingerprint"])])
        assert rows.num_rows == tokens.num_rows == result["train_vectors"]
        spec = ProjectionSpec(seed=seed, k={m.name: 4 for m in matrices}, normalizer=normalizer)
        assert spec.fingerprint() == result["fingerprint"]
        normalizers = (
            normalizers_from_state(load_second_moments(checkpoint), matrices, normalizer)
            if normalizer != "none"
            else {}
        )
        keys = list(zip(rows["doc_id"].to_pylist(), rows["chunk"].to_pylist()))[::7]
        direct = GradientProjector(model, spec, normalizers)(document_batch([by_key[k] for k in keys])).numpy()
        np.testing.assert_allclose(vectors[::7], direct, rtol=1e-4, atol=1e-4 * np.abs(direct).max())


def test_fit_hessian_equals_the_autocorrelation_of_the_stored_vectors(indexed, tmp_path):
    lake, checkpoint, results, _ = indexed
    fit = results["fit"]
    _, train = _table_vectors(lake, "train_gradients", [("checkpoint_id", "=", fit["checkpoint_id"])])
    _, queries = _table_vectors(lake, "query_gradients", [("query_set", "=", "fact-world")])
    blocks = [16] * (train.shape[1] // 16)
    r_train = Autocorrelation(blocks).add(torch.from_numpy(train)).mean()
    r_query = Autocorrelation(blocks).add(torch.from_numpy(queries)).mean()
    stored, row = catalog.load_preconditioner(lake, fit["checkpoint_id"], "fact-world", fit["fingerprint"], "r_train")
    for a, b in zip(stored, r_train):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
    component = crossing_component(train.shape[1])  # 1.5% of the dimension
    assert fit["crossing_component"] == component
    assert fit["lambda"] == pytest.approx(crossing_lambda(spectrum(r_query), spectrum(r_train), component), rel=1e-4)
    # the inverse root: (λ·R_query + (1-λ)·R_train + D)^(-1/2), D per block from R_train's own scale
    root, _ = catalog.load_preconditioner(lake, fit["checkpoint_id"], "fact-world", fit["fingerprint"], "inverse_root")
    expected, _ = damped_inverse_power(mix(r_query, r_train, fit["lambda"]), train_relative_damping(r_train, 0.1))
    for a, b in zip(root, expected):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-3 * float(b.abs().max()))
    assert fit["conditioning"]["blocks_damped_above_train_top"] == []
    kinds = lake.read("hessians")["kind"].to_pylist()
    assert sorted(kinds) == sorted(fit_hessian.KINDS)
    assert os.path.exists(fit["figure"])
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes(open(lake.resolve(row["path"]), "rb").read()[:-4] + b"\x00\x00\x00\x01")
    with pytest.raises(ChecksumMismatch):  # a changed file is refused, not silently used
        load_matrices(changed, row["sha256"])


@pytest.mark.parametrize("method", ["trackstar", "trak", "trackstar-no-hessian"])
def test_score_equals_brute_force_top_k(indexed, method):
    lake, checkpoint, results, _ = indexed
    fit = results["fit"]
    train_rows, train = _table_vectors(lake, "train_gradients", [("checkpoint_id", "=", fit["checkpoint_id"])])
    query_rows, queries = _table_vectors(lake, "query_gradients", [("prompt_index", "=", 0)])
    train_blocks, query_blocks, unit_norm = score.method_matrices(
        lake, method, fit["checkpoint_id"], "fact-world", fit["fingerprint"]
    )
    t = prepare(torch.from_numpy(train), Preconditioner(train_blocks) if train_blocks else None, unit_norm)
    q = prepare(torch.from_numpy(queries), Preconditioner(query_blocks) if query_blocks else None, unit_norm)
    brute = (q @ t.T).topk(5, dim=1)
    stored = lake.read("proponents", filters=[("method", "=", method)]).to_pylist()
    assert len(stored) == query_rows.num_rows * 5
    by_query = {}
    for r in stored:
        by_query.setdefault(r["query_id"], {})[r["rank"]] = r
    keys = list(zip(train_rows["doc_id"].to_pylist(), train_rows["chunk"].to_pylist()))
    all_scores = (q @ t.T).numpy()
    for qi, query_id in enumerate(query_rows["query_id"].to_pylist()):
        ranked = [by_query[query_id][rank] for rank in range(1, 6)]
        scores = np.array([r["score"] for r in ranked])
        np.testing.assert_allclose(scores, brute.values[qi].numpy(), rtol=1e-4, atol=1e-6)
        # the same chunks, up to the order of exact ties (the world repeats some documents verbatim)
        chosen = [keys.index((r["doc_id"], r["chunk"])) for r in ranked]
        np.testing.assert_allclose(all_scores[qi, chosen], scores, rtol=1e-4, atol=1e-6)
        assert len(set(chosen)) == 5


def test_scoring_refuses_vectors_of_another_fingerprint(indexed):
    lake, _, results, _ = indexed
    with pytest.raises(FingerprintMismatch):
        score.query_vectors(lake, "fact-world", results["fit"]["checkpoint_id"], "0000000000000000", 0)


def test_extract_rerun_is_a_no_op_and_a_killed_run_is_completed_without_duplicates(indexed):
    lake, checkpoint, results, _ = indexed
    version = lake.version("train_gradients")
    again = extract.run(extract.ExtractConfig(lake=lake.root, projection_k=4, token_budget=512))
    assert again["items"] == [] and lake.version("train_gradients") == version

    expected = lake.read("train_gradients").num_rows
    uninterrupted = _keyed_vectors(lake)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    command = [
        sys.executable,
        "-m",
        "jobs",
        "extract",
        "--lake",
        lake.root,
        "--projection-k",
        "4",
        "--token-budget",
        "64",
        "--force",
        "--query-set",
        "",
    ]
    child = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while lake.version("train_gradients") == version and time.time() < deadline and child.poll() is None:
        time.sleep(0.2)
    os.killpg(child.pid, signal.SIGKILL)  # mid-run: at most some slices rewritten
    child.wait()
    rows = lake.read("train_gradients", columns=["doc_id", "chunk"])
    assert rows.num_rows == expected  # every slice is whole: old or new, never both
    # lose one slice's rows, as if its rank died before committing: the next run redoes only it
    lake.open("train_gradients").delete("partition = 1")
    redo = extract.run(extract.ExtractConfig(lake=lake.root, projection_k=4, token_budget=512))
    assert redo["items"] == ["train:1"]
    rows = lake.read("train_gradients", columns=["doc_id", "chunk"])
    assert rows.num_rows == expected == len(set(zip(rows["doc_id"].to_pylist(), rows["chunk"].to_pylist())))
    after = _keyed_vectors(lake)  # the same table as an uninterrupted run
    assert after.keys() == uninterrupted.keys()
    for key, vector in uninterrupted.items():
        np.testing.assert_allclose(after[key], vector, rtol=1e-4, atol=1e-5 * np.abs(vector).max())


def test_the_fan_out_plan_groups_the_missing_partitions_and_registers_the_checkpoint_once(indexed):
    lake, checkpoint, results, _ = indexed
    config = extract.ExtractConfig(lake=lake.root, projection_k=4, token_budget=512)
    assert extract.plan_groups(config, ["fact-world"], group_size=2)["groups"] == []  # all extracted
    plans = lake.read("runs", filters=[("command", "=", "extract-plan")]).num_rows
    assert plans == 0  # nothing to do writes nothing

    other_seed = extract.ExtractConfig(lake=lake.root, projection_k=4, token_budget=512, projection_seed=7)
    plan = extract.plan_groups(other_seed, ["fact-world"], group_size=2)
    assert plan["fingerprint"] != results["extract"]["fingerprint"]
    tokenized = sorted(set(lake.read("tokens", columns=["partition"])["partition"].to_pylist()))
    assert [g["partitions"] for g in plan["groups"]] == [tokenized[i : i + 2] for i in range(0, len(tokenized), 2)]
    assert [g["query_sets"] for g in plan["groups"]] == [["fact-world"]] + [[]] * (len(plan["groups"]) - 1)
    assert {g["checkpoint"] for g in plan["groups"]} == {str(checkpoint)}
    (row,) = lake.read("runs", filters=[("command", "=", "extract-plan")]).to_pylist()
    assert row["status"] == "succeeded" and json.loads(row["counts_json"])["groups"] == plan["groups"]
    version = lake.version("checkpoints")
    extract.plan_groups(other_seed, ["fact-world"], group_size=2)
    assert lake.version("checkpoints") == version  # registered already: not rewritten

    # only the query set missing: one group of the queries alone, extracted without any partition
    lake.open("query_gradients").delete("query_set = 'fact-world'")
    only = extract.plan_groups(config, ["fact-world"], group_size=8)
    assert only["groups"] == [{"checkpoint": str(checkpoint), "partitions": [], "query_sets": ["fact-world"]}]
    version = lake.version("train_gradients")
    redo = extract.run(
        extract.ExtractConfig(
            lake=lake.root, projection_k=4, token_budget=512, query_set="fact-world", queries_only=True
        )
    )
    assert redo["items"] == ["query:fact-world"] and lake.version("train_gradients") == version
    with pytest.raises(ValueError, match="needs a --query-set"):
        extract.run(extract.ExtractConfig(lake=lake.root, queries_only=True, query_set=None))


@pytest.mark.parametrize("moment", [0.5, 3.0])
def test_score_killed_at_any_moment_then_rerun_gives_the_identical_table(indexed, moment):
    lake, _, _, _ = indexed

    def ranked():
        rows = lake.read(
            "proponents",
            filters=[("method", "=", "trackstar")],
            columns=["query_id", "rank", "doc_id", "chunk", "score"],
        )
        return dict(
            zip(zip(*(rows[c].to_pylist() for c in ("query_id", "rank", "doc_id", "chunk"))), rows["score"].to_pylist())
        )

    def same(a, b):  # identical rows; scores to float precision (another process may sum in another order)
        return a.keys() == b.keys() and np.allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-6, atol=0)

    # the table an uninterrupted run gives on the lake as it is now (earlier tests re-extract slices)
    score.run(score.ScoreConfig(lake=lake.root, methods=["trackstar"], top_k=5, index="float32"))
    before = ranked()
    command = [
        sys.executable,
        "-m",
        "jobs",
        "score",
        "--lake",
        lake.root,
        "--methods",
        "trackstar",
        "--top-k",
        "5",
        "--index",
        "float32",
    ]
    child = subprocess.Popen(
        command,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(moment)  # while it starts, reads or writes
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert same(ranked(), before)  # the slice is whole: the old one or the rerun's, never half
    score.run(score.ScoreConfig(lake=lake.root, methods=["trackstar"], top_k=5, index="float32"))
    assert same(ranked(), before)  # and the rerun gives the identical table


def _keyed_vectors(lake):
    rows, vectors = _table_vectors(lake, "train_gradients", None)
    return dict(zip(zip(rows["doc_id"].to_pylist(), rows["chunk"].to_pylist()), vectors))


def test_extract_refuses_partitions_another_tokenizer_cut(indexed, tmp_path):
    lake = Lake(copy_lake(indexed[0].root, tmp_path / "lake"))
    lake.update("tokens", {"partition": 1}, {"tokenizer_fingerprint": "0123456789abcdef-ctx64"})
    version = lake.version("train_gradients")
    with pytest.raises(CheckpointMismatch, match=r"partition\(s\) \[1\] were tokenized by another tokenizer"):
        extract.run(extract.ExtractConfig(lake=lake.root, projection_k=4, token_budget=512, force=True))
    assert lake.version("train_gradients") == version  # refused before any rank started


def test_extract_reads_a_checkpoint_from_s3(indexed, s3_bucket):
    from infra.storage import upload_dir

    lake, checkpoint, results, _ = indexed
    before = _keyed_vectors(lake)
    uri = f"s3://{s3_bucket}/checkpoints/{checkpoint.name}"
    upload_dir(checkpoint, uri)
    again = extract.run(
        extract.ExtractConfig(
            lake=lake.root, checkpoint=uri, projection_k=4, token_budget=512, partitions=[0], query_set=None, force=True
        )
    )
    assert again["items"] == ["train:0"] and again["fingerprint"] == results["extract"]["fingerprint"]
    after = _keyed_vectors(lake)
    assert after.keys() == before.keys()
    for key, vector in before.items():
        np.testing.assert_allclose(after[key], vector, rtol=1e-4, atol=1e-5 * np.abs(vector).max())


def test_a_checkpoint_id_with_other_weights_is_refused(indexed, tmp_path):
    lake, checkpoint, _, _ = indexed
    changed = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, changed)
    weights = load_file(changed / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatch, match="pass --force"):
        extract.run(extract.ExtractConfig(lake=lake.root, checkpoint=str(changed), projection_k=4))


def test_chunks_with_non_finite_gradients_are_quarantined_not_written(indexed, tmp_path):
    lake, checkpoint, _, _ = indexed
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["checkpoint_id"] += "-nan"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    tokens = lake.read("tokens", filters=[("partition", "=", 0)], columns=["doc_id", "chunk", "input_ids"]).to_pylist()
    position = sorted(len(r["input_ids"]) for r in tokens)[len(tokens) // 2]
    weights = load_file(broken / "model.safetensors")
    weights["transformer.wpe.weight"][position - 1] = float("nan")  # chunks that reach this position go NaN
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    # one chunk per batch (token budget 1): a NaN in a neighbour's padding would reach every row of its batch
    extract.run(
        extract.ExtractConfig(
            lake=lake.root,
            checkpoint=str(broken),
            projection_k=4,
            partitions=[0],
            query_set=None,
            normalizer="none",
            token_budget=1,
        )
    )
    expected_bad = {f"{r['doc_id']}#{r['chunk']}" for r in tokens if len(r["input_ids"]) >= position}
    assert 0 < len(expected_bad) < len(tokens)
    quarantined = lake.read("quarantine", filters=[("stage", "=", "extract")]).to_pylist()
    assert {q["position"] for q in quarantined} == expected_bad
    assert all("non-finite gradient" in q["reason"] for q in quarantined)
    written = lake.read("train_gradients", filters=[("checkpoint_id", "=", manifest["checkpoint_id"])])
    assert written.num_rows == len(tokens) - len(expected_bad)
    assert np.isfinite(
        _table_vectors(lake, "train_gradients", [("checkpoint_id", "=", manifest["checkpoint_id"])])[1]
    ).all()


def test_extract_with_data_moments_needs_no_optimizer_state_and_estimates_once(indexed, tmp_path, monkeypatch):
    source, checkpoint, _, _ = indexed
    lake = Lake(copy_lake(source.root, tmp_path / "lake"))
    stateless = tmp_path / "stateless"
    shutil.copytree(checkpoint, stateless, ignore=shutil.ignore_patterns("optimizer.pt", "zero*"))
    config = extract.ExtractConfig(
        lake=lake.root, checkpoint=str(stateless), projection_k=4, token_budget=512, normalizer="data-floored"
    )
    first = extract.run(config)
    run = lake.read("runs", filters=[("run_id", "=", first["run_id"])]).to_pylist()[0]
    spec = json.loads(run["config_json"])["spec"]
    checkpoint_id = first["checkpoint_id"]
    record = json.loads(
        storage.read_text(layout.second_moments(lake.root, checkpoint_id, f"sample-{SAMPLE_CHUNKS}.json"))
    )
    tokens = lake.read("tokens")
    assert record["hash"] == spec["moments"] and record["examples"] == min(SAMPLE_CHUNKS, tokens.num_rows)
    assert len({tuple(c) for c in record["chunks"]}) == record["examples"]

    plans = storage.list_objects(storage.join(lake.root, "_plans"))
    again = extract.run(config)  # the estimate is reused: same fingerprint, nothing to do
    assert again["fingerprint"] == first["fingerprint"] and again["items"] == []
    # the ranks started while it planned are stopped, and no plan is written for them
    assert running_ranks() == [] and storage.list_objects(storage.join(lake.root, "_plans")) == plans
    started = []  # a spy on the real start: the evaluation's way, ranks only once the plan shows work
    monkeypatch.setattr(extract, "start_ranks", lambda *a, **k: started.append(a) or launch.start_ranks(*a, **k))
    (late,) = extract.run_many([config], ranks_before_plan=False)
    assert late["items"] == [] and started == []

    model = AutoModelForCausalLM.from_pretrained(stateless)
    matrices = weight_matrices(model)
    estimate = load_data_moments(lake.root, checkpoint_id, spec["moments"])
    projector = GradientProjector(
        model, ProjectionSpec(**spec), normalizers_from_state(estimate, matrices, "data-floored")
    )
    rows, stored = _table_vectors(lake, "train_gradients", [("fingerprint", "=", first["fingerprint"])])
    assert rows.num_rows == tokens.num_rows
    by_key = {(d, c): ids for d, c, ids in zip(*(tokens[n].to_pylist() for n in ("doc_id", "chunk", "input_ids")))}
    keys = list(zip(rows["doc_id"].to_pylist(), rows["chunk"].to_pylist()))[::9]
    direct = projector(document_batch([by_key[k] for k in keys])).numpy()
    np.testing.assert_allclose(stored[::9], direct, rtol=1e-4, atol=1e-4 * np.abs(direct).max())


def test_proponents_scored_from_another_fingerprint_are_not_taken_for_this_ones(indexed, tmp_path):
    """Scoring a second projection seed replaces the stored proponents of the first: an evaluation
    asking for the first seed's must find them stale (before the fix it read the second's as its own)."""
    from jobs.catalog import last_scored_inputs

    source, _, results, _ = indexed
    lake = Lake(copy_lake(source.root, tmp_path / "lake"))
    first, query_set = results["extract"]["fingerprint"], results["score"]["query_set"]
    checkpoint_id = results["extract"]["checkpoint_id"]
    assert last_scored_inputs(lake, checkpoint_id, first, query_set, "trackstar") is not None
    second = extract.run(
        extract.ExtractConfig(lake=lake.root, projection_k=4, token_budget=512, projection_seed=1, query_set=query_set)
    )["fingerprint"]
    keys = {"lake": lake.root, "checkpoint_id": checkpoint_id, "fingerprint": second, "query_set": query_set}
    fit_hessian.run(fit_hessian.FitHessianConfig(**keys))
    score.run(score.ScoreConfig(**keys, methods=["trackstar"], top_k=5, index="float32"))
    assert last_scored_inputs(lake, checkpoint_id, second, query_set, "trackstar") is not None
    assert last_scored_inputs(lake, checkpoint_id, first, query_set, "trackstar") is None
    assert last_scored_inputs(lake, checkpoint_id, first, query_set, "trak") is not None  # not rescored


def test_ranking_in_memory_reads_the_vectors_once_and_ranks_as_the_score_job(indexed, monkeypatch, tmp_path):
    """The evaluation ranks other seeds and variants in memory: several methods from one read of
    the train vectors, each ranked as the score job (Spark) ranked it."""
    from evaluation.rankings import ranked_proponents
    from jobs.catalog import load_preconditioner

    source, _, results, _ = indexed
    lake = Lake(copy_lake(source.root, tmp_path / "lake"))
    keys = {k: results["score"][k] for k in ("checkpoint_id", "query_set", "fingerprint")}
    matrices = {kind: load_preconditioner(lake, **keys, kind=kind)[0] for kind in fit_hessian.KINDS}
    methods = ["trak", "trackstar-no-hessian", "trackstar"]
    # the index and the proponents of the vectors as they are now (earlier tests re-extract slices,
    # which leaves index rows of the same keys as they were: equal to float noise, enough to swap ties)
    shutil.rmtree(os.path.join(lake.root, "trackstar_index"))
    score.run(score.ScoreConfig(lake=lake.root, **keys, methods=methods, top_k=5, index="float32"))
    reads = []
    original_read = Lake.read
    monkeypatch.setattr(
        Lake, "read", lambda self, table, *a, **kw: reads.append(table) or original_read(self, table, *a, **kw)
    )
    ranked = score.rank_in_memory(lake, methods, **keys, matrices=matrices, k=5)
    assert reads.count("train_gradients") == 1
    stored = ranked_proponents(lake, keys["query_set"], keys["checkpoint_id"])
    for method in ("trak", "trackstar-no-hessian"):  # the raw vectors scored alike on both paths
        assert ranked[method] == stored[method], method
    # trackstar: the job scored its float32 index (prepared once), memory the raw vectors; the toy
    # corpus repeats documents word for word, and such exact ties may come out in either order
    texts = dict(zip(*(lake.read("documents", columns=["doc_id", "text"])[c].to_pylist() for c in ("doc_id", "text"))))
    assert stored["trackstar"].keys() == ranked["trackstar"].keys()
    for q, found in stored["trackstar"].items():
        assert sorted(texts[d] for d in ranked["trackstar"][q]) == sorted(texts[d] for d in found), q
    assert score.rank_in_memory(lake, [], **keys, matrices=matrices, k=5) == {}


def test_the_evaluations_in_memory_fit_is_the_fit_hessian_jobs(indexed, tmp_path):
    """Other seeds and the variants are fitted in memory: with the same settings the fit must equal the
    job's, outlier chunks left out alike (before, the memory fit kept them: its top-10 shared 0.85
    with the pipeline's on the embedded world)."""
    from evaluation.config import EvaluateConfig
    from evaluation.rankings import memory_rankings
    from jobs.catalog import load_preconditioner

    source, _, results, _ = indexed
    lake = Lake(copy_lake(source.root, tmp_path / "lake"))
    query_set = results["score"]["query_set"]
    # the exact floored correction: its heavier-tailed norms put chunks above the outlier floor here
    floored = extract.run(
        extract.ExtractConfig(
            lake=lake.root, projection_k=4, token_budget=512, normalizer="adam-floored", query_set=query_set
        )
    )
    keys = {"checkpoint_id": floored["checkpoint_id"], "fingerprint": floored["fingerprint"]}
    strict = fit_hessian.FitHessianConfig(lake=lake.root, query_set=query_set, outlier_z=0.5, **keys)
    assert fit_hessian.run(strict)["train_outliers"] > 0  # the job leaves some chunks out
    # ... and its fit is not stale for them: the evaluation refitted every time it ran
    assert not catalog.hessian_is_stale(lake, **keys, query_set=query_set, threshold=0.0)
    _, fitted = memory_rankings(
        lake, EvaluateConfig(lake=lake.root, query_set=query_set), **keys, methods=[], fit_config=strict
    )
    for kind in fit_hessian.KINDS:
        stored, _ = load_preconditioner(lake, keys["checkpoint_id"], query_set, keys["fingerprint"], kind)
        for mine, theirs in zip(fitted.matrices[kind], stored):
            torch.testing.assert_close(mine.float(), theirs.float(), rtol=1e-4, atol=1e-6 * float(theirs.abs().max()))
