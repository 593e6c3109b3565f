"""Per-example losses and the batches they are computed on.

A batch is right-padded token ids with two masks: `attention_mask` (real tokens) and `target_mask`
(the tokens whose prediction counts in the loss). Training documents count every next-token
prediction; queries count only the target tokens after the prompt. Padding is never a target and,
with causal attention, no real token depends on it, so it contributes nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) bool
    target_mask: torch.Tensor  # (B, T) bool: token t is predicted from tokens < t and counts

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device))

    def __len__(self):
        return self.input_ids.shape[0]


def _pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = True
    return ids, mask


def document_batch(documents: list[list[int]], pad_id: int = 0) -> Batch:
    """Training documents (or chunks): loss = sum of all next-token losses."""
    if any(len(d) < 2 for d in documents):
        raise ValueError("a document needs at least 2 tokens to have a next-token loss")
    ids, mask = _pad(documents, pad_id)
    target = mask.clone()
    target[:, 0] = False
    return Batch(ids, mask, target)


def query_batch(prompts: list[list[int]], targets: list[list[int]], pad_id: int = 0) -> Batch:
    """Queries: loss of the target tokens given the prompt; prompt tokens are masked out."""
    if any(not p for p in prompts) or any(not t for t in targets):
        raise ValueError("a query needs a non-empty prompt and target")
    ids, mask = _pad([p + t for p, t in zip(prompts, targets)], pad_id)
    target = torch.zeros_like(mask)
    for row, (p, t) in enumerate(zip(prompts, targets)):
        target[row, len(p) : len(p) + len(t)] = True
    return Batch(ids, mask, target)


def per_example_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B,) sums of the next-token cross-entropies at target positions."""
    predicted = logits[:, :-1].float()
    labels = batch.input_ids[:, 1:]
    nll = F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), labels.reshape(-1), reduction="none")
    return (nll.view(labels.shape) * batch.target_mask[:, 1:]).sum(1)


@contextmanager
def no_padding_check(model: nn.Module):
    """transformers peeks at the input ids for a pad token when no attention mask is given (a
    data-dependent branch vmap refuses); our right padding is harmless under causal attention."""
    config: Any = model.config  # a transformers PretrainedConfig
    pad = config.pad_token_id
    config.pad_token_id = None
    try:
        yield
    finally:
        config.pad_token_id = pad
