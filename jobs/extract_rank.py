"""The rank side of extract (`python -m jobs.extract_rank --plan <plan>`, a DeepSpeed rank
started by `jobs/extract.py`): each rank takes every world_size-th work item of the plan (the query
set or a partition), loads the model and the optimizer's second moments, computes projected vectors
with `gradient_kernels` in batches sized by a token budget, and writes each item as one idempotent
slice, with the autocorrelation sums of the slice beside the tables.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from infra.lake import Lake
from infra import layout
from infra.layout import QUERY, TRAIN
from jobs.extract import ExtractConfig, QUERY_DTYPE
from jobs.launch import bind_rank_device, end_rank, init_rank, rank_arguments, share_threads, wait_for_plan

# a partition's chunks are read this many at a time (and batched by length within each window)
TOKEN_WINDOW_ROWS = 8192


def token_budget_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped so that (rows × longest row) stays within the budget; similar lengths together."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current, longest = [], [], 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if current and longest_if_added * (len(current) + 1) > budget:
            batches.append(current)
            current, longest_if_added = [], lengths[i]
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


class Extraction:
    """One extraction of the plan as a rank sees it: its config, spec, run and output."""

    def __init__(self, job: dict, checkpoint_id: str):
        from gradient_kernels.projection import ProjectionSpec

        self.config, self.spec = ExtractConfig(**job["config"]), ProjectionSpec(**job["spec"])
        self.fingerprint, self.run_id, self.checkpoint_id = self.spec.fingerprint(), job["run_id"], checkpoint_id

    def vector_columns(self, vectors, dtype: str | None = None) -> dict:
        import numpy as np

        from schemas.vectors import decode_vectors, encode_vectors, vector_checksums

        dtype, n = dtype or self.config.vector_dtype, len(vectors)
        cells, scales = encode_vectors(vectors, dtype)
        stored = decode_vectors(cells, dtype, scales, vectors.shape[1])  # the norm of what readers will see
        return {
            "vector": cells,
            "dtype": [dtype] * n,
            "scale": scales if scales is not None else pa.nulls(n, pa.float32()),
            "norm": np.linalg.norm(stored, axis=1).astype(np.float32),
            "fingerprint": [self.fingerprint] * n,
            "checksum": vector_checksums(cells, scales),
            "run_id": [self.run_id] * n,
        }


class RankWorker:
    """One rank's work on one work item (the query set or a partition) for every extraction of the
    plan that needs it: one forward and backward pass per batch serves them all
    (`GradientProjector.project`), and the item's slices of all of them are one commit."""

    def __init__(self, lake: Lake, extractions: list[Extraction], rank: int, model, tokenizer, normalizers_for):
        from gradient_kernels.hooks import GradientProjector

        self.lake, self.extractions, self.rank = lake, extractions, rank
        self.model, self.tokenizer = model, tokenizer
        self.token_budget = extractions[0].config.token_budget
        specs = [
            (e.spec, normalizers_for(e.spec.normalizer, e.config.optimizer_source, e.spec.moments)) for e in extractions
        ]
        self.projector = GradientProjector(model, *specs[0], more=specs[1:])

    def vectors(self, batches_of_batch, progress):
        """Yields (row indices, [vectors of each extraction]) per batch, with progress."""
        for indices, batch in batches_of_batch:
            vectors = [v.cpu() for v in self.projector.project(batch)]
            progress.update(len(indices), int(batch.attention_mask.sum()))
            yield indices, vectors

    def extract_partition(self, partition: int):
        """Streams the partition: its chunks are read in windows of TOKEN_WINDOW_ROWS (batched by
        length within each), and each batch's vectors are encoded and written as soon as they are
        computed (one commit at the end), so a rank's memory does not grow with the partition."""
        from gradient_kernels.hessian import Autocorrelation
        from gradient_kernels.losses import document_batch
        from jobs.progress import Progress

        where = [("partition", "=", partition)]
        lengths = self.lake.read("tokens", filters=where, columns=["n_tokens"])["n_tokens"]
        longest, positions = max(lengths.to_pylist(), default=0), self.model.config.max_position_embeddings
        if longest > positions:
            raise ValueError(
                f"partition {partition} holds chunks of {longest} tokens, the model takes {positions}: "
                f"re-tokenize with `python -m jobs tokenize --context {positions} --force`"
            )
        pad = self.tokenizer.eos_token_id or 0
        progress = Progress(f"extract rank {self.rank} partition {partition}", len(lengths), unit="rows")
        windows = self.lake.read_batches(
            "tokens", filters=where, columns=["doc_id", "chunk", "input_ids", "n_tokens"], rows=TOKEN_WINDOW_ROWS
        )
        sums = [Autocorrelation(e.spec.block_sizes()) for e in self.extractions]
        nonfinite: list[list[str]] = [[] for _ in self.extractions]

        def batches(rows: pa.Table):
            ids = rows["input_ids"]
            for b in token_budget_batches(rows["n_tokens"].to_pylist(), self.token_budget):
                yield b, document_batch(ids.take(b).to_pylist(), pad)

        def encoded():  # one table per batch holding the rows of every extraction
            for rows in windows:
                keys = rows.select(["doc_id", "chunk", "n_tokens"])
                for indices, per_extraction in self.vectors(batches(rows), progress):
                    chunks = keys.take(indices)
                    yield pa.concat_tables(
                        [
                            self._batch_rows(e, partition, chunks, vectors.numpy(), its_sums, its_nonfinite)
                            for e, vectors, its_sums, its_nonfinite in zip(
                                self.extractions, per_extraction, sums, nonfinite
                            )
                        ]
                    )

        # the partition's slices of every extraction in one commit: all written, or none
        self.lake.replace_slice_batches(
            "train_gradients",
            encoded(),
            checkpoint_id=self.extractions[0].checkpoint_id,
            partition=partition,
            fingerprint=[e.fingerprint for e in self.extractions],
        )
        for e, its_sums, its_nonfinite in zip(self.extractions, sums, nonfinite):
            self._quarantine_nonfinite(e, its_nonfinite, f"train_gradients/partition={partition}")
            self._save_sums(e, TRAIN, partition, its_sums)

    @staticmethod
    def _batch_rows(e: Extraction, partition: int, chunks: pa.Table, vectors, sums, nonfinite: list) -> pa.Table:
        """One extraction's rows of one batch (`chunks`, in the order of `vectors`): rows with
        non-finite vectors are left out and named in `nonfinite`; the kept ones are added to `sums`."""
        import numpy as np
        import torch

        finite = np.isfinite(vectors).all(axis=1)
        nonfinite.extend(f"{row['doc_id']}#{row['chunk']}" for row in chunks.filter(pa.array(~finite)).to_pylist())
        kept, vectors = chunks.filter(pa.array(finite)), vectors[finite]
        sums.add(torch.from_numpy(vectors))
        return pa.table(
            {
                "checkpoint_id": [e.checkpoint_id] * len(kept),
                "partition": [partition] * len(kept),
                "doc_id": kept["doc_id"],
                "chunk": kept["chunk"],
                "n_tokens": kept["n_tokens"],
                **e.vector_columns(vectors),
            }
        )

    def extract_queries(self, query_set: str):
        import numpy as np
        import torch

        from gradient_kernels.hessian import Autocorrelation
        from gradient_kernels.losses import query_batch
        from jobs.progress import Progress

        rows = self.lake.read("queries", filters=[("query_set", "=", query_set)])
        if rows.num_rows == 0:
            raise ValueError(f"query set {query_set!r} has no queries in {self.lake.path('queries')}")
        eos = self.tokenizer.eos_token_id
        prompts, targets, keys = [], [], []
        for query in rows.to_pylist():
            for index in range(3):
                prompts.append([eos] + self.tokenizer(query[f"prompt{index}"], add_special_tokens=False)["input_ids"])
                targets.append(self.tokenizer(query["target"], add_special_tokens=False)["input_ids"])
                keys.append((query["query_id"], index))
        lengths = [len(p) + len(t) for p, t in zip(prompts, targets)]
        batches = (
            (b, query_batch([prompts[i] for i in b], [targets[i] for i in b], eos or 0))
            for b in token_budget_batches(lengths, self.token_budget)
        )
        vectors = [np.zeros((len(keys), e.spec.dim), dtype=np.float32) for e in self.extractions]
        progress = Progress(f"extract rank {self.rank} queries {query_set}", len(keys), unit="rows")
        for indices, per_extraction in self.vectors(batches, progress):
            for its_vectors, batch_vectors in zip(vectors, per_extraction):
                its_vectors[indices] = batch_vectors.numpy()
        for e, its_vectors in zip(self.extractions, vectors):
            finite = np.isfinite(its_vectors).all(axis=1)
            self._quarantine_nonfinite(
                e, [f"{q}/prompt{i}" for (q, i), ok in zip(keys, finite) if not ok], f"query_gradients/{query_set}"
            )
            keep = np.flatnonzero(finite).tolist()
            table = pa.table(
                {
                    "query_set": [query_set] * len(keep),
                    "checkpoint_id": [e.checkpoint_id] * len(keep),
                    "query_id": [keys[i][0] for i in keep],
                    "prompt_index": [keys[i][1] for i in keep],
                    **e.vector_columns(its_vectors[keep], QUERY_DTYPE),
                }
            )
            self.lake.replace_slice(
                "query_gradients", table, query_set=query_set, checkpoint_id=e.checkpoint_id, fingerprint=e.fingerprint
            )
            self._save_sums(
                e, QUERY, query_set, Autocorrelation(e.spec.block_sizes()).add(torch.from_numpy(its_vectors[keep]))
            )

    def _quarantine_nonfinite(self, e: Extraction, positions: list[str], source: str):
        """Rows with NaN/inf vectors go to quarantine with the reason (the rest are kept)."""
        from infra.quarantine import quarantine_rows

        if positions:
            quarantine_rows(
                self.lake,
                [
                    {
                        "source": source,
                        "position": position,
                        "reason": "non-finite gradient (NaN or inf loss or activations)",
                        "raw_value": None,
                    }
                    for position in positions
                ],
                stage="extract",
                run_id=e.run_id,
            )
            print(
                f"[extract rank {self.rank}] {len(positions)} row(s) of {source} quarantined: non-finite gradients",
                flush=True,
            )

    def _save_sums(self, e: Extraction, kind: str, item, sums):
        from jobs.autocorrelation import save_autocorrelation

        save_autocorrelation(
            layout.autocorrelation_file(self.lake.root, e.checkpoint_id, e.fingerprint, kind, item), sums
        )


def extract_rank(plan_path: str, checkpoint_dir: str):
    """Runs this rank's share of the plan. The rank starts while the driver still plans: it loads
    the model of `checkpoint_dir` meanwhile, then waits for the plan."""
    from functools import cache

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradient_kernels.modules import weight_matrices
    from gradient_kernels.normalizers import normalizers_from_state
    from jobs.checkpoints import load_second_moments
    from jobs.second_moments import load_data_moments

    rank, world = init_rank()  # threads per rank: OMP_NUM_THREADS, set by launch_ranks on a CPU node
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir).to(bind_rank_device()).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    plan = wait_for_plan(plan_path)
    if plan["checkpoint_dir"] != str(checkpoint_dir):
        raise ValueError(f"plan {plan_path} is for {plan['checkpoint_dir']}, this rank loaded {checkpoint_dir}")
    share_threads(min(world, len({item for job in plan["jobs"] for item in map(tuple, job["items"])})))
    checkpoint_dir = Path(checkpoint_dir)

    @cache  # one normaliser object per kind: extractions sharing it share its division (GradientProjector)
    def normalizers_for(normalizer: str, source: str, moments: str) -> dict:
        if normalizer == "none":
            return {}
        state = (
            load_data_moments(plan["lake"], plan["checkpoint_id"], moments)
            if moments
            else load_second_moments(checkpoint_dir, source)
        )
        return normalizers_from_state(state, weight_matrices(model), normalizer)

    extractions = [Extraction(job, plan["checkpoint_id"]) for job in plan["jobs"]]
    needed: dict[tuple, list[int]] = {}  # work item -> the extractions that need it
    for index, job in enumerate(plan["jobs"]):
        for kind, item in job["items"]:
            needed.setdefault((kind, item), []).append(index)
    lake, workers = Lake(plan["lake"]), {}
    for (kind, item), indices in list(needed.items())[rank::world]:
        key = tuple(indices)
        if key not in workers:
            workers[key] = RankWorker(lake, [extractions[i] for i in indices], rank, model, tokenizer, normalizers_for)
        if kind == QUERY:
            workers[key].extract_queries(item)
        else:
            workers[key].extract_partition(item)


if __name__ == "__main__":  # a DeepSpeed rank
    arguments = rank_arguments()
    extract_rank(arguments.plan, arguments.checkpoint_dir)
    end_rank()
