"""Extraction and index scoring on one GPU, for Pythia-shaped models (160M by default, or 1B).

The model is GPT-NeoX with Pythia-160M's shape (12 layers, 768 wide, vocabulary 50,304) or
Pythia-1B's (`--shape pythia-1b`: 16 layers, 2,048 wide), built from its config with random weights
(no hub here) and a plausible Adam state. Same process, same batches of random tokens:
- plain forward+backward tokens/s (the baseline), then extraction tokens/s with the factored Adam
  correction (the default) and the exact floored one, in float32 and in bfloat16
  autocast; each ÷ the baseline, and against bergson's published ~38k tokens/s for Pythia-160M;
- the extraction checked on the GPU against the exact reference (full per-example gradients);
- index scoring: int8 vectors copied from pinned host memory, decoded, scored against 200 queries
  (one matmul) with a top-10; vectors/s ÷ only copying and decoding them;
- the 4N-FLOP limit: a bfloat16 matrix product's FLOP/s measured here, ÷ 4N (the forward and the
  input-gradient backward of N parameters per token, what extraction needs at least): each
  bfloat16 extraction's tokens/s as a share of it (`flop_share`).

Needs CUDA (`--device cpu --tiny` runs the same code small, for a check without one).

    python bench/gpu.py [--shape pythia-160m|pythia-1b] [--batch 16] [--length 1024] [--k 16] [--out gpu.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import fake_adam_state, random_documents  # noqa: E402
from gradient_kernels.hooks import GradientProjector  # noqa: E402
from gradient_kernels.losses import document_batch, per_example_loss  # noqa: E402
from gradient_kernels.modules import uniform_k, weight_matrices  # noqa: E402
from gradient_kernels.normalizers import normalizers_from_state  # noqa: E402
from gradient_kernels.projection import ProjectionSpec  # noqa: E402
from gradient_kernels.reference import reference_vectors  # noqa: E402
from gradient_kernels.scoring import top_k  # noqa: E402

BERGSON_PUBLISHED_TOKENS_PER_S = 38_000  # bergson's README, Pythia-160M on one GPU


SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=512),
    "pythia-160m": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=50304
    ),
    "pythia-1b": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=8, intermediate_size=8192, vocab_size=50304
    ),
}


def pythia(shape: str):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(**SHAPES[shape], max_position_embeddings=2048, rotary_pct=0.25, tie_word_embeddings=False)
    return GPTNeoXForCausalLM(config).eval()


def matmul_flops_per_s(device, n: int = 8192) -> float:
    """bfloat16 matrix-product FLOP/s on this device: the ceiling extraction is measured against."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / seconds_per_call(lambda: a @ b, device, repeats=10)


def seconds_per_call(fn, device, repeats: int = 5) -> float:
    fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def extraction(model, device, batch, k: int, state: dict) -> dict:
    matrices = weight_matrices(model)

    def autocast(dtype):
        return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()

    def plain(dtype):
        model.zero_grad(set_to_none=True)
        with autocast(dtype):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
        per_example_loss(logits, batch).sum().backward()

    tokens = int(batch.attention_mask.sum())
    rows = {}
    for dtype in ("float32", "bfloat16"):
        baseline = seconds_per_call(lambda: plain(dtype), device)
        rows[f"plain {dtype}"] = {"tokens_per_s": tokens / baseline}
        for normalizer in ("adam-factored", "adam-floored"):
            spec = ProjectionSpec(seed=0, k=uniform_k(matrices, k), normalizer=normalizer)
            projector = GradientProjector(model, spec, normalizers_from_state(state, matrices, normalizer))

            def run():
                with autocast(dtype):
                    return projector(batch)

            seconds = seconds_per_call(run, device, repeats=3)
            rows[f"{normalizer} {dtype}"] = {
                "tokens_per_s": tokens / seconds,
                "ratio_to_plain": seconds / baseline,
                "vs_bergson_published": tokens / seconds / BERGSON_PUBLISHED_TOKENS_PER_S,
                "dim": spec.dim,
            }
    model.zero_grad(set_to_none=True)
    return rows


def fidelity(model, device, batch, k: int, state: dict) -> dict:
    """Max relative error of the GPU extraction against the exact reference, on 2 examples."""
    matrices = weight_matrices(model)
    few = document_batch(batch.input_ids[:2].cpu().tolist()).to(device)
    errors = {}
    for normalizer in ("adam-factored", "adam-floored"):
        spec = ProjectionSpec(seed=0, k=uniform_k(matrices, k), normalizer=normalizer)
        normalizers = normalizers_from_state(state, matrices, normalizer)
        ours = GradientProjector(model, spec, normalizers)(few)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            ours_bf16 = GradientProjector(model, spec, normalizers)(few)
        on_device = {
            n: type(v)(**{f.name: getattr(v, f.name).to(device) for f in fields(v)}) for n, v in normalizers.items()
        }
        reference = reference_vectors(model, few, spec, on_device)
        errors[normalizer] = {
            "max_rel_err_float32": float(((ours - reference).norm(dim=1) / reference.norm(dim=1)).max()),
            "min_cosine_bfloat16": float(torch.nn.functional.cosine_similarity(ours_bf16, reference).min()),
        }
    model.zero_grad(set_to_none=True)
    return errors


def index_scoring(device, n: int, dim: int, queries: int = 200, batch_rows: int = 65536) -> dict:
    """int8 index rows (pinned host memory) → GPU → decode → one matmul → top-10, vs copy + decode."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (n, dim), dtype=torch.int8, generator=g)
    scales = torch.rand(n, generator=g) / 127
    if device.type == "cuda":
        codes, scales = codes.pin_memory(), scales.pin_memory()
    query_vectors = torch.nn.functional.normalize(torch.randn(queries, dim, generator=g), dim=1).to(
        device, torch.bfloat16
    )

    def decoded():
        for start in range(0, n, batch_rows):
            rows = codes[start : start + batch_rows].to(device, non_blocking=True)
            scale = scales[start : start + batch_rows].to(device, non_blocking=True)
            yield rows.to(torch.bfloat16) * scale[:, None].to(torch.bfloat16)

    def decode_only():
        for _ in decoded():
            pass

    def score():
        for offset, train in enumerate(decoded()):
            top_k(query_vectors, train, 10, offset * batch_rows)

    read = seconds_per_call(decode_only, device, repeats=3)
    scored = seconds_per_call(score, device, repeats=3)
    return {
        "vectors": n,
        "dim": dim,
        "queries": queries,
        "copy_decode_vectors_per_s": n / read,
        "score_vectors_per_s": n / scored,
        "index_ratio": read / scored,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, for a check without a GPU")
    parser.add_argument("--shape", default="pythia-160m", choices=[s for s in SHAPES if s != "tiny"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--index-vectors", type=int, default=200_000)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu --tiny for a check")
    model = pythia("tiny" if args.tiny else args.shape)
    state = fake_adam_state(model)
    model.to(device)
    batch = document_batch(random_documents(args.batch, args.length, model.config.vocab_size)).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{name}, torch {torch.__version__}; GPT-NeoX {parameters / 1e6:.0f}M parameters, batch {args.batch} x {args.length} tokens, k={args.k}",
        flush=True,
    )
    result = {
        "device": name,
        "torch": torch.__version__,
        "shape": "tiny" if args.tiny else args.shape,
        "parameters": parameters,
        "batch": args.batch,
        "length": args.length,
        "k": args.k,
        "matmul_flops_per_s": matmul_flops_per_s(device, 512 if args.tiny else 8192),
    }
    result["fidelity"] = fidelity(model, device, batch, args.k, state)
    print(json.dumps(result["fidelity"]), flush=True)
    result["extraction"] = extraction(model, device, batch, args.k, state)
    for row, values in result["extraction"].items():
        if row.endswith("bfloat16"):
            values["flop_share"] = values["tokens_per_s"] * 4 * parameters / result["matmul_flops_per_s"]
        extra = "".join(
            f"  {key}={value:.3f}" for key, value in values.items() if key != "tokens_per_s" and key != "dim"
        )
        print(f"{row:26s} {values['tokens_per_s']:12,.0f} tok/s{extra}", flush=True)
    dim = result["extraction"]["adam-factored float32"]["dim"]
    best = max(v["tokens_per_s"] for key, v in result["extraction"].items() if key.startswith("adam-factored"))
    print(f"matmul bfloat16: {result['matmul_flops_per_s'] / 1e12:,.0f} TFLOP/s; d = {dim:,}")
    print(
        f"extraction_flop_share={result['extraction']['adam-factored bfloat16']['flop_share']:.3f} (÷ the 4N-FLOP limit)"
    )
    if args.shape == "pythia-160m" or args.tiny:
        print(f"extraction_vs_bergson_published={best / BERGSON_PUBLISHED_TOKENS_PER_S:.2f} (our tok/s ÷ 38k)")
    if args.index_vectors:
        result["index"] = index_scoring(device, args.index_vectors, dim)
        index = result["index"]
        print(
            f"index scoring: {index['vectors']:,} int8 vectors of {dim} dims x {index['queries']} queries: "
            f"{index['score_vectors_per_s']:,.0f} vectors/s, copy + decode only {index['copy_decode_vectors_per_s']:,.0f}"
        )
        print(f"gpu_index_ratio={index['index_ratio']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
