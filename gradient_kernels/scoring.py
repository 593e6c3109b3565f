"""Scoring: precondition with R^(-1/2), unit-normalise, dot products, exact top-k.

Each step can be switched off for the paper's ablations; TRAK-style scoring applies R⁻¹ to the
training side only and keeps raw norms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # the blocks stacked once per (device, dtype), not per batch: at d = 2^16 (48 blocks of 1,369²)
    # stacking them took 190 ms of each 256-row batch's 745
    _stacked: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        sizes = [block.shape[0] for block in self.blocks]
        if sum(sizes) != vectors.shape[1]:
            raise ValueError(f"preconditioner covers {sum(sizes)} coordinates, vectors have {vectors.shape[1]}")
        if len(set(sizes)) == 1:  # equal blocks (uniform k): one batched matmul instead of a loop
            key = (vectors.device, vectors.dtype)
            if key not in self._stacked:
                self._stacked[key] = torch.stack(self.blocks).to(vectors.device, vectors.dtype)
            stacked = self._stacked[key]
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
        largest = torch.maximum(queries.amax(dim=1), queries.amin(dim=1).neg())  # no |q| temporary
        self.scale = largest.clamp(min=1e-30) / 127
        # coded 16 queries at a time: float temporaries under glibc's 32 MiB mmap threshold do not
        # fault in fresh pages (200 queries at d = 2^16: 80 -> 18 ms)
        codes = [
            torch.div(queries[start : start + 16], self.scale[start : start + 16, None]).round_().to(torch.int8)
            for start in range(0, len(queries), 16)
        ]
        # stored coordinate-major: rows (n, d) @ codes (d, Q) runs ~15% faster at d = 2^16 than the
        # other way round, and needs no copy of either side per batch
        self.by_coordinate = torch.cat(codes).T.contiguous()
        self.codes = self.by_coordinate.T  # (Q, d)

    def scores(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """(Q, n) float32 scores of n int8 rows `codes` (n, d) with per-row `scales` (n,)."""
        if codes.shape[1] != self.by_coordinate.shape[0]:
            raise ValueError(f"index rows have {codes.shape[1]} coordinates, queries {self.by_coordinate.shape[0]}")
        pieces = (
            torch._int_mm(
                codes[:, start : start + INT8_DOT_MAX_DIM], self.by_coordinate[start : start + INT8_DOT_MAX_DIM]
            )
            for start in range(0, codes.shape[1], INT8_DOT_MAX_DIM)
        )
        total = next(pieces).float()
        for piece in pieces:  # only past INT8_DOT_MAX_DIM coordinates
            total += piece
        return total.T.mul(self.scale[:, None]).mul_(scales[None, :])


def merge_top_k(values_a, indices_a, values_b, indices_b, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of two partial top-k lists over disjoint candidates (the global merge)."""
    values = torch.cat([values_a, values_b], dim=1)
    indices = torch.cat([indices_a, indices_b], dim=1)
    best, where = values.topk(min(k, values.shape[1]), dim=1)
    return best, indices.gather(1, where)


class RunningTopK:
    """Exact top-k per query over streamed batches, in the order score descending, then key
    ascending (key = (doc_id, chunk)): ties are decided by the key, so the result does not depend
    on how the rows were split into batches. Holds about k candidates per query, never the corpus.

    Streaming stays in torch (a Python loop over each batch's candidates was ~20% of index scoring
    on small corpora): per query it holds every row scoring at least its k-th best so far (k rows;
    more only when rows tie with the k-th), as scores and ids into a store of keys. Of a batch,
    only each query's entries reaching its held k-th (the batch's own k-th at first) are gathered
    and merged; keys are fetched only for rows that enter the held set and compared only once, in
    `ranked`. On the embedded index (200 queries, 4 batches of ~1,700 rows): 7.3 ms with `ranked`,
    against 9.2 ms when every column some query reached was gathered and 30 ms of integer products.
    """

    def __init__(self, n_queries: int, k: int):
        self.k = k
        self.scores = torch.empty(n_queries, 0)
        self.ids = torch.empty(n_queries, 0, dtype=torch.int64)  # into self.keys
        self.keys: list = []

    def add(self, scores: torch.Tensor, key_of):
        """scores (Q, n) of n rows; key_of(row indices) -> their keys, called once per batch for
        the rows that enter the held set."""
        if scores.shape[1] == 0:
            return
        if not scores.sum().isfinite():  # one cheap pass; topk would rank NaN above every score
            raise ValueError("NaN or infinite scores: a stored vector or a query is not finite")
        if self.scores.shape[1] < self.k:  # fewer than k held: the batch's own k best (and ties) may all enter
            floor = scores.topk(min(self.k, scores.shape[1]), dim=1).values[:, -1]
        else:  # only rows reaching the held k-th can enter: usually a few, found by one comparison
            floor = self.scores[:, self.k - 1]
        values, rows = _reaching(scores, floor)
        if values.shape[1] == 0:  # the usual batch, once the held scores are high
            return
        stored = len(self.keys)
        merged, where = torch.cat([self.scores.to(values.dtype), values], dim=1).sort(dim=1, descending=True)
        ids = torch.cat([self.ids, rows + stored], dim=1).gather(1, where)  # the batch's rows: ids past the store
        kth = min(self.k, merged.shape[1]) - 1
        held = int((merged >= merged[:, kth : kth + 1]).sum(dim=1).max())  # k, or more where rows tie the k-th
        self.scores, ids = merged[:, :held], ids[:, :held]
        entering = ids >= stored
        if entering.any():
            new_rows = (ids[entering] - stored).unique()  # sorted
            ids[entering] = stored + torch.searchsorted(new_rows, ids[entering] - stored)
            self.keys.extend(key_of(new_rows.tolist()))
        if len(self.keys) > 2 * ids.numel():  # rows pushed out since: keep the store about the held size
            kept = ids.unique()
            self.keys = [self.keys[i] for i in kept.tolist()]
            ids = torch.searchsorted(kept, ids.contiguous())
        self.ids = ids

    def ranked(self) -> list[list[tuple[float, tuple]]]:
        """Per query, [(score, key)] best first."""
        kth = min(self.k, self.scores.shape[1]) - 1
        held = (self.scores >= self.scores[:, kth : kth + 1]).sum(dim=1).tolist() if kth >= 0 else [0] * len(self.ids)
        return [
            [(-negative, key) for negative, key in sorted((-value, self.keys[i]) for value, i in zip(values[:n], ids))][
                : self.k
            ]
            for values, ids, n in zip(self.scores.tolist(), self.ids.tolist(), held)
        ]


def _reaching(scores: torch.Tensor, floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, columns) per row of `scores`: its columns scoring at least its `floor`, in column
    order, padded with -inf to the widest row's count. Only each row's own entries are gathered
    (one comparison and one nonzero over the batch), not every column some row reaches."""
    rows, columns = (scores >= floor[:, None]).nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=scores.shape[0])
    width = int(counts.max()) if len(rows) else 0
    slots = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]  # place in its row
    values = scores.new_full((scores.shape[0], width), -float("inf"))
    values[rows, slots] = scores[rows, columns]
    where = torch.zeros((scores.shape[0], width), dtype=torch.int64, device=scores.device)
    where[rows, slots] = columns
    return values, where


def two_stage_top_k(queries: torch.Tensor, sketch: torch.Tensor, exact: torch.Tensor, candidates: int, k: int):
    """(scores, indices) of the top k per query among the `candidates` best by the 1-bit sketch.

    Stage 1 ranks every row by the float query against its sketch vector (`decode_sign_sketch`:
    signs times block scales; the query is not quantised, which costs no storage); stage 2
    rescores only those candidates with the exact vectors, ties broken by the lower row index (as
    a stable sort of exhaustive scores does). Equals exhaustive top-k when candidates = n.
    """
    shortlist = (queries @ sketch.T).topk(min(candidates, sketch.shape[0]), dim=1).indices.sort(dim=1).values
    exact_scores = torch.stack(
        [exact[rows] @ query for query, rows in zip(queries, shortlist)]
    )  # one query at a time: (N, d) each
    values, where = exact_scores.sort(dim=1, descending=True, stable=True)
    return values[:, :k], shortlist.gather(1, where[:, :k])
