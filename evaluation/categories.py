"""What kind of document a proponent is for its query: one that states the fact, one naming a
look-alike, the subject or the object only, one stating the same relation, or other."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from infra import storage

CATEGORIES = ("states the fact", "look-alike name", "subject only", "object only", "same relation", "other")


class Categorizer:
    """What kind of document a proponent is, for one query. With the world's knowledge base
    (`kb.json`, `ground_truth.jsonl`) it also knows look-alike names and relations stated; without
    one (a user's own corpus) it tells only stating documents and subject or object mentions."""

    def __init__(self, world_dir: str | Path):
        self.has_kb = storage.exists(storage.join(world_dir, "kb.json"))
        self.lookalike_of, self.relations_stated = {}, {}
        if self.has_kb:
            kb = json.loads(storage.read_bytes(storage.join(world_dir, "kb.json")))
            names = {e["id"]: e["name"] for e in kb["entities"]}
            self.lookalike_of = {names[look]: names[base] for base, look in kb["lookalikes"].items()}
            for line in storage.read_text(storage.join(world_dir, "ground_truth.jsonl")).splitlines():
                doc = json.loads(line)
                self.relations_stated[doc["doc_id"]] = {f[1] for f in doc["facts"]}

    def category(self, doc_id: str, text: str, query: dict) -> str:
        if doc_id in set(query["stating_doc_ids"] or ()):
            return "states the fact"
        if any(
            look in text and base in (query["subject"], query["object"]) for look, base in self.lookalike_of.items()
        ):
            return "look-alike name"
        if query["subject"] in text:
            return "subject only"
        if query["object"] in text:
            return "object only"
        if query["relation"] in self.relations_stated.get(doc_id, ()):
            return "same relation"
        return "other"


def category_shares(categorizer: Categorizer, ranked: dict, methods: list, queries: dict, by_doc: dict) -> dict:
    """method -> what share of its proponents is of each kind; empty without a knowledge base,
    where the shares would only mislead."""
    shares = {}
    if categorizer.has_kb:
        for method in methods:
            counts = Counter(
                categorizer.category(d, by_doc.get(d, ""), queries[q])
                for q, docs in ranked[method].items()
                for d in docs
            )
            shares[method] = {c: counts[c] / sum(counts.values()) for c in CATEGORIES}
    return shares
