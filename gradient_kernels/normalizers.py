"""Optimizer corrections: u = g / sqrt(V), with V the training optimizer's second moment.

All normalisers work on a gradient in the (out, in) orientation. A *factored* normaliser is a row
and a column scaling (1/sqrt(V) ≈ a bᵀ), which the hook path folds into the projection matrices
for free; an *exact* one divides elementwise and needs the per-example gradient itself.

- Adafactor (torch.optim.Adafactor): V = (r cᵀ) / mean(r), clamped below at eps1²; exactly factored
  (the clamp only bites where V < eps1² ≈ 1.4e-14, which the hook path reports rather than hides).
- Adam/AdamW: V̂ = exp_avg_sq / (1 - β2^t) and the update divides by sqrt(V̂) + eps, exactly as
  torch's Adam ("adam-exact", the paper's correction). Coordinates the optimizer never trained
  (embedding rows of tokens absent from the training data) keep V̂ ≈ 0, so dividing by eps boosts
  them ~10^4x over trained ones, and a query that contains such a token dominates R_query.
  "adam-floored" divides by max(sqrt(V̂) + eps, floor), the floor being a low quantile
  (FLOOR_QUANTILE) of the matrix's trained coordinates: the same correction wherever the optimizer
  has an estimate, no boost where it has none. "adam-factored" is the rank-1 Adafactor-style fit
  V̂ ≈ r cᵀ / Σr (r, c the row and column sums: the fit Adafactor itself would keep) of the floored
  denominator, whose error `rank1_error` measures: free (it folds into the projections) and level
  with the floored one in tail-patch. The default, "adam-half", takes the square root of that fit's
  scalings (u = g / V^(1/4)): the correction is applied to both sides of the dot product, so only
  half of it on each side makes u_q · u_z = g_q · g_z / sqrt(V), the first-order change of the
  query's loss under one Adam step on the training chunk (the tail-patch), where the full
  correction on both sides weighs by 1/V (docs/optimizer-correction.md has the measurements).
  "adam-flat-vocab" is the rank-1 fit with the output head's row scaling (one per vocabulary token)
  made flat: rare tokens' rows have tiny V̂, and the full fit boosts them, so a query's corrected
  vector is dominated by its target token's row (docs/optimizer-correction.md, the diagnosis).
- Data (gradient_kernels/second_moments.py): V = E[g²], the mean squared per-example gradient over
  a training sample, estimated at the checkpoint itself and needing no optimizer state.
  "data-floored" divides by max(sqrt(V), floor) with the same floor rule as Adam's;
  "data-factored" by its rank-1 fit (or Adafactor's rule where only row and column means are
  kept: matrices too big to store whole).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradient_kernels.modules import WeightMatrix
from gradient_kernels.projection import state_kind


class MissingOptimizerState(KeyError):
    def __str__(self):
        return self.args[0]


@dataclass
class FactoredNormalizer:
    out_scale: torch.Tensor  # (out,): a
    in_scale: torch.Tensor  # (in,): b, so that 1/sqrt(V) = a bᵀ

    def divide(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.out_scale[:, None] * self.in_scale[None, :]


@dataclass
class ExactNormalizer:
    denominator: torch.Tensor  # (out, in): sqrt(V̂) + eps

    def divide(self, grad: torch.Tensor) -> torch.Tensor:
        return grad / self.denominator


def adafactor_normalizer(
    row_var: torch.Tensor, col_var: torch.Tensor, eps1: float | None, transposed: bool
) -> FactoredNormalizer:
    """From torch Adafactor's state: row_var (R, 1) and col_var (1, C) in the stored layout."""
    r, c = row_var.reshape(-1).double(), col_var.reshape(-1).double()
    eps1 = torch.finfo(torch.float32).eps if eps1 is None else eps1
    mean_r = r.mean().clamp(min=eps1)
    row_scale = (mean_r / r.clamp(min=1e-30)).sqrt()
    col_scale = c.clamp(min=1e-30).rsqrt()
    if transposed:  # stored (in, out): rows are the input side
        row_scale, col_scale = col_scale, row_scale
    return FactoredNormalizer(row_scale.float(), col_scale.float())


def adam_denominator(exp_avg_sq: torch.Tensor, step: int, beta2: float, eps: float, transposed: bool) -> torch.Tensor:
    v = exp_avg_sq.t() if transposed else exp_avg_sq
    bias_correction2 = 1 - beta2**step
    return (v.double() / bias_correction2).sqrt() + eps


FLOOR_QUANTILE = 0.01  # of the trained coordinates' sqrt(V̂) + eps, per weight matrix


def floored_denominator(denominator: torch.Tensor, eps: float, quantile: float = FLOOR_QUANTILE) -> torch.Tensor:
    """max(sqrt(V̂) + eps, floor), floor = `quantile` of the coordinates the optimizer trained
    (sqrt(V̂) > eps). A matrix with no trained coordinate is left as it is."""
    values = denominator.reshape(-1)
    trained = values[values > 2 * eps]
    if trained.numel() == 0:
        return denominator
    rank = max(1, int(quantile * trained.numel()))
    floor = trained.double().kthvalue(rank).values.to(denominator.dtype)
    return denominator.clamp(min=floor)


def rank1_fit(denominator: torch.Tensor, eps: float) -> FactoredNormalizer:
    """Adafactor's rank-1 fit of V̂ (recovered from sqrt(V̂) + eps), as row/column scalings."""
    v = (denominator.double() - eps).clamp(min=0) ** 2
    r, c = v.sum(1).clamp(min=1e-30), v.sum(0).clamp(min=1e-30)
    return FactoredNormalizer(r.rsqrt().float(), (r.sum().sqrt() * c.rsqrt()).float())


def half_strength(normalizer: FactoredNormalizer) -> FactoredNormalizer:
    """The square root of a factored correction: 1/V^(1/4) instead of 1/sqrt(V)."""
    return FactoredNormalizer(normalizer.out_scale.sqrt(), normalizer.in_scale.sqrt())


def flat_rows(normalizer: FactoredNormalizer) -> FactoredNormalizer:
    """The same column scaling, every row scaled alike (by the mean row scale, to keep magnitudes)."""
    return FactoredNormalizer(normalizer.out_scale.mean().expand_as(normalizer.out_scale).clone(), normalizer.in_scale)


def rank1_error(denominator: torch.Tensor, eps: float) -> float:
    """Relative Frobenius error of the rank-1 fit of 1/(sqrt(V̂)+eps), the factor gradients get."""
    exact = 1 / denominator.double()
    fit = rank1_fit(denominator, eps)
    approx = fit.out_scale.double()[:, None] * fit.in_scale.double()[None, :]
    return float((approx - exact).norm() / exact.norm())


def normalizers_from_state(optimizer_state: dict, matrices: list[WeightMatrix], kind: str) -> dict:
    """name -> normaliser, from a consolidated optimizer state (see jobs/checkpoints.py).

    kind: "adafactor" (needs an Adafactor state), "adam-floored", "adam-exact", "adam-factored",
    "adam-half" or "adam-flat-vocab" (need Adam's exp_avg_sq), "data-floored" or "data-factored" (need a data estimate,
    gradient_kernels/second_moments.py), "none" (no correction: plain gradients).
    """
    if kind == "none":
        return {}
    saved_kind = optimizer_state.get("kind")
    wanted = state_kind(kind)
    if saved_kind != wanted:
        raise ValueError(f"normaliser {kind!r} needs a {wanted} optimizer state, the checkpoint has {saved_kind!r}")
    if kind == "adam-flat-vocab" and not any(m.output_head for m in matrices):
        raise ValueError("normaliser 'adam-flat-vocab' needs the model's output head among its weight matrices")
    state = optimizer_state["state"]
    normalizers: dict[str, ExactNormalizer | FactoredNormalizer] = {}
    for m in matrices:
        if m.name not in state:
            raise MissingOptimizerState(f"optimizer state has no second moment for {m.name!r}")
        held = state[m.name]
        if wanted == "data":
            normalizers[m.name] = data_normalizer(held, kind, m.stored_transposed)
            continue
        if kind == "adafactor":
            if "row_var" not in held:
                raise MissingOptimizerState(f"{m.name!r}: Adafactor state has no factored row_var/col_var")
            eps = optimizer_state.get("eps")
            eps1 = eps[0] if isinstance(eps, (list, tuple)) else None
            normalizers[m.name] = adafactor_normalizer(held["row_var"], held["col_var"], eps1, m.stored_transposed)
            continue
        if "exp_avg_sq" not in held:
            raise MissingOptimizerState(f"{m.name!r}: Adam state has no exp_avg_sq")
        denominator = adam_denominator(
            held["exp_avg_sq"],
            optimizer_state["step"],
            optimizer_state["betas"][1],
            optimizer_state["eps"],
            m.stored_transposed,
        )
        if kind == "adam-exact":
            normalizers[m.name] = ExactNormalizer(denominator.float())
            continue
        floored = floored_denominator(denominator, optimizer_state["eps"])
        if kind == "adam-floored":
            normalizers[m.name] = ExactNormalizer(floored.float())
            continue
        fit = rank1_fit(floored, optimizer_state["eps"])
        if kind == "adam-half":
            fit = half_strength(fit)
        elif kind == "adam-flat-vocab" and m.output_head:
            fit = flat_rows(fit)
        normalizers[m.name] = fit
    return normalizers


def data_normalizer(held: dict, kind: str, transposed: bool) -> ExactNormalizer | FactoredNormalizer:
    """From one matrix's data estimate: its whole E[g²] ("mean_sq"), or only its row and column
    means, which give Adafactor's factored rule whatever the kind asked for."""
    if "mean_sq" not in held:
        return adafactor_normalizer(held["row_var"], held["col_var"], None, transposed)
    v = held["mean_sq"].t() if transposed else held["mean_sq"]
    # a coordinate no sampled example moved (nor any other of its matrix) gets 0 / tiny = 0, not NaN
    floored = floored_denominator(v.double().sqrt(), 0.0).clamp(min=torch.finfo(torch.float32).tiny)
    return ExactNormalizer(floored.float()) if kind == "data-floored" else rank1_fit(floored, 0.0)
