"""The autocorrelation sums files (Σ p pᵀ per slice, `infra.layout.autocorrelation_file`): written by
the extraction ranks and corrected by takedowns, read by the Hessian fit. One home for their format:
a safetensors file of `block000`, `block001`, ... matrices with the count in its metadata."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from infra import layout, storage
from infra.lake import Lake
from infra.layout import TRAIN
from infra.matrices import load_matrices, load_metadata, save_matrices

LEDGER_KEY = "taken_down"  # metadata of an autocorrelation file: hashed (doc_id, chunk) keys no longer summed


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


def without_chunks(lake: Lake, sums, scope: list, removed, exact: bool):
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


# ------------------------------------------------------------------ takedowns
def chunk_key(doc_id: str, chunk: int) -> str:
    """A train chunk as an autocorrelation file's ledger names it (hashed: the url is not copied there)."""
    return hashlib.sha256(f"{doc_id}\0{chunk}".encode()).hexdigest()[:24]


def correct_sums(lake: Lake, found: pa.Table, urls: list[str]) -> list[dict]:
    """Takes the urls' vectors out of the autocorrelation file of every (checkpoint, fingerprint,
    partition) holding them; one entry each: {checkpoint_id, fingerprint, partition, vectors, how}."""
    slices = sorted(
        set(zip(found["checkpoint_id"].to_pylist(), found["fingerprint"].to_pylist(), found["partition"].to_pylist()))
        if found.num_rows
        else ()
    )
    return [
        correct_partition_sums(lake, checkpoint_id, fingerprint, partition, urls)
        for checkpoint_id, fingerprint, partition in slices
    ]


def correct_partition_sums(lake: Lake, checkpoint_id: str, fingerprint: str, partition: int, urls: list[str]) -> dict:
    """The partition's autocorrelation file without the urls' chunks: their stored float32 vectors
    subtracted (exactly what extraction summed), or, for a lossy dtype, the sums of the remaining
    stored vectors. Chunks the file's ledger already names (an earlier, killed run) are not subtracted again."""
    where = [("checkpoint_id", "=", checkpoint_id), ("fingerprint", "=", fingerprint), ("partition", "=", partition)]
    removed = lake.read(
        "train_gradients", filters=[*where, ("doc_id", "in", urls)], columns=["doc_id", "chunk", "dtype"]
    )
    entry = {
        "checkpoint_id": checkpoint_id,
        "fingerprint": fingerprint,
        "partition": partition,
        "vectors": removed.num_rows,
    }
    path = layout.autocorrelation_file(lake.root, checkpoint_id, fingerprint, TRAIN, partition)
    if not storage.exists(path):  # never completed extraction: fit-hessian refuses it until re-extracted
        return entry | {"how": "no sums file"}
    sums, metadata = stored_autocorrelation(path), load_metadata(path)
    ledger = set(json.loads(metadata.get(LEDGER_KEY, "[]")))
    keys = [chunk_key(d, c) for d, c in zip(removed["doc_id"].to_pylist(), removed["chunk"].to_pylist())]
    exact = set(removed["dtype"].to_pylist()) == {"float32"}
    if exact and all(key in ledger for key in keys):
        return entry | {"how": "already subtracted"}

    wanted = set(urls)

    def taken_down(batch):  # an exact subtraction skips what the ledger says is out already
        named = zip(batch["doc_id"].to_pylist(), batch["chunk"].to_pylist())
        return pa.array([d in wanted and not (exact and chunk_key(d, c) in ledger) for d, c in named])

    scope = [*where, ("doc_id", "in", urls)] if exact else where
    sums = without_chunks(lake, sums, scope, taken_down, exact)
    how = "subtracted" if exact else "rebuilt from the remaining stored vectors"
    save_autocorrelation(path, sums, {LEDGER_KEY: json.dumps(sorted(ledger | set(keys)))})
    return entry | {"how": how, "count": sums.count}
