"""The tail-patch: one optimizer step on a proponent, and how much it raises the target's
log-probability, for a bucket-stratified sample of the queries (`gradient_kernels.tail_patch`
takes the steps)."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from infra.lake import Lake
from schemas.tables import TABLES

# the step size of a tail-patch on a checkpoint that records no learning rate (one trained elsewhere)
DEFAULT_TAIL_PATCH_LR = 1e-3


@dataclass
class TailPatches:
    """What the tail-patch of a sample of queries measured."""

    sample: list[str]  # the queries patched
    base: dict  # query -> log p(target | prompt) before any step
    changes: dict  # (query, doc) -> Δ log p after one step on the doc
    step: str  # the step rule and learning rate, in words


def stratified_sample(queries: dict, n: int, seed: int) -> list[str]:
    by_bucket = defaultdict(list)
    for query_id, query in sorted(queries.items()):
        by_bucket[query["frequency_bucket"]].append(query_id)
    rng, per_bucket = random.Random(seed), max(1, n // len(by_bucket))
    return sorted(q for ids in by_bucket.values() for q in rng.sample(ids, min(per_bucket, len(ids))))


def tail_patch_step(checkpoint_dir: Path, manifest: dict, learning_rate: float | None) -> tuple[object, float, str]:
    """(step rule, learning rate, a line saying which): the checkpoint's optimizer with its state
    and learning rate, or plain SGD where it has no state (a model trained elsewhere)."""
    from gradient_kernels.tail_patch import optimizer_step
    from jobs.checkpoints import load_second_moments, optimizer_state_source

    source = optimizer_state_source(checkpoint_dir)
    lr = learning_rate or manifest.get("lr") or DEFAULT_TAIL_PATCH_LR
    if source is None:
        return optimizer_step(None), float(lr), f"SGD at lr {float(lr):g}: the checkpoint has no optimizer state"
    state = load_second_moments(checkpoint_dir)
    return optimizer_step(state), float(lr), f"{state['kind']} with the {source} optimizer state, lr {float(lr):g}"


def tail_patch(
    lake: Lake, checkpoint_dir: Path, rule, learning_rate: float, ranked: dict, queries: dict, sample: list[str]
) -> tuple[dict, dict]:
    """({query: log p(target | prompt) before any step}, {(query, doc): Δ log p} of every pair of a
    sampled query and one of its proponents under any method)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradient_kernels.tail_patch import TailPatcher
    from jobs.progress import Progress

    # eager attention: vmap has no batching rule for the CPU flash kernel (it falls back to a loop, warning)
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    patcher = TailPatcher(model, rule, learning_rate)
    eos = tokenizer.eos_token_id
    prompts = {q: [eos] + tokenizer(queries[q]["prompt0"], add_special_tokens=False)["input_ids"] for q in sample}
    targets = {q: tokenizer(queries[q]["target"], add_special_tokens=False)["input_ids"] for q in sample}
    pairs = {(q, doc) for per_query in ranked.values() for q in sample for doc in per_query.get(q, [])}
    tokens = lake.read(
        "tokens",
        filters=[("doc_id", "in", sorted({d for _, d in pairs})), ("chunk", "=", 0)],
        columns=["doc_id", "input_ids"],
    )
    documents = dict(zip(tokens["doc_id"].to_pylist(), tokens["input_ids"].to_pylist()))
    pairs = sorted(p for p in pairs if p[1] in documents)
    progress = Progress("evaluate tail-patch", len(pairs), unit="pairs")
    return patcher.log_prob_changes(documents, pairs, prompts, targets, on_step=progress.update)


def write_tail_patches(lake: Lake, query_set: str, checkpoint_id: str, changes: dict, run_id: str) -> None:
    """Every measured (query, proponent) effect, so the explorer can show it next to the proponent."""
    rows = [
        {
            "query_set": query_set,
            "checkpoint_id": checkpoint_id,
            "query_id": q,
            "doc_id": d,
            "delta_log_prob": v,
            "run_id": run_id,
        }
        for (q, d), v in sorted(changes.items())
    ]
    lake.replace_slice(
        "tail_patches",
        pa.Table.from_pylist(rows, schema=TABLES["tail_patches"].arrow_schema),
        query_set=query_set,
        checkpoint_id=checkpoint_id,
    )
