"""Tail-patch: does one training step on a proponent raise the target's probability?

The influence check of the paper: starting from the checkpoint, take one optimizer step on a
single proponent document (its mean next-token loss, as a batch of one) with the checkpoint's
optimizer state and learning rate, measure the change of the target's log-probability given the
prompt, and restore the weights.

The step is the optimizer's own rule applied to that one gradient:
- Adam: v' = β2·v + (1-β2)·g², m' = (1-β1)·g (the checkpoint keeps no first moment here: m = 0),
  Δθ = -lr · m̂' / (sqrt(v̂') + eps) with the bias corrections of step t+1. Folding g² into v
  bounds the step exactly as Adam does for a gradient it has never seen.
- Adafactor (torch): g² folded into the factored row/column state, u = g / sqrt(V), clipped to
  RMS ≤ 1, times the relative step size max(eps2, RMS(θ)) · min(lr, 1/sqrt(t)); tested against
  torch.optim.Adafactor's own step.

Each document's step is computed once and evaluated on every query that has it as a proponent,
in one batched forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from gradient_kernels.losses import Batch, per_example_loss, query_batch


class AdamStep:
    def __init__(self, state: dict):
        self.v = {n: s["exp_avg_sq"] for n, s in state["state"].items()}
        (self.beta1, self.beta2), self.eps, self.t = state["betas"], state["eps"], state["step"] + 1

    def delta(self, name: str, param: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
        v = self.beta2 * self.v[name] + (1 - self.beta2) * grad * grad
        m = (1 - self.beta1) * grad
        return -lr * (m / (1 - self.beta1 ** self.t)) / ((v / (1 - self.beta2 ** self.t)).sqrt() + self.eps)


class AdafactorStep:
    """torch.optim.Adafactor's step for one gradient (weight decay left out: it moves every
    document's step alike). The gradient's g² is folded into the factored state with β2_t =
    1 - t^decay, as torch does, so a document's own gradient bounds its step."""

    def __init__(self, state: dict):
        eps = state.get("eps")
        eps1, eps2 = eps if isinstance(eps, (list, tuple)) else (None, 1e-3)
        self.eps1 = torch.finfo(torch.float32).eps if eps1 is None else eps1
        self.eps2, self.decay = eps2, state.get("beta2_decay", -0.8)
        self.v, self.t = state["state"], state["step"] + 1

    def delta(self, name: str, param: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
        held, weight = self.v[name], self.t ** self.decay
        if "row_var" in held:
            row = held["row_var"].lerp(grad.pow(2).mean(dim=-1, keepdim=True), weight)
            col = held["col_var"].lerp(grad.pow(2).mean(dim=-2, keepdim=True), weight)
            variance = row @ col / row.mean(dim=-2, keepdim=True).clamp(min=self.eps1)
        else:
            variance = held["variance"].lerp(grad * grad, weight)
        update = grad * variance.clamp(min=self.eps1 * self.eps1).rsqrt()
        update = update / (update.norm() / update.numel() ** 0.5).clamp(min=1.0)  # update clipping, d = 1
        alpha = max(self.eps2, float(param.norm() / param.numel() ** 0.5)) * min(lr, self.t ** -0.5)
        return -alpha * update


def optimizer_step(state: dict):
    """The step rule for a consolidated optimizer state (see jobs/checkpoints.py)."""
    return AdamStep(state) if state["kind"] == "adam" else AdafactorStep(state)


class TailPatcher:
    def __init__(self, model: nn.Module, rule, lr: float):
        self.model, self.rule, self.lr = model.eval(), rule, lr
        self.params = dict(model.named_parameters())
        missing = sorted(set(self.params) - set(rule.v))
        if missing:
            raise ValueError(f"no second moments for {missing[:3]}")
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
                param += self.rule.delta(name, param, grad, self.lr)

    def restore(self):
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.original[name])

    def log_prob_changes(self, documents: dict, pairs: list[tuple], prompts: dict, targets: dict,
                         on_step=None) -> tuple[dict, dict]:
        """({query: log p(target | prompt)} before any step, {(query, doc): Δ log p} per pair).

        `on_step(n_pairs)` is called after each document's step (progress reporting)."""
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
            if on_step:
                on_step(len(doc_queries))
        return base, changes
