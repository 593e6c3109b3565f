"""Large matrices (Hessian autocorrelations, inverse roots) as safetensors files beside the tables.

`save_matrices(path, tensors)` writes a safetensors file and returns the sha256 that the `hessians`
table records beside its path; `load_matrices(path, sha256)` verifies
the checksum, so a truncated or swapped file is an error, never a silent wrong answer. Paths may
be local or s3:// (infra.storage).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors, save as save_safetensors

from infra import storage


class ChecksumMismatch(ValueError):
    """A stored matrix file does not have the checksum recorded for it."""


def save_matrices(path: str | Path, tensors: dict, metadata: dict | None = None) -> str:
    """Write torch/numpy tensors to a safetensors file (whole-file replace) and return its sha256."""
    data = save_safetensors(
        {key: _as_tensor(value) for key, value in tensors.items()},
        metadata={key: str(value) for key, value in (metadata or {}).items()},
    )
    storage.write_bytes(str(path), data)
    return hashlib.sha256(data).hexdigest()


def load_matrices(path: str | Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after checking it against its recorded sha256 if given."""
    data = storage.read_bytes(str(path))
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ChecksumMismatch(
            f"{path}: sha256 {hashlib.sha256(data).hexdigest()} does not match the recorded "
            f"{sha256}; the file was changed or truncated after it was registered"
        )
    return load_safetensors(data)


def load_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata saved with the tensors (safetensors header: 8-byte length, then JSON)."""
    data = storage.read_bytes(str(path))
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return header.get("__metadata__", {})


def _as_tensor(value) -> torch.Tensor:
    tensor = torch.from_numpy(np.asarray(value)) if isinstance(value, np.ndarray) else value
    return tensor.detach().cpu().contiguous()
