"""The evaluation's HTML report: Table 1 with confidence intervals, the findings, per-bucket and
category plots, the Hessian's spectra, and BM25 vs TrackStar examples (templates/eval.html).

Numbers are printed at their magnitude (`magnitude`: three significant digits, scientific notation
below 10^-3, so λ = 1.50e-05 never reads 0.000). Every method keeps one colour in every plot and in
Table 1's key, from Paul Tol's colour-blind-safe "discrete rainbow" scheme; categories use the
Okabe-Ito palette; legends sit outside the plotting area, never over the data.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape

TEMPLATES = Path(__file__).parent / "templates"

# colours of Paul Tol's discrete rainbow scheme, readable with the common colour-vision deficiencies;
# TrackStar red, BM25 dark blue
METHOD_COLORS = {
    "bm25": "#1965B0",
    "dense": "#7BAFDE",
    "grad-dot": "#D1BBD7",
    "grad-cos": "#AE76A3",
    "trak": "#882E72",
    "trackstar-no-optimizer": "#F4A736",
    "trackstar-adam-exact": "#E8601C",
    "trackstar-adam-floored": "#F1932D",
    "trackstar-adam-factored": "#EE8026",
    "trackstar-adam-half": "#72190E",
    "trackstar-adam-flat-vocab": "#E65518",
    "trackstar-adafactor": "#F6C141",
    "trackstar-data-moments": "#A5170E",
    "trackstar-no-hessian": "#4EB265",
    "trackstar-no-mixing": "#90C987",
    "trackstar-heldout-r-query": "#CAE0AB",
    "trackstar-global-damping": "#F7F056",
    "trackstar-every-chunk": "#B8DDA0",
    "trackstar-no-unit-norm": "#5289C7",
    "trackstar": "#DC050C",
}
OTHER_COLOR = "#777777"  # a method this table does not know (Tol's colour for missing data)
MARKERS = "os^vD<>pPhX*d"  # a second cue besides colour, one per method in report order
# Okabe-Ito, for the proponent categories
CATEGORY_COLORS = ("#0072B2", "#E69F00", "#56B4E9", "#009E73", "#CC79A7", "#BBBBBB")


def magnitude(value, digits: int = 3, sign: bool = False) -> str:
    """`value` with `digits` significant digits at its own magnitude: 0.0502, 0.711, 1.80, 12345, and
    scientific notation below 10^-3 or from 10^5 (1.50e-05, not 0.000); "—" for None."""
    if value is None:
        return "—"
    value = float(value)
    plus = "+" if sign else ""
    if not math.isfinite(value) or value == 0:
        return f"{value:{plus}g}"
    size = abs(value)
    if 1e-3 <= size < 1e5:
        decimals = max(0, digits - 1 - math.floor(math.log10(size)))
        return f"{value:{plus}.{decimals}f}"
    return f"{value:{plus}.{digits - 1}e}"


def signed(value, digits: int = 3) -> str:
    return magnitude(value, digits, sign=True)


def method_color(method: str) -> str:
    return METHOD_COLORS.get(method, OTHER_COLOR)


def _marker(method: str) -> str:
    order = list(METHOD_COLORS)
    return MARKERS[order.index(method) % len(MARKERS)] if method in order else "."


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rendered(fig) -> str:
    out = _png(fig)
    _pyplot().close(fig)
    return out


def bucket_plot(per_bucket: dict):
    """The figure of `bucket_figure`, or None when there are no buckets."""
    plt = _pyplot()
    per_bucket = {m: {b: c for b, c in cells.items() if b.isdigit()} for m, cells in per_bucket.items()}
    if not any(per_bucket.values()):  # queries without frequency buckets
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, cells in per_bucket.items():
        order = sorted(cells, key=int)
        for ax, metric in zip(axes, ("mrr", "recall@10")):
            ax.plot(
                [int(b) for b in order],
                [cells[b][metric] for b in order],
                marker=_marker(method),
                color=method_color(method),
                markeredgecolor="#333333",
                label=method,
                linewidth=2.5 if method in ("trackstar", "bm25") else 1.2,
            )
    buckets = sorted({int(b) for cells in per_bucket.values() for b in cells})
    for ax, metric in zip(axes, ("MRR", "recall@10 (any stating document in the top 10)")):
        ax.set_xscale("log")
        ax.set_xticks(buckets, [str(b) for b in buckets])
        ax.minorticks_off()
        ax.set_xlabel("frequency bucket (documents stating the fact)")
        ax.set_ylabel(metric)
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="method")
    return fig


def bucket_figure(per_bucket: dict) -> str:
    """MRR and recall@10 per frequency bucket, one line per method ('' when there are no buckets)."""
    fig = bucket_plot(per_bucket)
    return _rendered(fig) if fig is not None else ""


def tail_patch_plot(methods: dict):
    names = list(methods)
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 0.35 * len(names) + 1.2))
    for ax, key, label in zip(axes, ("tail_patch", "tail_patch_delta_prob"), ("Δlog p(target)", "Δp(target)")):
        means = np.array([methods[m][key] for m in names])
        low = np.array([methods[m][f"{key}_ci"][0] for m in names])
        high = np.array([methods[m][f"{key}_ci"][1] for m in names])
        colors = [method_color(m) for m in names]
        ax.barh(names, means, xerr=[means - low, high - means], color=colors, edgecolor="#333333", capsize=2)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: magnitude(value, 2)))  # no offset text
        ax.set_xlabel(f"tail-patch {label}, mean over queries (95% CI)")
    axes[1].set_yticks([])
    return fig


def tail_patch_figure(methods: dict) -> str:
    """Tail-patch Δlog p and Δp per method with their 95% CIs (methods named on the axis: no legend)."""
    return _rendered(tail_patch_plot(methods))


def category_plot(categories: dict, order: tuple):
    if not categories:
        return None
    plt = _pyplot()
    methods = list(categories)
    fig, ax = plt.subplots(figsize=(11, 0.35 * len(methods) + 1.2))
    left = np.zeros(len(methods))
    for category, color in zip(order, CATEGORY_COLORS * (len(order) // len(CATEGORY_COLORS) + 1)):
        shares = np.array([categories[m][category] for m in methods])
        ax.barh(methods, shares, left=left, label=category, color=color, edgecolor="#333333", linewidth=0.5)
        left += shares
    ax.set_xlabel("share of top-10 proponents")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="proponent")
    return fig


def category_figure(categories: dict, order: tuple) -> str:
    fig = category_plot(categories, order)
    return _rendered(fig) if fig is not None else ""


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
    environment.filters.update(num=magnitude, signed=signed, color=method_color)
    return environment.get_template("eval.html").render(
        report=report,
        title=report.get("title") or f"Fact tracing on {report['query_set']}",
        several_seeds=any(cell.get("seeds", 1) > 1 for cell in report["methods"].values()),
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
    correction = report.get("optimizer_correction", "").split(" from ")[0]  # the normaliser's name
    for method, c in report["methods"].items():
        name = NAMES.get(method, method)
        if method == "trackstar" and correction:
            name = f"**TrackStar** (correction: {correction})"
        lines.append(
            f"| {name} | {c['mrr']:.3f} [{c['mrr_ci'][0]:.2f}, {c['mrr_ci'][1]:.2f}] | "
            f"{c['recall@10']:.3f} | {c['tail_patch']:+.4f} [{c['tail_patch_ci'][0]:+.3f}, "
            f"{c['tail_patch_ci'][1]:+.3f}] | {c['tail_patch_delta_prob']:+.5f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m evaluation.report reports/eval.json
    import json
    import sys

    print(markdown_table(json.loads(open(sys.argv[1], encoding="utf-8").read())))
