"""Shared set-up for the benchmarks: the embedded model's shape, its batches and checkpoints."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

LAKE = Path("lake")


def embedded_model(seed: int = 0):
    """The embedded default's architecture (random weights unless a trained checkpoint is given)."""
    from demo.train_model import TrainConfig, build_model

    torch.manual_seed(seed)
    return build_model(TrainConfig(), TrainConfig().vocab_size)


def latest_checkpoint(lake: Path = LAKE) -> Path | None:
    """The newest checkpoint folder of `make run` (as the stages choose it), if the lake has one."""
    from infra.lake import Lake
    from jobs.catalog import checkpoint_uri

    try:
        return Path(checkpoint_uri(Lake(lake), ""))
    except FileNotFoundError:  # no trained model in this lake
        return None


def random_documents(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, length), generator=g).tolist()


def fake_adam_state(model) -> dict:
    """A plausible Adam state (positive exp_avg_sq of gradient-like magnitude) for timing runs."""
    g = torch.Generator().manual_seed(1)
    state = {
        n: {"exp_avg_sq": torch.rand(p.shape, generator=g) ** 2 * 1e-4 + 1e-10} for n, p in model.named_parameters()
    }
    return {"kind": "adam", "step": 100, "lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "state": state}


def train_like_a_user(model, tokenizer, optimizer, texts: list[str], out_dir: Path, steps: int, block: int, rows: int):
    """`steps` steps of a plain torch loop over `texts` (each after an end-of-text token, cut into
    blocks of `block` tokens, `rows` blocks a step), saved as a user would: save_pretrained, the
    tokenizer, and the optimizer's own `state_dict()` as optimizer.pt. A checkpoint made elsewhere."""
    ids = [i for text in texts for i in [tokenizer.eos_token_id or 0] + tokenizer(text)["input_ids"]]
    blocks = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    for step in range(steps):
        batch = blocks[(step * rows) % len(blocks) :][:rows]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    torch.save(optimizer.state_dict(), Path(out_dir) / "optimizer.pt")


def peak_tree_rss_mb(process, interval: float = 0.02) -> float:
    """Waits for a started `subprocess.Popen` and returns the peak RSS (MB) of it and all its
    descendants together (a stage's launcher and DeepSpeed ranks), sampled every `interval` s:
    getrusage's child maximum also counts short-lived forks, which show their parent's whole RSS."""
    import psutil

    tree, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        total = 0
        for member in [tree, *tree.children(recursive=True)]:
            try:
                total += member.memory_info().rss
            except psutil.Error:  # ended between listing and reading
                pass
        peak = max(peak, total)
        time.sleep(interval)
    return peak / 2**20


def timed(*fns, repeats: int = 3) -> list[float]:
    """The fastest of `repeats` runs of each of `fns`, run in turn (a, b, a, b...) so that a change in
    the load of a shared machine falls on both sides of a ratio."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, kept in zip(fns, times):
            started = time.perf_counter()
            fn()
            kept.append(time.perf_counter() - started)
    return [min(kept) for kept in times]


def median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def trackstar_inputs(lake_path: str = "lake") -> dict:
    """The scored TrackStar inputs of `make run`'s lake, for the index benchmarks: prepared queries
    (prompt 0), every train chunk's exact float32 Ḡ = R^(-1/2) p / ‖·‖, their keys, and the ground truth."""
    from gradient_kernels.scoring import prepare
    from infra.lake import Lake
    from jobs.score import query_vectors
    from explorer.trace import TraceContext
    from schemas.vectors import decode_vectors

    lake = Lake(lake_path)
    context = TraceContext(lake)
    query_ids, raw_queries, dim = query_vectors(lake, context.query_set, context.checkpoint_id, context.fingerprint, 0)
    rows = lake.read(
        "train_gradients",
        filters=[("checkpoint_id", "=", context.checkpoint_id), ("fingerprint", "=", context.fingerprint)],
        columns=["doc_id", "chunk", "vector", "dtype", "scale"],
    )
    raw = decode_vectors(rows["vector"], rows["dtype"][0].as_py(), rows["scale"], dim)
    queries = lake.read("queries", filters=[("query_set", "=", context.query_set)]).to_pylist()
    return {
        "lake": lake,
        "context": context,
        "query_ids": query_ids,
        "dim": dim,
        "queries": prepare(raw_queries, context.preconditioner),
        "train": prepare(torch.from_numpy(raw), context.preconditioner),
        "keys": list(zip(rows["doc_id"].to_pylist(), rows["chunk"].to_pylist())),
        "truth": {q["query_id"]: set(q["stating_doc_ids"]) for q in queries},
        "buckets": {q["query_id"]: q["frequency_bucket"] for q in queries},
    }


def ranking_metrics(inputs: dict, top: torch.Tensor) -> dict:
    """MRR and recall@10 (the evaluation's own definitions) of train indices ranked per query."""
    from evaluation.metrics import attribution_metrics

    ranked = {query_id: [inputs["keys"][i][0] for i in row] for query_id, row in zip(inputs["query_ids"], top.tolist())}
    return attribution_metrics({"m": ranked}, inputs["truth"], inputs["buckets"], 10)["m"]["all"]


def overlap_at(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mean share of each row's first k indices of `a` found among the first k of `b`."""
    return sum(len(set(x[:k]) & set(y[:k])) / k for x, y in zip(a.tolist(), b.tolist())) / len(a)


@contextlib.contextmanager
def busy_process(threads: int):
    """Another torch process multiplying matrices with `threads` threads while the block runs: what a
    concurrent job or test run is to the process being measured."""
    code = "import torch, time\na = torch.randn(768, 768)\nend = time.time() + 3600\nwhile time.time() < end:\n    a = torch.tanh(a @ a)\n"
    competitor = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    try:
        time.sleep(3)  # its torch import and first products
        yield competitor
    finally:
        competitor.kill()
        competitor.wait()
