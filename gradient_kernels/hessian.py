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
    sums: list = field(default=None)  # type: ignore[arg-type]  # None: zeros, made in __post_init__
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
            block = v[:, offset : offset + size]
            self.sums[i] += block.T @ block
            offset += size
        if offset != vectors.shape[1]:
            raise ValueError(f"vectors have {vectors.shape[1]} coordinates, the blocks cover {offset}")
        self.count += vectors.shape[0]
        return self

    def subtract(self, vectors: torch.Tensor) -> "Autocorrelation":
        """Takes vectors that were added back out (exact up to float64 rounding): the sums of the rest."""
        negated = Autocorrelation(self.block_sizes, [-s for s in self.sums]).add(vectors)
        return Autocorrelation(self.block_sizes, [-s for s in negated.sums], self.count - vectors.shape[0])

    def merge(self, other: "Autocorrelation") -> "Autocorrelation":
        if other.block_sizes != self.block_sizes:
            raise ValueError("cannot merge autocorrelations with different block layouts")
        return Autocorrelation(
            self.block_sizes, [a + b for a, b in zip(self.sums, other.sums)], self.count + other.count
        )

    def mean(self) -> list:
        if self.count == 0:
            raise ValueError("no vectors accumulated")
        return [s / self.count for s in self.sums]


class Decomposed:
    """A block-diagonal symmetric matrix with each block's eigendecomposition (float64), made once:
    its spectrum, extreme eigenvalues and damped powers all come from it. A fit asks for R_train's
    three times and the mixed R's twice (nine decompositions of three matrices before)."""

    def __init__(self, blocks: list):
        self.blocks = blocks
        self.eigen = [torch.linalg.eigh(b.double()) for b in blocks]  # (values ascending, vectors)


def decomposed(matrix: list | Decomposed) -> Decomposed:
    return matrix if isinstance(matrix, Decomposed) else Decomposed(matrix)


def spectrum(matrix: list | Decomposed) -> torch.Tensor:
    """All eigenvalues of a block-diagonal matrix (its blocks, or `Decomposed`), largest first."""
    values = [v for v, _ in decomposed(matrix).eigen]
    return torch.cat(values).clamp(min=0).sort(descending=True).values


def crossing_component(dim: int, fraction: float = 0.015) -> int:
    """The component where the spectra should cross, as a share of the dimension: the paper's
    ~1000 of ~65K coordinates is ~1.5%; a fixed 1000 would be 23% of a 4,352-dim projection."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"crossing fraction must lie in (0, 1], got {fraction}")
    return max(1, round(fraction * dim))


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


def train_relative_damping(train_blocks: list, ratio: float = 0.1) -> list[float]:
    """Per-block damping = ratio × the mean eigenvalue of that block of R_train.

    Relative to R_train, not to the mixed R: query vectors can be orders of magnitude larger than
    training vectors (rare-token rows boosted by the optimizer correction), and a damping scaled by
    them exceeds every R_train eigenvalue, so R^(-1/2) acts as a constant on training vectors.
    Per block, because blocks (weight matrices) differ in scale by orders of magnitude too.
    A block with no training signal borrows the mean over all blocks."""
    means = [float(torch.diagonal(b.double()).clamp(min=0).mean()) for b in train_blocks]
    overall = sum(m * b.shape[0] for m, b in zip(means, train_blocks)) / sum(b.shape[0] for b in train_blocks)
    if overall <= 0:
        raise ValueError("R_train is zero: no training signal to damp against")
    return [ratio * (m if m > 0 else overall) for m in means]


def global_damping(blocks: list, ratio: float = 0.1) -> float:
    """ratio × the mean eigenvalue of the whole (block-diagonal) matrix: the classic rule."""
    return ratio * sum(float(torch.trace(b.double())) for b in blocks) / sum(b.shape[0] for b in blocks)


def damped_inverse_power(
    matrix: list | Decomposed, damping: float | list | None = None, damping_ratio: float = 0.1, power: float = -0.5
) -> tuple[list, list]:
    """(R + d_b·I)^power per block b of R (its blocks, or `Decomposed`), by eigendecomposition in
    float64. `damping` is one value for every block, or one per block; if None, the global rule
    (`train_relative_damping` is the pipeline's). Returns the blocks (float32) and the dampings used."""
    matrix = decomposed(matrix)
    if damping is None:
        damping = global_damping(matrix.blocks, damping_ratio)
    n = len(matrix.blocks)
    dampings = [float(damping)] * n if isinstance(damping, (int, float)) else [float(d) for d in damping]
    if len(dampings) != n:
        raise ValueError(f"{len(dampings)} dampings for {n} blocks")
    if min(dampings) <= 0:
        raise ValueError("damping must be positive (R is singular when fewer vectors than coordinates)")
    out = []
    for (values, vectors), d in zip(matrix.eigen, dampings):
        scaled = (values.clamp(min=0) + d) ** power
        out.append(((vectors * scaled) @ vectors.T).float())
    return out, dampings


def conditioning(train: list | Decomposed, query: list | Decomposed, mixed: list | Decomposed, dampings: list) -> dict:
    """What the fit did to the spectra, for the run's lineage and the diagnostic: top eigenvalues,
    condition numbers of the damped matrices, and the blocks whose damping exceeds R_train's top
    eigenvalue (there R^(-1/2) is nearly constant on training vectors: the preconditioner is off)."""
    train, query, mixed = decomposed(train), decomposed(query), decomposed(mixed)
    train_blocks, query_blocks = train.blocks, query.blocks

    def extreme(matrix: Decomposed, at: int) -> list[float]:
        return [float(values[at].clamp(min=0)) for values, _ in matrix.eigen]

    train_top, query_top, mixed_top = extreme(train, -1), extreme(query, -1), extreme(mixed, -1)
    mixed_min = extreme(mixed, 0)
    condition = [(t + d) / (m + d) for t, m, d in zip(mixed_top, mixed_min, dampings)]
    over = [i for i, (t, d) in enumerate(zip(train_top, dampings)) if d > t]
    return {
        "train_top_eigenvalue": max(train_top),
        "query_top_eigenvalue": max(query_top),
        "query_to_train_trace": float(
            sum(torch.trace(b.double()) for b in query_blocks)
            / max(1e-300, float(sum(torch.trace(b.double()) for b in train_blocks)))
        ),
        "damping_min": min(dampings),
        "damping_max": max(dampings),
        "condition_number_max": max(condition),
        "condition_number_median": sorted(condition)[len(condition) // 2],
        "blocks_damped_above_train_top": over,
    }
