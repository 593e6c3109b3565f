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
from dataclasses import dataclass

import torch
from torch import nn

from gradient_kernels.losses import Batch, per_example_loss
from gradient_kernels.modules import WeightMatrix, weight_matrices
from gradient_kernels.normalizers import ExactNormalizer, FactoredNormalizer
from gradient_kernels.projection import ProjectionSpec, gaussian_projection

# Bytes of full per-matrix gradients the exact correction forms at once (`_exact_rows`), by device
# type. On a CPU, big tensors made and freed per batch cost more in page faults (kernel time) than
# the arithmetic: measured 2.5x slower with the whole batch at once. A GPU's caching allocator
# reuses its memory, so there small chunks would only add kernel launches.
EXACT_CHUNK_BYTES = {"cpu": 4 * 2**20, "cuda": 512 * 2**20}


@dataclass
class _Head:
    """One spec's projections of one matrix; `index`: the spec's place in `GradientProjector.specs`."""

    index: int
    p_out: torch.Tensor
    p_in: torch.Tensor


class GradientProjector:
    """Maps a batch to its per-example vectors p(z) = P · (g(z) / sqrt(V)), shape (B, spec.dim).

    With `more` (further (spec, normalizers) pairs) one forward and backward pass serves every
    spec, and `project` returns one tensor per spec: specs whose exact corrections share a
    denominator tensor (the same object) also share its division, so other projection seeds of the
    same extraction cost only their projections."""

    def __init__(self, model: nn.Module, spec: ProjectionSpec, normalizers: dict | None = None, more=()):
        self.model, self.spec = model.eval(), spec
        self.fingerprint = spec.fingerprint()
        self.specs = [spec] + [s for s, _ in more]
        by_name = {m.name: m for m in weight_matrices(model)}
        device = next(model.parameters()).device
        # matrix name -> the heads with their correction folded into the projections
        self.factored: dict[str, list[_Head]] = {}
        # matrix name -> [(denominator on the device, the heads dividing by it)]: one copy and one
        # division per distinct denominator, however many specs share it
        self.exact: dict[str, list[tuple[torch.Tensor, list[_Head]]]] = {}
        shared: dict[int, list[_Head]] = {}
        for index, (one, its_normalizers) in enumerate([(spec, normalizers)] + list(more)):
            for name, (p_out, p_in, denominator) in _projections(one, its_normalizers or {}, by_name).items():
                head = _Head(index, p_out.to(device), p_in.to(device))
                if denominator is None:
                    self.factored.setdefault(name, []).append(head)
                elif id(denominator) in shared:
                    shared[id(denominator)].append(head)
                else:
                    shared[id(denominator)] = [head]
                    self.exact.setdefault(name, []).append((denominator.to(device), shared[id(denominator)]))
        self.matrices: list[WeightMatrix] = [
            by_name[name] for name in by_name if name in self.factored or name in self.exact
        ]
        self._blocks: list[dict] = []

    def __call__(self, batch: Batch) -> torch.Tensor:
        return self.project(batch)[0]

    def project(self, batch: Batch) -> list[torch.Tensor]:
        device = next(self.model.parameters()).device
        batch = batch.to(device)
        self._blocks = [{} for _ in self.specs]
        with self._hooks(), _frozen(self.model):
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
            per_example_loss(logits, batch).sum().backward()
        blocks, self._blocks = self._blocks, []
        size = len(batch)
        return [
            torch.cat(
                [
                    found[name].reshape(size, -1)
                    if name in found
                    else torch.zeros(size, spec.k[name] ** 2, device=device)
                    for name in spec.k
                ],
                dim=1,
            )
            for spec, found in zip(self.specs, blocks)
        ]

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
            x = args[0].float().detach()
            # factored heads keep only k numbers per token; the inputs themselves only for exact ones
            projected = [x @ head.p_in.T for head in self.factored.get(m.name, ())]
            saved = x if m.name in self.exact else None
            output.register_hook(lambda grad: self._add_block(m.name, grad.float(), projected, saved))

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

    def _add_block(self, name: str, grad_out: torch.Tensor, projected_in: list, saved_in: torch.Tensor | None):
        for head, x in zip(self.factored.get(name, ()), projected_in):
            self._accumulate(head.index, name, torch.einsum("btk,btl->bkl", grad_out @ head.p_out.T, x))
        if saved_in is not None:
            rows = self._exact_rows(name)
            self._add_exact(
                name, (torch.bmm(g.transpose(1, 2), x) for g, x in zip(grad_out.split(rows), saved_in.split(rows)))
            )

    def _add_embedding_block(self, name: str, grad_embedding: torch.Tensor, token_ids: torch.Tensor):
        for head in self.factored.get(name, ()):
            out_side = head.p_out.T[token_ids]  # (B, T, k): column token(t) of P_out
            self._accumulate(head.index, name, torch.einsum("btk,btl->bkl", out_side, grad_embedding @ head.p_in.T))
        if name in self.exact:
            vocabulary = self.exact[name][0][0].shape[0]

            def gradients():
                rows = self._exact_rows(name)
                for grads, ids in zip(grad_embedding.split(rows), token_ids.split(rows)):
                    size, _, width = grads.shape
                    gradient = grads.new_zeros(size, vocabulary, width)
                    yield gradient.scatter_add_(1, ids[..., None].expand(-1, -1, width), grads)

            self._add_exact(name, gradients())

    def _add_exact(self, name: str, gradients):
        """Full per-example gradients, a chunk of examples at a time: each distinct denominator
        divides a chunk once, then every head sharing it projects the result."""
        blocks: dict[int, list] = {}
        for gradient in gradients:
            for denominator, heads in self.exact[name]:
                corrected = gradient / denominator
                for head in heads:
                    blocks.setdefault(head.index, []).append(head.p_out @ corrected @ head.p_in.T)
        for index, chunks in blocks.items():
            self._accumulate(index, name, torch.cat(chunks))

    def _exact_rows(self, name: str) -> int:
        """Examples whose full gradients of this matrix are formed at once: few enough that they
        stay within their device's EXACT_CHUNK_BYTES."""
        denominator = self.exact[name][0][0]
        budget = EXACT_CHUNK_BYTES.get(denominator.device.type, EXACT_CHUNK_BYTES["cpu"])
        return max(1, budget // (denominator.numel() * 4))

    def _accumulate(self, index: int, name: str, block: torch.Tensor):
        found = self._blocks[index]
        found[name] = found[name] + block if name in found else block


def _projections(spec: ProjectionSpec, normalizers: dict, by_name: dict) -> dict[str, tuple]:
    """name -> (P_out, P_in, exact denominator or None) of each of the spec's matrices: a factored
    correction folded into the projections, an exact one kept as its (shared) denominator."""
    unknown = [name for name in spec.k if name not in by_name]
    if unknown:
        raise ValueError(f"the model has no weight matrices named {unknown}")
    if spec.normalizer != "none" and set(normalizers) < set(spec.k):
        missing = sorted(set(spec.k) - set(normalizers))
        raise ValueError(
            f"normaliser {spec.normalizer!r} lacks state for {missing[:3]}{'...' if len(missing) > 3 else ''}"
        )
    projections = {}
    for name, k in spec.k.items():
        m = by_name[name]
        p_out = gaussian_projection(spec.seed, m.name, "out", k, m.out_features)
        p_in = gaussian_projection(spec.seed, m.name, "in", k, m.in_features)
        normalizer, denominator = normalizers.get(name) if spec.normalizer != "none" else None, None
        if isinstance(normalizer, FactoredNormalizer):
            p_out, p_in = p_out * normalizer.out_scale, p_in * normalizer.in_scale
        elif isinstance(normalizer, ExactNormalizer):
            denominator = normalizer.denominator
        projections[name] = (p_out, p_in, denominator)
    return projections


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
