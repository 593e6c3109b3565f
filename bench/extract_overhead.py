"""Extraction overhead: per-example projected, corrected gradients vs a plain forward+backward.

Same model (the embedded default's shape, or with `--model gpt2-small` a GPT-2 of 124M parameters
with random weights, k = 37: d = 67,081 as C4-sized users run it), same batch, same process. The
extraction uses the fast path (the default correction, Adam's factored V, folded into the projections, k=16 per matrix,
Σk² dims); the baseline computes the ordinary batch gradient. Peak memory is measured per phase in a fresh
child process (peak RSS above the RSS after set-up). Also checks the fast path against the exact
reference on a few examples. Aim on CPU: ratio ≤ 1.0 (an `aim:` line).

    python bench/extract_overhead.py [--batch 16] [--k 16] [--model embedded|gpt2-small]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import embedded_model, fake_adam_state, median_seconds, random_documents  # noqa: E402
from gradient_kernels.hooks import GradientProjector  # noqa: E402
from gradient_kernels.losses import document_batch, per_example_loss  # noqa: E402
from gradient_kernels.modules import uniform_k, weight_matrices  # noqa: E402
from gradient_kernels.normalizers import normalizers_from_state  # noqa: E402
from gradient_kernels.projection import ProjectionSpec  # noqa: E402

RATIO_AIM = 1.0  # no weight gradient is formed: the extraction should cost no more than a plain pass
from gradient_kernels.reference import reference_vectors  # noqa: E402


def gpt2_small():
    """GPT-2's 124M-parameter shape (512 positions), random weights: no hub is reachable here."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_positions=512, attn_implementation="eager"))


def build(batch_size: int, k: int, normalizer: str = "adam-half", model_name: str = "embedded"):
    model = gpt2_small() if model_name == "gpt2-small" else embedded_model()
    matrices = weight_matrices(model)
    spec = ProjectionSpec(seed=0, k=uniform_k(matrices, k), normalizer=normalizer)
    normalizers = normalizers_from_state(fake_adam_state(model), matrices, normalizer)
    batch = document_batch(random_documents(batch_size, model.config.n_positions, model.config.vocab_size))
    return model, spec, normalizers, batch


def plain_step(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    per_example_loss(logits, batch).sum().backward()


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def phase_memory(phase: str, batch_size: int, k: int, model_name: str) -> None:
    """Child process: run one phase once and print its peak RSS above the post-set-up RSS."""
    model, spec, normalizers, batch = build(batch_size, k, model_name=model_name)
    projector = GradientProjector(model, spec, normalizers)
    before = rss_mb()
    if phase == "baseline":
        plain_step(model, batch)
    else:
        projector(batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"extra_mb": max(0.0, peak - before)}))


def child_memory(phase: str, batch_size: int, k: int, model_name: str) -> float:
    out = subprocess.run(
        [
            *[sys.executable, __file__, "--memory-phase", phase],
            *["--batch", str(batch_size), "--k", str(k), "--model", model_name],
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_mb"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--model", choices=["embedded", "gpt2-small"], default="embedded")
    parser.add_argument("--memory-phase", choices=["baseline", "extract"])
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.memory_phase:
        return phase_memory(args.memory_phase, args.batch, args.k, args.model)

    model, spec, normalizers, batch = build(args.batch, args.k, model_name=args.model)
    projector = GradientProjector(model, spec, normalizers)
    tokens = int(batch.attention_mask.sum())
    repeats = 3 if args.model == "gpt2-small" else 5  # ~10 s a pass at 124M parameters
    baseline = median_seconds(lambda: plain_step(model, batch), repeats)
    extract = median_seconds(lambda: projector(batch), repeats)
    exact = None
    if args.model == "embedded":  # per-example weight gradients of 124M parameters: minutes, not measured
        exact_model, exact_spec, exact_normalizers, _ = build(args.batch, args.k, "adam-exact")
        exact_projector = GradientProjector(exact_model, exact_spec, exact_normalizers)
        exact = median_seconds(lambda: exact_projector(batch), repeats=3)

    few = document_batch(batch.input_ids[: min(3, args.batch)].tolist())
    reference = reference_vectors(model, few, spec, normalizers)
    error = float(((projector(few) - reference).norm(dim=1) / reference.norm(dim=1)).max())

    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: GPT-2 ({args.model}) {params:,} parameters, {len(projector.matrices)} weight matrices, "
        f"batch {args.batch} x {model.config.n_positions} tokens, k={args.k} -> {spec.dim} dims, device cpu, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"plain forward+backward:             {baseline * 1e3:8.1f} ms  ({tokens / baseline:,.0f} tok/s)")
    print(f"extraction (adam-half, hooks):      {extract * 1e3:8.1f} ms  ({tokens / extract:,.0f} tok/s)")
    if exact is not None:
        print(f"extraction (adam-exact, hooks):     {exact * 1e3:8.1f} ms  (exact ratio {exact / baseline:.2f})")
    base_mb = child_memory("baseline", args.batch, args.k, args.model)
    extract_mb = child_memory("extract", args.batch, args.k, args.model)
    print(
        f"peak memory above set-up: baseline {base_mb:.0f} MB, extraction {extract_mb:.0f} MB "
        f"(memory_ratio={extract_mb / max(base_mb, 1e-9):.2f})"
    )
    print(f"max_rel_err_vs_exact={error:.2e}")
    print(f"ratio={extract / baseline:.3f}")
    met = "met" if extract / baseline <= RATIO_AIM else "not met"
    print(
        f"aim: extraction (the default, adam-half) ÷ plain forward+backward, {args.model} model ≤ {RATIO_AIM}: "
        f"measured {extract / baseline:.3f} ({met})"
    )


if __name__ == "__main__":
    main()
