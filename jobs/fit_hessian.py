"""fit-hessian: R_train and R_query from the extraction's autocorrelation sums, λ, inverse roots.

The sums were accumulated per slice by `extract`; they are added up here (no pass over the
vectors). λ is given or chosen by the spectra-crossing rule. Two inverse roots are stored: the
task-mixed one (`inverse_root`) and the train-only one (`inverse_root_train_only`, λ = 0, the
"no task mixing" ablation), R_train⁻¹ (`inverse_train`, TRAK-style scoring), with `r_train` and
`r_query`, as safetensors files registered in `hessians`. A plot of both scaled spectra with the
crossing point and the dampings goes next to them.

Scale: the damping of each block is relative to R_train's block (`train_relative_damping`), and the
crossing component is a share of the dimension; both are recorded in the run's result with the
condition numbers, and a damping above R_train's top eigenvalue is flagged. R_query can be fitted
on a split that leaves the scored queries out (`r_query_exclude`).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import torch

from infra import storage
from infra.lake import Lake
from infra.matrices import save_matrices
from infra.cli import add_config_arguments, config_from_args, option
from infra.config import from_settings
from infra import layout
from jobs.threads import use_cpu_threads
from jobs.autocorrelation import summed_autocorrelation, without_chunks
from jobs.catalog import SliceConfig, latest_checkpoint_id, only_fingerprint
from jobs.spectra_plot import plot_spectra
from schemas.tables import table

KINDS = ("r_train", "r_query", "inverse_root", "inverse_root_train_only", "inverse_train")


@dataclass
class FitHessianConfig(SliceConfig):
    mixing_lambda: float | None = from_settings(
        "hessian_lambda", flags=["--lambda"], help="task mixing weight (default: spectra-crossing rule)"
    )
    crossing_fraction: float = option(
        0.015, help="the spectra cross at this share of the dimension (default 1.5%%, as the paper's ~1000 of ~65K)"
    )
    damping_ratio: float = from_settings(
        "hessian_damping", help="per block: ratio × the mean eigenvalue of R_train's block"
    )
    damping_rule: str = option(
        "train-block",
        choices=["train-block", "mixed-global"],
        help="per block relative to R_train (default), or the classic global rule on the mixed R",
    )
    outlier_z: float = from_settings(
        "hessian_outlier_z", help="leave train chunks this many robust deviations above the median norm out of R_train"
    )
    alarm_factor: float = from_settings(
        "hessian_alarm_factor", help="warn when λ or the damping moved by more than this factor since the last fit"
    )
    r_query_exclude: tuple = option(
        (), cli=False
    )  # query ids left out of R_query (fit it on a split the scoring does not use)


def query_autocorrelation(
    lake: Lake, checkpoint_id: str, fingerprint: str, query_set: str, exclude: set, block_sizes: list
):
    """Σ p pᵀ over the stored query vectors of the set, leaving out the `exclude` query ids."""
    from gradient_kernels.hessian import Autocorrelation
    from schemas.vectors import decode_rows

    rows = lake.read(
        "query_gradients",
        filters=[
            ("query_set", "=", query_set),
            ("checkpoint_id", "=", checkpoint_id),
            ("fingerprint", "=", fingerprint),
        ],
    )
    kept = rows.filter(pc.invert(pc.is_in(rows["query_id"], pa.array(sorted(exclude), pa.string()))))
    if kept.num_rows == 0:
        raise ValueError(
            f"no query vectors of {query_set!r} are left for R_query after excluding {len(exclude)} queries"
        )
    vectors = decode_rows(kept, sum(block_sizes))
    return Autocorrelation(block_sizes).add(torch.from_numpy(vectors))


@dataclass
class Fit:
    """The fitted preconditioners of one (checkpoint, query set, fingerprint), before registration."""

    lam: float
    component: int
    dampings: list
    train_dampings: list
    matrices: dict  # kind -> list of blocks (see KINDS)
    diagnostics: dict
    train_spectrum: torch.Tensor
    query_spectrum: torch.Tensor


def fit(train, query, config: FitHessianConfig) -> Fit:
    """R_train, R_query, λ and the damped inverse roots from two `Autocorrelation` sums."""
    from gradient_kernels.hessian import (
        Decomposed,
        conditioning,
        crossing_component,
        crossing_lambda,
        damped_inverse_power,
        mix,
        spectrum,
    )

    r_train, r_query = train.mean(), query.mean()
    train_eigen, query_eigen = Decomposed(r_train), Decomposed(r_query)  # each decomposed once, used throughout
    train_spectrum, query_spectrum = spectrum(train_eigen), spectrum(query_eigen)
    component = crossing_component(sum(train.block_sizes), config.crossing_fraction)
    lam = (
        config.mixing_lambda
        if config.mixing_lambda is not None
        else crossing_lambda(query_spectrum, train_spectrum, component)
    )
    mixed = mix(r_query, r_train, lam)
    mixed_eigen = Decomposed(mixed)
    dampings, train_dampings = dampings_for(config, r_train, mixed), dampings_for(config, r_train, r_train)
    matrices = {
        "r_train": r_train,
        "r_query": r_query,
        "inverse_root": damped_inverse_power(mixed_eigen, dampings)[0],
        "inverse_root_train_only": damped_inverse_power(train_eigen, train_dampings)[0],
        "inverse_train": damped_inverse_power(train_eigen, train_dampings, power=-1.0)[0],
    }
    return Fit(
        lam,
        component,
        dampings,
        train_dampings,
        matrices,
        conditioning(train_eigen, query_eigen, mixed_eigen, dampings),
        train_spectrum,
        query_spectrum,
    )


def extracted_sums(lake: Lake, checkpoint_id: str, fingerprint: str, query_set: str, r_query_exclude=()):
    """(train, query) autocorrelation sums of an extraction; R_query leaves out `r_query_exclude`."""
    from infra.layout import QUERY, TRAIN

    partitions = sorted(
        set(
            lake.read(
                "train_gradients",
                filters=[("checkpoint_id", "=", checkpoint_id), ("fingerprint", "=", fingerprint)],
                columns=["partition"],
            )["partition"].to_pylist()
        )
    )
    train_files = [layout.autocorrelation_file(lake.root, checkpoint_id, fingerprint, TRAIN, p) for p in partitions]
    query_file = layout.autocorrelation_file(lake.root, checkpoint_id, fingerprint, QUERY, query_set)
    missing = [f for f in train_files + [query_file] if not storage.exists(f)]
    if not partitions or missing:
        raise FileNotFoundError(
            f"autocorrelation sums missing for {checkpoint_id}/{fingerprint}: "
            f"{missing[:3] or 'no extracted partitions'}; rerun `python -m jobs extract`"
        )
    train = summed_autocorrelation(train_files)
    query = (
        summed_autocorrelation([query_file])
        if not r_query_exclude
        else query_autocorrelation(lake, checkpoint_id, fingerprint, query_set, set(r_query_exclude), train.block_sizes)
    )
    return train, query


def without_outliers(lake: Lake, checkpoint_id: str, fingerprint: str, train, z: float):
    """(R_train's sums without the outlier chunks, the outliers' rows for `train_outliers`). Their
    outer products are subtracted exactly where the vectors are stored as float32 (what extraction
    summed); for a lossy dtype the sums of the other chunks are rebuilt from the stored vectors."""
    import numpy as np

    from gradient_kernels.robust import outlier_threshold

    where = [("checkpoint_id", "=", checkpoint_id), ("fingerprint", "=", fingerprint)]
    rows = lake.read("train_gradients", filters=where, columns=["partition", "doc_id", "chunk", "norm", "dtype"])
    norms = rows["norm"].to_numpy()
    threshold = outlier_threshold(norms, z)
    median = float(np.median(norms)) if len(norms) else 0.0
    outliers = rows.filter(pa.array(norms > threshold))
    table = pa.table(
        {
            "checkpoint_id": [checkpoint_id] * outliers.num_rows,
            "fingerprint": [fingerprint] * outliers.num_rows,
            "partition": outliers["partition"],
            "doc_id": outliers["doc_id"],
            "chunk": outliers["chunk"],
            "norm": outliers["norm"],
            "median_norm": [median] * outliers.num_rows,
            "threshold": [threshold] * outliers.num_rows,
        }
    )
    if outliers.num_rows == 0:
        return train, table
    keys = set(zip(outliers["partition"].to_pylist(), outliers["doc_id"].to_pylist(), outliers["chunk"].to_pylist()))
    exact = set(outliers["dtype"].to_pylist()) == {"float32"}
    scope = where + ([("partition", "in", sorted({p for p, _, _ in keys}))] if exact else [])

    def is_outlier(batch):
        named = zip(batch["partition"].to_pylist(), batch["doc_id"].to_pylist(), batch["chunk"].to_pylist())
        return pa.array([key in keys for key in named])

    return without_chunks(lake, train, scope, is_outlier, exact), table


def alarms(lake: Lake, query_set: str, fingerprint: str, lam: float, damping: float, factor: float) -> list[str]:
    """What moved by more than `factor` (either way) since the last fit of the query set with the same
    projection and normaliser (fingerprint): the last checkpoint's, on a nightly run; fits of other
    projections (an evaluation's seeds) have scales of their own."""
    from jobs.catalog import runs_of

    earlier = [
        result
        for _, _, result in runs_of(lake, "fit-hessian")
        if result.get("query_set") == query_set and result.get("fingerprint") == fingerprint
    ]
    if not earlier:
        return []
    last, found = earlier[-1], []
    for name, now in (("lambda", lam), ("damping", damping)):
        before = last.get(name)
        if before and now and max(now / before, before / now) > factor:
            found.append(f"{name} moved from {before:.3g} to {now:.3g} since run {last.get('run_id')}")
    return found


def run(config: FitHessianConfig) -> dict:
    from infra.names import check_names
    from infra.runs import finish_run, start_run

    check_names(query_set=config.query_set, checkpoint_id=config.checkpoint_id, fingerprint=config.fingerprint)
    use_cpu_threads(config.cpu_threads, "fit-hessian")
    lake = Lake(config.lake)
    checkpoint_id = config.checkpoint_id or latest_checkpoint_id(lake)
    fingerprint = config.fingerprint or only_fingerprint(lake, checkpoint_id)
    run_id = start_run(
        lake, "fit-hessian", asdict(config) | {"checkpoint_id": checkpoint_id, "fingerprint": fingerprint}
    )
    train, query = extracted_sums(lake, checkpoint_id, fingerprint, config.query_set, config.r_query_exclude)
    train, outliers = without_outliers(lake, checkpoint_id, fingerprint, train, config.outlier_z)
    record_outliers(lake, outliers, checkpoint_id, fingerprint, run_id)
    fitted = fit(train, query, config)
    lam, component, dampings, diagnostics = fitted.lam, fitted.component, fitted.dampings, fitted.diagnostics
    warn_if_damping_hides_r_train(diagnostics)
    save_hessians(lake, fitted, train.count, query.count, (checkpoint_id, config.query_set, fingerprint), run_id)
    figure = plot_spectra(
        fitted.query_spectrum,
        fitted.train_spectrum,
        lam,
        component,
        diagnostics,
        layout.reports(lake.root, f"hessian_{checkpoint_id}_{config.query_set}_{fingerprint}.png"),
        outliers.num_rows,
    )
    moved = alarms(lake, config.query_set, fingerprint, lam, sum(dampings) / len(dampings), config.alarm_factor)
    for alarm in moved:
        print(f"[fit-hessian] ALARM: {alarm}; look at the spectra plot and table train_outliers", flush=True)
    result = {
        "checkpoint_id": checkpoint_id,
        "query_set": config.query_set,
        "fingerprint": fingerprint,
        "lambda": lam,
        "crossing_component": component,
        "damping_rule": config.damping_rule,
        "damping": sum(dampings) / len(dampings),
        "dampings": dampings,
        "n_train": train.count,
        "n_query": query.count,
        "train_outliers": outliers.num_rows,
        "alarms": moved,
        "dim": sum(train.block_sizes),
        "blocks": len(train.block_sizes),
        "figure": str(figure),
        "run_id": run_id,
        "conditioning": diagnostics,
    }
    finish_run(lake, run_id, "succeeded", result)
    print(
        f"[fit-hessian] {checkpoint_id} × {config.query_set}: R from {train.count:,} train and {query.count:,} query "
        f"vectors ({result['blocks']} blocks, {result['dim']} dims); λ = {lam:.3f} (crossing at component "
        f"{component}), damping {min(dampings):.3g}..{max(dampings):.3g} ({config.damping_rule}), condition number "
        f"≤ {diagnostics['condition_number_max']:.3g}; spectra plot {figure}"
    )
    return result


def record_outliers(lake: Lake, outliers: pa.Table, checkpoint_id: str, fingerprint: str, run_id: str) -> None:
    """The chunks left out of R_train, into `train_outliers` (replacing the last fit's), and a line."""
    lake.replace_slice(
        "train_outliers",
        outliers.append_column("run_id", pa.array([run_id] * outliers.num_rows, pa.string())).append_column(
            "created_at", pa.array([datetime.now(timezone.utc)] * outliers.num_rows, pa.timestamp("us", tz="UTC"))
        ),
        checkpoint_id=checkpoint_id,
        fingerprint=fingerprint,
    )
    if outliers.num_rows:
        threshold, median = outliers["threshold"][0].as_py(), outliers["median_norm"][0].as_py()
        print(
            f"[fit-hessian] {outliers.num_rows:,} train chunk(s) left out of R_train: gradient norm above "
            f"{threshold:.3g} ({threshold / median:.3g}× the median); listed in table train_outliers",
            flush=True,
        )


def warn_if_damping_hides_r_train(diagnostics: dict) -> None:
    if diagnostics["blocks_damped_above_train_top"]:
        print(
            f"[fit-hessian] WARNING: the damping exceeds R_train's top eigenvalue in blocks "
            f"{diagnostics['blocks_damped_above_train_top'][:10]}: there R^(-1/2) is nearly constant on training "
            f"vectors (the preconditioner does nothing); lower --damping-ratio or use --damping-rule train-block",
            flush=True,
        )


def save_hessians(lake: Lake, fitted: Fit, n_train: int, n_query: int, keys: tuple[str, str, str], run_id: str):
    """Every fitted matrix to its safetensors file under the lake, and one `hessians` row each (the
    slice of (checkpoint, query set, fingerprint) replaced)."""
    checkpoint_id, query_set, fingerprint = keys
    folder = layout.hessians(lake.root, checkpoint_id, query_set, fingerprint)
    lineage = {  # kind -> (λ, per-block dampings, samples)
        "r_train": (None, None, n_train),
        "r_query": (None, None, n_query),
        "inverse_root": (fitted.lam, fitted.dampings, n_train + n_query),
        "inverse_root_train_only": (0.0, fitted.train_dampings, n_train),
        "inverse_train": (0.0, fitted.train_dampings, n_train),
    }
    rows = []
    for kind, (kind_lambda, kind_damping, n) in lineage.items():
        blocks = fitted.matrices[kind]
        path = storage.join(folder, f"{kind}.safetensors")
        # one metadata key: safetensors writes several in no fixed order, and the checksum must be stable
        sha = save_matrices(path, {f"block{i:03d}": b.float() for i, b in enumerate(blocks)}, {"count": n})
        rows.append(
            {
                "checkpoint_id": checkpoint_id,
                "query_set": query_set,
                "fingerprint": fingerprint,
                "kind": kind,
                "path": lake.relative(path),
                "shape": [b.shape[0] for b in blocks],
                "sha256": sha,
                "lambda": kind_lambda,
                "damping": sum(kind_damping) / len(kind_damping) if kind_damping else None,
                "n_samples": n,
                "run_id": run_id,
                "created_at": datetime.now(timezone.utc),
            }
        )
    lake.replace_slice(
        "hessians",
        pa.Table.from_pylist(rows, schema=table("hessians").arrow_schema),
        checkpoint_id=checkpoint_id,
        query_set=query_set,
        fingerprint=fingerprint,
    )


def dampings_for(config: FitHessianConfig, r_train: list, blocks: list) -> list[float]:
    """Per-block dampings for the inverse root of `blocks` under the configured rule."""
    from gradient_kernels.hessian import global_damping, train_relative_damping

    if config.damping_rule == "train-block":
        return train_relative_damping(r_train, config.damping_ratio)
    if config.damping_rule == "mixed-global":  # the classic rule, kept to measure against
        return [global_damping(blocks, config.damping_ratio)] * len(blocks)
    raise ValueError(f"damping rule must be train-block or mixed-global, not {config.damping_rule!r}")


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, FitHessianConfig)


def main(args):
    run(config_from_args(FitHessianConfig, args))
