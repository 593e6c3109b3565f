"""Large matrices (Hessian autocorrelations, inverse roots) as safetensors files beside the tables.

`store_matrices(lake, name, tensors)` writes <lake>/_matrices/<name>.safetensors and returns the
path, shapes and sha256 that the `hessians` table records; `load_matrices(path, sha256)` verifies
the checksum, so a truncated or swapped file is an error, never a silent wrong answer. Paths may
be local or s3:// (infra.storage).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors, save as save_safetensors

from infra import storage
from infra.lake import Lake

_NAME = re.compile(r"^[A-Za-z0-9_.=-]+(/[A-Za-z0-9_.=-]+)*$")


class ChecksumMismatch(ValueError):
    """A stored matrix file does not have the checksum recorded for it."""


@dataclass(frozen=True)
class StoredMatrices:
    path: str
    shapes: dict[str, list[int]]
    sha256: str


def matrix_path(lake: Lake, name: str) -> str:
    """<lake>/_matrices/<name>.safetensors; `name` is a relative path like hessians/ck1/fp/r_train."""
    if not _NAME.match(name) or ".." in name.split("/"):
        raise ValueError(f"matrix name {name!r}: use letters, digits, _.=- and / between parts")
    return f"{lake.root}/_matrices/{name}.safetensors"


def store_matrices(lake: Lake, name: str, tensors: dict, metadata: dict | None = None) -> StoredMatrices:
    """Save tensors under the lake's _matrices folder; returns path, shape of each tensor, sha256."""
    path = matrix_path(lake, name)
    sha256 = save_matrices(path, tensors, metadata)
    return StoredMatrices(path, {key: list(np.shape(value)) for key, value in tensors.items()}, sha256)


def save_matrices(path: str | Path, tensors: dict, metadata: dict | None = None) -> str:
    """Write torch/numpy tensors to a safetensors file (whole-file replace) and return its sha256."""
    data = save_safetensors({key: _as_tensor(value) for key, value in tensors.items()},
                            metadata={key: str(value) for key, value in (metadata or {}).items()})
    storage.write_bytes(str(path), data)
    return hashlib.sha256(data).hexdigest()


def load_matrices(path: str | Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after checking it against its recorded sha256 if given."""
    data = storage.read_bytes(str(path))
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ChecksumMismatch(f"{path}: sha256 {hashlib.sha256(data).hexdigest()} does not match the recorded "
                               f"{sha256}; the file was changed or truncated after it was registered")
    return load_safetensors(data)


def load_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata saved with the tensors (safetensors header: 8-byte length, then JSON)."""
    data = storage.read_bytes(str(path))
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    return header.get("__metadata__", {})


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(storage.read_bytes(str(path))).hexdigest()


def _as_tensor(value) -> torch.Tensor:
    tensor = torch.from_numpy(np.asarray(value)) if isinstance(value, np.ndarray) else value
    return tensor.detach().cpu().contiguous()
