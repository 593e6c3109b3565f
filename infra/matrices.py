"""Large matrices (autocorrelation sums, inverse roots) as safetensors files next to the tables.

A saved file is named by the caller and checksummed; loading verifies the checksum, so a
truncated or swapped file is an error, not a silent wrong answer. Local paths only: the S3 case
copies through `infra.storage` (not needed by the embedded default).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class ChecksumMismatch(ValueError):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_matrices(path: Path, tensors: dict, metadata: dict | None = None) -> str:
    """Write atomically (temp file + rename) and return the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    partial.replace(path)
    return sha256_of(path)


def load_matrices(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    if sha256 is not None and sha256_of(path) != sha256:
        raise ChecksumMismatch(f"{path}: checksum differs from the registry's; the file was changed or truncated")
    return load_file(str(path))
