"""Which optimizer correction an extraction runs with: its projection spec (hence fingerprint) for a
checkpoint, the `auto` choice made by measurement (docs/optimizer-correction.md), and the line that
records which correction the vectors carry and why. Used by extract's planning and plan_groups.
"""

from __future__ import annotations

from pathlib import Path

from gradient_kernels.projection import state_kind
from infra.lake import Lake


def uses_optimizer_state(normalizer: str) -> bool:
    return state_kind(normalizer) in ("adam", "adafactor")


def projection_spec(lake: Lake, checkpoint_dir: Path, config):
    """The spec (hence fingerprint) of an extraction (`config`: its ExtractConfig) for this
    checkpoint's architecture, built on the meta device; a
    data-* normaliser's second moments are estimated here the first time (jobs/second_moments.py)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from gradient_kernels.modules import uniform_k, weight_matrices
    from gradient_kernels.projection import ProjectionSpec
    from jobs.checkpoints import CheckpointError, load_manifest, optimizer_state_source

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint_dir))
    normalizer = config.normalizer
    has_state = optimizer_state_source(checkpoint_dir, config.optimizer_source) is not None
    if normalizer == "auto":
        # no optimizer state: index without the correction (recorded in the fingerprint and the run)
        normalizer = auto_normalizer(load_manifest(checkpoint_dir)["optimizer"] if has_state else "none")
    elif uses_optimizer_state(normalizer) and not has_state:
        raise CheckpointError(
            f"{checkpoint_dir}: normaliser {normalizer!r} needs the optimizer's state "
            f"({config.optimizer_source}), and the folder has none; use --normalizer auto, data-floored or none"
        )
    moments = ""
    if state_kind(normalizer) == "data":
        from jobs.second_moments import data_moments

        moments = data_moments(lake, checkpoint_dir, load_manifest(checkpoint_dir)["checkpoint_id"])
    return ProjectionSpec(
        seed=config.projection_seed,
        k=uniform_k(weight_matrices(model), config.projection_k),
        normalizer=normalizer,
        dtype="float32",
        moments=moments,
    )


def auto_normalizer(optimizer: str) -> str:
    """The checkpoint's own optimizer state: Adafactor's is factored already; Adam's through half of
    the rank-1 fit of its floored V on each side (`adam-half`: the dot product weighs by 1/sqrt(V)
    once, as the Adam step of the tail-patch does), folded into the projections, so no per-example
    gradient is formed. Without optimizer state: none. Chosen by measurement
    (docs/optimizer-correction.md): over seven AdamW worlds the half correction's effect is never
    below no correction beyond its interval, where the full rank-1 fit's is, on the two largest
    worlds, and its harm grows with the corpus; second moments estimated from data (data-*) were
    below both everywhere."""
    return optimizer if optimizer in ("adafactor", "none") else "adam-half"


def optimizer_correction(checkpoint_dir: Path, config, spec) -> str:
    """One line for the run's lineage: which correction the vectors carry, and why."""
    from jobs.checkpoints import optimizer_state_source

    source = optimizer_state_source(checkpoint_dir, config.optimizer_source)
    chosen = ", the default (docs/optimizer-correction.md)" if config.normalizer == "auto" else ", asked for"
    if state_kind(spec.normalizer) == "data":
        return f"{spec.normalizer} from E[g²] over a sample of training chunks, second moments {spec.moments}{chosen}"
    if spec.normalizer != "none":
        return f"{spec.normalizer} from the {source} optimizer state{chosen}"
    if source is None:
        return "none: the checkpoint has no optimizer state (neither optimizer.pt nor zero/latest)"
    return "none: asked for (--normalizer none)"
