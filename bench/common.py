"""Shared set-up for the benchmarks: the embedded model's shape, its batches and checkpoints."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from jobs.checkpoints import checkpoint_path

LAKE = Path("lake")


def embedded_model(seed: int = 0):
    """The embedded default's architecture (random weights unless a trained checkpoint is given)."""
    from jobs.train_model import TrainConfig, build_model

    torch.manual_seed(seed)
    return build_model(TrainConfig(), TrainConfig().vocab_size)


def latest_checkpoint(lake: Path = LAKE) -> Path | None:
    """The newest checkpoint folder of `make run`, if one exists."""
    summary = lake / "model" / "train_summary.json"
    if not summary.exists():
        return None
    return checkpoint_path(lake, json.loads(summary.read_text())["checkpoints"][-1])


def random_documents(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, length), generator=g).tolist()


def fake_adam_state(model) -> dict:
    """A plausible Adam state (positive exp_avg_sq of gradient-like magnitude) for timing runs."""
    g = torch.Generator().manual_seed(1)
    state = {n: {"exp_avg_sq": torch.rand(p.shape, generator=g) ** 2 * 1e-4 + 1e-10}
             for n, p in model.named_parameters()}
    return {"kind": "adam", "step": 100, "lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "state": state}


def median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]
