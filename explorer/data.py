"""What the explorer's pages show, read from the lake's Delta tables on every request (delta-rs;
nothing is copied): checkpoints, queries, proponents, tail-patch results, the model's predictions,
and new prompts traced with the model, tokenizer and preconditioner kept loaded between requests."""

from __future__ import annotations

import functools
import threading
from collections import defaultdict

from infra.lake import Lake
from infra.config import load_config
from infra import layout
from jobs import catalog


class BadRequest(ValueError):
    """A parameter the page cannot use: answered with 400 and the message."""


class Explorer:
    def __init__(self, lake_root: str):
        self.lake = Lake(lake_root)
        # one gradient computation at a time: a tracer's projector keeps per-call state in its model's hooks
        self.tracing = threading.Lock()

    def checkpoints(self) -> list[str]:
        """The scored checkpoints, lowest step first (the last one is the latest: `jobs.catalog`)."""
        scored = set(self.lake.read("proponents", columns=["checkpoint_id"])["checkpoint_id"].to_pylist())
        return [c for c in catalog.checkpoint_ids_by_step(self.lake) if c in scored]

    def checkpoint(self, requested: str | None) -> str:
        known = self.checkpoints()
        if not known:
            raise LookupError("no proponents in this lake yet: run `make run` (or the score job) first")
        if requested and requested not in known:
            raise BadRequest(f"unknown checkpoint {requested!r}; indexed: {', '.join(known)}")
        return requested or known[-1]

    def methods(self, checkpoint: str) -> list[str]:
        rows = self.lake.read("proponents", filters=[("checkpoint_id", "=", checkpoint)], columns=["method"])
        return sorted(set(rows["method"].to_pylist()))

    def queries(self) -> dict:
        return {q["query_id"]: q for q in self.lake.read("queries").to_pylist()}

    def query_set(self, requested: str | None) -> str:
        """The query set whose preconditioner a new query is traced with (default: fact-world, or the first)."""
        known = sorted(set(self.lake.read("queries", columns=["query_set"])["query_set"].to_pylist()))
        if requested and requested not in known:
            raise BadRequest(f"unknown query set {requested!r}; registered: {', '.join(known)}")
        if not known:
            raise LookupError("no queries registered in this lake yet")
        default = load_config().query_set
        return requested or (default if default in known else known[0])

    def ranked(self, checkpoint: str, query_ids=None) -> dict:
        """method -> query -> [proponent rows by rank]."""
        filters = [("checkpoint_id", "=", checkpoint)]
        if query_ids is not None:
            filters.append(("query_id", "in", sorted(query_ids)))
        out = defaultdict(lambda: defaultdict(list))
        for row in sorted(self.lake.read("proponents", filters=filters).to_pylist(), key=lambda r: r["rank"]):
            out[row["method"]][row["query_id"]].append(row)
        return out

    def tail_patches(self, checkpoint: str, query_id: str) -> dict:
        """doc_id -> measured Δ log p(target) of one step on it (evaluation sample only)."""
        rows = self.lake.read(
            "tail_patches",
            filters=[("checkpoint_id", "=", checkpoint), ("query_id", "=", query_id)],
            columns=["doc_id", "delta_log_prob"],
        )
        return dict(zip(rows["doc_id"].to_pylist(), rows["delta_log_prob"].to_pylist()))

    @functools.cached_property
    def categorizer(self):
        from evaluation.categories import Categorizer

        return Categorizer(layout.world(self.lake.root))

    def texts(self, doc_ids) -> dict:
        rows = self.lake.read("documents", filters=[("doc_id", "in", sorted(set(doc_ids)))], columns=["doc_id", "text"])
        return dict(zip(rows["doc_id"].to_pylist(), rows["text"].to_pylist()))

    @functools.lru_cache(maxsize=4)
    def predictions(self, checkpoint: str) -> dict:
        """query -> (correct, probability of the target, predicted text) under greedy decoding of prompt0."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evaluation.answers import greedy_answers
        from jobs.catalog import checkpoint_folder

        directory = checkpoint_folder(self.lake, checkpoint)
        model, tokenizer = (
            AutoModelForCausalLM.from_pretrained(directory).eval(),
            AutoTokenizer.from_pretrained(directory),
        )
        queries = sorted(self.queries().values(), key=lambda q: q["query_id"])
        answers = greedy_answers(model, tokenizer, [(q["prompt0"], q["target"]) for q in queries])
        return {q["query_id"]: tuple(answer) for q, answer in zip(queries, answers)}

    @functools.lru_cache(maxsize=4)
    def tracer(self, checkpoint: str, query_set: str):
        from explorer.trace import TraceContext

        return TraceContext(self.lake, checkpoint, query_set)

    @functools.lru_cache(maxsize=256)
    def heat_map(self, checkpoint: str, query_set: str, query_id: str, doc_id: str, chunk: int):
        """[(token text, contribution)] of one proponent chunk to its TrackStar score."""
        with self.tracing:
            tracer = self.tracer(checkpoint, query_set)
            return tracer.token_contributions(tracer.stored_query_vector(query_id), doc_id, chunk)

    def warm(self):
        """Load the latest checkpoint's model, tokenizer and preconditioner before the first trace asks."""
        try:
            checkpoint, query_set = self.checkpoint(None), self.query_set(None)
            with self.tracing:
                tracer = self.tracer(checkpoint, query_set)
                tracer.projector, tracer.preconditioner
        except Exception as error:  # a lake not scored yet, say: the pages tell why when asked
            print(f"[explore] nothing loaded ahead of the first trace: {error}")

    def trace(self, checkpoint: str, query_set: str, prompt: str, target: str | None, k: int):
        """(target, [proponent rows with their token contributions]) of a new prompt, as `jobs trace`
        scores it; without a target, the model's own continuation is traced."""
        with self.tracing:
            tracer = self.tracer(checkpoint, query_set)  # kept: model, tokenizer and R^(-1/2) stay loaded
            try:
                target = target or tracer.greedy_target(prompt)
                query = tracer.query_vector(prompt, target)
            except ValueError as error:  # longer than the model reads, or nothing to trace
                raise BadRequest(str(error)) from None
            try:
                top = tracer.top_k(query, k)
            except StopIteration:  # no training vectors of this checkpoint at all
                top = []
            for row in top:
                row["tokens"] = tracer.token_contributions(query, row["doc_id"], row["chunk"])
        return target, top


def metrics(ranked: dict, queries: dict, query_ids) -> dict:
    """method -> (MRR, recall@10, n) over the given queries that have stating documents and proponents,
    computed as the evaluation computes them (`evaluation.metrics.attribution_metrics`)."""
    from evaluation.metrics import attribution_metrics

    truth = {q: set(queries[q]["stating_doc_ids"] or ()) for q in query_ids}
    docs = {
        method: {q: [r["doc_id"] for r in per_query[q]] for q in query_ids if truth[q] and per_query.get(q)}
        for method, per_query in sorted(ranked.items())
    }
    docs = {method: per_query for method, per_query in docs.items() if per_query}
    k = max((len(d) for per_query in docs.values() for d in per_query.values()), default=1)
    buckets = {q: queries[q]["frequency_bucket"] for q in query_ids}
    return {
        method: (cells["all"]["mrr"], cells["all"]["recall@10"], cells["all"]["n"])
        for method, cells in attribution_metrics(docs, truth, buckets, k).items()
    }
