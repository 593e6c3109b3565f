"""The gradient methods' rankings: method -> query -> [doc ids, best first], per projection seed.

The first seed goes the pipeline's way (what the DAG stored is reused when its inputs are
unchanged); other seeds and the variants are fitted and scored in memory and never overwrite
`proponents`. The extractions every seed needs start the ranks once, together.
"""

from __future__ import annotations

from collections import defaultdict

from evaluation.config import CORRECTION_VARIANTS, EvaluateConfig
from gradient_kernels.projection import state_kind
from infra.lake import Lake
from jobs import extract, fit_hessian, score


# scored on vectors extracted with the optimizer correction; score.PLAIN_METHODS on vectors without it
CORRECTED_METHODS = ("trackstar", "trackstar-no-hessian", "trackstar-no-mixing", "trackstar-no-unit-norm")
# the crossing component of the classic rule, kept fixed whatever the dimension (the variant measures it)
CLASSIC_CROSSING_COMPONENT = 1000


def evaluated_checkpoint(lake: Lake, config: EvaluateConfig) -> str:
    """The checkpoint's location (absolute path or s3:// URI): the one named (path or registered id),
    else the newest registered, else the newest the lake trained (a fresh lake with a user's corpus
    has none registered yet)."""
    from jobs.catalog import checkpoint_uri, latest_checkpoint_id, registered_location

    if config.checkpoint:
        return checkpoint_uri(lake, config.checkpoint)
    if config.checkpoint_id:
        return registered_location(lake, config.checkpoint_id)
    if lake.read("checkpoints", columns=["checkpoint_id"]).num_rows:
        return registered_location(lake, latest_checkpoint_id(lake))
    return checkpoint_uri(lake, "")


def ranked_proponents(lake: Lake, query_set: str, checkpoint_id: str) -> dict:
    """method -> query -> [doc ids, best first] of the stored proponents."""
    ranked = defaultdict(dict)
    rows = lake.read("proponents", filters=[("query_set", "=", query_set), ("checkpoint_id", "=", checkpoint_id)])
    for row in sorted(rows.to_pylist(), key=lambda r: r["rank"]):
        ranked[row["method"]].setdefault(row["query_id"], []).append(row["doc_id"])
    return dict(ranked)


def rankings_per_seed(
    lake: Lake, config: EvaluateConfig, checkpoint: str, manifest: dict, query_ids: list
) -> tuple[dict, dict]:
    """seed -> method -> query -> [doc ids] for every gradient method, and seed -> the fit
    diagnostics of its TrackStar Hessian."""
    wanted = extractions(config, checkpoint, manifest.get("optimizer", "adam"))
    # one start of the ranks for all, and none where the DAG extracted them already (its `also_extract`)
    extracted = dict(zip(wanted, extract.run_many(list(wanted.values()), ranks_before_plan=False)))
    ranked, diagnostics = {}, {}
    for seed in config.seeds:
        ranked[seed], diagnostics[seed] = seed_rankings(
            lake, config, manifest["checkpoint_id"], seed, query_ids, extracted
        )
        print(f"[evaluate] projection seed {seed}: {len(ranked[seed])} gradient method(s) ranked", flush=True)
    return ranked, diagnostics


def extractions(config: EvaluateConfig, checkpoint: str, optimizer: str) -> dict:
    """(seed, normalizer) -> the extraction's config, for every seed: TrackStar's own ("auto") on
    each, the plain-gradient baselines ("none") and the other corrections (CORRECTION_VARIANTS, those
    the checkpoint's optimizer state allows) on the first only (each needs an extraction of its own) unless
    `baselines_every_seed`."""
    wanted = {}
    for seed in config.seeds:
        normalizers = ["auto"]
        if seed == config.seeds[0] or config.baselines_every_seed:
            normalizers.append("none")
            normalizers += [
                CORRECTION_VARIANTS[v]
                for v in config.variants
                if v in CORRECTION_VARIANTS and applies(CORRECTION_VARIANTS[v], optimizer)
            ]
        for normalizer in normalizers:
            wanted[seed, normalizer] = extract.ExtractConfig(
                lake=config.lake,
                checkpoint=checkpoint,
                projection_k=config.projection_k,
                normalizer=normalizer,
                query_set=config.query_set,
                projection_seed=seed,
            )
    return wanted


def projections(config: EvaluateConfig, checkpoint_dir) -> list[dict]:
    """Every projection the evaluation of this checkpoint extracts, as the extraction DAGs'
    `also_extract` param: `make run` passes them to the reindex DAG, so one start of the ranks
    extracts them with the index (the evaluation then finds them done)."""
    from jobs.checkpoints import load_manifest

    wanted = extractions(config, str(checkpoint_dir), load_manifest(checkpoint_dir).get("optimizer", "adam"))
    return [
        {"projection_seed": c.projection_seed, "projection_k": c.projection_k, "normalizer": c.normalizer}
        for c in wanted.values()
    ]


def applies(normalizer: str, optimizer: str) -> bool:
    """Can this correction be applied to a checkpoint trained by `optimizer`? adam-* need Adam's
    state, adafactor Adafactor's; data-* and none need none."""
    return state_kind(normalizer) in (None, "data", optimizer)


def seed_rankings(
    lake: Lake, config: EvaluateConfig, checkpoint_id: str, seed: int, query_ids: list, extracted: dict
) -> tuple[dict, dict]:
    """method -> query -> [doc ids] for every gradient method under one projection seed, and the
    fit diagnostics of its TrackStar Hessian. `extracted`: (seed, normalizer) -> extraction result."""
    first = seed == config.seeds[0]
    ranked, diagnostics = {}, {}
    methods_of = {"auto": CORRECTED_METHODS, "none": score.PLAIN_METHODS}
    variant_of = {normalizer: variant for variant, normalizer in CORRECTION_VARIANTS.items()}
    default = extracted[seed, "auto"]["fingerprint"]
    for (of_seed, normalizer), extraction in extracted.items():
        if of_seed != seed:
            continue
        fingerprint = extraction["fingerprint"]
        if normalizer in variant_of:  # TrackStar with another correction; none if it is the default's
            if fingerprint != default:
                other, _ = memory_rankings(
                    lake, config, checkpoint_id, fingerprint, ["trackstar"], fit_hessian.FitHessianConfig()
                )
                ranked[variant_of[normalizer]] = other["trackstar"]
            continue
        methods = methods_of[normalizer]
        if first:
            found, fitted = pipeline_rankings(lake, config, checkpoint_id, fingerprint, methods), None
        else:
            found, fitted = memory_rankings(
                lake, config, checkpoint_id, fingerprint, methods, fit_hessian.FitHessianConfig()
            )
        ranked |= found
        if normalizer != "auto":
            continue
        if fitted is None:
            _, fitted = memory_rankings(lake, config, checkpoint_id, fingerprint, [], fit_hessian.FitHessianConfig())
        diagnostics = {
            "lambda": fitted.lam,
            "crossing_component": fitted.component,
            **fitted.diagnostics,
            "fingerprint": fingerprint,
            "optimizer_correction": extraction["optimizer_correction"],
        }
        ranked |= variant_rankings(lake, config, checkpoint_id, extraction, query_ids)
    return ranked, diagnostics


def variant_rankings(lake: Lake, config: EvaluateConfig, checkpoint_id: str, extraction: dict, query_ids: list) -> dict:
    """The variants computed from TrackStar's own vectors: R_query fitted on held-out queries, the
    classic global damping, and R_train of every chunk (no outliers left out)."""
    fingerprint, ranked = extraction["fingerprint"], {}
    if "trackstar-heldout-r-query" in config.variants:
        ranked["trackstar-heldout-r-query"] = heldout_rankings(lake, config, checkpoint_id, fingerprint, query_ids)
    if "trackstar-global-damping" in config.variants:
        classic = fit_hessian.FitHessianConfig(
            damping_rule="mixed-global", crossing_fraction=min(1.0, CLASSIC_CROSSING_COMPONENT / extraction["dim"])
        )
        old, _ = memory_rankings(lake, config, checkpoint_id, fingerprint, ["trackstar"], classic)
        ranked["trackstar-global-damping"] = old["trackstar"]
    if "trackstar-every-chunk" in config.variants:
        every = fit_hessian.FitHessianConfig(outlier_z=float("inf"))
        kept, _ = memory_rankings(lake, config, checkpoint_id, fingerprint, ["trackstar"], every)
        ranked["trackstar-every-chunk"] = kept["trackstar"]
    return ranked


def pipeline_rankings(lake: Lake, config: EvaluateConfig, checkpoint_id: str, fingerprint: str, methods) -> dict:
    """The Spark path for the first seed: refit the Hessian and rescore only what is missing or was
    made from other inputs (what the DAG made is reused), then read the stored proponents."""
    from jobs.catalog import hessian_is_stale, last_scored_inputs

    refit = hessian_is_stale(lake, checkpoint_id, fingerprint, config.query_set, threshold=0.0) or not _has_every_kind(
        lake, checkpoint_id, fingerprint, config.query_set
    )
    if refit:
        fit_hessian.run(
            fit_hessian.FitHessianConfig(
                lake=config.lake, checkpoint_id=checkpoint_id, query_set=config.query_set, fingerprint=fingerprint
            )
        )
    inputs = score.scoring_inputs(lake, checkpoint_id, fingerprint, config.query_set)
    stale = [m for m in methods if last_scored_inputs(lake, checkpoint_id, fingerprint, config.query_set, m) != inputs]
    if stale:
        score.run(
            score.ScoreConfig(
                lake=config.lake,
                checkpoint_id=checkpoint_id,
                query_set=config.query_set,
                fingerprint=fingerprint,
                methods=stale,
                top_k=config.top_k,
            )
        )
    print(
        f"[evaluate] {fingerprint}: Hessian {'refitted' if refit else 'reused'}, "
        f"{len(stale)} of {len(methods)} method(s) rescored, the rest reused",
        flush=True,
    )
    stored = ranked_proponents(lake, config.query_set, checkpoint_id)
    return {m: stored[m] for m in methods}


def _has_every_kind(lake: Lake, checkpoint_id: str, fingerprint: str, query_set: str) -> bool:
    kinds = lake.read(
        "hessians",
        filters=[
            ("checkpoint_id", "=", checkpoint_id),
            ("fingerprint", "=", fingerprint),
            ("query_set", "=", query_set),
        ],
        columns=["kind"],
    )["kind"].to_pylist()
    return set(fit_hessian.KINDS) <= set(kinds)


def memory_rankings(
    lake: Lake,
    config: EvaluateConfig,
    checkpoint_id: str,
    fingerprint: str,
    methods,
    fit_config: fit_hessian.FitHessianConfig,
    exclude=(),
) -> tuple[dict, fit_hessian.Fit]:
    """Rankings of `methods` under an unregistered fit (another seed, or a variant's settings); R_train
    leaves out the same outlier chunks the fit-hessian job does, so these rankings and the
    pipeline's (the first seed's) are the same estimator."""
    train, query = fit_hessian.extracted_sums(lake, checkpoint_id, fingerprint, config.query_set, exclude)
    train, _ = fit_hessian.without_outliers(lake, checkpoint_id, fingerprint, train, fit_config.outlier_z)
    fitted = fit_hessian.fit(train, query, fit_config)
    ranked = score.rank_in_memory(
        lake, list(methods), checkpoint_id, config.query_set, fingerprint, fitted.matrices, config.top_k
    )
    return ranked, fitted


def heldout_rankings(lake: Lake, config: EvaluateConfig, checkpoint_id: str, fingerprint: str, query_ids: list) -> dict:
    """TrackStar with R_query fitted on the other half of the queries (2-fold cross-fit)."""
    ranked = {}
    for scored in (query_ids[0::2], query_ids[1::2]):  # R_query fitted without them: on the other half
        fold, _ = memory_rankings(
            lake,
            config,
            checkpoint_id,
            fingerprint,
            ["trackstar"],
            fit_hessian.FitHessianConfig(),
            exclude=tuple(scored),
        )
        ranked |= {q: fold["trackstar"][q] for q in scored if q in fold["trackstar"]}
    return ranked
