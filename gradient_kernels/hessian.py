"""The Hessian approximation: autocorrelation R = E[p pᵀ], task mixing, damped inverse roots.

R is block-diagonal by default (one block per weight matrix: the scalable default) or one dense
block over all coordinates when the dimension is small. Sums are kept in float64 and can be
added across batches, partitions and ranks before dividing by the count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Autocorrelation:
    """Streaming Σ p pᵀ per block, and the number of vectors summed."""

    block_sizes: list
    sums: list = field(default=None)
    count: int = 0

    def __post_init__(self):
        if self.sums is None:
            self.sums = [torch.zeros(s, s, dtype=torch.float64) for s in self.block_sizes]

    @classmethod
    def dense(cls, dim: int) -> "Autocorrelation":
        return cls([dim])

    def add(self, vectors: torch.Tensor) -> "Autocorrelation":
        offset = 0
        v = vectors.detach().to("cpu", torch.float64)
        for i, size in enumerate(self.block_sizes):
            block = v[:, offset:offset + size]
            self.sums[i] += block.T @ block
            offset += size
        if offset != vectors.shape[1]:
            raise ValueError(f"vectors have {vectors.shape[1]} coordinates, the blocks cover {offset}")
        self.count += vectors.shape[0]
        return self

    def merge(self, other: "Autocorrelation") -> "Autocorrelation":
        if other.block_sizes != self.block_sizes:
            raise ValueError("cannot merge autocorrelations with different block layouts")
        return Autocorrelation(self.block_sizes, [a + b for a, b in zip(self.sums, other.sums)], self.count + other.count)

    def mean(self) -> list:
        if self.count == 0:
            raise ValueError("no vectors accumulated")
        return [s / self.count for s in self.sums]


def spectrum(blocks: list) -> torch.Tensor:
    """All eigenvalues of a block-diagonal matrix, largest first."""
    return torch.cat([torch.linalg.eigvalsh(b.double()) for b in blocks]).clamp(min=0).sort(descending=True).values


def crossing_lambda(query_spectrum: torch.Tensor, train_spectrum: torch.Tensor, component: int = 1000) -> float:
    """λ such that λ·spec_query and (1-λ)·spec_train meet at `component`.

    The component is clamped to the numerical rank of both spectra: past the rank of R_query
    (fewer query vectors than coordinates) its eigenvalues are zero and the rule would give λ = 1.
    """
    rank = min(_rank(query_spectrum), _rank(train_spectrum))
    if rank == 0:
        return 0.0  # no query directions to mix in
    c = min(component, rank) - 1
    q, t = float(query_spectrum[c]), float(train_spectrum[c])
    return min(1.0, max(0.0, t / (q + t)))


def _rank(sorted_spectrum: torch.Tensor, tolerance: float = 1e-10) -> int:
    if len(sorted_spectrum) == 0 or float(sorted_spectrum[0]) <= 0:
        return 0
    return int((sorted_spectrum > tolerance * sorted_spectrum[0]).sum())


def mix(query_blocks: list, train_blocks: list, lam: float) -> list:
    """R = λ·R_query + (1-λ)·R_train."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"λ must lie in [0, 1], got {lam}")
    return [lam * q + (1 - lam) * t for q, t in zip(query_blocks, train_blocks)]


def damped_inverse_power(blocks: list, damping: float | None = None, damping_ratio: float = 0.1,
                         power: float = -0.5) -> tuple[list, float]:
    """(R + d·I)^power per block, by eigendecomposition in float64; d = ratio × mean eigenvalue
    over the whole matrix unless given. Returns the blocks (float32) and the damping used."""
    decompositions = [torch.linalg.eigh(b.double()) for b in blocks]
    if damping is None:
        total = sum(float(values.clamp(min=0).sum()) for values, _ in decompositions)
        damping = damping_ratio * total / sum(b.shape[0] for b in blocks)
    if damping <= 0:
        raise ValueError("damping must be positive (R is singular when fewer vectors than coordinates)")
    out = []
    for values, vectors in decompositions:
        scaled = (values.clamp(min=0) + damping) ** power
        out.append(((vectors * scaled) @ vectors.T).float())
    return out, damping
