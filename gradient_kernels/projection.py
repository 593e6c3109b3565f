"""Deterministic Gaussian projections and the fingerprint that names them.

A projection matrix is a pure function of (seed, module name, side, k, width): its generator seed is
derived by hashing those, and it is drawn on the CPU, so every process, rank and device gets the
same matrix (moved to the device afterwards). Each module's pair is drawn on its own, so no
process ever holds one matrix over all parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import torch

# Bump when a change to the kernels changes the vectors they produce: old vectors stop matching.
KERNEL_VERSION = "2"  # 2: adam-factored fits the floored denominator

NORMALIZER_KINDS = (
    "none",
    "adafactor",
    "adam-floored",
    "adam-exact",
    "adam-factored",
    "adam-half",
    "adam-flat-vocab",
    "data-floored",
    "data-factored",
)


def state_kind(normalizer: str) -> str | None:
    """The second moments a normaliser reads: "adam" or "adafactor" (the optimizer's state), "data"
    (estimated from training data: jobs/second_moments.py), None for "none"."""
    return None if normalizer == "none" else normalizer.split("-")[0]


def _generator_seed(seed: int, name: str, side: str, k: int, width: int) -> int:
    digest = hashlib.sha256(f"{seed}|{name}|{side}|{k}|{width}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def gaussian_projection(seed: int, name: str, side: str, k: int, width: int) -> torch.Tensor:
    """A k × width float32 matrix with entries N(0, 1/k), identical wherever it is made."""
    if side not in ("out", "in"):
        raise ValueError(f"side must be 'out' or 'in', not {side!r}")
    generator = torch.Generator(device="cpu").manual_seed(_generator_seed(seed, name, side, k, width))
    return torch.randn(k, width, generator=generator, dtype=torch.float32) / math.sqrt(k)


@dataclass(frozen=True)
class ProjectionSpec:
    """Everything that determines a projected vector's coordinates, besides the checkpoint."""

    seed: int
    k: dict = field(hash=False)  # weight matrix name -> k (its block is k × k)
    normalizer: str = "adafactor"  # which optimizer correction was applied
    dtype: str = "float32"  # compute dtype of the projections
    code_version: str = KERNEL_VERSION
    # the data-estimated second moments' content hash (data-* normalisers only; jobs/second_moments.py)
    moments: str = ""

    def __post_init__(self):
        if self.normalizer not in NORMALIZER_KINDS:
            raise ValueError(f"normalizer must be one of {NORMALIZER_KINDS}, not {self.normalizer!r}")
        if (state_kind(self.normalizer) == "data") != bool(self.moments):
            raise ValueError(f"normalizer {self.normalizer!r}: `moments` names the data estimate, for data-* only")

    @property
    def modules(self) -> list[str]:
        return list(self.k)

    @property
    def dim(self) -> int:
        return sum(k * k for k in self.k.values())

    def block_sizes(self) -> list[int]:
        return [k * k for k in self.k.values()]

    def as_dict(self) -> dict:
        held = asdict(self)
        if not self.moments:  # left out, so specs without data moments keep their fingerprints
            del held["moments"]
        return held

    def fingerprint(self) -> str:
        """Short stable hash; vectors with different fingerprints must never be compared."""
        canonical = json.dumps(self.as_dict(), sort_keys=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
