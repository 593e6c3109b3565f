"""Sized runs: the pipeline's stages on a C4-like partition and on a GPT-2-small-shaped model.

- `c4`: one generated partition of C4-like documents (word counts drawn like C4's: lognormal,
  median ~230 and mean ~410 words, from the embedded corpus's vocabulary) goes through tokenize ->
  extract -> fit-hessian -> index -> score with `make run`'s trained model, at --documents and at a
  tenth of that.
- `tokenize`: tokenize alone on a partition of C4's size (--tokenize-documents, default 356,000: C4's
  365M documents / 1,024 partitions) and a tenth, the stage a whole C4 partition can go through here.
- `gpt2`: a GPT-2-small-shaped model (12 x 768, vocabulary 50,257: 124M parameters) built from its
  config and trained a few AdamW steps for an optimizer state (a checkpoint this project did not
  train: torch's own `optimizer.pt`, no manifest), at k = 37 per side (d = 49 x 37^2 = 67,081 ~ 2^16),
  through extract -> fit-hessian -> index -> score on --gpt2-documents and a tenth of them.

Every stage runs as its CLI command (`python -m jobs <stage>`) in a fresh process; its time and the
peak RSS of its process tree (launcher and DeepSpeed ranks included) are measured, and the bytes of
every table after the run. Printed as tables with each stage's RSS ratio to the tenth-size run (aim
<= 1.2: memory flat in the corpus size), and written as JSON (--out) for bench/capacity.py.

    python bench/sized_runs.py [--lake lake] [--runs c4 tokenize gpt2] [--documents 35000] [--gpt2-documents 100]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from infra.lake import Lake  # noqa: E402

# C4 (en): median ~230 words, mean ~410 (a lognormal with these has sigma = sqrt(2 ln(410/230)))
C4_MEDIAN_WORDS, C4_MEAN_WORDS, C4_MAX_WORDS = 230, 410, 20_000
GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50_257, n_positions=1024)
GPT2_K = 37  # 49 weight matrices x 37^2 = 67,081 dims, the paper's d ~ 2^16
TABLES = ("documents", "tokens", "train_gradients", "query_gradients", "hessians", "trackstar_index", "proponents")


def c4_like_partition(path: Path, documents: int, vocabulary: list[str], seed: int) -> None:
    """A gzip JSON-lines partition of `documents` C4-format documents of C4-like lengths."""
    rng = np.random.default_rng(seed)
    sigma = np.sqrt(2 * np.log(C4_MEAN_WORDS / C4_MEDIAN_WORDS))
    lengths = np.clip(rng.lognormal(np.log(C4_MEDIAN_WORDS), sigma, documents), 5, C4_MAX_WORDS).astype(int)
    words = np.array(vocabulary)
    with gzip.open(path, "wt", encoding="utf-8") as out:
        for i, n in enumerate(lengths):
            text = " ".join(words[rng.integers(0, len(words), n)])
            # sentences of ~15 words, as prose has
            text = re.sub(r"((?:\S+ ){14}\S+) ", r"\1. ", text)
            record = {"text": text, "url": f"https://sized.example/{seed}/{i}", "timestamp": "2019-04-25T12:00:00Z"}
            out.write(json.dumps(record) + "\n")


def corpus_vocabulary(lake: Path) -> list[str]:
    words: set[str] = set()
    for partition in sorted((lake / "raw").glob("c4-*.json.gz")):
        with gzip.open(partition, "rt", encoding="utf-8") as lines:
            for line in lines:
                words.update(re.findall(r"[A-Za-z]+", json.loads(line)["text"]))
    return sorted(words)


def stage(name: str, lake: Path, *args: str) -> dict:
    """Runs `python -m jobs <name> --lake <lake> <args>` in a fresh process: seconds and peak RSS."""
    from bench.common import peak_tree_rss_mb

    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "jobs", name, "--lake", str(lake), *args], stdout=log, stderr=subprocess.STDOUT
        )
        peak = peak_tree_rss_mb(child, interval=0.1)
        if child.returncode:
            log.seek(0)
            raise RuntimeError(f"{name} failed:\n{log.read()[-4000:]}")
    figures = {"seconds": round(time.perf_counter() - started, 2), "peak_rss_mb": round(peak, 1)}
    print(f"[sized]   {name:<12} {figures['seconds']:8.1f} s  peak RSS {figures['peak_rss_mb']:8,.0f} MB", flush=True)
    return figures


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def measure_lake(lake_dir: Path, stages: dict) -> dict:
    lake = Lake(lake_dir)
    vectors = lake.read("train_gradients", columns=["vector"])
    return {
        "stages": stages,
        "documents": lake.count_rows("documents"),
        "chunks": lake.count_rows("tokens"),
        "tokens": int(np.sum(lake.read("tokens", columns=["n_tokens"])["n_tokens"].to_numpy())),
        "train_vectors": vectors.num_rows,
        "vector_bytes": int(np.mean([len(v) for v in vectors["vector"].to_pylist()])) if vectors.num_rows else 0,
        "table_bytes": {table: folder_bytes(lake_dir / table) for table in TABLES},
        "autocorrelation_bytes": folder_bytes(lake_dir / "_autocorrelation"),
        "hessian_bytes": folder_bytes(lake_dir / "_matrices"),
    }


def run_c4(source: Path, documents: int, scratch: Path, vocabulary: list[str], stages_to_run=None) -> dict:
    lake = scratch / f"c4-{documents}"
    (lake / "raw").mkdir(parents=True)
    (lake / "world").mkdir()
    shutil.copy(source / "world" / "queries.jsonl", lake / "world" / "queries.jsonl")
    summary = json.loads((source / "model" / "train_summary.json").read_text())
    final = summary["checkpoints"][-1]
    shutil.copytree(source / "model" / "tokenizer", lake / "model" / "tokenizer")
    shutil.copytree(source / "model" / "checkpoints" / final, lake / "model" / "checkpoints" / final)
    c4_like_partition(lake / "raw" / "c4-train.00000-of-01024.json.gz", documents, vocabulary, seed=documents)
    stages = {"tokenize": stage("tokenize", lake)}
    if stages_to_run == ["tokenize"]:
        return measure_lake(lake, stages)
    stage("register-queries", lake)
    stages["extract"] = stage("extract", lake, "--checkpoint", str(lake / "model" / "checkpoints" / final))
    stages["fit-hessian"] = stage("fit-hessian", lake)
    stages["index"] = stage("index", lake)
    stages["score"] = stage("score", lake, "--methods", "trackstar")
    return measure_lake(lake, stages)


def gpt2_small_checkpoint(folder: Path, tokenizer_dir: Path, texts: list[str], steps: int = 3) -> int:
    """A GPT-2-small-shaped model from its config, trained `steps` AdamW steps on `texts`, saved as a
    Hugging Face folder with torch's own optimizer.pt (parameter names recorded) and the tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from bench.common import train_like_a_user

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2_SMALL))
    optimizer = torch.optim.AdamW(model.named_parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train_like_a_user(model, tokenizer, optimizer, texts, folder, steps, block=256, rows=4)
    return sum(p.numel() for p in model.parameters())


def run_gpt2(source: Path, documents: int, scratch: Path, vocabulary: list[str]) -> dict:
    lake = scratch / f"gpt2-{documents}"
    (lake / "raw").mkdir(parents=True)
    (lake / "world").mkdir()
    shutil.copy(source / "world" / "queries.jsonl", lake / "world" / "queries.jsonl")
    shutil.copytree(source / "model" / "tokenizer", lake / "model" / "tokenizer")
    partition = lake / "raw" / "c4-train.00000-of-01024.json.gz"
    c4_like_partition(partition, documents, vocabulary, seed=documents)
    checkpoint = scratch / f"gpt2-small-{documents}"  # outside the lake: a checkpoint from elsewhere
    with gzip.open(partition, "rt", encoding="utf-8") as lines:
        texts = [json.loads(line)["text"] for line, _ in zip(lines, range(64))]
    parameters = gpt2_small_checkpoint(checkpoint, lake / "model" / "tokenizer", texts)
    print(f"[sized]   gpt2-small: {parameters:,} parameters, k = {GPT2_K}", flush=True)
    stages = {"tokenize": stage("tokenize", lake, "--context", str(GPT2_SMALL["n_positions"]))}
    stage("register-queries", lake)
    stages["extract"] = stage(
        "extract", lake, "--checkpoint", str(checkpoint), "--projection-k", str(GPT2_K), "--query-set", "fact-world"
    )
    stages["fit-hessian"] = stage("fit-hessian", lake)
    stages["index"] = stage("index", lake)
    stages["score"] = stage("score", lake, "--methods", "trackstar")
    return measure_lake(lake, stages) | {"parameters": parameters, "k": GPT2_K}


def print_run(name: str, sized: dict) -> None:
    small, large = sorted(sized, key=int)
    a, b = sized[small], sized[large]
    print(
        f"\n{name}: {a['documents']:,} and {b['documents']:,} documents ({b['chunks']:,} chunks, {b['tokens']:,} tokens)"
    )
    print(f"{'stage':<12} {'s (1/10)':>9} {'s':>9} {'MB (1/10)':>10} {'MB':>9} {'RSS ratio':>9} {'time ratio':>10}")
    for stage_name in b["stages"]:
        x, y = a["stages"][stage_name], b["stages"][stage_name]
        print(
            f"{stage_name:<12} {x['seconds']:9.1f} {y['seconds']:9.1f} {x['peak_rss_mb']:10,.0f} {y['peak_rss_mb']:9,.0f} "
            f"{y['peak_rss_mb'] / x['peak_rss_mb']:9.2f} {y['seconds'] / x['seconds']:10.2f}"
        )
    print("bytes: " + ", ".join(f"{t} {n / 2**20:,.1f} MB" for t, n in b["table_bytes"].items() if n))
    if b["train_vectors"]:
        print(f"bytes per train vector: {b['vector_bytes']:,}; Hessian files {b['hessian_bytes'] / 2**20:,.1f} MB")
    worst = max(b["stages"][s]["peak_rss_mb"] / a["stages"][s]["peak_rss_mb"] for s in b["stages"])
    print(f"{name}_worst_rss_ratio={worst:.2f} (largest stage peak RSS ÷ its tenth-size run; aim ≤ 1.2)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lake", default="lake", help="`make run`'s lake: its model, tokenizer and queries")
    parser.add_argument("--runs", nargs="+", default=["c4", "tokenize", "gpt2"], choices=["c4", "tokenize", "gpt2"])
    parser.add_argument("--documents", type=int, default=35_000, help="documents of the c4 run (and a tenth)")
    parser.add_argument("--gpt2-documents", type=int, default=100, help="documents of the gpt2 run (and a tenth)")
    parser.add_argument("--tokenize-documents", type=int, default=356_000, help="documents of the tokenize run")
    parser.add_argument("--out", default="reports/bench/sized_runs.json")
    parser.add_argument("--keep", help="keep the lakes in this folder instead of a temporary one")
    args = parser.parse_args()
    source = Path(args.lake)
    vocabulary = corpus_vocabulary(source)
    results = {}
    with tempfile.TemporaryDirectory(prefix="sized-") as temporary:
        scratch = Path(args.keep or temporary)
        runs = {
            "c4": (args.documents, run_c4),
            "tokenize": (args.tokenize_documents, lambda *a: run_c4(*a, stages_to_run=["tokenize"])),
            "gpt2": (args.gpt2_documents, run_gpt2),
        }
        for name in args.runs:
            total, runner = runs[name]
            results[name] = {}
            for documents in (max(1, total // 10), total):
                print(f"[sized] {name}: {documents:,} documents", flush=True)
                results[name][str(documents)] = runner(source, documents, scratch, vocabulary)
            print_run(name, results[name])
    results["machine"] = {"cores": len(os.sched_getaffinity(0)), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
