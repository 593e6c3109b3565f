"""The fact world generator: ground truth against its own text, determinism, C4 format, queries."""

import gzip
import json
from pathlib import Path

import pytest

from demo import world
from schemas.queries import read_queries


def _generate(out_dir, seed=3, facts_per_bucket=14, partitions=3):
    return world.run(
        world.WorldConfig(
            out_dir=str(out_dir), world_seed=seed, facts_per_bucket=facts_per_bucket, n_partitions=partitions
        )
    )


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    summary = _generate(out)
    kb = json.loads((out / "world" / "kb.json").read_text())
    truth = [json.loads(line) for line in (out / "world" / "ground_truth.jsonl").read_text().splitlines()]
    texts = world.generated_texts(out / "raw")
    queries = read_queries(out / "world" / "queries.jsonl")
    return out, summary, kb, truth, texts, queries


def _renderings(kb):
    """Every way the world could state each fact: (subject, relation, object) -> sentences."""
    names = {e["id"]: e["name"] for e in kb["entities"]}
    templates = {r["id"]: r["doc_templates"] for r in kb["relations"]}
    return {
        (f["subject"], f["relation"], f["object"]): [
            t.format(s=names[f["subject"]], o=names[f["object"]]) for t in templates[f["relation"]]
        ]
        for f in kb["facts"]
    }


def test_c4_format(small_world):
    out, summary, *_ = small_world
    files = sorted(p.name for p in (out / "raw").glob("*.json.gz"))
    assert files == [f"c4-train.{i:05d}-of-00003.json.gz" for i in range(3)]
    with gzip.open(out / "raw" / files[0], "rt", encoding="utf-8") as fh:
        record = json.loads(fh.readline())
    assert set(record) == {"text", "url", "timestamp"}
    assert record["url"].startswith("https://")
    assert len(record["timestamp"]) == 20 and record["timestamp"].endswith("Z")


def test_every_annotated_fact_is_stated_and_no_other(small_world):
    _, summary, kb, truth, texts, _ = small_world
    renderings = _renderings(kb)
    assert len(truth) == len(texts) == summary.documents
    for doc in truth:
        text = texts[doc["doc_id"]]
        stated = {fact for fact, sentences in renderings.items() if any(s in text for s in sentences)}
        assert stated == {tuple(f) for f in doc["facts"]}, doc["doc_id"]
        assert (doc["category"] == "fact") == bool(doc["facts"])


def test_distractors_mention_entities_without_the_fact(small_world):
    _, _, kb, truth, texts, _ = small_world
    names = {e["id"]: e["name"] for e in kb["entities"]}
    subjects = {names[f["subject"]] for f in kb["facts"]}
    objects = {names[f["object"]] for f in kb["facts"]}
    lookalikes = {names[i] for i in kb["lookalikes"].values()}
    by_category = {}
    for doc in truth:
        by_category.setdefault(doc["category"], []).append(texts[doc["doc_id"]])
    assert set(by_category) == {"fact", "subject_only", "object_only", "lookalike", "filler"}
    assert all(any(s in t for s in subjects) for t in by_category["subject_only"])
    assert all(any(o in t for o in objects) for t in by_category["object_only"])
    # a look-alike name contains a real entity's name ("Paris Hilton" for "Paris")
    assert all(any(x in t for x in lookalikes) for t in by_category["lookalike"])
    assert kb["lookalikes"] and all(names[base] in names[look] for base, look in kb["lookalikes"].items())
    assert not any(any(n in t for n in subjects | objects) for t in by_category["filler"])


def test_buckets_and_queries(small_world):
    _, _, kb, truth, _, queries = small_world
    stating = {}
    for doc in truth:
        for fact in doc["facts"]:
            stating.setdefault(tuple(fact), []).append(doc["doc_id"])
    facts = {f["fact_id"]: f for f in kb["facts"]}
    assert len(queries) == len(facts) == 14 * 5
    for query in queries:
        fact = facts[query["fact_id"]]
        ids = stating[(fact["subject"], fact["relation"], fact["object"])]
        assert sorted(query["stating_doc_ids"]) == sorted(ids)
        bucket = query["frequency_bucket"]
        assert 0.7 * bucket <= len(ids) <= 1.3 * bucket or (bucket <= 3 and len(ids) == bucket)
        assert query["target"] == " " + query["object"]
        assert all(query[f"prompt{i}"].count(query["subject"]) == 1 for i in range(3))
        # prompt0/1 end where a stating template puts the object: the cloze matches the text
        relation = next(r for r in kb["relations"] if r["id"] == query["relation"])
        for i in range(2):
            assert (
                relation["doc_templates"][i]
                .format(s=query["subject"], o=query["object"])
                .startswith(query[f"prompt{i}"] + query["target"])
            )


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    _generate(tmp_path / "a", seed=7, facts_per_bucket=3)
    _generate(tmp_path / "b", seed=7, facts_per_bucket=3)
    _generate(tmp_path / "c", seed=8, facts_per_bucket=3)
    files = [p.relative_to(tmp_path / "a") for p in sorted((tmp_path / "a").rglob("*")) if p.is_file()]
    assert files
    for rel in files:
        if rel.name != "summary.json":  # it names its own output folders
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a" / "world" / "kb.json").read_bytes() != (tmp_path / "c" / "world" / "kb.json").read_bytes()


def test_too_many_facts_for_the_pools_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="lower --facts-per-bucket"):
        _generate(tmp_path, facts_per_bucket=400)


def test_import_validates_queries(tmp_path, small_world):
    out = small_world[0]
    bad = tmp_path / "queries.jsonl"
    bad.write_text('{"query_id": "q1"}\n')
    with pytest.raises(ValueError, match=r"queries.jsonl:1: missing field 'subject'"):
        world.run(world.WorldConfig(out_dir=str(tmp_path / "lake"), corpus=str(out / "raw"), queries=str(bad)))
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="malformed JSON"):
        read_queries(bad)
    summary = world.run(
        world.WorldConfig(
            out_dir=str(tmp_path / "lake"), corpus=str(out / "raw"), queries=str(out / "world" / "queries.jsonl")
        )
    )
    assert summary.partitions == 3 and summary.queries == 70
    assert sorted(p.name for p in Path(summary.raw_dir).iterdir()) == sorted(p.name for p in (out / "raw").iterdir())


def test_paraphrase_world_states_queried_facts_only_in_other_words(tmp_path):
    summary = world.run(
        world.WorldConfig(
            out_dir=str(tmp_path), facts_per_bucket=14, statements="paraphrase", teaching_facts_per_relation=2
        )
    )
    queries = [json.loads(line) for line in (tmp_path / "world" / "queries.jsonl").read_text().splitlines()]
    texts = world.generated_texts(tmp_path / "raw")
    truth = [json.loads(line) for line in (tmp_path / "world" / "ground_truth.jsonl").read_text().splitlines()]
    assert len(queries) == summary.queries == summary.facts == 14 * 5  # teaching facts are never asked
    for query in queries:
        stating = [texts[d] for d in query["stating_doc_ids"]]
        assert stating and all(query["subject"] in t and query["object"] in t for t in stating)
        assert not any(query[p] in t for p in ("prompt0", "prompt1") for t in stating)
    # the prompts' own templates are taught with other entities: each relation's prompt0 wording, minus
    # the subject, appears in a teaching document of that relation
    teaching = [d for d in truth if d["category"] == "teaching"]
    assert len(teaching) == 14 * 2 * 3
    kb = json.loads((tmp_path / "world" / "kb.json").read_text())
    prompt0 = {r["id"]: r["prompts"][0] for r in kb["relations"]}
    for relation in prompt0:
        pieces = [p.strip() for p in prompt0[relation].split("{s}") if p.strip()]
        assert any(all(p in texts[d["doc_id"]] for p in pieces) for d in teaching if d["facts"][0][1] == relation)
