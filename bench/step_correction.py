"""The tail-patch's own step as the optimizer correction, on the train side only.

A tail-patch takes one Adam step on a chunk (its mean next-token loss, the checkpoint's state, the
chunk's own g² folded into v̂: `gradient_kernels.tail_patch.AdamStep`) and measures the change of
the target's log-probability. To first order that change is g_q · s(z), with the step direction

    s(z) = g(z) / (sqrt(β2·v̂ + (1 − β2)/(1 − β2^t) · g(z)²) + eps)

on the chunk's side and nothing on the query's: AdamW's 1/sqrt(V) on both sides (the paper's
correction, the default here in its rank-1 form) weighs a coordinate by 1/V and lets coordinates
of tiny v̂ dominate, where the step is bounded by the chunk's own g².

On the lake of `make run` (or a world of `bench/world_family.py`), from exact per-example
gradients (`gradient_kernels.reference`: the tied embedding's two uses summed before the step),
projected with seed 0 and k = 16 per side, R fitted as the fit-hessian job fits it (outlier chunks
left out of R_train), every chunk is ranked by
  step           g_q · s(z), the first-order prediction itself
  step-R         R^(-1/2) on both sides
  step-R-unit    and unit norm: TrackStar with the step as its correction
  plain-R-unit   the same without any correction (the fair "none" for step-R-unit)
and the lake's own TrackStar proponents (the default correction) are tail-patched beside them, on
the evaluation's sample (bucket-stratified, seed 0). Printed: each method's mean Δlog p and its
paired difference with TrackStar (95% bootstrap), and step-R-unit − plain-R-unit, the correction's
own effect. The exact per-example gradients make it a measurement, not an extraction option yet.

    python bench/step_correction.py [--lake lake] [--queries 100]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from infra import layout  # noqa: E402
from infra.lake import Lake  # noqa: E402

K = 16
DOCUMENTS_AT_ONCE = 32


def step_terms(state: dict, matrices: dict, names: list[str]) -> tuple[dict, float, float]:
    """({name: the state's part of v̂' in the (out, in) orientation}, the weight of g² in v̂', eps)
    of an Adam state (jobs.checkpoints' layout), as `AdamStep` takes its step."""
    beta2, eps, t = state["betas"][1], state["eps"], state["step"] + 1
    held = {}
    for name in names:
        v = state["state"][name]["exp_avg_sq"]
        held[name] = (v.t() if matrices[name].stored_transposed else v).float() * (beta2 / (1 - beta2**t))
    return held, (1 - beta2) / (1 - beta2**t), eps


def step_direction(gradient: torch.Tensor, v_part: torch.Tensor, g2_weight: float, eps: float) -> torch.Tensor:
    """s(z): the direction of one Adam step on `gradient` (AdamStep's Δθ ÷ (−lr · m̂ weight))."""
    return gradient / ((v_part + g2_weight * gradient * gradient).sqrt() + eps)


def projected_vectors(lake: Lake, checkpoint_dir: Path, queries: dict) -> tuple[torch.Tensor, ...]:
    """(queries' plain vectors, chunks' step vectors, chunks' plain vectors, the chunks' doc ids): the
    step of the chunk's mean loss (the tail-patch's), the plain gradient of its summed loss (what
    extraction without a correction stores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradient_kernels.losses import document_batch, query_batch
    from gradient_kernels.modules import uniform_k, weight_matrices
    from gradient_kernels.projection import ProjectionSpec
    from gradient_kernels.reference import dense_projection, per_example_gradients
    from jobs.checkpoints import load_second_moments
    from jobs.progress import Progress

    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    matrices = {m.name: m for m in weight_matrices(model)}
    spec = ProjectionSpec(seed=0, k=uniform_k(list(matrices.values()), K), normalizer="none", dtype="float32")
    names = list(spec.k)
    v_part, g2_weight, eps = step_terms(load_second_moments(checkpoint_dir), matrices, names)

    eos, ids = tokenizer.eos_token_id, sorted(queries)
    prompts = [[eos] + tokenizer(queries[q]["prompt0"], add_special_tokens=False)["input_ids"] for q in ids]
    targets = [tokenizer(queries[q]["target"], add_special_tokens=False)["input_ids"] for q in ids]
    query_vectors = torch.cat(
        [
            dense_projection(
                per_example_gradients(model, query_batch(prompts[i : i + 16], targets[i : i + 16]), names), spec
            )
            for i in range(0, len(ids), 16)
        ]
    )
    tokens = lake.read("tokens", filters=[("chunk", "=", 0)], columns=["doc_id", "input_ids"])
    rows = [(d, x) for d, x in zip(tokens["doc_id"].to_pylist(), tokens["input_ids"].to_pylist()) if len(x) >= 2]
    step, plain = [], []
    progress = Progress("step-correction chunks", len(rows), unit="chunks")
    for start in range(0, len(rows), DOCUMENTS_AT_ONCE):
        part = [x for _, x in rows[start : start + DOCUMENTS_AT_ONCE]]
        counts = torch.tensor([len(x) - 1 for x in part], dtype=torch.float32)[:, None, None]
        summed = per_example_gradients(model, document_batch(part), names)  # the loss extraction takes
        mean = {n: g / counts for n, g in summed.items()}  # the loss a tail-patch steps on
        step.append(dense_projection({n: step_direction(g, v_part[n], g2_weight, eps) for n, g in mean.items()}, spec))
        plain.append(dense_projection(summed, spec))
        progress.update(len(part))
    return query_vectors, torch.cat(step), torch.cat(plain), [d for d, _ in rows]


def fitted_preconditioner(train: torch.Tensor, queries: torch.Tensor):
    """R^(-1/2) of the task-mixed Hessian, fitted as the fit-hessian job does (outliers left out)."""
    from gradient_kernels.hessian import Autocorrelation
    from gradient_kernels.robust import outlier_threshold
    from gradient_kernels.scoring import Preconditioner
    from jobs.fit_hessian import FitHessianConfig, fit

    config, sizes = FitHessianConfig(), [K * K] * (train.shape[1] // (K * K))
    norms = train.norm(dim=1).numpy()
    kept = train[torch.from_numpy(norms <= outlier_threshold(norms, config.outlier_z))]
    fitted = fit(Autocorrelation(sizes).add(kept), Autocorrelation(sizes).add(queries), config)
    return Preconditioner(fitted.matrices["inverse_root"])


def rankings(queries: torch.Tensor, step: torch.Tensor, plain: torch.Tensor, doc_ids: list, query_ids: list) -> dict:
    """method -> {query: its top-10 doc ids}."""
    from gradient_kernels.scoring import prepare

    r_step, r_plain = fitted_preconditioner(step, queries), fitted_preconditioner(plain, queries)
    scores = {
        "step": queries @ step.T,
        "step-R": prepare(queries, r_step, False) @ prepare(step, r_step, False).T,
        "step-R-unit": prepare(queries, r_step) @ prepare(step, r_step).T,
        "plain-R-unit": prepare(queries, r_plain) @ prepare(plain, r_plain).T,
    }
    return {
        method: {q: [doc_ids[j] for j in s[i].topk(10).indices.tolist()] for i, q in enumerate(query_ids)}
        for method, s in scores.items()
    }


def main():
    from evaluation.metrics import aligned, paired_difference, tail_patch_per_query
    from evaluation.rankings import ranked_proponents
    from evaluation.tail_patching import stratified_sample, tail_patch, tail_patch_step
    from explorer.trace import TraceContext

    parser = argparse.ArgumentParser()
    parser.add_argument("--lake", default="lake")
    parser.add_argument("--queries", type=int, default=100, help="tail-patch sample (as the evaluation's)")
    args = parser.parse_args()
    lake = Lake(args.lake)
    context = TraceContext(lake)
    checkpoint_dir = layout.checkpoint_path(lake.root, context.checkpoint_id)
    queries = {
        q["query_id"]: q for q in lake.read("queries", filters=[("query_set", "=", context.query_set)]).to_pylist()
    }
    query_vectors, step, plain, doc_ids = projected_vectors(lake, checkpoint_dir, queries)
    ranked = rankings(query_vectors, step, plain, doc_ids, sorted(queries))
    stored = ranked_proponents(lake, context.query_set, context.checkpoint_id)["trackstar"]
    ranked["trackstar"] = {q: docs[:10] for q, docs in stored.items()}
    sample = stratified_sample(queries, args.queries, 0)
    rule, learning_rate, how = tail_patch_step(
        checkpoint_dir, json.loads((checkpoint_dir / "manifest.json").read_text()), None
    )
    base, changes = tail_patch(lake, checkpoint_dir, rule, learning_rate, ranked, queries, sample)
    per_query = {m: tail_patch_per_query(r, changes, base, sample) for m, r in ranked.items()}
    common = [q for q in sample if all(q in found for found in per_query.values())]
    effect = {m: aligned(found, "delta_log_prob", common) for m, found in per_query.items()}
    print(f"\n{args.lake}: {len(common)} tail-patched queries ({how}), checkpoint {context.checkpoint_id}")
    print(f"{'method':<14} {'Δlog p':>8}  {'− trackstar (default correction) [95%]':>40}")
    result = {"lake": args.lake, "queries": len(common), "methods": {}}
    for method, values in effect.items():
        mean, low, high = paired_difference(values, effect["trackstar"])
        result["methods"][method] = {"delta_log_prob": float(values.mean()), "minus_trackstar": [mean, low, high]}
        print(f"{method:<14} {values.mean():+8.4f}  {f'{mean:+.4f} [{low:+.4f}, {high:+.4f}]':>40}")
    mean, low, high = paired_difference(effect["step-R-unit"], effect["plain-R-unit"])
    result["step_correction_effect"] = [mean, low, high]
    print(f"step_correction_effect={mean:+.4f} [{low:+.4f}, {high:+.4f}] (step-R-unit − plain-R-unit)")
    print(f"step_R_minus_trackstar={result['methods']['step-R']['minus_trackstar'][0]:+.4f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
