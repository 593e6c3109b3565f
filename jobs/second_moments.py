"""A checkpoint's second moments estimated from its training data, for the data-* normalisers.

Estimated once per checkpoint and sample size, at its first extraction with a data-* normaliser,
and reused by every later one: the estimate's content hash is part of the projection spec (hence
of the vectors' fingerprint), so vectors corrected by different estimates are never compared, and
a nightly run that adds partitions keeps the fingerprint of the vectors already extracted.

The sample: `chunks` training chunks of the lowest-numbered tokenized partitions, those whose
(doc_id, chunk) hash lowest, so it does not depend on the order rows were written. The record
`sample-<chunks>.json` beside the estimate lists them (the estimate's lineage).
"""

from __future__ import annotations

import hashlib
import io
import json
from datetime import datetime, timezone
from pathlib import Path

from infra import layout, storage
from infra.lake import Lake

SAMPLE_CHUNKS = 512


def data_moments(lake: Lake, checkpoint_dir: Path, checkpoint_id: str, chunks: int = SAMPLE_CHUNKS) -> str:
    """The content hash of the checkpoint's estimate from `chunks` training chunks, estimating and
    storing it first where the lake has none yet."""
    record = layout.second_moments(lake.root, checkpoint_id, f"sample-{chunks}.json")
    if storage.exists(record):
        return json.loads(storage.read_text(record))["hash"]
    import torch

    sample = sampled_chunks(lake, chunks)
    estimate = estimate_moments(checkpoint_dir, sample)
    buffer = io.BytesIO()
    torch.save(estimate, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()[:16]
    storage.write_bytes(layout.second_moments(lake.root, checkpoint_id, f"{digest}.pt"), data)
    lineage = {
        "hash": digest,
        "examples": estimate["examples"],
        "chunks": [[doc_id, chunk] for doc_id, chunk in zip(sample["doc_id"].to_pylist(), sample["chunk"].to_pylist())],
        "estimated_at": datetime.now(timezone.utc).isoformat(),
    }
    # last (a killed estimate leaves no record), and only if no concurrent extraction recorded its
    # own first: every extraction of the checkpoint then uses the one recorded
    if not storage.create_bytes(record, json.dumps(lineage).encode()):
        return json.loads(storage.read_text(record))["hash"]
    print(f"[extract] second moments of {checkpoint_id} estimated from {estimate['examples']} chunks: {digest}")
    return digest


def load_data_moments(lake_root: str, checkpoint_id: str, digest: str) -> dict:
    import torch

    data = storage.read_bytes(layout.second_moments(lake_root, checkpoint_id, f"{digest}.pt"))
    if hashlib.sha256(data).hexdigest()[:16] != digest:
        raise ValueError(f"the second moments {digest} of {checkpoint_id} do not match their hash")
    return torch.load(io.BytesIO(data), map_location="cpu")


def sampled_chunks(lake: Lake, chunks: int):
    """The sample's rows of `tokens` (doc_id, chunk, input_ids)."""
    import pyarrow as pa

    picked, have = [], 0
    for (partition,) in sorted(lake.distinct("tokens", ["partition"])):
        rows = lake.read("tokens", filters=[("partition", "=", partition)], columns=["doc_id", "chunk", "input_ids"])
        rows = rows.filter(pa.array([n >= 2 for n in (len(ids) for ids in rows["input_ids"].to_pylist())]))
        keys = [_sample_key(d, c) for d, c in zip(rows["doc_id"].to_pylist(), rows["chunk"].to_pylist())]
        order = sorted(range(len(keys)), key=keys.__getitem__)[: chunks - have]
        picked.append(rows.take(order))
        have += len(order)
        if have >= chunks:
            break
    if not have:
        raise ValueError(f"no tokenized chunks in {lake.path('tokens')} to estimate second moments from")
    return pa.concat_tables(picked)


def _sample_key(doc_id: str, chunk: int) -> bytes:
    return hashlib.sha256(f"{doc_id}|{chunk}".encode()).digest()


def estimate_moments(checkpoint_dir: Path, sample) -> dict:
    from transformers import AutoModelForCausalLM

    from gradient_kernels.losses import document_batch
    from gradient_kernels.second_moments import mean_squared_gradients
    from jobs.progress import Progress

    import torch

    # eager attention: vmap has no batching rule for the CPU flash kernel (2.6x slower measured)
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, attn_implementation="eager")
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    ids = sample["input_ids"].to_pylist()
    progress = Progress("extract: second moments", len(ids), unit="chunks")

    def batches():
        for start in range(0, len(ids), 16):
            yield document_batch(ids[start : start + 16])
            progress.update(len(ids[start : start + 16]))

    return mean_squared_gradients(model, batches())
