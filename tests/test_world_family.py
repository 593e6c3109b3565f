"""The family of worlds (demo/world.py's WorldOptions and presets): each option changes the corpus as
it says, the queries stay valid, a preset is deterministic per seed, and a flag given wins."""

import argparse
import json

import pytest

from demo import pipeline, world
from demo.world_wording import ALT_PARAPHRASES
from infra.cli import config_from_args
from schemas.queries import read_queries

SEED = 3  # the seed test_world.py uses; bench/world_family.py's seeds are none of the tests'


def _generate(out, seed=SEED, facts_per_bucket=6, **options):
    world.run(world.WorldConfig(out_dir=str(out), world_seed=seed, facts_per_bucket=facts_per_bucket, **options))
    kb = json.loads((out / "world" / "kb.json").read_text())
    truth = [json.loads(line) for line in (out / "world" / "ground_truth.jsonl").read_text().splitlines()]
    return kb, truth, world.generated_texts(out / "raw"), read_queries(out / "world" / "queries.jsonl")


def _prompt_statements(query) -> list[str]:
    """The cloze of prompt0 and prompt1 with the target: what a copying stating document contains."""
    return [query[f"prompt{i}"] + query["target"] for i in range(2)]


def _check_queries_are_valid(kb, texts, queries):
    """Every prompt names the subject once, prompt0/1 end where a stating template puts the object,
    and every stating document names the subject and the object."""
    relations = {r["id"]: r for r in kb["relations"]}
    assert queries
    for query in queries:
        assert all(query[f"prompt{i}"].count(query["subject"]) == 1 for i in range(3))
        templates = relations[query["relation"]]["doc_templates"]
        for i in range(2):
            statement = templates[i].format(s=query["subject"], o=query["object"])
            assert statement.startswith(query[f"prompt{i}"] + query["target"])
        stating = [texts[d] for d in query["stating_doc_ids"]]
        assert len(stating) == query["n_stating_docs"] >= 1
        assert all(query["subject"] in t and query["object"] in t for t in stating)


def test_presets_fill_unset_options_and_a_flag_given_wins():
    assert world.resolved(world.WorldOptions()) == world.WorldOptions(**world.BASE_WORLD)
    mixed = world.resolved(world.WorldOptions(preset="mixed-heavy-distractors"))
    assert mixed.statements == "mixed" and mixed.filler_share == world.HEAVY_DISTRACTORS["filler_share"]
    # a flag equal to the base world's value still wins over the preset
    assert world.resolved(world.WorldOptions(preset="paraphrase", statements="copy")).statements == "copy"
    parser = argparse.ArgumentParser()
    world.add_arguments(parser)
    args = parser.parse_args(["--preset", "alt-paraphrase", "--templates", "default", "--filler-share", "0.1"])
    options = world.resolved(config_from_args(world.WorldConfig, args))
    assert (options.statements, options.vocabulary, options.templates) == ("paraphrase", "alt", "default")
    assert options.filler_share == 0.1 and options.subject_only_docs_per_fact == 1.5
    with pytest.raises(ValueError, match="unknown world preset"):
        world.resolved(world.WorldOptions(preset="nonsense"))


def test_mixed_world_states_each_fact_both_ways(tmp_path):
    kb, truth, texts, queries = _generate(tmp_path, preset="mixed")
    _check_queries_are_valid(kb, texts, queries)
    assert not any(d["category"] == "teaching" for d in truth)  # the copied statements teach the prompts
    for query in queries:
        stating = [texts[d] for d in query["stating_doc_ids"]]
        copied = [t for t in stating if any(s in t for s in _prompt_statements(query))]
        if len(stating) >= 2:  # alternating: about half each way
            assert abs(len(copied) - (len(stating) - len(copied))) <= 1, query["query_id"]
    both_ways = sum(1 for q in queries if q["n_stating_docs"] >= 2)
    assert both_ways >= len(queries) // 2


def test_alt_templates_reword_every_statement_and_prompt(tmp_path):
    kb, truth, texts, queries = _generate(tmp_path / "alt", preset="alt-templates")
    default_kb, *_, default_queries = _generate(tmp_path / "default")
    _check_queries_are_valid(kb, texts, queries)
    wording = {r["id"]: set(r["doc_templates"] + r["prompts"]) for r in kb["relations"]}
    default_wording = {r["id"]: set(r["doc_templates"] + r["prompts"]) for r in default_kb["relations"]}
    assert wording.keys() == default_wording.keys()
    assert all(not wording[r] & default_wording[r] for r in wording)
    # the same seed draws the same facts and names: only the wording changed
    assert [(q["subject"], q["object"]) for q in queries] == [(q["subject"], q["object"]) for q in default_queries]
    assert all(q["prompt0"] != d["prompt0"] for q, d in zip(queries, default_queries))


def test_alt_paraphrase_world_states_queried_facts_only_in_other_words(tmp_path):
    kb, truth, texts, queries = _generate(tmp_path, preset="alt-paraphrase", teaching_facts_per_relation=2)
    _check_queries_are_valid(kb, texts, queries)
    for query in queries:
        stating = [texts[d] for d in query["stating_doc_ids"]]
        assert not any(query[p] in t for p in ("prompt0", "prompt1") for t in stating), query["query_id"]
    relations = {r["id"]: r for r in kb["relations"]}
    for relation, paraphrases in ALT_PARAPHRASES.items():  # none of them contains a prompt's wording
        prompts = [p.split("{s}") for p in relations[relation]["prompts"][:2]]
        assert not any(all(piece in t for piece in pieces if piece.strip()) for t in paraphrases for pieces in prompts)
    assert sum(d["category"] == "teaching" for d in truth) == 14 * 2 * 3


def test_alt_vocabulary_makes_names_of_another_shape(tmp_path):
    kb, truth, texts, queries = _generate(tmp_path / "alt", preset="alt-vocab")
    default_kb, *_ = _generate(tmp_path / "default")
    _check_queries_are_valid(kb, texts, queries)
    names = {e["name"] for e in kb["entities"] if e["type"] not in ("occupation", "genre")}
    default_names = {e["name"] for e in default_kb["entities"] if e["type"] not in ("occupation", "genre")}
    assert not names & default_names
    by_type = {}
    for entity in kb["entities"]:
        by_type.setdefault(entity["type"], []).append(entity["name"])
    assert all(n.endswith("ic") for n in by_type["language"])
    assert all(n.split()[-1] in ("Company", "Foundation", "Council", "Union") for n in by_type["organisation"])
    # still no name inside another, except the look-alikes made so on purpose
    words = [w.lower() for e in kb["entities"] if e["type"] in ("person", "city", "country") for w in e["name"].split()]
    assert len(words) == len(set(words))
    assert not any(a != b and a in b for a in words for b in words)


def test_distractor_counts_scale_with_the_options(tmp_path):
    def categories(truth):
        counts = {}
        for doc in truth:
            counts[doc["category"]] = counts.get(doc["category"], 0) + 1
        return counts

    base = categories(_generate(tmp_path / "default")[1])
    heavy = categories(_generate(tmp_path / "heavy", preset="heavy-distractors")[1])
    assert heavy["fact"] == base["fact"]
    for category in ("subject_only", "object_only", "lookalike"):
        assert 2 <= heavy[category] / base[category] <= 4, category  # the preset triples each
    assert heavy["filler"] / sum(heavy.values()) == pytest.approx(0.25, abs=0.01)
    none = categories(_generate(tmp_path / "none", lookalike_docs_per_fact=0.0, filler_share=0.0)[1])
    assert "lookalike" not in none and "filler" not in none


@pytest.mark.parametrize("preset", ["mixed-heavy-distractors", "alt-paraphrase"])
def test_a_preset_is_deterministic_per_seed(tmp_path, preset):
    for folder, seed in (("a", 11), ("b", 11), ("c", 12)):
        _generate(tmp_path / folder, seed=seed, facts_per_bucket=3, preset=preset, n_partitions=2)
    files = [p.relative_to(tmp_path / "a") for p in sorted((tmp_path / "a").rglob("*")) if p.is_file()]
    for rel in files:
        if rel.name != "summary.json":  # it names its own output folders
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a" / "world" / "kb.json").read_bytes() != (tmp_path / "c" / "world" / "kb.json").read_bytes()


def test_the_pipeline_passes_the_world_options_through(tmp_path):
    parser = argparse.ArgumentParser()
    pipeline.add_arguments(parser)
    args = parser.parse_args(["--lake", str(tmp_path), "--preset", "alt-templates", "--statements", "mixed"])
    options = world.WorldOptions(**vars(config_from_args(world.WorldOptions, args)))
    assert (options.preset, options.statements) == ("alt-templates", "mixed")
    pipeline.build_corpus(pipeline.Stages(), str(tmp_path), SEED, None, None, None, "fact-world", vars(options))
    kb = json.loads((tmp_path / "world" / "kb.json").read_text())
    assert kb["relations"][0]["prompts"][0] == "The hometown of {s} is"
    with pytest.raises(pipeline.import_data.ImportRefused, match="not your own data"):
        pipeline.refuse_option_clashes(str(tmp_path), "corpus", "queries.jsonl", None, False, None, vars(options))
