"""The Hessian fit's picture: the scaled spectra of R_query and R_train, where they cross, the
dampings, and how many outlier chunks were left out (a PNG under the lake's reports/)."""

from __future__ import annotations

import torch

from infra import storage


def plot_spectra(
    query_spectrum, train_spectrum, lam: float, component: int, diagnostics: dict, path: str, outliers: int = 0
) -> str:
    """Writes the plot to `path` (a file or s3:// URI) and returns it."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ranks = torch.arange(1, len(train_spectrum) + 1)
    ax.loglog(ranks, (lam * query_spectrum).clamp(min=1e-30), label=f"λ·R_query (λ={lam:.3f})")
    ax.loglog(ranks, ((1 - lam) * train_spectrum).clamp(min=1e-30), label="(1-λ)·R_train")
    ax.axvline(min(component, len(ranks)), color="grey", linestyle=":", label=f"crossing target ({component})")
    ax.axhspan(
        diagnostics["damping_min"], diagnostics["damping_max"], color="orange", alpha=0.2, label="dampings (per block)"
    )
    ax.set_xlabel("component (sorted)")
    ax.set_ylabel("eigenvalue")
    left_out = f"\n{outliers:,} outlier train chunk(s) left out of R_train (table train_outliers)" if outliers else ""
    ax.set_title(
        f"Task-mixed Hessian: scaled spectra (condition ≤ {diagnostics['condition_number_max']:.2g}){left_out}",
        fontsize=10,
    )
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(path, png.getvalue())
    return path
