"""Projection fidelity: do projected TrackStar scores rank documents like unprojected ones?

On the embedded world and its trained model (run `make run` first): for a sample of queries and
documents (each query's stating documents plus random others), the exact scores are cosines of
the full optimizer-corrected gradients (1.3M coordinates, no projection); the projected scores use
the hook path at several k. Both without R, which cannot be formed at full size. Prints the mean
Spearman correlation per k. Also measures Adam's rank-1 (Adafactor-style) fit on the real
optimizer state: its relative error per matrix and the cosine between vectors corrected exactly
and through the fit.

    python bench/projection_fidelity.py [--lake lake] [--queries 16] [--documents 160]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import latest_checkpoint  # noqa: E402
from gradient_kernels.hooks import GradientProjector  # noqa: E402
from gradient_kernels.losses import document_batch, query_batch  # noqa: E402
from gradient_kernels.modules import uniform_k, weight_matrices  # noqa: E402
from gradient_kernels.normalizers import adam_denominator, normalizers_from_state, rank1_error  # noqa: E402
from gradient_kernels.projection import ProjectionSpec  # noqa: E402
from gradient_kernels.reference import flat_corrected_gradients  # noqa: E402
from jobs.checkpoints import load_second_moments  # noqa: E402
from demo.world import generated_texts  # noqa: E402


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def sample(lake: Path, n_queries: int, n_documents: int, seed: int = 0):
    queries = [json.loads(line) for line in (lake / "world" / "queries.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    queries = rng.sample([q for q in queries if q["frequency_bucket"] >= 10], n_queries)
    texts = generated_texts(lake / "raw")
    chosen = {d for q in queries for d in q["stating_doc_ids"][:4]}
    chosen |= set(rng.sample(sorted(texts), n_documents - len(chosen)))
    return queries, [texts[d] for d in sorted(chosen)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lake", type=Path, default=Path("lake"))
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--documents", type=int, default=160)
    parser.add_argument("--ks", default="4,8,16,32,64")
    args = parser.parse_args()
    checkpoint = latest_checkpoint(args.lake)
    if checkpoint is None:
        sys.exit(f"no trained model under {args.lake}: run `make run` first")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    state = load_second_moments(checkpoint)
    kind = "adafactor" if state["kind"] == "adafactor" else "adam-exact"
    matrices = weight_matrices(model)
    normalizers = normalizers_from_state(state, matrices, kind)
    queries, texts = sample(args.lake, args.queries, args.documents)
    docs = document_batch([tokenizer(t)["input_ids"][: model.config.n_positions] for t in texts])
    prompts = [tokenizer(q["prompt0"])["input_ids"] for q in queries]
    targets = [tokenizer(q["target"])["input_ids"] for q in queries]
    qbatch = query_batch(prompts, targets)
    names = [m.name for m in matrices]

    def unit(x):
        return x / x.norm(dim=1, keepdim=True)

    full_queries = unit(flat_corrected_gradients(model, qbatch, names, normalizers))
    exact_scores = torch.cat(
        [
            unit(flat_corrected_gradients(model, document_batch(docs_chunk), names, normalizers)) @ full_queries.T
            for docs_chunk in _chunks(docs, 16)
        ]
    ).T  # (Q, N)
    print(
        f"checkpoint {checkpoint.name} ({state['kind']} state, correction {kind}); "
        f"{len(queries)} queries x {len(texts)} documents; full dimension {full_queries.shape[1]:,}"
    )
    for k in [int(x) for x in args.ks.split(",")]:
        spec = ProjectionSpec(seed=0, k=uniform_k(matrices, k), normalizer=kind)
        projector = GradientProjector(model, spec, normalizers)
        projected = unit(projector(docs)) @ unit(projector(qbatch)).T
        rho = sum(spearman(projected.T[i], exact_scores[i]) for i in range(len(queries))) / len(queries)
        overlap = sum(
            len(set(projected.T[i].topk(10).indices.tolist()) & set(exact_scores[i].topk(10).indices.tolist()))
            for i in range(len(queries))
        ) / (10 * len(queries))
        print(
            f"k={k:>3} per matrix ({spec.dim:>6} dims): mean Spearman vs unprojected = {rho:.3f}, "
            f"top-10 overlap = {overlap:.2f}"
        )
        print(f"spearman_k{k}={rho:.3f} top10_overlap_k{k}={overlap:.2f}")

    if state["kind"] == "adam":
        errors = []
        for m in matrices:
            denominator = adam_denominator(
                state["state"][m.name]["exp_avg_sq"],
                state["step"],
                state["betas"][1],
                state["eps"],
                m.stored_transposed,
            )
            errors.append(rank1_error(denominator, state["eps"]))
        spec_exact = ProjectionSpec(seed=0, k=uniform_k(matrices, 16), normalizer="adam-exact")
        spec_fit = ProjectionSpec(seed=0, k=uniform_k(matrices, 16), normalizer="adam-factored")
        exact = GradientProjector(model, spec_exact, normalizers)(docs)
        fitted = GradientProjector(model, spec_fit, normalizers_from_state(state, matrices, "adam-factored"))(docs)
        cosine = (unit(exact) * unit(fitted)).sum(1)
        print(
            f"adam rank-1 fit of 1/(sqrt(V)+eps): relative error per matrix mean {sum(errors) / len(errors):.3f}, "
            f"max {max(errors):.3f}; cosine(exact-corrected, fit-corrected vectors) mean {float(cosine.mean()):.3f}, "
            f"min {float(cosine.min()):.3f}"
        )


def _chunks(batch, size):
    ids = batch.input_ids
    for start in range(0, len(batch), size):
        rows = ids[start : start + size]
        lengths = batch.attention_mask[start : start + size].sum(1)
        yield [row[:n].tolist() for row, n in zip(rows, lengths)]


if __name__ == "__main__":
    main()
