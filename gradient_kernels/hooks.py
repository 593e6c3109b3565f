"""Per-example projected gradients by hooks, without forming any per-example gradient.

For a weight matrix W (out × in) used as y_t = W x_t at every token t, one example's gradient is
Σ_t δ_t x_tᵀ (δ_t = ∂loss/∂y_t). Its projection P_out (δ x ᵀ) P_inᵀ is Σ_t (P_out δ_t)(P_in x_t)ᵀ:
the forward hook projects x_t to k numbers, the backward hook projects δ_t, and the block is a
sum of k × k outer products over tokens. A factored optimizer correction diag(a) G diag(b) is
folded into the projections (P_out diag(a), P_in diag(b)), so it costs nothing.

With the Adam-exact correction (elementwise, not factorable) the hooks form each example's
gradient of one matrix at a time, divide it by sqrt(V̂) + eps, and project it: exact, for small
models and references.

Tied output head / input embedding: the embedding's use of the weight adds Σ_t e_token(t) g_tᵀ
(g_t = ∂loss/∂embedding output), whose out-side projection is column token(t) of P_out.

Parameters are frozen during the pass: nothing needs ∂loss/∂W, only the activations' gradients.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from gradient_kernels.losses import Batch, per_example_loss
from gradient_kernels.modules import WeightMatrix, weight_matrices
from gradient_kernels.normalizers import ExactNormalizer, FactoredNormalizer
from gradient_kernels.projection import ProjectionSpec, gaussian_projection


class GradientProjector:
    """Maps a batch to its per-example vectors p(z) = P · (g(z) / sqrt(V)), shape (B, spec.dim)."""

    def __init__(self, model: nn.Module, spec: ProjectionSpec, normalizers: dict | None = None):
        self.model, self.spec = model.eval(), spec
        self.fingerprint = spec.fingerprint()
        normalizers = normalizers or {}
        by_name = {m.name: m for m in weight_matrices(model)}
        unknown = [name for name in spec.k if name not in by_name]
        if unknown:
            raise ValueError(f"the model has no weight matrices named {unknown}")
        if spec.normalizer != "none" and set(normalizers) < set(spec.k):
            missing = sorted(set(spec.k) - set(normalizers))
            raise ValueError(f"normaliser {spec.normalizer!r} lacks state for {missing[:3]}{'...' if len(missing) > 3 else ''}")
        device = next(model.parameters()).device
        self.matrices: list[WeightMatrix] = [by_name[name] for name in spec.k]
        self.p_out, self.p_in, self.exact = {}, {}, {}
        for m in self.matrices:
            p_out = gaussian_projection(spec.seed, m.name, "out", spec.k[m.name], m.out_features)
            p_in = gaussian_projection(spec.seed, m.name, "in", spec.k[m.name], m.in_features)
            normalizer = normalizers.get(m.name) if spec.normalizer != "none" else None
            if isinstance(normalizer, FactoredNormalizer):
                p_out, p_in = p_out * normalizer.out_scale, p_in * normalizer.in_scale
            elif isinstance(normalizer, ExactNormalizer):
                self.exact[m.name] = normalizer.denominator.to(device)
            self.p_out[m.name], self.p_in[m.name] = p_out.to(device), p_in.to(device)
        self._blocks: dict = {}

    def __call__(self, batch: Batch) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = batch.to(device)
        self._blocks = {}
        with self._hooks(), _frozen(self.model):
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
            per_example_loss(logits, batch).sum().backward()
        blocks, self._blocks = self._blocks, {}
        size = len(batch)
        return torch.cat([blocks[m.name].reshape(size, -1) if m.name in blocks
                          else torch.zeros(size, self.spec.k[m.name] ** 2, device=device)
                          for m in self.matrices], dim=1)

    # ------------------------------------------------------------------ hooks
    @contextmanager
    def _hooks(self):
        handles = [m.module.register_forward_hook(self._matrix_hook(m)) for m in self.matrices]
        embedding: nn.Module = self.model.get_input_embeddings()  # type: ignore[operator]  # a transformers model's method
        tied = next((m for m in self.matrices if m.tied_embedding is embedding), None)
        handles.append(embedding.register_forward_hook(self._embedding_hook(tied)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _matrix_hook(self, m: WeightMatrix):
        def forward_hook(module, args, output):
            x = args[0].float()
            saved = x.detach() if m.name in self.exact else x.detach() @ self.p_in[m.name].T
            output.register_hook(lambda grad: self._add_block(m.name, grad.float(), saved))
        return forward_hook

    def _embedding_hook(self, tied: WeightMatrix | None):
        def forward_hook(module, args, output):
            # parameters are frozen: the gradient has to start flowing at the embedding output
            output = output.detach().requires_grad_()
            if tied is not None:
                token_ids = args[0]
                output.register_hook(lambda grad: self._add_embedding_block(tied.name, grad.float(), token_ids))
            return output
        return forward_hook

    def _add_block(self, name: str, grad_out: torch.Tensor, saved_in: torch.Tensor):
        if name in self.exact:
            gradient = torch.einsum("bto,bti->boi", grad_out, saved_in)
            block = self._project_exact(name, gradient)
        else:
            block = torch.einsum("btk,btl->bkl", grad_out @ self.p_out[name].T, saved_in)
        self._accumulate(name, block)

    def _add_embedding_block(self, name: str, grad_embedding: torch.Tensor, token_ids: torch.Tensor):
        if name in self.exact:
            size, _, width = grad_embedding.shape
            gradient = grad_embedding.new_zeros(size, self.p_out[name].shape[1], width)
            gradient.scatter_add_(1, token_ids[..., None].expand(-1, -1, width), grad_embedding)
            block = self._project_exact(name, gradient)
        else:
            out_side = self.p_out[name].T[token_ids]  # (B, T, k): column token(t) of P_out
            block = torch.einsum("btk,btl->bkl", out_side, grad_embedding @ self.p_in[name].T)
        self._accumulate(name, block)

    def _project_exact(self, name: str, gradient: torch.Tensor) -> torch.Tensor:
        corrected = gradient / self.exact[name]
        return torch.einsum("ko,boi,li->bkl", self.p_out[name], corrected, self.p_in[name])

    def _accumulate(self, name: str, block: torch.Tensor):
        self._blocks[name] = self._blocks[name] + block if name in self._blocks else block


@contextmanager
def _frozen(model: nn.Module):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
