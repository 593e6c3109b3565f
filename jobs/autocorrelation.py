"""The autocorrelation sums files (Σ p pᵀ per slice, `infra.layout.autocorrelation_file`): written by
the extraction ranks and corrected by takedowns, read by the Hessian fit. One home for their format:
a safetensors file of `block000`, `block001`, ... matrices with the count in its metadata."""

from __future__ import annotations

from infra.matrices import load_matrices, load_metadata, save_matrices


def save_autocorrelation(path: str, sums, metadata: dict | None = None) -> None:
    """Saves an Autocorrelation (gradient_kernels.hessian) to `path`, with extra `metadata` if given."""
    save_matrices(
        path, {f"block{i:03d}": block for i, block in enumerate(sums.sums)}, {"count": sums.count} | (metadata or {})
    )


def stored_autocorrelation(path: str):
    """The Autocorrelation saved to `path`."""
    from gradient_kernels.hessian import Autocorrelation

    tensors = load_matrices(path)
    blocks = [tensors[k] for k in sorted(tensors)]
    return Autocorrelation([b.shape[0] for b in blocks], blocks, int(load_metadata(path)["count"]))


def summed_autocorrelation(files: list[str]):
    """The sum of the Autocorrelations saved to `files` (None for no files)."""
    total = None
    for path in files:
        part = stored_autocorrelation(path)
        total = part if total is None else total.merge(part)
    return total


def without_chunks(lake, sums, scope: list, removed, exact: bool):
    """`sums` (of the train vectors `scope` selects, or a superset) without the chunks `removed(batch)`
    marks (a boolean array per batch of train_gradients rows). Where the vectors are stored as
    float32 (`exact`) their outer products are subtracted: exactly what extraction summed, and
    `scope` need only cover the removed chunks. For a lossy dtype the sums are rebuilt from the
    other stored vectors of `scope`, which must then be the whole of what `sums` summed."""
    import pyarrow.compute as pc
    import torch

    from gradient_kernels.hessian import Autocorrelation
    from schemas.vectors import decode_rows

    columns = ["partition", "doc_id", "chunk", "vector", "dtype", "scale"]
    dim, rest = sum(sums.block_sizes), Autocorrelation(sums.block_sizes)
    for batch in lake.read_batches("train_gradients", filters=scope, columns=columns):
        marked = removed(batch)
        if exact:
            sums = sums.subtract(torch.from_numpy(decode_rows(batch.filter(marked), dim)))
        else:
            rest = rest.add(torch.from_numpy(decode_rows(batch.filter(pc.invert(marked)), dim)))
    return sums if exact else rest
