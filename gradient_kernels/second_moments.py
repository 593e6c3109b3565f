"""Second moments estimated from data: V = E[g²] over a sample of training examples.

The optimizer's second moment is one estimate of the gradients' scale per coordinate, but AdamW's
with β2 = 0.95 remembers only the last ~20 steps, and most published checkpoints carry no optimizer
state at all. The mean of squared per-example gradients over a training sample needs only the
weights and the data, and estimates the same quantity at the checkpoint itself.

Each example's gradient is formed exactly (torch.func: a vmapped gradient over a right-padded
batch, each example's loss the sum of its next-token losses as extraction uses; the tied
embedding's two uses summed, as the optimizer sees them) and squared into a running sum per weight
matrix, in the parameter's stored layout like an optimizer state. Examples are taken a few at a
time, so their gradients stay within `memory_budget_bytes`. Matrices with more than
`full_max_elements` keep only their row and column means (Adafactor's factored statistics), so
the stored estimate stays small for big models.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gradient_kernels.losses import Batch, no_padding_check, per_example_loss
from gradient_kernels.modules import weight_matrices

FULL_MAX_ELEMENTS = 2**24  # above this a matrix's estimate is stored as its row and column means


def mean_squared_gradients(
    model: nn.Module, batches, full_max_elements: int = FULL_MAX_ELEMENTS, memory_budget_bytes: int = 1 << 30
) -> dict:
    """The estimate as an optimizer-state-like dict: {"kind": "data", "examples": n, "state":
    {name: {"mean_sq"} or {"row_var", "col_var"}}}, every tensor float64 in the stored layout.

    `batches`: an iterable of right-padded `Batch`es of training documents."""
    model.eval()
    names = [m.name for m in weight_matrices(model)]
    params = {n: p.detach() for n, p in model.named_parameters()}
    weights = {n: params[n] for n in names}
    sums = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in weights.items()}
    rows = max(1, memory_budget_bytes // (4 * sum(w.numel() for w in weights.values())))

    def loss(chosen: dict, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, params | chosen, (ids[None],)).logits
        return per_example_loss(logits, Batch(ids[None], torch.ones_like(target[None]), target[None]))[0]

    examples = 0
    with no_padding_check(model):
        for batch in batches:
            batch = batch.to(next(model.parameters()).device)
            for ids, target in zip(batch.input_ids.split(rows), batch.target_mask.split(rows)):
                grads = vmap(grad(loss), in_dims=(None, 0, 0))(weights, ids, target)
                for name, total in sums.items():
                    total.add_(grads[name].double().square().sum(0))
                examples += len(ids)
    if not examples:
        raise ValueError("no training examples to estimate the second moments from")
    state = {}
    for name, total in sums.items():
        mean_sq = total / examples
        if mean_sq.numel() <= full_max_elements:
            state[name] = {"mean_sq": mean_sq}
        else:  # Adafactor's statistics: V ≈ r cᵀ / mean(r)
            state[name] = {"row_var": mean_sq.mean(1, keepdim=True), "col_var": mean_sq.mean(0, keepdim=True)}
    return {"kind": "data", "examples": examples, "state": state}
