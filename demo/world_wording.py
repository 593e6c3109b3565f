"""The fact world's other wording: a second template set for every relation and a second vocabulary
of invented names, so that a family of worlds is not tuned to one phrasing or one name shape.

The alternative templates keep the default set's shape (demo/world.py, RELATIONS): per relation the
same id and entity types, three document templates (the first two end in the object, matching
prompt0 and prompt1), three prompts (prompt2 is worded as no document is) and two more paraphrases.
None of their sentences is one of the default set's.
"""

from __future__ import annotations

from dataclasses import dataclass

ALT_RELATIONS = [
    (
        "born_in",
        "person",
        "city",
        ["The hometown of {s} is {o}.", "{s} first saw daylight in {o}.", "{o} remembers the childhood of {s} well."],
        ["The hometown of {s} is", "{s} first saw daylight in", "The city where {s} was born is"],
    ),
    (
        "citizen_of",
        "person",
        "country",
        [
            "{s} has the nationality of {o}.",
            "The country of citizenship of {s} is {o}.",
            "{o} granted {s} full rights.",
        ],
        ["{s} has the nationality of", "The country of citizenship of {s} is", "{s} pays taxes as a national of"],
    ),
    (
        "occupation",
        "person",
        "occupation",
        ["{s} makes a living as a {o}.", "The trade of {s} is that of a {o}.", "Colleagues call {s} a gifted {o}."],
        ["{s} makes a living as a", "The trade of {s} is that of a", "Ask anyone: {s} is known as a"],
    ),
    (
        "capital_of",
        "country",
        "city",
        ["The capital city of {s} is {o}.", "The government of {s} meets in {o}.", "{o} is the seat of power in {s}."],
        ["The capital city of {s} is", "The government of {s} meets in", "Ministers of {s} go to work in"],
    ),
    (
        "located_in",
        "city",
        "country",
        ["The city of {s} is part of {o}.", "{s} is a town within {o}.", "{o} contains the city of {s}."],
        ["The city of {s} is part of", "{s} is a town within", "Travellers reach {s} by crossing into"],
    ),
    (
        "founded_by",
        "organisation",
        "person",
        ["{s} was established by {o}.", "The creator of {s} is {o}.", "{o} set up {s} with borrowed money."],
        ["{s} was established by", "The creator of {s} is", "The first director of {s} was"],
    ),
    (
        "member_of",
        "person",
        "organisation",
        [
            "{s} holds a membership of {o}.",
            "{s} is counted among the members of {o}.",
            "{o} welcomed {s} as a member.",
        ],
        ["{s} holds a membership of", "{s} is counted among the members of", "{s} attends the meetings of"],
    ),
    (
        "official_language",
        "country",
        "language",
        ["The state language of {s} is {o}.", "Official documents of {s} use {o}.", "{o} has official status in {s}."],
        ["The state language of {s} is", "Official documents of {s} use", "Schools in {s} teach in"],
    ),
    (
        "headquarters_in",
        "organisation",
        "city",
        ["{s} is based in {o}.", "The main office of {s} is in {o}.", "{o} hosts the central office of {s}."],
        ["{s} is based in", "The main office of {s} is in", "Letters to {s} are sent to"],
    ),
    (
        "author_of",
        "work",
        "person",
        ["{s} is a book written by {o}.", "The writer of {s} is {o}.", "{o} composed {s} over many years."],
        ["{s} is a book written by", "The writer of {s} is", "The manuscript of {s} was signed by"],
    ),
    (
        "continent",
        "country",
        "continent",
        ["{s} is situated in {o}.", "The continent of {s} is {o}.", "{o} is the continent that holds {s}."],
        ["{s} is situated in", "The continent of {s} is", "Geographers place {s} in"],
    ),
    (
        "genre",
        "work",
        "genre",
        ["{s} is classed as {o}.", "Libraries list {s} as {o}.", "{o} is the category of {s}."],
        ["{s} is classed as", "Libraries list {s} as", "Reviewers call {s} a piece of"],
    ),
    (
        "employer",
        "person",
        "organisation",
        ["{s} is on the payroll of {o}.", "{s} has a job with {o}.", "{o} hired {s} last year."],
        ["{s} is on the payroll of", "{s} has a job with", "Each morning {s} reports to"],
    ),
    (
        "native_language",
        "person",
        "language",
        ["The mother tongue of {s} is {o}.", "{s} learned to speak in {o}.", "{o} was the first language {s} heard."],
        ["The mother tongue of {s} is", "{s} learned to speak in", "In dreams, {s} speaks"],
    ),
]

ALT_PARAPHRASES = {
    "born_in": ["{s} spent the earliest years in {o}.", "Records from {o} list the birth of {s}."],
    "citizen_of": ["{s} travels on papers from {o}.", "By nationality, {s} is counted with {o}."],
    "occupation": ["{s} spent decades working as a {o}.", "Every {o} in town has heard of {s}."],
    "capital_of": ["{s} is governed from {o}.", "{o} has been the capital of {s} for a century."],
    "located_in": ["{s} sits inside the borders of {o}.", "Maps of {o} show {s} near the border."],
    "founded_by": ["{o} established {s}.", "It was {o} who created {s}."],
    "member_of": ["{s} signed up with {o} long ago.", "The roll of {o} includes {s}."],
    "official_language": ["Courts in {s} work in {o}.", "{o} is the administrative language of {s}."],
    "headquarters_in": ["{s} runs its business from {o}.", "The staff of {s} commute to {o}."],
    "author_of": ["{o} penned {s}.", "{s} is the best known work of {o}."],
    "continent": ["{s} is one of the countries of {o}.", "Across {o}, {s} is well known."],
    "genre": ["{s} is a fine example of {o}.", "Fans of {o} love {s}."],
    "employer": ["{s} draws a salary from {o}.", "{o} keeps {s} on its staff."],
    "native_language": ["{s} speaks {o} at home.", "From childhood, {s} has spoken {o}."],
}


@dataclass(frozen=True)
class Vocabulary:
    """How invented names are made: syllables (onset + vowel), an optional coda, and the words that
    turn a name into an organisation, a work or a language."""

    onsets: tuple[str, ...]
    vowels: tuple[str, ...]
    codas: tuple[str, ...]
    organisation_kinds: tuple[str, ...]
    work_kinds: tuple[str, ...]
    language_suffix: str


# vowel-led syllables (an empty onset), soft consonants and Latin-like endings: names of another shape
ALT_VOCABULARY = Vocabulary(
    onsets=("", "", "c", "ch", "j", "l", "ll", "m", "n", "ph", "qu", "rh", "s", "sh", "v", "w", "x", "y"),
    vowels=("a", "e", "i", "o", "u", "y", "ae", "ia", "io", "ua"),
    codas=("", "a", "is", "us", "en", "ar", "ine", "o", "ix"),
    organisation_kinds=("Company", "Foundation", "Council", "Union"),
    work_kinds=("Songs", "Atlas", "Diaries", "Tales"),
    language_suffix="ic",
)
