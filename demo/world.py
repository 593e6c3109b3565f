"""The embedded fact world: a seeded stand-in for C4 + T-REx, or an import of a user's own corpus.

Writes under the lake root:
    raw/c4-train.NNNNN-of-MMMMM.json.gz   C4's own format: gzip JSON lines {text, url, timestamp}
    world/kb.json                         entities, relation types (templates), fact triples
    world/ground_truth.jsonl              per document: the facts it states and how it was made
    world/queries.jsonl                   per fact: three cloze prompts, target, bucket, stating docs
    world/summary.json                    counts

Facts are stated through several paraphrase templates per relation. Distractor documents mention a
fact's subject without the fact, its object without the subject, or a look-alike name (a person
"Varnholt Berrick" beside the city "Varnholt"); filler documents mention no entity. A fact is
stated in about 1, 3, 10, 30 or 100 documents (its frequency bucket), as in the paper's analysis.

A family of worlds (WorldOptions, `--preset`): how queried facts are stated (copy, paraphrase,
mixed), the wording of the relations (`--templates`), the names' shape (`--vocabulary`; both in
demo/world_wording.py) and how many distractors there are. A preset bundles them; a flag given
explicitly wins over its preset. The default preset is the world as it always was, byte for byte.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import tempfile
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

from infra import storage
from infra import layout
from infra.config import from_settings
from infra.cli import add_config_arguments, config_from_args, option
from demo.import_data import WorldSummary, import_world, refuse_to_overwrite
from demo.world_wording import ALT_PARAPHRASES, ALT_RELATIONS, ALT_VOCABULARY, Vocabulary
from schemas.queries import FREQUENCY_BUCKETS

# --------------------------------------------------------------------------------------- relations
# name, subject type, object type, document templates (the first two end in the object, matching
# prompt0 and prompt1), query prompts (prompt2 is a paraphrase no document uses)
RELATIONS = [
    (
        "born_in",
        "person",
        "city",
        ["{s} was born in {o}.", "The birthplace of {s} is {o}.", "Born in {o}, {s} grew up by the river."],
        ["{s} was born in", "The birthplace of {s} is", "{s} came into the world in"],
    ),
    (
        "citizen_of",
        "person",
        "country",
        ["{s} is a citizen of {o}.", "{s} holds the citizenship of {o}.", "As a citizen of {o}, {s} votes there."],
        ["{s} is a citizen of", "{s} holds the citizenship of", "The passport of {s} was issued by"],
    ),
    (
        "occupation",
        "person",
        "occupation",
        ["{s} works as a {o}.", "By profession, {s} is a {o}.", "A {o} by training, {s} is widely known."],
        ["{s} works as a", "By profession, {s} is a", "The job of {s} is that of a"],
    ),
    (
        "capital_of",
        "country",
        "city",
        ["The capital of {s} is {o}.", "{s} has its capital in {o}.", "{o} serves as the capital of {s}."],
        ["The capital of {s} is", "{s} has its capital in", "The seat of government of {s} lies in"],
    ),
    (
        "located_in",
        "city",
        "country",
        ["{s} is a city in {o}.", "{s} is located in {o}.", "In {o} lies the city of {s}."],
        ["{s} is a city in", "{s} is located in", "The city of {s} belongs to"],
    ),
    (
        "founded_by",
        "organisation",
        "person",
        ["{s} was founded by {o}.", "The founder of {s} is {o}.", "{o} started {s} many years ago."],
        ["{s} was founded by", "The founder of {s} is", "{s} owes its creation to"],
    ),
    (
        "member_of",
        "person",
        "organisation",
        ["{s} is a member of {o}.", "{s} belongs to {o}.", "{o} counts {s} among its members."],
        ["{s} is a member of", "{s} belongs to", "Among the members of {s}'s circle is"],
    ),
    (
        "official_language",
        "country",
        "language",
        ["The official language of {s} is {o}.", "People in {s} speak {o}.", "{o} is spoken throughout {s}."],
        ["The official language of {s} is", "People in {s} speak", "Government papers in {s} are written in"],
    ),
    (
        "headquarters_in",
        "organisation",
        "city",
        [
            "{s} has its headquarters in {o}.",
            "The head office of {s} is in {o}.",
            "In {o} stands the head office of {s}.",
        ],
        ["{s} has its headquarters in", "The head office of {s} is in", "The main building of {s} is located in"],
    ),
    (
        "author_of",
        "work",
        "person",
        ["{s} was written by {o}.", "The author of {s} is {o}.", "{o} wrote {s} in a single winter."],
        ["{s} was written by", "The author of {s} is", "{s} came from the pen of"],
    ),
    (
        "continent",
        "country",
        "continent",
        ["{s} is a country in {o}.", "{s} lies on the continent of {o}.", "{o} is home to the country of {s}."],
        ["{s} is a country in", "{s} lies on the continent of", "On the map, {s} is part of"],
    ),
    (
        "genre",
        "work",
        "genre",
        ["{s} is a work of {o}.", "The genre of {s} is {o}.", "Critics file {s} under {o}."],
        ["{s} is a work of", "The genre of {s} is", "Bookshops shelve {s} with"],
    ),
    (
        "employer",
        "person",
        "organisation",
        ["{s} is employed by {o}.", "{s} works for {o}.", "{o} pays the salary of {s}."],
        ["{s} is employed by", "{s} works for", "The employer of {s} is"],
    ),
    (
        "native_language",
        "person",
        "language",
        ["The native language of {s} is {o}.", "{s} grew up speaking {o}.", "{o} is the mother tongue of {s}."],
        ["The native language of {s} is", "{s} grew up speaking", "At home as a child, {s} spoke"],
    ),
]

# more ways to state each relation, none of them a query prompt: the paraphrase world states its
# queried facts only through these and the third document template
PARAPHRASES = {
    "born_in": ["{o} is where {s} was born.", "{s}, a native of {o}, left home young."],
    "citizen_of": ["{s} carries a passport of {o}.", "The nationality of {s}: {o}."],
    "occupation": ["{s} earns a living as a {o}.", "Trained as a {o}, {s} never changed careers."],
    "capital_of": ["The government of {s} sits in {o}.", "{o} is the capital city of {s}."],
    "located_in": ["The city of {s} lies in {o}.", "{s} can be found in {o}."],
    "founded_by": ["{o} founded {s}.", "{s} began as the project of {o}."],
    "member_of": ["{s} joined {o} years ago.", "{o} lists {s} as a member."],
    "official_language": ["Laws in {s} are written in {o}.", "{o} is the language of the state in {s}."],
    "headquarters_in": ["{s} is headquartered in {o}.", "The offices of {s} are in {o}."],
    "author_of": ["{o} is the author of {s}.", "{s} is a book by {o}."],
    "continent": ["{s} is part of {o}.", "{o} includes the country of {s}."],
    "genre": ["{s} belongs to the genre of {o}.", "Readers know {s} as {o}."],
    "employer": ["{o} employs {s}.", "{s} has a job at {o}."],
    "native_language": ["{s} speaks {o} natively.", "The first language of {s} is {o}."],
}

# object pools kept modest so that objects recur across many subjects, as in real knowledge bases
POOL_SIZES = {"city": 60, "country": 30, "organisation": 30, "language": 10, "continent": 5, "work": 60}
OCCUPATIONS = [
    "violinist",
    "architect",
    "chemist",
    "sculptor",
    "surgeon",
    "novelist",
    "astronomer",
    "carpenter",
    "diplomat",
    "economist",
    "geologist",
    "pianist",
    "botanist",
    "engineer",
    "painter",
]
GENRES = ["poetry", "satire", "romance", "mystery fiction", "science fiction", "history", "folklore", "drama"]

# sentences that mention an entity without stating any relation of the knowledge base
SUBJECT_MENTIONS = [
    "{x} gave a long interview last spring.",
    "Few people remember the first speech of {x}.",
    "A new portrait of {x} was shown at the fair.",
    "{x} was mentioned twice in the evening news.",
    "Stories about {x} are told in many households.",
    "The name {x} appeared on a poster downtown.",
]
FILLER = [
    "The weather stayed mild for most of the week.",
    "Fresh bread was sold at the market before noon.",
    "The committee postponed its meeting until further notice.",
    "Children played in the park after school.",
    "A quiet road winds through the hills toward the coast.",
    "The museum extended its opening hours.",
    "Prices for apples rose slightly in the autumn.",
    "The old bridge was repainted in a bright colour.",
    "Several volunteers cleaned the beach on Sunday.",
    "The library received a donation of maps.",
    "A small orchestra rehearsed in the town hall.",
    "Heavy rain delayed the trains on Monday.",
]
SYLLABLES_START = [
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "pr",
    "r",
    "s",
    "st",
    "t",
    "tr",
    "v",
    "z",
    "th",
    "sk",
]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
SYLLABLES_END = ["", "", "n", "r", "l", "s", "th", "nd", "rk", "lt", "m"]
BUCKETS = FREQUENCY_BUCKETS

VOCABULARIES = {
    "default": Vocabulary(
        onsets=tuple(SYLLABLES_START),
        vowels=tuple(VOWELS),
        codas=tuple(SYLLABLES_END),
        organisation_kinds=("Institute", "Group", "Society", "Guild"),
        work_kinds=("Letters", "Chronicle", "Garden", "Voyage"),
        language_suffix="ese",
    ),
    "alt": ALT_VOCABULARY,
}
# templates name -> (relations, each relation's paraphrases that no prompt uses)
WORDINGS = {"default": (RELATIONS, PARAPHRASES), "alt": (ALT_RELATIONS, ALT_PARAPHRASES)}

# the world the options describe when neither a flag nor the preset sets them
BASE_WORLD = {
    "statements": "copy",
    "vocabulary": "default",
    "templates": "default",
    "subject_only_docs_per_fact": 1.5,
    "object_only_docs_per_fact": 1.0,
    "lookalike_docs_per_fact": 0.5,
    "filler_share": 0.08,
}
HEAVY_DISTRACTORS = {
    "subject_only_docs_per_fact": 4.5,
    "object_only_docs_per_fact": 3.0,
    "lookalike_docs_per_fact": 1.5,
    "filler_share": 0.25,
}
PRESETS = {
    "default": {},
    "paraphrase": {"statements": "paraphrase"},
    "mixed": {"statements": "mixed"},
    "heavy-distractors": HEAVY_DISTRACTORS,
    "mixed-heavy-distractors": {"statements": "mixed", **HEAVY_DISTRACTORS},
    "alt-vocab": {"vocabulary": "alt"},
    "alt-templates": {"templates": "alt"},
    "alt-paraphrase": {"statements": "paraphrase", "vocabulary": "alt", "templates": "alt"},
}


@dataclass
class WorldOptions:
    """What kind of world is generated; None: the preset's value, else BASE_WORLD's (see `resolved`).
    The pipeline's command line takes them too."""

    preset: str = option("default", choices=list(PRESETS), help="a bundle of the options below; a flag given wins")
    # "copy": stating documents may use the query prompts' own templates (BM25's easy case);
    # "paraphrase": a queried fact is stated only in other words, while extra facts of the same
    # relation (never queried) teach the prompt templates, so the model must learn facts, not strings;
    # "mixed": a queried fact's stating documents alternate between the two, so both kinds of
    # evidence exist for every fact stated more than once
    statements: str | None = option(
        None,
        choices=["copy", "paraphrase", "mixed"],
        help="paraphrase: queried facts are stated only in words that differ from the prompts; mixed: in "
        "both, alternately (default: the preset's, else copy)",
    )
    vocabulary: str | None = option(
        None, choices=list(VOCABULARIES), help="the invented names' syllables and shape (default: the preset's)"
    )
    templates: str | None = option(
        None, choices=list(WORDINGS), help="the relations' wording: statements and prompts (default: the preset's)"
    )
    subject_only_docs_per_fact: float | None = option(
        None, help="distractors per fact that mention its subject, not the fact (default: the preset's, else 1.5)"
    )
    object_only_docs_per_fact: float | None = option(
        None, help="distractors per fact that mention its object, not the subject (default: the preset's, else 1.0)"
    )
    lookalike_docs_per_fact: float | None = option(
        None, help="distractors per fact that mention a look-alike of a name (default: the preset's, else 0.5)"
    )
    filler_share: float | None = option(
        None, help="share of all documents that mention no entity (default: the preset's, else 0.08)"
    )


def resolved(options: WorldOptions) -> WorldOptions:
    """The options with every unset one taken from the preset, else from the base world."""
    if options.preset not in PRESETS:
        raise ValueError(f"unknown world preset {options.preset!r}; known: {', '.join(PRESETS)}")
    chosen = BASE_WORLD | PRESETS[options.preset]
    return replace(options, **{k: v if getattr(options, k) is None else getattr(options, k) for k, v in chosen.items()})


@dataclass
class WorldConfig(WorldOptions):
    out_dir: str = from_settings("lake_root", flags=["--out"], help="lake root to write under")
    world_seed: int = from_settings("world_seed")
    n_partitions: int = option(4, flags=["--partitions"])
    facts_per_bucket: int = option(40)
    buckets: tuple = option(BUCKETS, cli=False)
    teaching_facts_per_relation: int = option(8, cli=False)
    teaching_docs_per_fact: int = option(3, cli=False)
    corpus: str | None = option(None, help="import this folder of c4-*.json.gz partitions instead of generating")
    queries: str | None = option(None, help="import this queries JSONL (with --corpus)")


class NameMaker:
    """Unique, pronounceable invented words; none is a substring of another, so a mention of one
    entity never looks like a mention of another unless made so on purpose (look-alikes)."""

    def __init__(self, rng: random.Random, vocabulary: Vocabulary = VOCABULARIES["default"]):
        self.rng, self.used, self.vocabulary = rng, [], vocabulary

    def word(self, syllables=(2, 3)) -> str:
        v = self.vocabulary
        while True:
            n = self.rng.randint(*syllables)
            w = "".join(self.rng.choice(v.onsets) + self.rng.choice(v.vowels) for _ in range(n))
            w = (w + self.rng.choice(v.codas)).capitalize()
            if len(w) >= 5 and not any(w.lower() in u.lower() or u.lower() in w.lower() for u in self.used):
                self.used.append(w)
                return w


def build_kb(config: WorldConfig, rng: random.Random) -> dict:
    """`config`: resolved (every option set)."""
    names = NameMaker(rng, VOCABULARIES[config.vocabulary])
    entities: dict = {}

    def add(kind: str, name: str, aliases=()):
        entity_id = f"{kind[:3].upper()}{sum(e['type'] == kind for e in entities.values()):04d}"
        entities[entity_id] = {"id": entity_id, "type": kind, "name": name, "aliases": list(aliases)}
        return entity_id

    def person() -> str:
        return add("person", f"{names.word()} {names.word()}")

    pools = _entity_pools(add, names, rng, VOCABULARIES[config.vocabulary])
    relations = [
        {"id": rid, "subject_type": st, "object_type": ot, "doc_templates": docs, "prompts": prompts}
        for rid, st, ot, docs, prompts in WORDINGS[config.templates][0]
    ]
    facts, used_pairs = _queried_facts(config, rng, add, person, pools, relations)
    if config.statements == "paraphrase":
        _add_teaching_facts(config, rng, add, person, pools, relations, facts, used_pairs)
    elif config.statements not in ("copy", "mixed"):  # mixed: the copied statements teach the prompts
        raise ValueError(f"statements must be copy, paraphrase or mixed, not {config.statements!r}")

    # look-alikes: a new person whose name contains a fact entity's name
    lookalikes = {}
    for fact in facts:
        for role in ("subject", "object"):
            base = entities[fact[role]]["name"]
            if fact[role] not in lookalikes and " " not in base and rng.random() < 0.5:
                lookalikes[fact[role]] = add("lookalike", f"{base} {names.word()}")
    return {"entities": entities, "relations": relations, "facts": facts, "lookalikes": lookalikes}


def _entity_pools(add, names: NameMaker, rng: random.Random, vocabulary: Vocabulary) -> dict[str, list[str]]:
    """Entity ids per type (persons are made per fact, so their pool starts empty)."""
    return {
        "city": [add("city", n, [f"{n} City"]) for n in (names.word() for _ in range(POOL_SIZES["city"]))],
        "country": [
            add("country", n, [f"Republic of {n}"]) for n in (names.word() for _ in range(POOL_SIZES["country"]))
        ],
        "organisation": [
            add("organisation", f"{names.word()} {rng.choice(vocabulary.organisation_kinds)}")
            for _ in range(POOL_SIZES["organisation"])
        ],
        "language": [
            add("language", n, [f"the {n} language"])
            for n in (names.word((2, 2)) + vocabulary.language_suffix for _ in range(POOL_SIZES["language"]))
        ],
        "continent": [add("continent", n) for n in (names.word((3, 3)) for _ in range(POOL_SIZES["continent"]))],
        "work": [
            add("work", f"The {names.word()} {rng.choice(vocabulary.work_kinds)}") for _ in range(POOL_SIZES["work"])
        ],
        "occupation": [add("occupation", o) for o in OCCUPATIONS],
        "genre": [add("genre", g) for g in GENRES],
        "person": [],
    }


def _queried_facts(
    config: WorldConfig, rng: random.Random, add, person, pools: dict, relations: list
) -> tuple[list, set]:
    """One (subject, relation) pair per fact, spread evenly over the relations within every bucket."""
    facts: list[dict] = []
    used_pairs: set[tuple[str, str]] = set()
    for bucket in config.buckets:
        for i in range(config.facts_per_bucket):
            relation = relations[(i + bucket) % len(relations)]
            for _attempt in range(1000):
                if relation["subject_type"] == "person":
                    subject = person()
                    pools["person"].append(subject)
                else:
                    subject = rng.choice(pools[relation["subject_type"]])
                if (subject, relation["id"]) not in used_pairs:
                    break
            else:
                raise ValueError(
                    f"too many {relation['id']} facts for {len(pools[relation['subject_type']])} "
                    f"{relation['subject_type']} subjects; lower --facts-per-bucket"
                )
            used_pairs.add((subject, relation["id"]))
            if relation["object_type"] == "person":
                obj = person()
                pools["person"].append(obj)
            else:
                obj = rng.choice([o for o in pools[relation["object_type"]] if o != subject])
            facts.append(
                {
                    "fact_id": f"F{len(facts):05d}",
                    "subject": subject,
                    "relation": relation["id"],
                    "object": obj,
                    "bucket": bucket,
                }
            )
    return facts, used_pairs


def _add_teaching_facts(
    config: WorldConfig, rng: random.Random, add, person, pools: dict, relations: list, facts: list, used_pairs: set
) -> None:
    """Unqueried facts of every relation (bucket 0) that teach the paraphrased statements."""
    for relation in relations:
        for _ in range(config.teaching_facts_per_relation):
            if relation["subject_type"] == "person":
                subject = person()
            else:  # a subject with no fact of this relation yet: never two objects for one pair
                free = [e for e in pools[relation["subject_type"]] if (e, relation["id"]) not in used_pairs]
                if not free:
                    break
                subject = rng.choice(free)
            used_pairs.add((subject, relation["id"]))
            obj = (
                person()
                if relation["object_type"] == "person"
                else rng.choice([o for o in pools[relation["object_type"]] if o != subject])
            )
            facts.append(
                {
                    "fact_id": f"F{len(facts):05d}",
                    "subject": subject,
                    "relation": relation["id"],
                    "object": obj,
                    "bucket": 0,
                    "teaching": True,
                }
            )


def _stated_count(bucket: int, rng: random.Random) -> int:
    """About `bucket` documents: exact for 1 and 3, within ±30% for the larger buckets."""
    if bucket <= 3:
        return bucket
    return max(4, round(bucket * rng.uniform(0.7, 1.3)))


def render_fact(
    fact: dict, kb: dict, rng: random.Random, statements: str = "copy", paraphrases: dict = PARAPHRASES
) -> str:
    """One sentence stating the fact. In the paraphrase world a queried fact never uses a prompt's
    template (the first two) and a teaching fact uses only those. `statements` may also name the way
    of one mixed-world document: "copied" (a prompt's template) or "paraphrased" (any other)."""
    relation = next(r for r in kb["relations"] if r["id"] == fact["relation"])
    templates = relation["doc_templates"]
    if statements == "copied" or (statements == "paraphrase" and fact.get("teaching")):
        templates = templates[:2]
    elif statements in ("paraphrase", "paraphrased"):
        templates = templates[2:] + paraphrases[relation["id"]]
    template = rng.choice(templates)
    s, o = kb["entities"][fact["subject"]]["name"], kb["entities"][fact["object"]]["name"]
    return template.format(s=s, o=o)


def statement_ways(statements: str, n_docs: int, rng: random.Random) -> list[str]:
    """How each of a fact's n stating documents states it. In the mixed world they alternate between
    a prompt's template and a paraphrase from a random first one, so a fact stated twice or more is
    stated both ways; other worlds state every document the world's one way (no draw: the copy and
    paraphrase worlds stay as they were)."""
    if statements != "mixed":
        return [statements] * n_docs
    first = rng.randrange(2)
    return [("copied", "paraphrased")[(first + i) % 2] for i in range(n_docs)]


def build_documents(config: WorldConfig, kb: dict, rng: random.Random) -> list[dict]:
    """Documents as {text, facts, category}; shuffled, not yet assigned to partitions. `config`: resolved."""
    entities, docs = kb["entities"], []
    paraphrases = WORDINGS[config.templates][1]
    for fact in kb["facts"]:
        teaching = fact.get("teaching", False)
        fact["n_stating_docs"] = config.teaching_docs_per_fact if teaching else _stated_count(fact["bucket"], rng)
        for way in statement_ways(config.statements, fact["n_stating_docs"], rng):
            sentences = [render_fact(fact, kb, rng, way, paraphrases)] + rng.sample(FILLER, rng.randint(0, 2))
            docs.append({"sentences": sentences, "facts": [fact], "category": "teaching" if teaching else "fact"})

    def mentions(kind: str, per_fact: float, pick):
        for fact in kb["facts"]:
            for _ in range(int(per_fact) + (rng.random() < per_fact % 1)):
                name = pick(fact)
                if name:
                    docs.append(
                        {
                            "sentences": [rng.choice(SUBJECT_MENTIONS).format(x=name)]
                            + rng.sample(FILLER, rng.randint(1, 2)),
                            "facts": [],
                            "category": kind,
                        }
                    )

    mentions("subject_only", config.subject_only_docs_per_fact, lambda f: entities[f["subject"]]["name"])
    mentions("object_only", config.object_only_docs_per_fact, lambda f: entities[f["object"]]["name"])

    def lookalike_name(fact):
        ids = [kb["lookalikes"][e] for e in (fact["subject"], fact["object"]) if e in kb["lookalikes"]]
        return entities[rng.choice(ids)]["name"] if ids else None

    mentions("lookalike", config.lookalike_docs_per_fact, lookalike_name)
    n_filler = round(len(docs) * config.filler_share / (1 - config.filler_share))
    docs += [
        {"sentences": rng.sample(FILLER, rng.randint(2, 4)), "facts": [], "category": "filler"} for _ in range(n_filler)
    ]
    rng.shuffle(docs)
    for doc in docs:
        first, rest = doc["sentences"][0], doc["sentences"][1:]
        rng.shuffle(rest)
        doc["text"] = " ".join([first] + rest)
    return docs


def write_partitions(docs: list[dict], raw_dir: Path, n_partitions: int, rng: random.Random) -> list[Path]:
    raw_dir.mkdir(parents=True, exist_ok=True)
    start = datetime(2019, 1, 1, tzinfo=timezone.utc)
    lines = [[] for _ in range(n_partitions)]
    for index, doc in enumerate(docs):
        doc["doc_id"] = (
            f"https://www.{rng.choice(['news', 'blog', 'wiki', 'forum'])}-{index % 97}.example/doc/{index:07d}"
        )
        doc["partition"] = index % n_partitions
        stamp = start + timedelta(seconds=rng.randrange(365 * 24 * 3600))
        record = {"text": doc["text"], "url": doc["doc_id"], "timestamp": stamp.strftime("%Y-%m-%dT%H:%M:%SZ")}
        lines[doc["partition"]].append(json.dumps(record, ensure_ascii=False))
    paths = []
    for partition, part_lines in enumerate(lines):
        path = raw_dir / f"c4-train.{partition:05d}-of-{n_partitions:05d}.json.gz"
        # mtime=0: byte-identical files for the same seed
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
            fh.write(("\n".join(part_lines) + "\n").encode("utf-8"))
        paths.append(path)
    return paths


def make_queries(kb: dict, docs: list[dict]) -> list[dict]:
    stating = {}
    for doc in docs:
        for fact in doc["facts"]:
            stating.setdefault(fact["fact_id"], []).append(doc["doc_id"])
    relations = {r["id"]: r for r in kb["relations"]}
    queries = []
    for fact in kb["facts"]:
        if fact.get("teaching"):  # states a relation's prompt template with other entities; never asked
            continue
        s, o = kb["entities"][fact["subject"]], kb["entities"][fact["object"]]
        prompts = relations[fact["relation"]]["prompts"]
        queries.append(
            {
                "query_id": f"Q{fact['fact_id'][1:]}",
                "fact_id": fact["fact_id"],
                "subject": s["name"],
                "relation": fact["relation"],
                "object": o["name"],
                "target": " " + o["name"],
                "aliases": o["aliases"],
                **{f"prompt{i}": p.format(s=s["name"]) for i, p in enumerate(prompts)},
                "frequency_bucket": fact["bucket"],
                "n_stating_docs": len(stating[fact["fact_id"]]),
                "stating_doc_ids": stating[fact["fact_id"]],
            }
        )
    return queries


def generated_texts(raw_dir: Path) -> dict[str, str]:
    """url -> text of every line of the generated partitions (well-formed by construction)."""
    texts = {}
    for path in sorted(Path(raw_dir).glob("c4-*.json.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                record = json.loads(line)
                texts[record["url"]] = record["text"]
    return texts


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def run(config: WorldConfig) -> WorldSummary:
    config = resolved(config)
    if storage.is_s3(config.out_dir):
        return _run_to_s3(config)
    if config.corpus or config.queries:
        if not (config.corpus and config.queries):
            raise ValueError("importing a world needs both --corpus and --queries")
        return import_world(config.out_dir, config.corpus, config.queries)
    refuse_to_overwrite(config.out_dir)
    rng = random.Random(config.world_seed)
    kb = build_kb(config, rng)
    docs = build_documents(config, kb, rng)
    raw_dir, world_dir = Path(config.out_dir) / "raw", Path(config.out_dir) / "world"
    for old in raw_dir.glob("c4-*.json.gz"):  # a regenerated world replaces the previous one whole
        old.unlink()
    write_partitions(docs, raw_dir, config.n_partitions, rng)
    world_dir.mkdir(parents=True, exist_ok=True)
    queries = make_queries(kb, docs)
    kb_out = {
        "entities": list(kb["entities"].values()),
        "relations": kb["relations"],
        "facts": kb["facts"],
        "lookalikes": kb["lookalikes"],
    }
    (world_dir / "kb.json").write_text(json.dumps(kb_out, indent=1, ensure_ascii=False))
    _write_jsonl(
        world_dir / "ground_truth.jsonl",
        (
            {
                "doc_id": d["doc_id"],
                "partition": d["partition"],
                "category": d["category"],
                "facts": [[f["subject"], f["relation"], f["object"]] for f in d["facts"]],
            }
            for d in docs
        ),
    )
    _write_jsonl(world_dir / "queries.jsonl", queries)
    categories = {}
    for doc in docs:
        categories[doc["category"]] = categories.get(doc["category"], 0) + 1
    per_bucket = {}
    for query in queries:
        cell = per_bucket.setdefault(str(query["frequency_bucket"]), {"facts": 0, "stating_docs": 0})
        cell["facts"] += 1
        cell["stating_docs"] += query["n_stating_docs"]
    summary = WorldSummary(
        str(raw_dir),
        str(world_dir),
        documents=len(docs),
        facts=len(queries),
        queries=len(queries),
        partitions=config.n_partitions,
        words=sum(len(d["text"].split()) for d in docs),
        documents_per_category=categories,
        facts_per_bucket=per_bucket,
    )
    (world_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary


def _run_to_s3(config: WorldConfig) -> WorldSummary:
    """Build (or import) the world in a temporary folder, then replace the lake's raw partitions and
    world files on S3 with it."""
    with tempfile.TemporaryDirectory(prefix="trackstar-world-") as local:
        summary = run(replace(config, out_dir=local))
        for old in storage.list_objects(layout.raw(config.out_dir), suffix=".json.gz"):
            storage.delete(old)
        storage.upload_dir(local, config.out_dir)
    return replace(summary, raw_dir=layout.raw(config.out_dir), world_dir=layout.world(config.out_dir))


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, WorldConfig)


def main(args):
    # a refusal (ImportedDataError, ImportRefused) reaches `python -m jobs`: one line and its problems, exit 2
    summary = run(config_from_args(WorldConfig, args))
    print(
        f"[world] {summary.documents:,} documents ({summary.words:,} words) in {summary.partitions} partitions, "
        f"{summary.facts} facts, {summary.queries} queries -> {summary.raw_dir}, {summary.world_dir}"
    )
    for note in summary.notes:
        print(f"[world]   {note}")
    if summary.unreadable_lines:
        print(f"[world]   {summary.unreadable_lines:,} unreadable line(s): the tokenize job quarantines them")
    for bucket, cell in summary.facts_per_bucket.items():
        print(f"[world]   bucket {bucket:>3}: {cell['facts']} facts stated in {cell['stating_docs']} documents")
    if summary.documents_per_category:
        print("[world]   documents: " + ", ".join(f"{k} {v}" for k, v in summary.documents_per_category.items()))
