"""The evaluation's configuration (its command line) and the variants it can measure."""

from __future__ import annotations

from dataclasses import dataclass

from evaluation.tail_patching import DEFAULT_TAIL_PATCH_LR
from infra.cli import option
from infra.config import from_settings

# TrackStar with another optimizer correction than its default -> that correction's normaliser; each
# needs an extraction of its own, and one that resolves to the default's vectors is not repeated
CORRECTION_VARIANTS = {
    "trackstar-adam-exact": "adam-exact",
    "trackstar-adam-floored": "adam-floored",
    "trackstar-adam-factored": "adam-factored",
    "trackstar-adam-half": "adam-half",
    "trackstar-adam-flat-vocab": "adam-flat-vocab",
    "trackstar-adafactor": "adafactor",
    "trackstar-data-moments": "data-floored",
}
# variants that measure this implementation's own choices (evaluation/evaluate.py's docstring)
VARIANTS = (
    *CORRECTION_VARIANTS,
    "trackstar-heldout-r-query",
    "trackstar-global-damping",
    "trackstar-every-chunk",
)
# all but the data estimate (a whole extraction more, and far below the default on every world
# measured) and the flat vocabulary rows (a diagnosis of the correction): docs/optimizer-correction.md;
# ask for them with --variants
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v not in ("trackstar-data-moments", "trackstar-adam-flat-vocab"))


@dataclass
class EvaluateConfig:
    lake: str = from_settings("lake_root", help="lake root: a folder or s3://bucket/prefix")
    checkpoint_id: str = option("", help="a registered checkpoint (default: the newest)")
    checkpoint: str = option("", help="or a checkpoint folder / s3:// prefix")
    query_set: str = from_settings("query_set")
    top_k: int = from_settings("top_k", help="proponents kept per query")
    projection_k: int = from_settings("projection_k")
    seeds: list[int] = option(
        factory=lambda: [0, 1, 2], nargs="+", help="projection seeds; the first is the pipeline's"
    )
    # TrackStar and the variants computed from its vectors run for every seed; the methods that need
    # extractions of their own (plain-gradient baselines, the paper-exact correction) for the first
    # only, unless this is set (it triples the evaluation's extraction time)
    baselines_every_seed: bool = option(
        False, help="also extract the plain-gradient baselines and the paper-exact correction for every seed"
    )
    variants: list[str] = option(factory=lambda: list(DEFAULT_VARIANTS), choices=VARIANTS)
    tail_patch_queries: int = option(
        100, help="queries of the tail-patch: a bucket-stratified sample, fixed by the seed"
    )
    tail_patch_lr: float | None = option(
        None, help=f"step size of the tail-patch (default: the checkpoint's, else {DEFAULT_TAIL_PATCH_LR})"
    )
    sample_seed: int = option(0, help="of the tail-patch sample and the bootstrap")
    reports: str = option(
        "", help="folder of the report (default: a new <lake>/reports/<run_id>/, with <lake>/reports/latest)"
    )
    cpu_threads: int = from_settings("cpu_threads", help="CPU threads (0: the cores idle at the start)")
