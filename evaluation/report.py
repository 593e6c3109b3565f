"""The evaluation's HTML report: Table 1 with confidence intervals, the findings, per-bucket and
category plots, the Hessian's spectra, and BM25 vs TrackStar examples (templates/eval.html)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape

TEMPLATES = Path(__file__).parent / "templates"


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def bucket_figure(per_bucket: dict) -> str:
    """MRR and recall@10 per frequency bucket, one line per method ('' when there are no buckets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_bucket = {m: {b: c for b, c in cells.items() if b.isdigit()} for m, cells in per_bucket.items()}
    if not any(per_bucket.values()):  # queries without frequency buckets
        return ""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, cells in per_bucket.items():
        order = sorted(cells, key=int)
        for ax, metric in zip(axes, ("mrr", "recall@10")):
            ax.plot(
                [int(b) for b in order],
                [cells[b][metric] for b in order],
                marker="o",
                label=method,
                linewidth=2.5 if method in ("trackstar", "bm25") else 1,
            )
    for ax, metric in zip(axes, ("MRR", "recall@10 (any stating document in the top 10)")):
        ax.set_xscale("log")
        ax.set_xlabel("frequency bucket (documents stating the fact)")
        ax.set_ylabel(metric)
    axes[1].legend(fontsize=7, ncol=2)
    out = _png(fig)
    plt.close(fig)
    return out


def tail_patch_figure(methods: dict) -> str:
    """Tail-patch Δlog p and Δp per method with their 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(methods)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.35 * len(names) + 1.2))
    for ax, key, label in zip(axes, ("tail_patch", "tail_patch_delta_prob"), ("Δlog p(target)", "Δp(target)")):
        means = np.array([methods[m][key] for m in names])
        low = np.array([methods[m][f"{key}_ci"][0] for m in names])
        high = np.array([methods[m][f"{key}_ci"][1] for m in names])
        colors = ["#c33" if m == "trackstar" else "#36a" if m == "bm25" else "#999" for m in names]
        ax.barh(names, means, xerr=[means - low, high - means], color=colors, capsize=2)
        ax.set_xlabel(f"tail-patch {label}, mean over queries (95% CI)")
    axes[1].set_yticks([])
    out = _png(fig)
    plt.close(fig)
    return out


def category_figure(categories: dict, order: tuple) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not categories:
        return ""
    methods = list(categories)
    fig, ax = plt.subplots(figsize=(11, 0.35 * len(methods) + 1.2))
    left = np.zeros(len(methods))
    for category in order:
        shares = np.array([categories[m][category] for m in methods])
        ax.barh(methods, shares, left=left, label=category)
        left += shares
    ax.set_xlabel("share of top-10 proponents")
    ax.legend(fontsize=8, loc="lower right")
    out = _png(fig)
    plt.close(fig)
    return out


def examples(ranked: dict, queries: dict, texts: dict, categorizer, n: int = 6) -> list[dict]:
    """A few queries with BM25's and TrackStar's top-3 side by side."""
    out = []
    for query_id in sorted(queries)[:: max(1, len(queries) // n)][:n]:
        query = queries[query_id]
        stating = set(query["stating_doc_ids"] or ())
        columns = {
            method: [
                {
                    "states": doc in stating,
                    "kind": categorizer.category(doc, texts.get(doc, ""), query),
                    "text": texts.get(doc, "")[:220],
                }
                for doc in ranked.get(method, {}).get(query_id, [])[:3]
            ]
            for method in ("bm25", "trackstar")
        }
        out.append({"query": query, "columns": columns})
    return out


def render_html(
    report: dict,
    ranked: dict,
    queries: dict,
    texts: dict,
    spectra_png: bytes | None,
    categorizer,
    category_order: tuple,
) -> str:
    """The report page; `spectra_png` is the fit's spectra plot, if there is one."""
    spectra = base64.b64encode(spectra_png).decode() if spectra_png else ""
    environment = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    return environment.get_template("eval.html").render(
        report=report,
        buckets_png=bucket_figure(report["per_bucket"]),
        tail_png=tail_patch_figure(report["methods"]),
        categories_png=category_figure(report["categories"], category_order),
        spectra_png=spectra,
        examples=examples(ranked, queries, texts, categorizer),
    )


NAMES = {"bm25": "BM25", "dense": "dense (MiniLM)", "trak": "TRAK-style", "trackstar": "**TrackStar**"}


def markdown_table(report: dict) -> str:
    """The headline table of an eval.json as Markdown (README): means over seeds, 95% intervals."""
    lines = ["| method | MRR | recall@10 | tail-patch Δlog p | tail-patch Δp |", "|---|---|---|---|---|"]
    for method, c in report["methods"].items():
        lines.append(
            f"| {NAMES.get(method, method)} | {c['mrr']:.3f} [{c['mrr_ci'][0]:.2f}, {c['mrr_ci'][1]:.2f}] | "
            f"{c['recall@10']:.3f} | {c['tail_patch']:+.4f} [{c['tail_patch_ci'][0]:+.3f}, "
            f"{c['tail_patch_ci'][1]:+.3f}] | {c['tail_patch_delta_prob']:+.5f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m evaluation.report reports/eval.json
    import json
    import sys

    print(markdown_table(json.loads(open(sys.argv[1], encoding="utf-8").read())))
