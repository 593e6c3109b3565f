"""The report's findings: a sentence per TrackStar component saying whether it helps (the paired 95%
interval of the tail-patch difference), the headline comparisons with BM25, and the Hessian's fit;
numbers at their magnitude, components named in words."""

from __future__ import annotations

from evaluation.report import magnitude, signed

# ablation or variant -> (the component full TrackStar has and it lacks, the variant in words)
COMPONENTS = {
    "trackstar-no-optimizer": ("The optimizer correction", "TrackStar without it"),
    "trackstar-no-hessian": ("The Hessian preconditioner (R^-1/2)", "TrackStar without it"),
    "trackstar-no-mixing": ("Task mixing (R_query mixed into the Hessian)", "TrackStar without it"),
    "trackstar-no-unit-norm": ("Unit normalisation", "TrackStar without it"),
    "trackstar-adam-exact": ("The default correction", "TrackStar with the paper's exact Adam correction"),
    "trackstar-adam-floored": ("The default correction", "TrackStar with the floored Adam correction"),
    "trackstar-adam-factored": ("The default correction", "TrackStar with the rank-1 (factored) Adam correction"),
    "trackstar-adam-half": (
        "The default correction",
        "TrackStar with half of the rank-1 Adam correction on each side (V^1/4)",
    ),
    "trackstar-adam-flat-vocab": (
        "The default correction",
        "TrackStar with the rank-1 Adam correction, its vocabulary rows left flat",
    ),
    "trackstar-adafactor": ("The default correction", "TrackStar with Adafactor's own correction"),
    "trackstar-data-moments": (
        "The default correction",
        "TrackStar corrected by second moments estimated from data",
    ),
    "trackstar-heldout-r-query": (
        "Fitting R_query on the scored queries",
        "TrackStar with R_query fitted on a held-out half of the queries",
    ),
    "trackstar-every-chunk": (
        "Leaving the outlier chunks out of R_train",
        "TrackStar with every training chunk in R_train",
    ),
    "trackstar-global-damping": (
        "Per-block damping relative to R_train",
        "TrackStar with the classic global damping of the mixed R",
    ),
}


def _interval(low, high, format=signed) -> str:
    return f"95% interval {format(low)} to {format(high)}"


def findings(report: dict) -> list[str]:
    """The findings of a report as `summary.summarise` makes it, in the order the page shows them."""
    versus = report["trackstar_minus"]
    components = [_component_finding(m, versus[m]["tail_patch"]) for m in COMPONENTS if m in versus]
    return components + _bm25_findings(report) + _hessian_findings(report["hessian"])


def _component_finding(method: str, tail_patch_difference) -> str:
    """Does full TrackStar's tail-patch beat the variant without the component (paired 95% CI)?"""
    component, variant = COMPONENTS[method]
    mean, low, high = tail_patch_difference
    row = f"Table 1 row {method}"
    if low > 0:
        return (
            f"{component} helps: TrackStar's proponents raise the target's log-probability by {magnitude(mean)} "
            f"more per tail-patch step than those of {variant} ({_interval(low, high, magnitude)}; {row})."
        )
    if high < 0:
        return (
            f"{component} hurts: TrackStar's proponents raise the target's log-probability by "
            f"{magnitude(-mean)} less per tail-patch step than those of {variant} "
            f"({_interval(-high, -low, magnitude)}; {row})."
        )
    return (
        f"{component} makes no measurable difference here: per tail-patch step, TrackStar's proponents "
        f"change the target's log-probability by {signed(mean)} relative to those of {variant} "
        f"({_interval(low, high)}, which includes 0; {row})."
    )


def _bm25_findings(report: dict) -> list[str]:
    """Who ranks the stating documents better (MRR), and how much more TrackStar's proponents move
    the target than BM25's (the tail-patch ratio)."""
    if "bm25" not in report["trackstar_minus"]:
        return []
    what = {"delta_log_prob": "log-probability (Δlog p)", "delta_prob": "probability (Δp)"}
    return [_mrr_finding(*report["trackstar_minus"]["bm25"]["mrr"])] + [
        f"TrackStar's proponents change the target's {what.get(metric, metric)} {magnitude(ratio)}× as much "
        f"as BM25's in one tail-patch step (95% interval {magnitude(low)}× to {magnitude(high)}×)."
        for metric, (ratio, low, high) in report["trackstar_over_bm25_tail_patch"].items()
    ]


def _mrr_finding(mean: float, low: float, high: float) -> str:
    """TrackStar's MRR minus BM25's, with its paired 95% interval, in words."""
    if high < 0:
        return (
            f"BM25 finds the documents that state a fact better: TrackStar's MRR is {magnitude(-mean)} lower "
            f"({_interval(-high, -low, magnitude)})."
        )
    if low > 0:
        return (
            f"TrackStar ranks the documents that state a fact better than BM25: its MRR is {magnitude(mean)} "
            f"higher ({_interval(low, high, magnitude)})."
        )
    return (
        f"Neither TrackStar nor BM25 ranks the documents that state a fact measurably better: TrackStar's "
        f"MRR differs by {signed(mean)} ({_interval(low, high)}, which includes 0)."
    )


def _hessian_findings(h: dict) -> list[str]:
    """The Hessian's fit in one sentence; none when the report has no fit."""
    if not h:
        return []
    damped_above = (
        f"; the damping lies above R_train's largest eigenvalue in blocks {h['blocks_damped_above_train_top']}"
        if h["blocks_damped_above_train_top"]
        else ""
    )
    return [
        f"The Hessian fit: λ = {magnitude(h['lambda'])} (where the spectra cross, at eigenvalue number "
        f"{h['crossing_component']}), dampings from {magnitude(h['damping_min'])} to "
        f"{magnitude(h['damping_max'])}, condition number at most {magnitude(h['condition_number_max'])}; "
        f"the query gradients' second moment R_query has {magnitude(h['query_to_train_trace'])}× the trace "
        "of the training gradients' R_train" + damped_above + "."
    ]
