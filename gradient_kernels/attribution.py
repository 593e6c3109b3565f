"""Per-token attribution: how much each predicted token of a training document adds to a score.

A document's loss is the sum of its next-token losses, so its gradient, projection and
preconditioned vector are sums over predicted tokens too: score = Σ_t G_t · q̄ / ‖G‖ exactly,
with G_t the preconditioned projected gradient of token t's loss alone. Each G_t is one "example"
of the hook path whose target mask holds only token t.
"""

from __future__ import annotations

import torch

from gradient_kernels.hooks import GradientProjector
from gradient_kernels.losses import Batch
from gradient_kernels.scoring import Preconditioner


def token_contributions(
    projector: GradientProjector,
    document: list[int],
    query: torch.Tensor,
    preconditioner: Preconditioner | None = None,
    unit_norm: bool = True,
    batch_size: int = 32,
) -> torch.Tensor:
    """(len(document),) contributions; entry 0 is 0 (the first token is never predicted).

    `query` is the prepared query vector (preconditioned and normalised as the scores are).
    """
    n = len(document)
    if n < 2:
        raise ValueError("a document needs at least 2 tokens")
    ids = torch.as_tensor(document, dtype=torch.long)
    per_token = []
    for start in range(1, n, batch_size):
        positions = torch.arange(start, min(n, start + batch_size))
        target = torch.zeros(len(positions), n, dtype=torch.bool)
        target[torch.arange(len(positions)), positions] = True
        batch = Batch(ids.expand(len(positions), n).clone(), torch.ones(len(positions), n, dtype=torch.bool), target)
        per_token.append(projector(batch))
    vectors = torch.cat(per_token)
    if preconditioner is not None:
        vectors = preconditioner.apply(vectors)
    norm = vectors.sum(0).norm().clamp(min=1e-30) if unit_norm else 1.0
    contributions = vectors @ query.to(vectors.dtype) / norm
    return torch.cat([contributions.new_zeros(1), contributions])
