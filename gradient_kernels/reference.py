"""The exact reference: full per-example gradients, one backward per example.

Slow and memory-hungry on purpose: it is what the hook path is checked against (tests,
bench/extract_overhead.py, bench/projection_fidelity.py). Nothing here is used in production.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from gradient_kernels.losses import Batch, per_example_loss
from gradient_kernels.modules import weight_matrices
from gradient_kernels.projection import ProjectionSpec, gaussian_projection


def per_example_gradients(model: nn.Module, batch: Batch, names: list[str]) -> dict:
    """name -> (B, out, in) full gradients of each example's loss, each example run alone, unpadded."""
    model.eval()
    by_name = {m.name: m for m in weight_matrices(model)}
    weights = [cast(torch.Tensor, by_name[n].module.weight) for n in names]
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for b in range(len(batch)):
        length = int(batch.attention_mask[b].sum())
        single = Batch(
            batch.input_ids[b : b + 1, :length],
            batch.attention_mask[b : b + 1, :length],
            batch.target_mask[b : b + 1, :length],
        )
        logits = model(input_ids=single.input_ids).logits
        grads = torch.autograd.grad(per_example_loss(logits, single)[0], weights)
        for n, g in zip(names, grads):
            rows[n].append(g.t() if by_name[n].stored_transposed else g)
    return {n: torch.stack(g) for n, g in rows.items()}


def corrected_gradients(gradients: dict, normalizers: dict) -> dict:
    """u = g / sqrt(V) per matrix, elementwise (no normaliser: g itself)."""
    return {n: normalizers[n].divide(g) if n in normalizers else g for n, g in gradients.items()}


def dense_projection(corrected: dict, spec: ProjectionSpec) -> torch.Tensor:
    """(B, D): P_out U P_inᵀ per matrix, the Kronecker projection (P_out ⊗ P_in) vec(U) in closed form."""
    blocks = []
    for name, k in spec.k.items():
        u = corrected[name]
        p_out = gaussian_projection(spec.seed, name, "out", k, u.shape[1]).to(u.device)
        p_in = gaussian_projection(spec.seed, name, "in", k, u.shape[2]).to(u.device)
        blocks.append((p_out @ u @ p_in.T).reshape(u.shape[0], -1))
    return torch.cat(blocks, dim=1)


def reference_vectors(model: nn.Module, batch: Batch, spec: ProjectionSpec, normalizers: dict) -> torch.Tensor:
    gradients = per_example_gradients(model, batch, list(spec.k))
    return dense_projection(corrected_gradients(gradients, normalizers if spec.normalizer != "none" else {}), spec)


def flat_corrected_gradients(model: nn.Module, batch: Batch, names: list[str], normalizers: dict) -> torch.Tensor:
    """(B, Σ out·in): unprojected corrected gradients, for the projection-fidelity benchmark."""
    corrected = corrected_gradients(per_example_gradients(model, batch, names), normalizers)
    return torch.cat([corrected[n].reshape(len(batch), -1) for n in names], dim=1)
