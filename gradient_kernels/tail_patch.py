"""Tail-patch: does one training step on a proponent raise the target's probability?

The influence check of the paper: starting from the checkpoint, take one optimizer step on a
single proponent document (its mean next-token loss, as a batch of one) with the checkpoint's
learning rate and second moments, Δθ = -lr · g / (sqrt(V̂) + eps), measure the change of the
target's log-probability given the prompt, and restore the weights. The step uses the second
moments only (not Adam's first moment): the per-example part of an Adam step, as in the paper.

Each document's step is computed once and evaluated on every query that has it as a proponent,
in one batched forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from gradient_kernels.losses import Batch, per_example_loss, query_batch


class TailPatcher:
    def __init__(self, model: nn.Module, denominators: dict, lr: float):
        """denominators: parameter name -> sqrt(V̂) + eps, in the parameter's own layout."""
        self.model, self.lr = model.eval(), lr
        self.params = dict(model.named_parameters())
        missing = sorted(set(self.params) - set(denominators))
        if missing:
            raise ValueError(f"no second moments for {missing[:3]}")
        self.denominators = {n: denominators[n].to(p.dtype) for n, p in self.params.items()}
        self.original = {n: p.detach().clone() for n, p in self.params.items()}

    def target_log_probs(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
            return -per_example_loss(logits, batch)

    def step_on(self, document: list[int]):
        """Apply one step on `document` in place (undo with `restore`)."""
        ids = torch.as_tensor([document])
        loss = self.model(input_ids=ids, labels=ids).loss  # mean next-token loss: a batch of one
        grads = torch.autograd.grad(loss, list(self.params.values()))
        with torch.no_grad():
            for (name, param), grad in zip(self.params.items(), grads):
                param -= self.lr * grad / self.denominators[name]

    def restore(self):
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.original[name])

    def log_prob_changes(self, documents: dict, pairs: list[tuple], prompts: dict, targets: dict) -> tuple[dict, dict]:
        """({query: log p(target | prompt)} before any step, {(query, doc): Δ log p} per pair)."""
        by_doc = {}
        for query, doc in pairs:
            by_doc.setdefault(doc, []).append(query)
        queries = sorted({q for q, _ in pairs})
        base = dict(zip(queries, self.target_log_probs(query_batch([prompts[q] for q in queries],
                                                                   [targets[q] for q in queries])).tolist()))
        changes = {}
        for doc, doc_queries in by_doc.items():
            self.step_on(documents[doc])
            after = self.target_log_probs(query_batch([prompts[q] for q in doc_queries], [targets[q] for q in doc_queries]))
            self.restore()
            for query, value in zip(doc_queries, after.tolist()):
                changes[(query, doc)] = value - base[query]
        return base, changes


def adam_denominators(state: dict) -> dict:
    """sqrt(V̂) + eps per parameter from a consolidated Adam state (see jobs/checkpoints.py)."""
    correction = 1 - state["betas"][1] ** state["step"]
    return {n: (s["exp_avg_sq"] / correction).sqrt() + state["eps"] for n, s in state["state"].items()}


def adafactor_denominators(state: dict) -> dict:
    """sqrt(V) per parameter from torch Adafactor's factored (or full, for vectors) state."""
    eps1 = torch.finfo(torch.float32).eps
    out = {}
    for name, held in state["state"].items():
        if "row_var" in held:
            v = held["row_var"] @ held["col_var"] / held["row_var"].mean(dim=-2, keepdim=True).clamp(min=eps1)
        else:
            v = held["variance"]
        out[name] = v.clamp(min=eps1 * eps1).sqrt()
    return out
