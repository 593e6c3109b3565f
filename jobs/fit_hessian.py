"""fit-hessian: R_train and R_query from the extraction's autocorrelation sums, λ, inverse roots.

The sums were accumulated per slice by `extract`; they are added up here (no pass over the
vectors). λ is given or chosen by the spectra-crossing rule. Two inverse roots are stored: the
task-mixed one (`inverse_root`) and the train-only one (`inverse_root_train_only`, λ = 0, the
"no task mixing" ablation), with `r_train` and `r_query`, as safetensors files registered in
`hessians`. A plot of both scaled spectra with the crossing point goes next to them.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import pyarrow as pa
import torch

from infra import storage
from infra.lake import Lake
from infra.matrices import load_matrices, load_metadata, save_matrices
from infra.config import load_config

KINDS = ("r_train", "r_query", "inverse_root", "inverse_root_train_only")


@dataclass
class FitHessianConfig:
    lake: str = "lake"
    checkpoint_id: str = ""       # default: the most recently registered checkpoint
    query_set: str = "fact-world"
    fingerprint: str = ""         # default: the one train_gradients holds for the checkpoint
    mixing_lambda: float | None = None  # None: spectra-crossing rule
    crossing_component: int = 1000
    damping_ratio: float = 0.1    # damping = ratio × mean eigenvalue


def latest_checkpoint_id(lake: Lake) -> str:
    rows = lake.read("checkpoints", columns=["checkpoint_id", "registered_at"])
    if rows.num_rows == 0:
        raise ValueError("no registered checkpoints: run `python -m jobs extract` first")
    return max(zip(rows["registered_at"].to_pylist(), rows["checkpoint_id"].to_pylist()))[1]


def only_fingerprint(lake: Lake, checkpoint_id: str) -> str:
    rows = lake.read("train_gradients", filters=[("checkpoint_id", "=", checkpoint_id)], columns=["fingerprint"])
    found = sorted(set(rows["fingerprint"].to_pylist()))
    if len(found) != 1:
        raise ValueError(f"{checkpoint_id}: train_gradients hold fingerprints {found}; pass --fingerprint")
    return found[0]


def summed_autocorrelation(files: list[str]):
    from gradient_kernels.hessian import Autocorrelation

    total = None
    for path in files:
        tensors = load_matrices(path)
        blocks = [tensors[k] for k in sorted(tensors)]
        count = int(load_metadata(path)["count"])
        part = Autocorrelation([b.shape[0] for b in blocks], blocks, count)
        total = part if total is None else total.merge(part)
    return total


def run(config: FitHessianConfig) -> dict:
    from gradient_kernels.hessian import crossing_lambda, damped_inverse_power, mix, spectrum
    from infra.runs import finish_run, start_run
    from jobs.extract import QUERY, TRAIN, autocorrelation_path

    lake = Lake(config.lake)
    checkpoint_id = config.checkpoint_id or latest_checkpoint_id(lake)
    fingerprint = config.fingerprint or only_fingerprint(lake, checkpoint_id)
    run_id = start_run(lake, "fit-hessian", asdict(config) | {"checkpoint_id": checkpoint_id, "fingerprint": fingerprint})
    partitions = sorted(set(lake.read("train_gradients", filters=[("checkpoint_id", "=", checkpoint_id),
                                                                   ("fingerprint", "=", fingerprint)],
                                      columns=["partition"])["partition"].to_pylist()))
    train_files = [autocorrelation_path(lake, checkpoint_id, fingerprint, TRAIN, p) for p in partitions]
    query_file = autocorrelation_path(lake, checkpoint_id, fingerprint, QUERY, config.query_set)
    missing = [f for f in train_files + [query_file] if not storage.exists(f)]
    if not partitions or missing:
        raise FileNotFoundError(f"autocorrelation sums missing for {checkpoint_id}/{fingerprint}: "
                                f"{missing[:3] or 'no extracted partitions'}; rerun `python -m jobs extract`")
    train, query = summed_autocorrelation(train_files), summed_autocorrelation([query_file])
    r_train, r_query = train.mean(), query.mean()
    train_spectrum, query_spectrum = spectrum(r_train), spectrum(r_query)
    lam = (config.mixing_lambda if config.mixing_lambda is not None
           else crossing_lambda(query_spectrum, train_spectrum, config.crossing_component))
    inverse_root, damping = damped_inverse_power(mix(r_query, r_train, lam), damping_ratio=config.damping_ratio)
    train_only_root, train_damping = damped_inverse_power(r_train, damping_ratio=config.damping_ratio)

    folder = storage.join(lake.root, "_matrices", "hessians", checkpoint_id, config.query_set, fingerprint)
    matrices = {"r_train": (r_train, None, None, train.count), "r_query": (r_query, None, None, query.count),
                "inverse_root": (inverse_root, lam, damping, train.count + query.count),
                "inverse_root_train_only": (train_only_root, 0.0, train_damping, train.count)}
    rows = {name: [] for name in ("checkpoint_id", "query_set", "fingerprint", "kind", "path", "shape", "sha256",
                                  "lambda", "damping", "n_samples", "run_id", "created_at")}
    for kind, (blocks, kind_lambda, kind_damping, n) in matrices.items():
        path = storage.join(folder, f"{kind}.safetensors")
        sha = save_matrices(path, {f"block{i:03d}": b.float() for i, b in enumerate(blocks)}, {"count": n})
        for name, value in (("checkpoint_id", checkpoint_id), ("query_set", config.query_set), ("fingerprint", fingerprint),
                            ("kind", kind), ("path", str(path)), ("shape", [b.shape[0] for b in blocks]), ("sha256", sha),
                            ("lambda", kind_lambda), ("damping", kind_damping), ("n_samples", n), ("run_id", run_id),
                            ("created_at", datetime.now(timezone.utc))):
            rows[name].append(value)
    lake.replace_slice("hessians", pa.table(rows), checkpoint_id=checkpoint_id, query_set=config.query_set,
                       fingerprint=fingerprint)
    figure = plot_spectra(query_spectrum, train_spectrum, lam, config.crossing_component,
                          storage.join(lake.root, "reports", f"hessian_{checkpoint_id}_{config.query_set}_{fingerprint}.png"))
    result = {"checkpoint_id": checkpoint_id, "query_set": config.query_set, "fingerprint": fingerprint, "lambda": lam,
              "damping": damping, "n_train": train.count, "n_query": query.count, "dim": sum(train.block_sizes),
              "blocks": len(train.block_sizes), "figure": str(figure), "run_id": run_id}
    finish_run(lake, run_id, "succeeded", result)
    print(f"[fit-hessian] {checkpoint_id} × {config.query_set}: R from {train.count:,} train and {query.count:,} query "
          f"vectors ({result['blocks']} blocks, {result['dim']} dims); λ = {lam:.3f}, damping = {damping:.3g}; "
          f"spectra plot {figure}")
    return result


def plot_spectra(query_spectrum, train_spectrum, lam: float, component: int, path: str) -> str:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ranks = torch.arange(1, len(train_spectrum) + 1)
    ax.loglog(ranks, (lam * query_spectrum).clamp(min=1e-30), label=f"λ·R_query (λ={lam:.3f})")
    ax.loglog(ranks, ((1 - lam) * train_spectrum).clamp(min=1e-30), label="(1-λ)·R_train")
    ax.axvline(min(component, len(ranks)), color="grey", linestyle=":", label=f"crossing target ({component})")
    ax.set_xlabel("component (sorted)")
    ax.set_ylabel("eigenvalue")
    ax.set_title("Task-mixed Hessian approximation: scaled spectra")
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(path, png.getvalue())
    return path


def load_preconditioner(lake: Lake, checkpoint_id: str, query_set: str, fingerprint: str, kind: str):
    """The registered matrix of one kind, checksum-verified, as its list of blocks."""
    rows = lake.read("hessians", filters=[("checkpoint_id", "=", checkpoint_id), ("query_set", "=", query_set),
                                          ("fingerprint", "=", fingerprint), ("kind", "=", kind)])
    if rows.num_rows != 1:
        raise FileNotFoundError(f"no {kind} registered for {checkpoint_id}/{query_set}/{fingerprint}: run fit-hessian")
    row = rows.to_pylist()[0]
    tensors = load_matrices(row["path"], row["sha256"])
    return [tensors[k] for k in sorted(tensors)], row


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--lake", default=load_config().lake_root)
    parser.add_argument("--checkpoint-id", default="")
    parser.add_argument("--query-set", default=FitHessianConfig.query_set)
    parser.add_argument("--fingerprint", default="")
    parser.add_argument("--lambda", dest="mixing_lambda", type=float, default=load_config().hessian_lambda,
                        help="task mixing weight (default: spectra-crossing rule)")
    parser.add_argument("--crossing-component", type=int, default=FitHessianConfig.crossing_component)
    parser.add_argument("--damping-ratio", type=float, default=load_config().hessian_damping)


def main(args):
    run(FitHessianConfig(**{k: v for k, v in vars(args).items()}))
