"""The evaluation: metrics on hand-built cases, the text baselines, and a full run on a corpus and
query file supplied the way a user would (imported, no knowledge base)."""

import json
import shutil

import pytest

from infra.lake import Lake
from jobs import evaluate, register_queries, tokenize, world


def test_mrr_and_recall_on_hand_built_ranks():
    truth = {"q1": {"a"}, "q2": {"b", "c"}, "q3": {"z"}}
    buckets = {"q1": 1, "q2": 30, "q3": 30}
    ranked = {"m": {"q1": ["a", "x", "y"], "q2": ["x", "b", "c"], "q3": ["x", "y", "w"]}}
    metrics = evaluate.attribution_metrics(ranked, truth, buckets, k=3)["m"]
    assert metrics["all"]["mrr"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert metrics["all"]["recall@10"] == pytest.approx((1 + 1 + 0) / 3)
    assert metrics["30"] == {"mrr": pytest.approx(0.25), "recall@10": pytest.approx(0.5), "n": 2}
    assert metrics["1"]["n"] == 1 and metrics["all"]["n"] == 3


def test_stratified_sample_takes_every_bucket_and_is_fixed_by_the_seed():
    queries = {f"q{i}": {"frequency_bucket": b} for i, b in enumerate([1] * 10 + [3] * 10 + [10] * 10)}
    sample = evaluate.stratified_sample(queries, 6, seed=0)
    assert sorted(queries[q]["frequency_bucket"] for q in sample) == [1, 1, 3, 3, 10, 10]
    assert sample == evaluate.stratified_sample(queries, 6, seed=0) != evaluate.stratified_sample(queries, 6, seed=1)


TEXTS = ["The capital of Vornland is Quessa.", "Bread was sold at the market before noon.",
         "Maren Olt works as a violinist in the city orchestra.", "Heavy rain delayed the trains on Monday."]


@pytest.mark.parametrize("retrieve", [evaluate.bm25_top_k, evaluate.dense_top_k])
def test_text_baselines_find_the_document_a_query_copies(retrieve):
    indices, scores = retrieve(TEXTS, ["Maren Olt works as a violinist", "The capital of Vornland is Quessa"], 2)
    assert indices[0][0] == 2 and indices[1][0] == 0
    assert scores[0][0] > scores[0][1]


def test_evaluation_runs_on_a_user_supplied_corpus_and_queries(adam_run, tmp_path):
    source, summary = adam_run
    # the user's files: C4 partitions and a queries JSONL, nothing else of the generated world
    world.run(world.WorldConfig(out_dir=str(tmp_path / "lake"), corpus=str(source / "raw"),
                                queries=str(source / "world" / "queries.jsonl")))
    shutil.copytree(source / "model", tmp_path / "lake" / "model")  # tokenizer and checkpoint folders
    root = str(tmp_path / "lake")
    tokenize.run(tokenize.TokenizeConfig(lake=root))
    register_queries.run(root)
    report = evaluate.run(evaluate.EvaluateConfig(lake=root, k_projection=4, tail_patch_queries=5,
                                                  reports=str(tmp_path / "reports")))
    methods = set(report["methods"])
    assert methods == {"bm25", "dense", "grad-dot", "grad-cos", "trak", "trackstar", "trackstar-no-optimizer",
                       "trackstar-no-hessian", "trackstar-no-mixing", "trackstar-no-unit-norm"}
    stored = json.loads((tmp_path / "reports" / "eval.json").read_text())
    for cell in stored["methods"].values():
        assert 0 <= cell["mrr"] <= 1 and 0 <= cell["recall@10"] <= 1 and cell["n_queries"] == 10
        assert cell["tail_patch"] == cell["tail_patch"]  # a number, not NaN
    assert stored["categories"] == {}  # no knowledge base was supplied: no categories, and no crash
    page = (tmp_path / "reports" / "eval.html").read_text()
    assert "Table 1" in page and page.count("data:image/png;base64,") >= 2
    # every measured step is stored; the report's tail-patch is their mean per query, then over queries
    patches = {(p["query_id"], p["doc_id"]): p["delta_log_prob"] for p in Lake(root).read("tail_patches").to_pylist()}
    sampled = sorted({q for q, _ in patches})
    assert len(sampled) == 5  # the stratified sample
    proponents = Lake(root).read("proponents", filters=[("method", "=", "trackstar")]).to_pylist()
    per_query = [[patches[(r["query_id"], r["doc_id"])] for r in proponents if r["query_id"] == q] for q in sampled]
    assert stored["methods"]["trackstar"]["tail_patch"] == pytest.approx(sum(sum(d) / len(d) for d in per_query) / 5)
    rows = Lake(root).read("eval_metrics", filters=[("metric", "=", "mrr"), ("bucket", "=", "all")]).to_pylist()
    assert {r["method"] for r in rows} == methods
    assert {r["method"]: r["value"] for r in rows} == pytest.approx({m: c["mrr"] for m, c in stored["methods"].items()})
