"""score (Spark): exact top-k proponents per query from `train_gradients`, into `proponents`.

The prepared query vectors (preconditioned, normalised: small) are shipped to every task. The
methods that precondition both sides with a fitted matrix and unit-normalise (trackstar,
-no-mixing, -no-optimizer) score the TrackStar index (`jobs.trackstar_index`: the train side prepared once,
int8 by default; built here first where missing or stale): one integer matrix product per batch
against int8-coded queries (the rows are not decoded), then top-k. The others
(and `--index none`) prepare the raw `train_gradients` vectors as they go. Arrow batches are cut
into slices bounded in bytes (`--batch-bytes` of decoded float32), each decoded in one vectorised
step and scored against all queries; only the running top-k per query is kept (ties broken by
doc_id, chunk), so memory is bounded by the batch, not the corpus. A global window keeps the
exact top-k per query: the result equals brute-force scoring of every vector (tested).

Methods (`--methods`), each written under its own name so they compare row for row:
  trackstar               R^(-1/2) of the task-mixed R on both sides, unit norm
  trackstar-no-mixing     R from training vectors only (λ = 0)
  trackstar-no-hessian    no R, unit norm (cosine of corrected projected gradients)
  trackstar-no-unit-norm  R^(-1/2), raw norms
  trackstar-no-optimizer  as trackstar, on vectors extracted without optimizer correction
  trak                    R_train⁻¹ on one side, raw norms, no optimizer correction (TRAK-style)
  grad-dot, grad-cos      plain projected gradients: dot product, cosine
The optimizer correction is decided at extraction (the fingerprint names it); `PLAIN_METHODS` are
meant for vectors extracted with `--normalizer none` (`evaluation.evaluate` wires both).
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from infra.lake import Lake
from infra.names import check_names
from infra.cli import add_config_arguments, config_from_args, option
from infra.config import from_settings
from jobs.threads import use_cpu_threads
from jobs.catalog import SliceConfig, train_vector_count
from jobs.trackstar_index import BATCH_BYTES, rows_per_batch
from schemas.vectors import DTYPES

# method -> (registered matrix kind or None, power applied to it, unit norm, on both sides)
METHODS = {
    "trackstar": ("inverse_root", True, True),
    "trackstar-no-mixing": ("inverse_root_train_only", True, True),
    "trackstar-no-hessian": (None, True, True),
    "trackstar-no-unit-norm": ("inverse_root", False, True),
    "trackstar-no-optimizer": ("inverse_root", True, True),
    "trak": ("inverse_train", False, False),
    "grad-dot": (None, False, True),
    "grad-cos": (None, True, True),
}
PLAIN_METHODS = ("trackstar-no-optimizer", "trak", "grad-dot", "grad-cos")
# R^(-1/2) on both sides and unit norm: the train side is the same on every run, scored from the index
INDEXED_METHODS = tuple(m for m, (kind, unit_norm, both_sides) in METHODS.items() if kind and unit_norm and both_sides)


@dataclass
class ScoreConfig(SliceConfig):
    methods: list[str] = option(factory=lambda: ["trackstar"], choices=sorted(METHODS), nargs="+")
    top_k: int = from_settings("top_k", help="proponents kept per query")
    prompt_index: int = option(0, choices=[0, 1, 2])
    index: str = option(
        "int8",
        choices=[*DTYPES, "none"],
        help=f"code of the TrackStar index for {', '.join(INDEXED_METHODS)} ('none': score raw vectors)",
    )
    batch_bytes: int = option(BATCH_BYTES, help="decoded bytes per scoring batch")
    outlier_proponent_ratio: float = from_settings(
        "outlier_proponent_ratio",
        help="never propose train outliers (table train_outliers) this many times the median norm or more",
    )


def _prepared_side(vectors: torch.Tensor, blocks, unit_norm: bool) -> torch.Tensor:
    from gradient_kernels.scoring import Preconditioner, prepare

    return prepare(vectors, Preconditioner(blocks) if blocks is not None else None, unit_norm)


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over a read-only buffer (Arrow's), without the copy torch would ask for: only read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(array)


def method_matrices(lake: Lake, method: str, checkpoint_id: str, query_set: str, fingerprint: str):
    """(train-side blocks or None, query-side blocks or None, unit norm) for a method."""
    from jobs.catalog import load_preconditioner

    kind = METHODS[method][0]
    matrices = {kind: load_preconditioner(lake, checkpoint_id, query_set, fingerprint, kind)[0]} if kind else {}
    return method_blocks(method, matrices)


def method_blocks(method: str, matrices: dict):
    """As `method_matrices`, from matrices at hand (kind -> blocks, e.g. an unregistered `fit_hessian.fit`)."""
    kind, unit_norm, both_sides = METHODS[method]
    if kind is None:
        return None, None, unit_norm
    if both_sides:
        return matrices[kind], matrices[kind], unit_norm
    return None, matrices[kind], unit_norm  # R⁻¹ on the query side only: q·R⁻¹·t, the same scores, cheaper


def rank_in_memory(
    lake: Lake,
    methods: list[str],
    checkpoint_id: str,
    query_set: str,
    fingerprint: str,
    matrices: dict,
    k: int,
    prompt_index: int = 0,
) -> dict:
    """method -> query id -> [doc ids, best first]: what `run` computes, in this process and without
    writing, for evaluations that compare other preconditioners or projection seeds. The vectors
    are read once for all the methods."""
    if not methods:
        return {}
    query_ids, raw_queries, dim = query_vectors(lake, query_set, checkpoint_id, fingerprint, prompt_index)
    train = lake.read(
        "train_gradients",
        filters=[("checkpoint_id", "=", checkpoint_id), ("fingerprint", "=", fingerprint)],
        columns=["doc_id", "chunk", "vector", "dtype", "scale"],
    )
    found = {}
    for method in methods:
        train_blocks, query_blocks, unit_norm = method_blocks(method, matrices)
        queries = _prepared_side(raw_queries, query_blocks, unit_norm).numpy()
        ranked: dict[str, list] = {q: [] for q in query_ids}
        for batch in score_batches(train.to_batches(max_chunksize=2048), queries, train_blocks, unit_norm, k, dim):
            best = pa.Table.from_batches([batch]).sort_by([("query_index", "ascending"), ("score", "descending")])
            for query_index, doc_id in zip(best["query_index"].to_pylist(), best["doc_id"].to_pylist()):
                ranked[query_ids[query_index]].append(doc_id)
        found[method] = ranked
    return found


def score_batches(
    batches, queries: np.ndarray, train_blocks, unit_norm: bool, k: int, dim: int, batch_bytes: int = BATCH_BYTES
):
    """mapInArrow body: batches of train vectors -> this task's top-k rows per query. Rows that are
    scored as stored (no preconditioner, no normalisation: the index) and stored as int8 are scored
    by integer products against int8-coded queries, without decoding them."""
    from gradient_kernels.scoring import Int8Queries, Preconditioner, RunningTopK, prepare
    from schemas.vectors import check_vectors, decode_vectors, stored_values

    q = torch.from_numpy(queries)
    train_side = Preconditioner(train_blocks) if train_blocks is not None else None  # one for every batch
    as_stored = train_blocks is None and not unit_norm
    int8_queries = Int8Queries(q) if as_stored else None
    best, step = RunningTopK(len(queries), k), rows_per_batch(dim, batch_bytes)
    for mixed in batches:
        if "checksum" in mixed.schema.names:
            check_vectors(mixed, "the vectors scored")
        for dtype, batch in _by_dtype(mixed):  # a slice re-extracted with another --vector-dtype mixes them
            for start in range(0, batch.num_rows, step):
                part = batch.slice(start, step)
                if int8_queries is not None and dtype == "int8":
                    codes = _read_only_tensor(stored_values(part.column("vector"), dtype, dim))
                    scales = _read_only_tensor(part.column("scale").to_numpy(zero_copy_only=False))
                    scores = int8_queries.scores(codes, scales)
                else:
                    train = torch.from_numpy(decode_vectors(part.column("vector"), dtype, part.column("scale"), dim))
                    scores = q @ prepare(train, train_side, unit_norm).T
                doc_ids, chunks = part.column("doc_id"), part.column("chunk")
                best.add(
                    scores,
                    lambda rows: zip(
                        doc_ids.take(pa.array(rows, pa.int64())).to_pylist(),
                        chunks.take(pa.array(rows, pa.int64())).to_pylist(),
                    ),
                )
    ranked = [(query, score, key) for query, found in enumerate(best.ranked()) for score, key in found]
    if not ranked:
        return
    yield pa.RecordBatch.from_pydict(
        {
            "query_index": pa.array([query for query, _, _ in ranked], pa.int32()),
            "doc_id": [key[0] for _, _, key in ranked],
            "chunk": pa.array([key[1] for _, _, key in ranked], pa.int32()),
            "score": pa.array([score for _, score, _ in ranked], pa.float64()),
        }
    )


def scoring_inputs(lake: Lake, checkpoint_id: str, fingerprint: str, query_set: str) -> dict:
    """What the scores depend on, recorded with each run so a rerun can tell whether anything changed."""
    hessian = lake.read(
        "hessians",
        filters=[
            ("checkpoint_id", "=", checkpoint_id),
            ("query_set", "=", query_set),
            ("fingerprint", "=", fingerprint),
            ("kind", "=", "inverse_root"),
        ],
        columns=["sha256"],
    )["sha256"].to_pylist()
    return {
        "train_vectors": train_vector_count(lake, checkpoint_id, fingerprint),
        "hessian": hessian[0] if hessian else None,
        "fingerprint": fingerprint,
    }


def query_vectors(lake: Lake, query_set: str, checkpoint_id: str, fingerprint: str, prompt_index: int):
    """(query ids, vectors, dim) of one prompt of a query set, extracted under `fingerprint`."""
    import pyarrow.compute as pc

    from gradient_kernels.scoring import check_same
    from schemas.vectors import decode_rows

    rows = lake.read(
        "query_gradients",
        filters=[
            ("query_set", "=", query_set),
            ("checkpoint_id", "=", checkpoint_id),
            ("prompt_index", "=", prompt_index),
        ],
    )
    if rows.num_rows == 0:
        raise ValueError(f"no query gradients for {query_set}/{checkpoint_id}: run `python -m jobs extract`")
    matching = rows.filter(pc.equal(rows["fingerprint"], fingerprint))
    if matching.num_rows == 0:  # the train side was extracted otherwise: never compare across projections
        check_same("projection fingerprint", fingerprint, *set(rows["fingerprint"].to_pylist()))
    vectors = decode_rows(matching)
    return matching["query_id"].to_pylist(), torch.from_numpy(vectors), vectors.shape[1]


@dataclass
class ScoringRun:
    """What every method of one score run shares."""

    lake: Lake
    spark: object
    config: ScoreConfig
    checkpoint_id: str
    fingerprint: str
    run_id: str
    query_ids: list
    raw_queries: torch.Tensor
    dim: int

    @property
    def train_keys(self) -> dict:
        return {"checkpoint_id": self.checkpoint_id, "fingerprint": self.fingerprint}


def run(config: ScoreConfig) -> dict:
    from infra.runs import finish_run, start_run
    from infra.spark import spark_session
    from jobs.catalog import latest_checkpoint_id, only_fingerprint

    check_names(query_set=config.query_set, checkpoint_id=config.checkpoint_id, fingerprint=config.fingerprint)
    use_cpu_threads(config.cpu_threads, "score")
    lake = Lake(config.lake)
    checkpoint_id = config.checkpoint_id or latest_checkpoint_id(lake)
    fingerprint = config.fingerprint or only_fingerprint(lake, checkpoint_id)
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    run_id = start_run(lake, "score", asdict(config) | {"checkpoint_id": checkpoint_id, "fingerprint": fingerprint})
    query_ids, raw_queries, dim = query_vectors(lake, config.query_set, checkpoint_id, fingerprint, config.prompt_index)
    scoring = ScoringRun(lake, spark_session(), config, checkpoint_id, fingerprint, run_id, query_ids, raw_queries, dim)
    written, indexes = {}, {}
    for method in config.methods:
        index = score_method(scoring, method)
        if index is not None:
            indexes[method] = index
        written[method] = len(query_ids) * config.top_k
        print(f"[score] {method}: top-{config.top_k} of {config.query_set} × {checkpoint_id} written", flush=True)
    result = {
        "checkpoint_id": checkpoint_id,
        "query_set": config.query_set,
        "fingerprint": fingerprint,
        "queries": len(query_ids),
        "methods": written,
        "run_id": run_id,
        "indexes": indexes,
        "inputs": scoring_inputs(lake, checkpoint_id, fingerprint, config.query_set),
    }
    finish_run(lake, run_id, "succeeded", result)
    return result


def score_method(scoring: ScoringRun, method: str) -> dict | None:
    """One method's top-k per query into `proponents` (its slice replaced); returns what
    `ensure_index` did when the method scores the TrackStar index, else None."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    lake, config = scoring.lake, scoring.config
    train_blocks, query_blocks, unit_norm = method_matrices(
        lake, method, scoring.checkpoint_id, config.query_set, scoring.fingerprint
    )
    queries = _prepared_side(scoring.raw_queries, query_blocks, unit_norm).numpy()
    index, scored = None, ("train_gradients", scoring.train_keys)
    if config.index != "none" and method in INDEXED_METHODS:
        index, scored = index_side(scoring, method)
        train_blocks, unit_norm = None, False  # the index holds the prepared train side
    train = lake.spark_read(scoring.spark, scored[0]).filter(_where(scored[1]))
    train = without_junk(scoring, train.select("doc_id", "chunk", "vector", "dtype", "scale", "checksum"))
    k, batch_bytes, dim = config.top_k, config.batch_bytes, scoring.dim

    def local_top_k(batches):
        return score_batches(batches, queries, train_blocks, unit_norm, k, dim, batch_bytes)

    local = train.mapInArrow(local_top_k, "query_index int, doc_id string, chunk int, score double")
    ranked = local.withColumn(
        "rank", F.row_number().over(Window.partitionBy("query_index").orderBy(F.desc("score"), "doc_id", "chunk"))
    )
    ids = scoring.spark.createDataFrame(
        [(i, q) for i, q in enumerate(scoring.query_ids)], "query_index int, query_id string"
    )
    proponents = (
        ranked.filter(F.col("rank") <= k)
        .join(ids, "query_index")
        .select(
            F.lit(config.query_set).alias("query_set"),
            F.lit(scoring.checkpoint_id).alias("checkpoint_id"),
            "query_id",
            F.lit(method).alias("method"),
            "rank",
            "doc_id",
            "chunk",
            "score",
            F.lit(scoring.run_id).alias("run_id"),
        )
    )
    slice_keys = {"query_set": config.query_set, "method": method, "checkpoint_id": scoring.checkpoint_id}
    try:
        lake.spark_write(proponents, "proponents", replace_where=slice_keys)
    except Exception as error:  # the engine's error has no table or file: find them
        lake.raise_file_problems(*scored, error)
        raise
    return index


def index_side(scoring: ScoringRun, method: str) -> tuple[dict, tuple[str, dict]]:
    """Brings the method's TrackStar index up to date; (what ensure_index did, (its table, its keys))."""
    from jobs.trackstar_index import ensure_index

    config, kind = scoring.config, METHODS[method][0]
    index = ensure_index(
        scoring.lake,
        scoring.checkpoint_id,
        scoring.fingerprint,
        config.query_set,
        kind,
        config.index,
        scoring.run_id,
        config.batch_bytes,
    )
    keys = scoring.train_keys | {"query_set": config.query_set, "kind": kind, "dtype": config.index}
    return index, ("trackstar_index", keys)


def without_junk(scoring: ScoringRun, train):
    """The train side without the outliers far beyond the corpus's own tail (`outlier_proponent_ratio`)."""
    from pyspark.sql import functions as F

    if not scoring.lake.exists("train_outliers"):
        return train
    junk = F.col("norm") >= F.col("median_norm") * scoring.config.outlier_proponent_ratio
    flagged = scoring.lake.spark_read(scoring.spark, "train_outliers").filter(_where(scoring.train_keys) & junk)
    return train.join(flagged.select("doc_id", "chunk"), ["doc_id", "chunk"], "left_anti")


def _by_dtype(batch: pa.RecordBatch):
    """(dtype, the batch's rows of that dtype) for each dtype the batch holds."""
    dtypes = pc.unique(batch.column("dtype")).to_pylist()
    if len(dtypes) == 1:
        yield dtypes[0], batch
        return
    for dtype in dtypes:
        yield dtype, batch.filter(pc.equal(batch.column("dtype"), dtype))


def _where(keys: dict):
    """The Spark filter of rows whose columns equal `keys`' values."""
    from functools import reduce

    from pyspark.sql import functions as F

    return reduce(lambda a, b: a & b, (F.col(column) == value for column, value in keys.items()))


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, ScoreConfig)


def main(args):
    run(config_from_args(ScoreConfig, args))
