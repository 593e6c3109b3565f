"""The queries file a user brings: JSON lines, one fact query per line, validated as a whole.

    {"query_id": "q1", "subject": "Marie Curie", "relation": "born_in", "object": "Warsaw", "target": " Warsaw",
     "prompt0": "Marie Curie was born in", "stating_doc_ids": ["https://example.org/curie"]}

`Query` declares every field (required ones have no default); `load_queries(path)` checks the whole
file at once and raises `QueryFileError` listing every problem as `file:line: problem`, so a user
fixes the file in one pass. `Query.model_json_schema()` gives the same rules as a JSON Schema.

The target is the text the model should produce right after the prompt, leading space included
(" Warsaw", as a byte-level BPE tokenizer sees it in running text). A target without it, after a
prompt that does not end in whitespace, would be scored as a token the model never predicts there:
it gets the space prepended, and the load says how many were normalised. `check_targets` then
refuses (with a reason) targets the model's tokenizer cannot encode, and warns where the tokenizer
splits the target differently after the prompt than alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

# documents stating a fact, as in the paper's frequency analysis; a query without a bucket gets the
# nearest one (log scale) to its number of stating documents
FREQUENCY_BUCKETS = (1, 3, 10, 30, 100)


def nearest_bucket(n_documents: int) -> int:
    return min(FREQUENCY_BUCKETS, key=lambda b: abs(math.log(b) - math.log(max(n_documents, 1))))


class Query(BaseModel):
    """One line of a queries file. Strict: "3" is not a number and unknown fields are errors (a
    misspelt `stating_doc_ids` would otherwise leave a query without ground truth)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    query_id: str = Field(min_length=1, description="unique within the file")
    subject: str = Field(min_length=1, description="subject entity, as written in the documents")
    relation: str = Field(min_length=1, description="relation id or name")
    object: str = Field(min_length=1, description="object entity, as written in the documents")
    target: str = Field(
        min_length=1, description="what the model should produce after the prompt, leading space included"
    )
    prompt0: str = Field(min_length=1, description="cloze prompt ending right before the target")
    prompt1: str | None = Field(None, description="a paraphrase of prompt0 (default: prompt0)")
    prompt2: str | None = Field(None, description="another paraphrase (default: prompt0)")
    aliases: list[str] = Field(default_factory=list, description="accepted alternative targets")
    stating_doc_ids: list[str] = Field(min_length=1, description="urls (C4 `url`) of the documents stating the fact")
    frequency_bucket: int | None = Field(
        None, ge=1, description="default: nearest of 1, 3, 10, 30, 100 to the number of stating documents"
    )
    fact_id: str | None = Field(None, description="knowledge-base fact id, if any")
    n_stating_docs: int | None = Field(None, ge=0, description="informational (the generated world writes it)")

    _target_normalised: bool = PrivateAttr(default=False)

    @model_validator(mode="after")
    def fill_defaults(self):
        if not self.target.strip():
            raise ValueError("target is blank")
        if any(not doc.strip() for doc in self.stating_doc_ids):
            raise ValueError("stating_doc_ids holds a blank url")
        self.prompt1 = self.prompt1 or self.prompt0
        self.prompt2 = self.prompt2 or self.prompt0
        prompts = (self.prompt0, self.prompt1, self.prompt2)
        ends_in_space = {p[-1].isspace() for p in prompts}
        if len(ends_in_space) > 1:
            raise ValueError("some prompts end in whitespace and some do not, but they share one target")
        if not self.target[0].isspace() and not ends_in_space.pop():
            self.target = " " + self.target
            self._target_normalised = True
        if self.frequency_bucket is None:
            self.frequency_bucket = nearest_bucket(len(self.stating_doc_ids))
        return self


class QueryFileError(ValueError):
    """A queries file with problems; `problems` lists each as `file:line: problem`."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.problems = problems
        shown = problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else [])
        super().__init__(f"{path}: {len(problems)} problem(s) in the queries file:\n" + "\n".join(shown))


@dataclass
class QueryFile:
    queries: list[dict]  # validated, defaults filled, targets normalised
    lines: list[int]  # the line each query came from
    notes: list[str] = field(default_factory=list)  # what was normalised


def _describe(error: Mapping) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "missing":
        return f"missing field {location!r}"
    if error["type"] == "extra_forbidden":
        return f"unknown field {location!r} (fields: {', '.join(Query.model_fields)})"
    if not location:  # a whole-query rule (fill_defaults)
        return error["msg"].removeprefix("Value error, ")
    return f"field {location!r}: {error['msg']}"


def load_queries(path: Path | str, text: str | None = None) -> QueryFile:
    """Every line checked; raises QueryFileError with all problems, or returns the queries. `text`
    is the file's content when it was read elsewhere (an s3:// object); `path` then names it."""
    text = Path(path).read_text(encoding="utf-8") if text is None else text
    problems, queries, lines, normalised = [], [], [], []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError as error:
            problems.append(f"{path}:{number}: malformed JSON ({error})")
            continue
        if not isinstance(raw, dict):
            problems.append(f"{path}:{number}: expected a JSON object, found {type(raw).__name__}")
            continue
        try:
            query = Query.model_validate(raw)
        except ValidationError as error:
            problems += [f"{path}:{number}: {_describe(e)}" for e in error.errors()]
            continue
        if query.query_id in first_line:
            problems.append(f"{path}:{number}: query_id {query.query_id!r} repeats line {first_line[query.query_id]}")
            continue
        first_line[query.query_id] = number
        if query._target_normalised:
            normalised.append(number)
        queries.append(query.model_dump())
        lines.append(number)
    if not queries and not problems:
        problems.append(f"{path}: no queries")
    if problems:
        raise QueryFileError(path, problems)
    notes = (
        [
            f"{len(normalised)} target(s) lacked the leading space their prompt needs; a space was prepended "
            f"(lines {_some(normalised)})"
        ]
        if normalised
        else []
    )
    return QueryFile(queries, lines, notes)


def read_queries(path: Path) -> list[dict]:
    """The validated queries of a file (see `load_queries`)."""
    return load_queries(path).queries


def _some(numbers: list, shown: int = 8) -> str:
    return ", ".join(map(str, numbers[:shown])) + (f", ... ({len(numbers)} in all)" if len(numbers) > shown else "")


def check_targets(queries: list[dict], tokenizer) -> tuple[list[tuple[int, str]], list[str]]:
    """(refused: [(index, reason)], warnings) of queries against a Hugging Face tokenizer.

    Refused: a target that encodes to nothing, to the unknown token or another special token, or
    that does not decode back to itself (characters the tokenizer drops or rewrites). Warned: a
    target whose tokens after the prompt, in running text, differ from its tokens alone; the model
    is scored on the tokens alone (prompt and target are encoded apart), which it may rarely see.
    """
    special = set(tokenizer.all_special_ids)
    refused, split_differently = [], []
    for index, query in enumerate(queries):
        target = query["target"]
        ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        if not ids:
            refused.append((index, f"target {target!r} encodes to no tokens"))
            continue
        if special & set(ids):
            names = sorted({tokenizer.convert_ids_to_tokens(i) for i in ids if i in special})
            refused.append(
                (
                    index,
                    f"target {target!r} encodes to special/unknown token(s) {names}: the tokenizer cannot represent it",
                )
            )
            continue
        decoded = tokenizer.decode(ids)
        if decoded.strip() != target.strip():
            refused.append((index, f"target {target!r} decodes back as {decoded!r}: the tokenizer cannot encode it"))
            continue
        prompt_ids = tokenizer(query["prompt0"], add_special_tokens=False)["input_ids"]
        joint = tokenizer(query["prompt0"] + target, add_special_tokens=False)["input_ids"]
        if joint != prompt_ids + ids:
            split_differently.append(query["query_id"])
    warnings = []
    if split_differently:
        warnings.append(
            f"{len(split_differently)} target(s) split differently after their prompt than alone "
            f"(queries {_some(split_differently)}); they are scored on the tokens alone"
        )
    return refused, warnings
