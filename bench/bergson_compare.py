"""Ours against bergson 2.5.1 (the only open TrackStar) on the same model, chunks and queries.

On the lake of `make run`: a sample of queries (prompt 0) and a corpus of chunks (every chunk of
their stating documents plus random others) is scored end to end by both:
- bergson: `bergson trackstar` in its own venv (`make bench-setup`), on the same token ids (the
  queries' loss on the target tokens only, as ours), the checkpoint's Adam second moments
  (bias-corrected, in torch's optimizer.pt layout), projection 16 per side, unit norm;
- ours: extract (1 CPU rank) + fit-hessian + score, in a scratch lake, projection seeds 0 and 1.
Both with OMP_NUM_THREADS=1, alternated (bergson, ours seed 0, ours seed 1, bergson again; the
faster of each pair counts: the CPU is shared). Printed: our extraction time ÷ bergson's end to
end, our whole run ÷ bergson's; MRR and recall@10 of each against the stating documents;
per-query agreement of bergson's ranking with ours (top-10 overlap, Spearman over every chunk),
read against the agreement of our own two projection seeds (what projection noise alone gives).

    python bench/bergson_compare.py [--lake lake] [--queries 40] [--chunks 600]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import torch  # noqa: E402

from bench.common import busy_process, latest_checkpoint  # noqa: E402
from infra.lake import Lake  # noqa: E402

BERGSON_VENV = Path(os.environ.get("BERGSON_VENV", Path(__file__).resolve().parents[1] / ".bergson-venv"))
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def sample(lake: Lake, n_queries: int, n_chunks: int, seed: int = 0):
    """(queries, tokens rows): queries whose facts are stated, every chunk of their stating documents, random others."""
    rng = random.Random(seed)
    queries = [q for q in lake.read("queries").to_pylist() if q["stating_doc_ids"]]
    queries = sorted(rng.sample(queries, min(n_queries, len(queries))), key=lambda q: q["query_id"])
    tokens = lake.read("tokens")
    stating = {d for q in queries for d in q["stating_doc_ids"]}
    doc_ids = tokens["doc_id"].to_pylist()
    chosen = [i for i, d in enumerate(doc_ids) if d in stating]
    others = [i for i, d in enumerate(doc_ids) if d not in stating]
    chosen += rng.sample(others, max(0, min(len(others), n_chunks - len(chosen))))
    return queries, tokens.take(sorted(chosen))


def query_ids_and_labels(tokenizer, query: dict) -> tuple[list[int], list[int]]:
    """The query as our extraction feeds it ([eos] + prompt0 + target; loss on the target only)."""
    prompt = [tokenizer.eos_token_id] + tokenizer(query["prompt0"], add_special_tokens=False)["input_ids"]
    target = tokenizer(query["target"], add_special_tokens=False)["input_ids"]
    return prompt + target, [-100] * len(prompt) + target


def bergson_inputs(folder: Path, checkpoint: Path, queries: list, tokens: pa.Table) -> Path:
    """train.jsonl, query.jsonl (pre-tokenized) and optimizer.pt for bergson; returns the folder."""
    from transformers import AutoTokenizer

    from jobs.checkpoints import load_second_moments

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with open(folder / "train.jsonl", "w") as fh:
        for ids in tokens["input_ids"].to_pylist():
            fh.write(json.dumps({"input_ids": ids}) + "\n")
    with open(folder / "query.jsonl", "w") as fh:
        for query in queries:
            ids, labels = query_ids_and_labels(tokenizer, query)
            fh.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")
    moments = load_second_moments(checkpoint)
    correction = 1 - moments["betas"][1] ** moments["step"]  # bergson divides by sqrt(v) + eps: give it v̂
    names = sorted(moments["state"])
    torch.save(
        {
            "state": {
                i: {"exp_avg_sq": moments["state"][name]["exp_avg_sq"] / correction, "param_name": name}
                for i, name in enumerate(names)
            },
            "param_groups": [{"params": list(range(len(names))), "eps": moments["eps"]}],
        },
        folder / "optimizer.pt",
    )
    return folder


def run_bergson(folder: Path, checkpoint: Path, context: int, seed: int) -> tuple[float, np.ndarray]:
    """(seconds end to end, scores [chunks, queries]) of `bergson trackstar`."""
    run = folder / "run"
    command = [
        str(BERGSON_VENV / "bin" / "bergson"),
        "trackstar",
        str(run),
        "--model",
        str(checkpoint),
        "--data.dataset",
        str(folder / "train.jsonl"),
        "--query.dataset",
        str(folder / "query.jsonl"),
        "--projection_dim",
        "16",
        "--projection_type",
        "normal",
        "--projection_seed",
        str(seed),
        "--unit_normalize",
        "true",
        "--token_batch_size",
        str(context),
        "--optimizer_state",
        str(folder),
        "--precision",
        "fp32",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(
            f"bergson trackstar failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    reader = (
        "import sys, numpy as np; from pathlib import Path; from bergson.data import load_scores; "
        "s = load_scores(Path(sys.argv[1])); np.save(sys.argv[2], np.asarray(s[:], dtype=np.float32))"
    )
    subprocess.run(
        [str(BERGSON_VENV / "bin" / "python"), "-c", reader, str(run / "scores"), str(folder / "scores.npy")],
        env=ENV,
        check=True,
    )
    return seconds, np.load(folder / "scores.npy")


def run_ours(source: Lake, folder: Path, checkpoint: Path, queries: list, tokens: pa.Table, seed: int):
    """({stage: seconds}, scores [chunks, queries]) of extract + fit-hessian + score in a scratch lake."""
    from gradient_kernels.scoring import Preconditioner, prepare
    from jobs import catalog, extract, fit_hessian, score
    from jobs.score import query_vectors
    from schemas.vectors import decode_vectors

    lake = Lake(folder / f"lake-seed{seed}")
    for partition in sorted(set(tokens["partition"].to_pylist())):
        lake.replace_slice("tokens", tokens.filter(pc.equal(tokens["partition"], partition)), partition=partition)
    query_set = source.read("query_sets").to_pylist()[0]
    lake.replace_slice(
        "query_sets",
        pa.Table.from_pylist([query_set], schema=source.read("query_sets").schema),
        query_set=query_set["query_set"],
    )
    lake.replace_slice(
        "queries", pa.Table.from_pylist(queries, schema=source.read("queries").schema), query_set=query_set["query_set"]
    )
    seconds = {}
    started = time.perf_counter()
    extracted = extract.run(
        extract.ExtractConfig(
            lake=lake.root, checkpoint=str(checkpoint), ranks=1, projection_seed=seed, query_set=query_set["query_set"]
        )
    )
    seconds["extract"] = time.perf_counter() - started
    started = time.perf_counter()
    fit_hessian.run(fit_hessian.FitHessianConfig(lake=lake.root, query_set=query_set["query_set"]))
    seconds["fit-hessian"] = time.perf_counter() - started
    started = time.perf_counter()
    score.run(score.ScoreConfig(lake=lake.root, query_set=query_set["query_set"], methods=["trackstar"]))
    seconds["score"] = time.perf_counter() - started
    # every score, not only the top-k the job keeps: the same Ḡ, computed here in float32
    checkpoint_id, fingerprint = extracted["checkpoint_id"], extracted["fingerprint"]
    blocks, _ = catalog.load_preconditioner(lake, checkpoint_id, query_set["query_set"], fingerprint, "inverse_root")
    ids, raw_queries, _ = query_vectors(lake, query_set["query_set"], checkpoint_id, fingerprint, 0)
    rows = lake.read("train_gradients", columns=["doc_id", "chunk", "vector", "dtype", "scale"])
    position = {key: i for i, key in enumerate(zip(rows["doc_id"].to_pylist(), rows["chunk"].to_pylist()))}
    rows = rows.take([position[key] for key in zip(tokens["doc_id"].to_pylist(), tokens["chunk"].to_pylist())])
    train = prepare(
        torch.from_numpy(decode_vectors(rows["vector"], rows["dtype"][0].as_py(), rows["scale"])),
        Preconditioner(blocks),
    )
    order = [ids.index(q["query_id"]) for q in queries]
    return seconds, (prepare(raw_queries, Preconditioner(blocks))[order] @ train.T).T.numpy()


def metrics(scores: np.ndarray, queries: list, doc_ids: list) -> dict:
    from evaluation.metrics import attribution_metrics

    ranked = {
        q["query_id"]: [doc_ids[i] for i in np.argsort(-scores[:, j], kind="stable")[:10]]
        for j, q in enumerate(queries)
    }
    truth = {q["query_id"]: set(q["stating_doc_ids"]) for q in queries}
    buckets = {q["query_id"]: q["frequency_bucket"] for q in queries}
    return attribution_metrics({"m": ranked}, truth, buckets, 10)["m"]["all"]


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean top-10 overlap, mean Spearman over every chunk) of two [chunks, queries] score matrices."""
    from bench.projection_fidelity import spearman

    overlaps, correlations = [], []
    for j in range(a.shape[1]):
        top_a, top_b = set(np.argsort(-a[:, j])[:10]), set(np.argsort(-b[:, j])[:10])
        overlaps.append(len(top_a & top_b) / 10)
        correlations.append(spearman(torch.from_numpy(a[:, j]), torch.from_numpy(b[:, j])))
    return float(np.mean(overlaps)), float(np.mean(correlations))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lake", default="lake")
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--chunks", type=int, default=600)
    args = parser.parse_args()
    if not (BERGSON_VENV / ".installed").exists():
        print(f"skipped: no bergson venv at {BERGSON_VENV}; create it with `make bench-setup` (bench/setup_bergson.sh)")
        return
    source = Lake(args.lake)
    checkpoint = latest_checkpoint(Path(args.lake)).resolve()
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(checkpoint).n_positions
    queries, tokens = sample(source, args.queries, args.chunks)
    doc_ids = tokens["doc_id"].to_pylist()
    print(
        f"{len(queries)} queries x {tokens.num_rows} chunks ({sum(tokens['n_tokens'].to_pylist()):,} tokens), "
        f"checkpoint {checkpoint.name}; OMP_NUM_THREADS=1",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bergson-compare-") as scratch:
        folder = bergson_inputs(Path(scratch), checkpoint, queries, tokens)
        os.environ["OMP_NUM_THREADS"] = "1"  # ours as bergson: one thread (jobs/threads.py honours it)
        torch.set_num_threads(1)
        idle = timed_runs(folder, source, checkpoint, context, queries, tokens, "idle")
        with busy_process(threads=1):  # one core kept busy, as a concurrent job would
            busy = timed_runs(folder, source, checkpoint, context, queries, tokens, "beside a busy process")
    first_seconds, second_seconds, bergson_scores, ours = idle
    bergson_seconds = min(first_seconds, second_seconds)
    for seed, (stages, _) in ours.items():
        print(f"[ours] seed {seed}: " + ", ".join(f"{stage} {s:.1f}s" for stage, s in stages.items()))
    ours_scores = ours[0][1]
    seconds = {stage: min(ours[0][0][stage], ours[1][0][stage]) for stage in ours[0][0]}
    print(f"\n{'system':<22} {'seconds':>8} {'MRR':>6} {'recall@10':>9}")
    for name, total, scores in (
        ("bergson trackstar", bergson_seconds, bergson_scores),
        ("ours (seed 0)", sum(ours[0][0].values()), ours_scores),
        ("ours (seed 1)", sum(ours[1][0].values()), ours[1][1]),
    ):
        m = metrics(scores, queries, doc_ids)
        print(f"{name:<22} {total:8.1f} {m['mrr']:6.3f} {m['recall@10']:9.3f}")
    seeds_overlap, seeds_spearman = agreement(ours_scores, ours[1][1])
    bergson_overlap, bergson_spearman = agreement(ours_scores, bergson_scores)
    print("\nper-query agreement       top-10 overlap  Spearman")
    print(f"ours seed 0 vs seed 1     {seeds_overlap:14.3f} {seeds_spearman:9.3f}")
    print(f"ours seed 0 vs bergson    {bergson_overlap:14.3f} {bergson_spearman:9.3f}")
    print(f"extraction_vs_bergson={seconds['extract'] / bergson_seconds:.2f} (our extraction ÷ bergson's whole run)")
    print(
        f"end_to_end_vs_bergson={sum(seconds.values()) / bergson_seconds:.2f} (our extract + fit + score ÷ bergson's)"
    )
    busy_bergson = min(busy[0], busy[1])
    busy_ours = min(sum(stages.values()) for stages, _ in busy[3].values())
    print(f"end_to_end_vs_bergson_beside_busy={busy_ours / busy_bergson:.2f} (the same, one core kept busy meanwhile)")
    print(f"aim: our whole run ÷ bergson's ≤ 0.67, idle: measured {sum(seconds.values()) / bergson_seconds:.2f}")
    print(f"aim: our whole run ÷ bergson's ≤ 0.67, beside a busy process: measured {busy_ours / busy_bergson:.2f}")


def timed_runs(folder: Path, source: Lake, checkpoint: Path, context: int, queries: list, tokens: pa.Table, label: str):
    """Alternated: bergson, ours seed 0, ours seed 1, bergson again (the faster of each pair counts).
    Returns (bergson's seconds, again, bergson's scores, {seed: (our stage seconds, our scores)})."""
    shutil.rmtree(folder / "run", ignore_errors=True)
    first, bergson_scores = run_bergson(folder, checkpoint, context, seed=0)
    print(f"[bergson] {label}: trackstar end to end {first:.1f}s", flush=True)
    scratch = folder / label.replace(" ", "-")  # inside the bench's temporary folder: fresh lakes every run
    ours = {seed: run_ours(source, scratch, checkpoint, queries, tokens, seed) for seed in (0, 1)}
    shutil.rmtree(folder / "run")
    second, _ = run_bergson(folder, checkpoint, context, seed=0)
    print(f"[bergson] {label}: again {second:.1f}s", flush=True)
    return first, second, bergson_scores, ours


if __name__ == "__main__":
    main()
