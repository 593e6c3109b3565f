"""Second moments estimated from data: V = E[g²] over a sample of training examples.

The optimizer's second moment is one estimate of the gradients' scale per coordinate, but AdamW's
with β2 = 0.95 remembers only the last ~20 steps, and most published checkpoints carry no optimizer
state at all. The mean of squared per-example gradients over a training sample needs only the
weights and the data, and estimates the same quantity at the checkpoint itself.

Each example's gradient is formed exactly (a batch of one, ordinary autograd; the tied
embedding's two uses summed, as the optimizer sees them) and squared into a running sum per weight
matrix, in the parameter's stored layout like an optimizer state. Matrices with more than
`full_max_elements` keep only their row and column means (Adafactor's factored statistics),
so the stored estimate stays small for big models.
"""

from __future__ import annotations

import torch
from torch import nn

from gradient_kernels.losses import Batch, per_example_loss
from gradient_kernels.modules import weight_matrices

FULL_MAX_ELEMENTS = 2**24  # above this a matrix's estimate is stored as its row and column means


def mean_squared_gradients(model: nn.Module, batches, full_max_elements: int = FULL_MAX_ELEMENTS) -> dict:
    """The estimate as an optimizer-state-like dict: {"kind": "data", "examples": n, "state":
    {name: {"mean_sq"} or {"row_var", "col_var"}}}, every tensor float64 in the stored layout.

    `batches`: an iterable of `Batch`es of training documents (each example's loss: the sum of its
    next-token losses, as extraction uses)."""
    matrices = weight_matrices(model)
    params = dict(model.named_parameters())
    sums = {m.name: torch.zeros_like(params[m.name], dtype=torch.float64) for m in matrices}
    examples = 0
    model.eval()
    for batch in batches:
        batch = batch.to(next(model.parameters()).device)
        for row in range(len(batch)):
            length = int(batch.attention_mask[row].sum())  # unpadded: padding adds nothing but work
            one = Batch(
                *(t[row : row + 1, :length] for t in (batch.input_ids, batch.attention_mask, batch.target_mask))
            )
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=one.input_ids, attention_mask=one.attention_mask.long()).logits
            per_example_loss(logits, one).sum().backward()
            for name, total in sums.items():
                total.add_(params[name].grad.double().square())
            examples += 1
    model.zero_grad(set_to_none=True)
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
