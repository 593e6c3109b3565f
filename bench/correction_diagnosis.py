"""Why does the optimizer correction hurt? The second moments and what they do to the vectors.

On `make run`'s lake, for each saved checkpoint (steps 256, 384, 512 by default):
1. V per weight matrix, from AdamW's state (v̂ = exp_avg_sq / (1 - β2^t)) and estimated from data
   (E[g²] over 512 training chunks, jobs/second_moments.py): quantiles, and the share of
   coordinates below AdamW's floor rule;
2. per row of the tied embedding / output head: the row's mean V against how often its token
   occurs in the training chunks (Spearman, and the median per frequency band): does AdamW's
   β2 = 0.95 forget rows not seen lately, where the data estimate does not?
3. the share of each matrix in the squared norm of corrected train and query gradients (exact,
   unprojected), under no correction, the floored AdamW correction and the data correction, and
   the query ÷ train norm ratio under each.

Prints a table and `name=value` lines, writes correction_diagnosis.json and .png under --out.

    python bench/correction_diagnosis.py [--lake lake] [--out reports/bench] [--documents 256] [--queries 64]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.projection_fidelity import spearman  # noqa: E402
from evaluation.answers import encode_query  # noqa: E402
from gradient_kernels.losses import document_batch, query_batch  # noqa: E402
from gradient_kernels.modules import weight_matrices  # noqa: E402
from gradient_kernels.normalizers import adam_denominator, normalizers_from_state  # noqa: E402
from gradient_kernels.reference import corrected_gradients, per_example_gradients  # noqa: E402
from infra import layout  # noqa: E402
from infra.lake import Lake  # noqa: E402
from jobs.checkpoints import load_second_moments  # noqa: E402
from jobs.second_moments import SAMPLE_CHUNKS, estimate_moments, sampled_chunks  # noqa: E402

CORRECTIONS = ("none", "adam-floored", "data-floored")
# token occurrences in training: label -> (lowest, highest)
BANDS = {"0": (0, 0), "1-9": (1, 9), "10-99": (10, 99), "100-999": (100, 999), ">=1000": (1000, 10**12)}


def token_counts(lake: Lake, vocabulary: int) -> torch.Tensor:
    counts = torch.zeros(vocabulary, dtype=torch.long)
    for ids in lake.read("tokens", columns=["input_ids"])["input_ids"].to_pylist():
        counts += torch.bincount(torch.tensor(ids), minlength=vocabulary)
    return counts


def variances(adam_state: dict, data_state: dict, matrices) -> dict:
    """name -> {"adam": v̂, "data": E[g²]}, (out, in)."""
    found = {}
    for m in matrices:
        denominator = adam_denominator(
            adam_state["state"][m.name]["exp_avg_sq"],
            adam_state["step"],
            adam_state["betas"][1],
            0.0,
            m.stored_transposed,
        )
        data = data_state["state"][m.name]["mean_sq"]
        found[m.name] = {"adam": denominator.square(), "data": data.t() if m.stored_transposed else data}
    return found


def matrix_rows(found: dict, eps: float) -> list[dict]:
    rows = []
    for name, v in found.items():
        row = {"matrix": name}
        for kind, values in v.items():
            flat = values.reshape(-1).float()
            q = torch.quantile(flat[torch.randperm(flat.numel())[:100_000]], torch.tensor([0.01, 0.5, 0.99]))
            row[kind] = {"q01": float(q[0]), "median": float(q[1]), "q99": float(q[2])}
            row[kind]["below_eps_share"] = float((flat.sqrt() < 2 * eps).float().mean())
        rows.append(row)
    return rows


def embedding_rows(found: dict, embedding: str, counts: torch.Tensor, in_sample: torch.Tensor) -> dict:
    """Row means of V of the tied embedding against the tokens' training counts; and, for the rows
    of tokens the training data holds, V of those the data estimate's sample missed against those
    it saw (the estimate knows a missed token only through the output head)."""
    trained, seen = counts > 0, in_sample > 0
    result: dict = {"tokens_in_training": int(trained.sum()), "missed_by_sample": int((trained & ~seen).sum())}
    for kind, values in found[embedding].items():
        row_mean = values.mean(1).float()
        bands = {}
        for label, (low, high) in BANDS.items():
            rows = (counts >= low) & (counts <= high)
            if rows.any():
                bands[label] = {"rows": int(rows.sum()), "median_row_v": float(row_mean[rows].median())}
        result[kind] = {"spearman_vs_count": spearman(row_mean, counts.double()), "bands": bands}
        if (trained & ~seen).any():
            missed, hit = row_mean[trained & ~seen].median(), row_mean[trained & seen].median()
            result[kind]["missed_over_seen_median_v"] = float(missed / hit)
    return result


def norm_shares(model, docs, queries, matrices, normalizers: dict) -> dict:
    """correction -> {train/query: name -> share of ‖u‖², "query_over_train": ratio of mean norms}."""
    names = [m.name for m in matrices]
    result = {}
    for correction, divide in normalizers.items():
        shares, norms = {}, {}
        for kind, batch in (("train", docs), ("query", queries)):
            per_matrix = corrected_gradients(per_example_gradients(model, batch, names), divide)
            squared = {n: g.double().square().sum((1, 2)) for n, g in per_matrix.items()}  # (B,) per matrix
            total = sum(squared.values())
            shares[kind] = {n: float((s / total).mean()) for n, s in squared.items()}
            norms[kind] = float(total.sqrt().mean())
        result[correction] = shares | {"query_over_train": norms["query"] / norms["train"]}
    return result


def diagnose(lake: Lake, checkpoint: Path, docs, queries, counts) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    matrices = weight_matrices(model)
    adam = load_second_moments(checkpoint)
    sample = sampled_chunks(lake, SAMPLE_CHUNKS)
    data = estimate_moments(checkpoint, sample)
    in_sample = torch.bincount(torch.tensor(sum(sample["input_ids"].to_pylist(), [])), minlength=len(counts))
    found = variances(adam, data, matrices)
    embedding = next(m.name for m in matrices if m.tied_embedding is not None)
    normalizers = {"none": {}, "adam-floored": normalizers_from_state(adam, matrices, "adam-floored")}
    normalizers["data-floored"] = normalizers_from_state(data, matrices, "data-floored")
    return {
        "step": adam["step"],
        "matrices": matrix_rows(found, adam["eps"]),
        "embedding": embedding_rows(found, embedding, counts, in_sample),
        "norm_shares": norm_shares(model, docs, queries, matrices, normalizers),
        "embedding_name": embedding,
    }


def sample_batches(lake: Lake, tokenizer, n_docs: int, n_queries: int, seed: int = 0):
    rng = random.Random(seed)
    ids = lake.read("tokens", columns=["input_ids"])["input_ids"].to_pylist()
    docs = document_batch(rng.sample([i for i in ids if len(i) >= 2], n_docs))
    chosen = rng.sample(lake.read("queries").to_pylist(), n_queries)
    prompts, targets = zip(*(encode_query(tokenizer, q["prompt0"], q["target"]) for q in chosen))
    return docs, query_batch(list(prompts), list(targets))


def print_summary(results: list[dict]) -> None:
    for r in results:
        e = r["embedding"]
        print(f"\n== step {r['step']}: tied embedding row mean V vs training count of the token")
        for kind in ("adam", "data"):
            bands = ", ".join(f"{b}: {v['median_row_v']:.2e} ({v['rows']} rows)" for b, v in e[kind]["bands"].items())
            print(f"  {kind:5} Spearman {e[kind]['spearman_vs_count']:+.3f}; median row V by count band: {bands}")
        print(f"  share of ‖u‖² in the tied embedding ({r['embedding_name']}), and query ÷ train norm:")
        for correction, shares in r["norm_shares"].items():
            train, query = shares["train"][r["embedding_name"]], shares["query"][r["embedding_name"]]
            print(
                f"    {correction:13} train {train:.3f}  query {query:.3f}  query/train norm {shares['query_over_train']:.3g}"
            )
            tag = correction.replace("-", "_")
            print(f"step{r['step']}_{tag}_embedding_share_train={train:.3f}")
            print(f"step{r['step']}_{tag}_embedding_share_query={query:.3f}")
            print(f"step{r['step']}_{tag}_query_over_train_norm={shares['query_over_train']:.4g}")
        for kind in ("adam", "data"):
            print(f"step{r['step']}_{kind}_row_v_spearman_vs_count={e[kind]['spearman_vs_count']:.3f}")
            if "missed_over_seen_median_v" in e[kind]:
                print(f"step{r['step']}_{kind}_missed_over_seen_median_v={e[kind]['missed_over_seen_median_v']:.3g}")
        print(f"  the data sample missed {e['missed_by_sample']} of the {e['tokens_in_training']} tokens in training")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        for kind, style in (("adam", "-o"), ("data", "--s")):
            bands = r["embedding"][kind]["bands"]
            axes[0].plot(
                list(bands), [b["median_row_v"] for b in bands.values()], style, label=f"{kind}, step {r['step']}"
            )
    axes[0].set(yscale="log", xlabel="token's occurrences in training", ylabel="median row mean of V (tied embedding)")
    axes[0].set_title("Second moment of embedding rows by token frequency")
    axes[0].legend(fontsize=8)
    last = results[-1]["norm_shares"]
    matrices = list(last["none"]["train"])
    width = 0.13
    for i, (correction, shares) in enumerate(last.items()):
        for j, kind in enumerate(("train", "query")):
            offset = (2 * i + j - 2.5) * width
            values = [shares[kind][m] for m in matrices]
            axes[1].bar([x + offset for x in range(len(matrices))], values, width, label=f"{correction} {kind}")
    axes[1].set_xticks(
        range(len(matrices)),
        [m.replace("transformer.", "").replace(".weight", "") for m in matrices],
        rotation=90,
        fontsize=6,
    )
    axes[1].set(ylabel="share of ‖u‖²", title=f"Norm share per matrix, step {results[-1]['step']}")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lake", default="lake")
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    parser.add_argument("--documents", type=int, default=256)
    parser.add_argument("--queries", type=int, default=64)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    lake = Lake(args.lake)
    checkpoints = sorted(Path(layout.checkpoints(lake.root)).glob("*/config.json"))
    if not checkpoints:
        sys.exit(f"no trained checkpoints under {args.lake}: run `make run` first")
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[-1].parent)
    docs, queries = sample_batches(lake, tokenizer, args.documents, args.queries)
    counts = token_counts(lake, tokenizer.vocab_size)
    results = [diagnose(lake, c.parent, docs, queries, counts) for c in checkpoints]
    print_summary(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "correction_diagnosis.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "correction_diagnosis.png")
    print(f"figure: {args.out / 'correction_diagnosis.png'}")


if __name__ == "__main__":
    main()
