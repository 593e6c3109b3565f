"""LDS (linear datamodeling score): do a method's scores predict what retraining without documents does?

A small fact world of its own (`--facts-per-bucket`, default 8: ~1,300 documents, 40 queries) in a
lake under `--out`, and a model trained on all of it with the project's recipe (`demo.train_model`,
DeepSpeed). From that full-data model every method scores every training chunk for every query:
- ours: extract (optimizer-corrected `auto` and plain `none`, plus one extraction per extra
  `--normalizers` kind) and a Hessian fit per extraction, then the full score matrix in memory with
  the score job's own per-method matrices (`jobs.score.method_blocks`): TrackStar, its ablations
  (-no-optimizer, -no-hessian, -no-mixing, -no-unit-norm), TRAK-style, grad-dot, grad-cos, and
  `trackstar[<kind>]` for each extra normaliser;
- bergson 2.5.1's `trackstar` on the same checkpoint, chunks and queries (`bench.bergson_compare`;
  its venv from `make bench-setup`, or `$BERGSON_VENV`).
A document's score is the sum of its chunks' (documents here are one chunk each, almost always).

Then `--subsets` random halves of the documents (seeded), a model retrained on each from the same
initialisation, and each query's log p(target | prompt) under it (the evaluation's definition:
`TailPatcher.target_log_probs` on the queries' [eos] + prompt0, target). A method predicts the
subset's effect on query q as Σ_{d∈S} score(q, d); LDS(q) is the Spearman correlation over the
subsets between predicted and actual log p; printed per method as the mean over queries with a
bootstrap 95% CI over queries, and the paired difference TrackStar − bergson.

The subset models are trained in this process, not by DeepSpeed ranks: the same model config and
initialisation (`train_model.build_model` after `torch.manual_seed(seed)`), tokenizer (the full
run's), block packing, step count, per-epoch shuffles (`train_model.step_rows`), AdamW and
warm-up-cosine schedule (built from `train_model.deepspeed_config`, DeepSpeed's own scheduler
class) and gradient clipping. What differs: one process computes the mean loss of the step's
micro_batch × ranks blocks at once where the ranks average their micro-batches' gradients (the
same value: every block has `context` tokens), without ZeRO's partitioning, so sums round
differently; no checkpoint is written. A retraining on every document (`all`) is run as well and
its log-probs compared with the DeepSpeed model's, which measures that difference.

Each subset model's log-probs are cached under `<out>/subsets/` (keyed by the training input and
the subset), so a rerun that changes only the scoring (`--normalizers`, `--queries`) retrains nothing.

    BERGSON_VENV=.bergson-venv python bench/lds.py [--subsets 24] [--queries 40] [--out reports/bench/lds]
        [--normalizers adam-exact ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.projection_fidelity import spearman  # noqa: E402
from infra.lake import Lake  # noqa: E402

BERGSON = "bergson-trackstar"
REFERENCE = "trackstar"
BOOTSTRAP_SAMPLES = 2000


# ----------------------------------------------------------------------------- LDS arithmetic


def lds_per_query(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Spearman over the subsets (rows) of predicted vs actual, per query (column); NaN where
    either side is constant (no ranking to compare)."""
    values = []
    for q in range(predicted.shape[1]):
        p, a = predicted[:, q], actual[:, q]
        constant = np.ptp(p) == 0 or np.ptp(a) == 0
        values.append(np.nan if constant else spearman(torch.from_numpy(p), torch.from_numpy(a)))
    return np.array(values)


def bootstrap_mean(values: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of the mean over resampled queries) of the finite values."""
    values = values[np.isfinite(values)]
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def predicted_effects(doc_scores: np.ndarray, membership: np.ndarray) -> np.ndarray:
    """[subsets, queries]: Σ over each subset's documents of their scores. doc_scores [queries,
    documents], membership [subsets, documents] of 0/1."""
    return membership @ doc_scores.T


# ----------------------------------------------------------------------------- the world and its model


def build_world(lake: Path, facts_per_bucket: int, partitions: int) -> dict:
    """The world, the full-data model (DeepSpeed), tokens and queries; each step kept if done.
    Returns the training summary."""
    from demo import train_model, world
    from jobs import register_queries, tokenize

    if not (lake / "world" / "queries.jsonl").exists():
        world.run(world.WorldConfig(out_dir=str(lake), facts_per_bucket=facts_per_bucket, n_partitions=partitions))
    summary = train_model.run(train_model.TrainConfig(lake=str(lake)))
    if not Lake(lake).exists("tokens"):
        tokenize.run(tokenize.TokenizeConfig(lake=str(lake)))
    if not Lake(lake).exists("queries"):
        register_queries.run(str(lake))
    return summary


@dataclass
class Corpus:
    """The lake's training data as the scorers and the retrainings see it."""

    doc_ids: list  # documents in the raw partitions' order (the order training reads them)
    texts: list
    chunk_docs: np.ndarray  # per row of `tokens`, the index of its document in doc_ids
    tokens: object  # the `tokens` table (pyarrow)


def read_corpus(lake: Path) -> Corpus:
    from demo.world import generated_texts

    texts = generated_texts(lake / "raw")
    tokens = Lake(lake).read("tokens")
    position = {doc: i for i, doc in enumerate(texts)}
    return Corpus(
        list(texts), list(texts.values()), np.array([position[d] for d in tokens["doc_id"].to_pylist()]), tokens
    )


def document_scores(chunk_scores: np.ndarray, chunk_docs: np.ndarray, n_documents: int) -> np.ndarray:
    """[queries, documents]: each document's chunks' scores summed (chunk_scores [queries, chunks])."""
    out = np.zeros((chunk_scores.shape[0], n_documents))
    np.add.at(out.T, chunk_docs, chunk_scores.T)
    return out


# ----------------------------------------------------------------------------- scores of the full-data model


def method_groups(extra_normalizers: list[str]) -> dict:
    """extraction normaliser -> {reported name: score method}."""
    from evaluation.rankings import CORRECTED_METHODS
    from jobs.score import PLAIN_METHODS

    groups = {"auto": {m: m for m in CORRECTED_METHODS}, "none": {m: m for m in PLAIN_METHODS}}
    for kind in extra_normalizers:
        groups.setdefault(kind, {})[f"trackstar[{kind}]"] = "trackstar"
    return groups


def known_normalizers(kinds: list[str]) -> list[str]:
    """The kinds this checkout's extraction knows; the others are named and left out."""
    from gradient_kernels.projection import NORMALIZER_KINDS

    unknown = [k for k in kinds if k not in NORMALIZER_KINDS]
    if unknown:
        print(f"[lds] normaliser(s) {unknown} unknown to jobs/extract.py here (known: {NORMALIZER_KINDS}): skipped")
    return [k for k in kinds if k in NORMALIZER_KINDS]


def our_scores(lake: Path, checkpoint: Path, query_set: str, groups: dict, tokens) -> tuple[list, dict]:
    """(query ids, {method: [queries, chunks] scores in `tokens` row order}) for every method."""
    from jobs import extract

    configs = [
        extract.ExtractConfig(lake=str(lake), checkpoint=str(checkpoint), normalizer=kind, query_set=query_set, ranks=1)
        for kind in groups
    ]
    scores, query_ids = {}, None
    for kind, extraction in zip(groups, extract.run_many(configs)):
        ids, found = fingerprint_scores(Lake(lake), extraction, query_set, groups[kind].values(), tokens)
        if query_ids is not None and ids != query_ids:
            raise ValueError("query order differs between extractions")
        query_ids = ids
        scores |= {name: found[method] for name, method in groups[kind].items()}
    return query_ids, scores


def fingerprint_scores(lake: Lake, extraction: dict, query_set: str, methods, tokens) -> tuple[list, dict]:
    """(query ids, {method: every chunk's score}) of one extraction, under a Hessian fitted in memory
    as the fit-hessian job fits it, scored as the score job's matrices (every chunk, not only the
    top-k the job keeps)."""
    from gradient_kernels.scoring import Preconditioner, prepare
    from jobs import fit_hessian, score
    from schemas.vectors import decode_vectors

    checkpoint_id, fingerprint = extraction["checkpoint_id"], extraction["fingerprint"]
    config = fit_hessian.FitHessianConfig()
    train_sums, query_sums = fit_hessian.extracted_sums(lake, checkpoint_id, fingerprint, query_set)
    # R_train without the outlier chunks, as the fit-hessian job fits it
    train_sums, _ = fit_hessian.without_outliers(lake, checkpoint_id, fingerprint, train_sums, config.outlier_z)
    fitted = fit_hessian.fit(train_sums, query_sums, config)
    query_ids, raw_queries, _ = score.query_vectors(lake, query_set, checkpoint_id, fingerprint, 0)
    rows = lake.read(
        "train_gradients",
        filters=[("checkpoint_id", "=", checkpoint_id), ("fingerprint", "=", fingerprint)],
        columns=["doc_id", "chunk", "vector", "dtype", "scale"],
    )
    position = {key: i for i, key in enumerate(zip(rows["doc_id"].to_pylist(), rows["chunk"].to_pylist()))}
    rows = rows.take([position[key] for key in zip(tokens["doc_id"].to_pylist(), tokens["chunk"].to_pylist())])
    train = torch.from_numpy(decode_vectors(rows["vector"], rows["dtype"][0].as_py(), rows["scale"]))

    def side(vectors, blocks, unit_norm):
        return prepare(vectors, Preconditioner(blocks) if blocks is not None else None, unit_norm)

    found = {}
    for method in methods:
        train_blocks, query_blocks, unit_norm = score.method_blocks(method, fitted.matrices)
        found[method] = (side(raw_queries, query_blocks, unit_norm) @ side(train, train_blocks, unit_norm).T).numpy()
    print(f"[lds] scored {', '.join(methods)} on {fingerprint} ({len(query_ids)} x {train.shape[0]})", flush=True)
    return query_ids, found


def bergson_scores(out: Path, checkpoint: Path, queries: list, tokens) -> np.ndarray | None:
    """[queries, chunks] of bergson's trackstar (cached in `out`), None without its venv."""
    from bench import bergson_compare

    if not (bergson_compare.BERGSON_VENV / ".installed").exists():
        print(f"[lds] no bergson venv at {bergson_compare.BERGSON_VENV} (`make bench-setup`): bergson left out")
        return None
    key = hashlib.sha256(f"{checkpoint.name} {[q['query_id'] for q in queries]} {tokens.num_rows}".encode())
    cached = out / f"bergson-{key.hexdigest()[:12]}.npy"
    if not cached.exists():
        folder = out / "bergson"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        context = json.loads((checkpoint / "config.json").read_text())["n_positions"]
        seconds, scores = bergson_compare.run_bergson(
            bergson_compare.bergson_inputs(folder, checkpoint, queries, tokens), checkpoint, context, seed=0
        )
        print(f"[lds] bergson trackstar: {seconds:.0f}s", flush=True)
        np.save(cached, scores.T)
        shutil.rmtree(folder)
    return np.load(cached)


# ----------------------------------------------------------------------------- retraining on subsets


def plan_config(lake: Path):
    """The full run's TrainConfig, as its plan recorded it."""
    from demo.train_model import TrainConfig

    plan = json.loads((lake / "model" / "plan.json").read_text())
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in plan["config"].items() if k in names})


def retrain(config, tokenizer, texts: list[str]):
    """A model trained in this process on `texts` with the full run's recipe (see the docstring)."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from demo import train_model

    blocks, _ = train_model.pack_blocks(tokenizer, texts, config.context)
    blocks = blocks.long()
    total_steps = train_model.step_count(config, len(blocks))
    recipe = train_model.deepspeed_config(config, total_steps)
    torch.manual_seed(config.seed)
    model = train_model.build_model(config, len(tokenizer)).train()
    if config.optimizer == "adam":
        params = {k: v for k, v in recipe["optimizer"]["params"].items() if k != "torch_adam"}
        optimizer = torch.optim.AdamW(model.parameters(), **params | {"betas": tuple(params["betas"])})
    else:
        optimizer = torch.optim.Adafactor(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = WarmupCosineLR(optimizer, **recipe["scheduler"]["params"])
    per_step = config.micro_batch * config.ranks
    for _, rows in train_model.step_rows(len(blocks), total_steps, per_step, config.seed):
        model(input_ids=blocks[rows], labels=blocks[rows]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["gradient_clipping"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    return model.eval()


def query_log_probs(model, tokenizer, queries: list) -> list[float]:
    """log p(target | [eos] + prompt0) of each query under `model`, as the evaluation measures it."""
    from bench.bergson_compare import query_ids_and_labels
    from gradient_kernels.losses import query_batch
    from gradient_kernels.tail_patch import SGDStep, TailPatcher

    prompts, targets = [], []
    for query in queries:
        ids, labels = query_ids_and_labels(tokenizer, query)
        cut = sum(1 for label in labels if label == -100)
        prompts.append(ids[:cut])
        targets.append(ids[cut:])
    batch = query_batch(prompts, targets, tokenizer.eos_token_id)
    return TailPatcher(model, SGDStep(), 0.0).target_log_probs(batch).tolist()


def random_halves(n_documents: int, n_subsets: int, seed: int = 0) -> np.ndarray:
    """[subsets, documents] 0/1: each row a uniformly random half of the documents."""
    rng = np.random.default_rng(seed)
    membership = np.zeros((n_subsets, n_documents))
    for row in membership:
        row[rng.permutation(n_documents)[: n_documents // 2]] = 1
    return membership


def subset_log_probs(cache: Path, digest: str, name: str, train) -> dict:
    """{query id: log p} of the model `train()` returns, cached under `cache` by `digest`."""
    path = cache / f"{name}-{digest[:16]}.json"
    if path.exists():
        return json.loads(path.read_text())["log_probs"]
    started = time.perf_counter()
    log_probs = train()
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seconds": time.perf_counter() - started, "log_probs": log_probs}))
    print(f"[lds] {name}: trained and measured in {time.perf_counter() - started:.0f}s", flush=True)
    return log_probs


def actual_log_probs(lake: Path, out: Path, corpus: Corpus, membership: np.ndarray, queries: list) -> dict:
    """{'all': {query: log p}, 0: ..., 1: ...}: every world query's log p under the retrained models."""
    from transformers import AutoTokenizer

    config = plan_config(lake)
    tokenizer = AutoTokenizer.from_pretrained(lake / "model" / "tokenizer")
    base = json.loads((lake / "model" / "train_summary.json").read_text())["input_digest"]

    def measured(texts):
        model = retrain(config, tokenizer, texts)
        return dict(zip([q["query_id"] for q in queries], query_log_probs(model, tokenizer, queries)))

    found = {"all": subset_log_probs(out / "subsets", base, "all", lambda: measured(corpus.texts))}
    for i, row in enumerate(membership):
        chosen = [t for t, keep in zip(corpus.texts, row) if keep]
        digest = hashlib.sha256((base + " " + ",".join(np.flatnonzero(row).astype(str))).encode()).hexdigest()
        found[i] = subset_log_probs(out / "subsets", digest, f"subset{i:03d}", lambda chosen=chosen: measured(chosen))
    return found


def recipe_check(lake: Path, checkpoint: Path, queries: list, retrained: dict) -> dict:
    """How the in-process retraining on every document differs from the DeepSpeed model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    deepspeed = np.array(query_log_probs(model, AutoTokenizer.from_pretrained(checkpoint), queries))
    ours = np.array([retrained[q["query_id"]] for q in queries])
    return {
        "max_abs_diff": float(np.abs(deepspeed - ours).max()),
        "mean_deepspeed": float(deepspeed.mean()),
        "mean_in_process": float(ours.mean()),
        "spearman": spearman(torch.from_numpy(deepspeed), torch.from_numpy(ours)),
    }


# ----------------------------------------------------------------------------- report


def summarise(lds: dict) -> dict:
    """method -> mean LDS and CI; plus the paired TrackStar − bergson difference."""
    summary = {m: dict(zip(("mean", "low", "high"), bootstrap_mean(v))) for m, v in lds.items()}
    if BERGSON in lds:
        summary[f"{REFERENCE} − {BERGSON}"] = dict(
            zip(("mean", "low", "high"), bootstrap_mean(lds[REFERENCE] - lds[BERGSON]))
        )
    return summary


def report(out: Path, summary: dict, details: dict) -> None:
    print(f"\n{'method':<36} {'LDS':>7} {'95% CI':>18}")
    for method, cell in summary.items():
        print(f"{method:<36} {cell['mean']:7.3f} [{cell['low']:7.3f}, {cell['high']:7.3f}]")
    (out / "lds.json").write_text(json.dumps({"summary": summary, **details}, indent=2))
    figure = plot(out, {m: c for m, c in summary.items() if "−" not in m})
    difference = summary.get(f"{REFERENCE} − {BERGSON}")
    if difference:
        met = "met" if difference["mean"] >= 0 else "not met"
        print(f"aim: LDS TrackStar − bergson TrackStar ≥ 0: measured {difference['mean']:+.3f} ({met})")
    print(f"written: {out / 'lds.json'}, {figure}")


def plot(out: Path, summary: dict) -> Path:
    """lds.png (bars with their CIs), or lds.html (a table) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        cells = "".join(
            f"<tr><td>{m}</td><td>{c['mean']:.3f}</td><td>[{c['low']:.3f}, {c['high']:.3f}]</td></tr>"
            for m, c in summary.items()
        )
        (out / "lds.html").write_text(f"<table><tr><th>method</th><th>LDS</th><th>95% CI</th></tr>{cells}</table>")
        return out / "lds.html"

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    means = [summary[m]["mean"] for m in names]
    errors = [
        [m - summary[n]["low"] for n, m in zip(names, means)],
        [summary[n]["high"] - m for n, m in zip(names, means)],
    ]
    figure, axes = plt.subplots(figsize=(8, 0.4 * len(names) + 1.2))
    axes.barh(names, means, xerr=errors, color="tab:blue", ecolor="black", capsize=3)
    axes.axvline(0, color="grey", linewidth=0.8)
    axes.invert_yaxis()
    axes.set_xlabel("LDS: mean Spearman over subsets (95% bootstrap CI over queries)")
    figure.tight_layout()
    figure.savefig(out / "lds.png", dpi=120)
    plt.close(figure)
    return out / "lds.png"


# ----------------------------------------------------------------------------- main


def chosen_queries(lake: Path, n: int | None) -> tuple[str, list]:
    """(query set, its queries) — a bucket-stratified sample of n when n is given."""
    from evaluation.tail_patching import stratified_sample

    tables = Lake(lake)
    query_set = tables.read("query_sets")["query_set"][0].as_py()
    rows = {q["query_id"]: q for q in tables.read("queries", filters=[("query_set", "=", query_set)]).to_pylist()}
    ids = sorted(rows) if not n or n >= len(rows) else stratified_sample(rows, n, seed=0)
    return query_set, [rows[q] for q in ids]


def main():
    from jobs.catalog import checkpoint_uri

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=24)
    parser.add_argument("--queries", type=int, default=None, help="a stratified sample of the queries (default all)")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/lds"))
    parser.add_argument("--facts-per-bucket", type=int, default=8)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument(
        "--normalizers", nargs="*", default=[], help="extra TrackStar variants by extraction normaliser"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random halves")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(1)
    lake = (args.out / "lake").resolve()
    build_world(lake, args.facts_per_bucket, args.partitions)
    checkpoint = Path(checkpoint_uri(Lake(lake), ""))
    corpus = read_corpus(lake)
    query_set, queries = chosen_queries(lake, args.queries)
    query_ids, chunk_scores = our_scores(
        lake, checkpoint, query_set, method_groups(known_normalizers(args.normalizers)), corpus.tokens
    )
    by_id = {q["query_id"]: q for q in queries}
    rows = [query_ids.index(q) for q in by_id]
    chunk_scores = {m: s[rows] for m, s in chunk_scores.items()}
    external = bergson_scores(args.out, checkpoint, queries, corpus.tokens)
    if external is not None:
        chunk_scores[BERGSON] = external
    membership = random_halves(len(corpus.doc_ids), args.subsets, args.seed)
    _, all_queries = chosen_queries(lake, None)
    measured = actual_log_probs(lake, args.out, corpus, membership, all_queries)
    actual = np.array([[measured[i][q] for q in by_id] for i in range(args.subsets)])
    lds = {
        m: lds_per_query(
            predicted_effects(document_scores(s, corpus.chunk_docs, len(corpus.doc_ids)), membership), actual
        )
        for m, s in chunk_scores.items()
    }
    details = {
        "subsets": args.subsets,
        "queries": list(by_id),
        "documents": len(corpus.doc_ids),
        "chunks": corpus.tokens.num_rows,
        "lds_per_query": {m: v.tolist() for m, v in lds.items()},
        "recipe_check": recipe_check(lake, checkpoint, queries, measured["all"]),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(
        f"[lds] {args.subsets} subsets x {len(by_id)} queries, {len(corpus.doc_ids)} documents; in-process vs "
        f"DeepSpeed full-data model: {details['recipe_check']}; {details['wall_seconds']}s"
    )
    report(args.out, summarise(lds), details)


if __name__ == "__main__":
    main()
