"""Scoring: precondition with R^(-1/2), unit-normalise, dot products, exact top-k.

Each step can be switched off for the paper's ablations; TRAK-style scoring applies R⁻¹ to the
training side only and keeps raw norms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class FingerprintMismatch(ValueError):
    """Vectors from different projections (or checkpoints) must never be compared."""


def check_same(kind: str, *values: str) -> str:
    if len(set(values)) != 1:
        raise FingerprintMismatch(f"{kind} mismatch: {sorted(set(values))}; re-extract with one {kind}")
    return values[0]


@dataclass
class Preconditioner:
    """A symmetric block-diagonal matrix (R^(-1/2), or R⁻¹ for TRAK) applied blockwise."""

    blocks: list

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        sizes = [block.shape[0] for block in self.blocks]
        if sum(sizes) != vectors.shape[1]:
            raise ValueError(f"preconditioner covers {sum(sizes)} coordinates, vectors have {vectors.shape[1]}")
        if len(set(sizes)) == 1:  # equal blocks (uniform k): one batched matmul instead of a loop
            stacked = torch.stack(self.blocks).to(vectors.device, vectors.dtype)
            return torch.einsum("nbi,bij->nbj", vectors.view(len(vectors), len(sizes), sizes[0]), stacked).reshape(
                vectors.shape
            )
        out, offset = [], 0
        for block, size in zip(self.blocks, sizes):
            out.append(vectors[:, offset : offset + size] @ block.to(vectors.device, vectors.dtype))
            offset += size
        return torch.cat(out, dim=1)


def prepare(
    vectors: torch.Tensor, preconditioner: Preconditioner | None = None, unit_norm: bool = True
) -> torch.Tensor:
    """G = R^(-1/2) p, then G / ‖G‖ (either step optional)."""
    out = preconditioner.apply(vectors) if preconditioner is not None else vectors
    if unit_norm:
        out = out / out.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return out


def top_k(
    queries: torch.Tensor, train: torch.Tensor, k: int, index_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, train indices), each (Q, min(k, N)): the exact k best per query, best first."""
    scores = queries @ train.T
    values, indices = scores.topk(min(k, train.shape[0]), dim=1)
    return values, indices + index_offset


# int8 products summed in int32: each partial sum stays below 2^31 for this many coordinates (127² each)
INT8_DOT_MAX_DIM = 2**31 // 127**2


class Int8Queries:
    """Queries coded like the int8 index (one scale per query: max|q| / 127), scored against int8
    rows by integer matrix products (exact int32 sums; VNNI on CPUs that have it). Skips decoding
    the index to float and costs a fraction of a float32 product. Quantizing the queries as well
    moved 1.4% of the top-10 places on the embedded world, MRR +0.0002 (bench/compression.py)."""

    def __init__(self, queries: torch.Tensor):
        self.scale = queries.abs().amax(dim=1).clamp(min=1e-30) / 127
        self.codes = torch.round(queries / self.scale[:, None]).to(torch.int8)

    def scores(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """(Q, n) float32 scores of n int8 rows `codes` (n, d) with per-row `scales` (n,)."""
        if codes.shape[1] != self.codes.shape[1]:
            raise ValueError(f"index rows have {codes.shape[1]} coordinates, queries {self.codes.shape[1]}")
        pieces = (
            torch._int_mm(
                self.codes[:, start : start + INT8_DOT_MAX_DIM].contiguous(),
                codes[:, start : start + INT8_DOT_MAX_DIM].T,
            )
            for start in range(0, codes.shape[1], INT8_DOT_MAX_DIM)
        )
        total = next(pieces).float()
        for piece in pieces:  # only past INT8_DOT_MAX_DIM coordinates
            total += piece
        return total.mul_(self.scale[:, None]).mul_(scales[None, :])


def merge_top_k(values_a, indices_a, values_b, indices_b, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of two partial top-k lists over disjoint candidates (the global merge)."""
    values = torch.cat([values_a, values_b], dim=1)
    indices = torch.cat([indices_a, indices_b], dim=1)
    best, where = values.topk(min(k, values.shape[1]), dim=1)
    return best, indices.gather(1, where)


class RunningTopK:
    """Exact top-k per query over streamed batches, in the order score descending, then key
    ascending (key = (doc_id, chunk)): ties are decided by the key, so the result does not depend
    on how the rows were split into batches. Holds at most k candidates per query, never the corpus.
    """

    def __init__(self, n_queries: int, k: int):
        self.k = k
        self.best: list[list[tuple]] = [[] for _ in range(n_queries)]  # per query: [(-score, key)], sorted, at most k
        self.floor = torch.full((n_queries,), -float("inf"))  # k-th best so far (-inf until k are held)

    def add(self, scores: torch.Tensor, key_of):
        """scores (Q, n) of n rows; key_of(row indices) -> their keys. Only rows that reach the
        batch's k-th best and the running k-th best are looked at (ties included)."""
        if scores.shape[1] == 0:
            return
        kth = scores.topk(min(self.k, scores.shape[1]), dim=1).values[:, -1]
        threshold = torch.maximum(kth, self.floor.to(scores.dtype))
        queries, rows = torch.nonzero(scores >= threshold[:, None], as_tuple=True)
        if len(rows) == 0:
            return
        found: dict[int, list[tuple]] = {}
        for q, value, key in zip(queries.tolist(), scores[queries, rows].tolist(), key_of(rows.tolist())):
            found.setdefault(q, []).append((-value, key))
        floor = self.floor.tolist()
        for q, candidates in found.items():
            self.best[q] = sorted(self.best[q] + candidates)[: self.k]
            if len(self.best[q]) == self.k:
                floor[q] = -self.best[q][-1][0]
        self.floor = torch.tensor(floor)

    def ranked(self) -> list[list[tuple[float, tuple]]]:
        """Per query, [(score, key)] best first."""
        return [[(-negative, key) for negative, key in best] for best in self.best]


def two_stage_top_k(queries: torch.Tensor, signs: torch.Tensor, exact: torch.Tensor, candidates: int, k: int):
    """(scores, indices) of the top k per query among the `candidates` best by the 1-bit sketch.

    Stage 1 ranks every row by q · sign(t) (the sketch keeps one bit per value); stage 2 rescores
    only those candidates with the exact vectors. Equals exhaustive top-k when candidates = n.
    """
    shortlist = (queries @ signs.T).topk(min(candidates, signs.shape[0]), dim=1).indices  # (Q, N)
    exact_scores = torch.stack(
        [exact[rows] @ query for query, rows in zip(queries, shortlist)]
    )  # one query at a time: (N, d) each
    values, where = exact_scores.topk(min(k, shortlist.shape[1]), dim=1)
    return values, shortlist.gather(1, where)
