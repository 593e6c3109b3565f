"""The TrackStar index (jobs.index) and scoring from it: against exact float32 scoring, incremental
builds, rebuilds on a new Hessian fit, no duplicates on rerun; streamed top-k with deterministic
ties; the 1-bit sketch and two-stage retrieval.

The lake holds synthetic projected vectors (no model: the index only reads `train_gradients`,
`query_gradients` and the autocorrelation sums), written as the extraction writes them; the
Hessian is fitted by the real `fit_hessian` job and scoring runs on the embedded Spark engine.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from gradient_kernels.hessian import Autocorrelation
from gradient_kernels.scoring import Preconditioner, RunningTopK, prepare, two_stage_top_k
from infra.lake import Lake
from infra.matrices import save_matrices
from infra import layout
from jobs import catalog, fit_hessian, score, trackstar_index
from infra.layout import QUERY, TRAIN
from schemas.vectors import (
    SKETCH_BLOCK,
    decode_sign_sketch,
    decode_vectors,
    encode_sign_sketch,
    encode_vectors,
    stored_values,
)

CHECKPOINT, FINGERPRINT, QUERY_SET = "ck-test", "fp-test", "qs-test"
BLOCKS, BLOCK = 4, 16
DIM = BLOCKS * BLOCK


def _vectors(n: int, seed: int) -> np.ndarray:
    """Gradient-like vectors: a few strong shared directions (what R^(-1/2) whitens away) plus noise."""
    g = np.random.default_rng(seed)
    shared = np.random.default_rng(99).normal(size=(3, DIM)) * 10
    return (g.normal(size=(n, 3)) @ shared + g.normal(size=(n, DIM))).astype(np.float32)


def _vector_columns(vectors: np.ndarray, run_id: str) -> dict:
    cells, _ = encode_vectors(vectors, "float32")
    n = len(vectors)
    return {
        "vector": cells,
        "dtype": ["float32"] * n,
        "scale": pa.nulls(n, pa.float32()),
        "norm": np.linalg.norm(vectors, axis=1).astype(np.float32),
        "fingerprint": [FINGERPRINT] * n,
        "run_id": [run_id] * n,
    }


def write_partition(lake: Lake, partition: int, vectors: np.ndarray, run_id: str = "extract-1"):
    """A train_gradients slice and its autocorrelation sums, as an extraction rank writes them."""
    n = len(vectors)
    lake.replace_slice(
        "train_gradients",
        pa.table(
            {
                "checkpoint_id": [CHECKPOINT] * n,
                "partition": [partition] * n,
                "doc_id": [f"doc-{partition}-{i:04d}" for i in range(n)],
                "chunk": [0] * n,
                "n_tokens": [10] * n,
                **_vector_columns(vectors, run_id),
            }
        ),
        checkpoint_id=CHECKPOINT,
        partition=partition,
        fingerprint=FINGERPRINT,
    )
    _save_sums(lake, TRAIN, partition, vectors)


def _save_sums(lake: Lake, kind: str, item, vectors: np.ndarray):
    sums = Autocorrelation([BLOCK] * BLOCKS).add(torch.from_numpy(vectors))
    save_matrices(
        layout.autocorrelation_file(lake.root, CHECKPOINT, FINGERPRINT, kind, item),
        {f"block{i:03d}": s for i, s in enumerate(sums.sums)},
        {"count": sums.count},
    )


def fit(lake: Lake, mixing_lambda: float = 0.9) -> dict:
    return fit_hessian.run(
        fit_hessian.FitHessianConfig(
            lake=lake.root,
            checkpoint_id=CHECKPOINT,
            query_set=QUERY_SET,
            fingerprint=FINGERPRINT,
            mixing_lambda=mixing_lambda,
        )
    )


@pytest.fixture
def small_lake(tmp_path) -> Lake:
    lake = Lake(tmp_path / "lake")
    for partition in (0, 1):
        write_partition(lake, partition, _vectors(300, seed=partition))
    queries = _vectors(40, seed=7)
    lake.replace_slice(
        "query_gradients",
        pa.table(
            {
                "query_set": [QUERY_SET] * 40,
                "checkpoint_id": [CHECKPOINT] * 40,
                "query_id": [f"q{i:02d}" for i in range(40)],
                "prompt_index": [0] * 40,
                **_vector_columns(queries, "extract-1"),
            }
        ),
        query_set=QUERY_SET,
        checkpoint_id=CHECKPOINT,
        fingerprint=FINGERPRINT,
    )
    _save_sums(lake, QUERY, QUERY_SET, queries)
    fit(lake)
    return lake


def _exact(lake: Lake):
    """(train keys, exact float32 Ḡ of every train vector, prepared queries) computed directly."""
    blocks, _ = catalog.load_preconditioner(lake, CHECKPOINT, QUERY_SET, FINGERPRINT, "inverse_root")
    rows = lake.read("train_gradients")
    train = decode_vectors(rows["vector"], "float32")
    queries = decode_vectors(lake.read("query_gradients")["vector"], "float32")
    keys = list(zip(rows["doc_id"].to_pylist(), rows["chunk"].to_pylist()))
    return (
        keys,
        prepare(torch.from_numpy(train), Preconditioner(blocks)),
        prepare(torch.from_numpy(queries), Preconditioner(blocks)),
    )


def _indexed(lake: Lake, dtype: str):
    rows = lake.read("trackstar_index", filters=[("dtype", "=", dtype), ("kind", "=", "inverse_root")])
    keys = list(zip(rows["doc_id"].to_pylist(), rows["chunk"].to_pylist()))
    return keys, decode_vectors(rows["vector"], dtype, rows["scale"], DIM), decode_sign_sketch(rows["sketch"], DIM)


def test_index_scores_equal_exact_float32_scoring_within_the_int8_bound(small_lake):
    keys, exact, queries = _exact(small_lake)
    exact_scores = (queries @ exact.T).numpy()
    exact_top = np.argsort(-exact_scores, axis=1)[:, :10]
    for dtype in ("float32", "int8"):
        trackstar_index.ensure_index(small_lake, CHECKPOINT, FINGERPRINT, QUERY_SET, "inverse_root", dtype)
        indexed_keys, vectors, _ = _indexed(small_lake, dtype)
        order = [indexed_keys.index(k) for k in keys]
        scores = queries.numpy() @ vectors[order].T
        if dtype == "float32":
            np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
        else:
            # each coordinate is off by at most scale/2 = max|x|/254, so a unit query's score by at most sqrt(d)·that
            bound = np.sqrt(DIM) * np.abs(exact.numpy()).max(axis=1) / 254
            assert (np.abs(scores - exact_scores) <= bound[None, :] + 1e-6).all()
            assert np.abs(scores - exact_scores).max() > 0  # int8 really is lossy: the bound is the check
        top = np.argsort(-scores, axis=1)[:, :10]
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, exact_top)])
        print(f"{dtype}: top-10 overlap with exact float32 = {overlap:.3f}")
        assert overlap >= (1.0 if dtype == "float32" else 0.9)


def test_incremental_build_adds_only_the_new_partition_and_a_rerun_adds_no_rows(small_lake):
    first = trackstar_index.ensure_index(
        small_lake, CHECKPOINT, FINGERPRINT, QUERY_SET, "inverse_root", "int8", run_id="build-1"
    )
    assert first["built"] == {0: "new partition", 1: "new partition"} and first["rows_written"] == 600
    version = small_lake.version("trackstar_index")
    again = trackstar_index.ensure_index(
        small_lake, CHECKPOINT, FINGERPRINT, QUERY_SET, "inverse_root", "int8", run_id="build-2"
    )
    assert again["built"] == {} and again["kept"] == [0, 1]
    assert small_lake.version("trackstar_index") == version  # nothing written, not even an empty commit

    write_partition(small_lake, 2, _vectors(50, seed=2))
    third = trackstar_index.ensure_index(
        small_lake, CHECKPOINT, FINGERPRINT, QUERY_SET, "inverse_root", "int8", run_id="build-3"
    )
    assert third["built"] == {2: "new partition"} and third["kept"] == [0, 1] and third["rows_written"] == 50
    rows = small_lake.read("trackstar_index", columns=["partition", "doc_id", "run_id"])
    by_partition = {}
    for partition, run_id in zip(rows["partition"].to_pylist(), rows["run_id"].to_pylist()):
        by_partition.setdefault(partition, set()).add(run_id)
    assert by_partition == {0: {"build-1"}, 1: {"build-1"}, 2: {"build-3"}}
    assert rows.num_rows == len(set(rows["doc_id"].to_pylist())) == 650

    write_partition(small_lake, 1, _vectors(300, seed=11), run_id="extract-2")  # partition 1 re-extracted
    small_lake.open("train_gradients").delete("partition = 2")  # and partition 2 dropped
    fourth = trackstar_index.ensure_index(
        small_lake, CHECKPOINT, FINGERPRINT, QUERY_SET, "inverse_root", "int8", run_id="build-4"
    )
    assert fourth["built"] == {1: "re-extracted"} and fourth["removed"] == [2] and fourth["kept"] == [0]
    assert small_lake.read("trackstar_index", columns=["partition"]).num_rows == 600


def test_a_new_hessian_fit_rebuilds_the_index(small_lake):
    trackstar_index.ensure_index(small_lake, CHECKPOINT, FINGERPRINT, QUERY_SET, "inverse_root", "int8")
    same = fit(small_lake)  # the same inputs give the same matrix: nothing to rebuild
    assert (
        trackstar_index.ensure_index(small_lake, CHECKPOINT, FINGERPRINT, QUERY_SET, "inverse_root", "int8")["built"]
        == {}
    )
    refit = fit(small_lake, mixing_lambda=0.3)
    assert refit["lambda"] != same["lambda"]
    rebuilt = trackstar_index.ensure_index(small_lake, CHECKPOINT, FINGERPRINT, QUERY_SET, "inverse_root", "int8")
    assert rebuilt["built"] == {0: "Hessian changed", 1: "Hessian changed"}
    stored = small_lake.read("trackstar_index", columns=["hessian_sha256"])
    assert set(stored["hessian_sha256"].to_pylist()) == {rebuilt["hessian"]} and stored.num_rows == 600


def test_score_job_from_the_index_matches_exhaustive_scoring(small_lake):
    keys, exact, queries = _exact(small_lake)
    exact_top = (queries @ exact.T).topk(10, dim=1)
    results = {}
    for code in ("none", "float32", "int8"):
        run = score.run(
            score.ScoreConfig(
                lake=small_lake.root,
                checkpoint_id=CHECKPOINT,
                query_set=QUERY_SET,
                fingerprint=FINGERPRINT,
                methods=["trackstar"],
                top_k=10,
                index=code,
                batch_bytes=50 * DIM * 4,
            )
        )  # 50-row slices: many batches per task
        rows = small_lake.read("proponents").to_pylist()
        assert len(rows) == 400 and run["methods"] == {"trackstar": 400}
        results[code] = {(r["query_id"], r["rank"]): ((r["doc_id"], r["chunk"]), r["score"]) for r in rows}
    overlaps = []
    for qi in range(40):
        expected = [keys[i] for i in exact_top.indices[qi].tolist()]
        for code in ("none", "float32"):
            ranked = [results[code][(f"q{qi:02d}", rank)] for rank in range(1, 11)]
            assert [key for key, _ in ranked] == expected
            np.testing.assert_allclose([s for _, s in ranked], exact_top.values[qi].numpy(), atol=1e-5)
        int8 = {results["int8"][(f"q{qi:02d}", rank)][0] for rank in range(1, 11)}
        overlaps.append(len(int8 & set(expected)) / 10)
    print(f"int8 index: top-10 overlap with exhaustive float32 = {np.mean(overlaps):.3f}")
    assert np.mean(overlaps) >= 0.9


def test_running_top_k_breaks_ties_by_key_whatever_the_batches():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (3, 40), generator=g).float()  # many exact ties
    keys = [(f"doc-{i % 13:02d}", i // 13) for i in range(40)]
    expected = [sorted(((-float(s), k) for s, k in zip(row, keys)))[:7] for row in scores]
    for order in (torch.arange(40), torch.randperm(40, generator=g)):
        best = RunningTopK(3, 7)
        for part in order.split(6):
            best.add(scores[:, part], lambda rows, part=part: [keys[part[r]] for r in rows])
        assert [[(-s, k) for s, k in found] for found in best.ranked()] == expected


def test_running_top_k_equals_a_full_sort_over_many_batches_with_duplicates():
    g = torch.Generator().manual_seed(1)
    n = 600
    scores = torch.randint(0, 50, (5, n), generator=g).float() / 7  # duplicates: ties at every rank
    keys = [(f"doc-{i % 97:03d}", i // 97) for i in range(n)]
    for k in (1, 10, 700):  # 700: more than the rows, every row kept
        expected = [sorted((-float(s), key) for s, key in zip(row, keys))[:k] for row in scores]
        order, start, best = torch.randperm(n, generator=g), 0, RunningTopK(5, k)
        while start < n:  # batches of 0 to 80 rows
            part = order[start : start + int(torch.randint(0, 80, (1,), generator=g))]
            best.add(scores[:, part], lambda rows, part=part: [keys[part[r]] for r in rows])
            start += len(part)
        assert [[(-s, key) for s, key in found] for found in best.ranked()] == expected, k
        assert len(best.keys) <= 2 * best.ids.numel() + n  # the key store stays about the held set's size


def test_running_top_k_refuses_nan_scores():
    best = RunningTopK(2, 3)
    with pytest.raises(ValueError, match="NaN"):
        best.add(torch.tensor([[1.0, float("nan")], [0.0, 2.0]]), lambda rows: [("d", r) for r in rows])


def test_sign_sketch_keeps_signs_and_block_scales_and_two_stage_equals_exhaustive_with_every_candidate():
    g = torch.Generator().manual_seed(0)
    dim = 2 * SKETCH_BLOCK + 64  # a narrower last block
    train, queries = torch.randn(500, dim, generator=g), torch.randn(8, dim, generator=g)
    train[250:300] = train[200:250]  # duplicates: exact ties, broken by the lower row as in a stable sort
    cells = encode_sign_sketch(train.numpy())
    assert len(cells[0].as_py()) == dim // 8 + 2 * 3  # bits, then three float16 block scales
    sketch = torch.from_numpy(decode_sign_sketch(cells, dim))
    assert torch.equal(sketch.sign(), torch.where(train > 0, 1.0, -1.0))
    block_means = torch.cat(
        [b.abs().mean(1, keepdim=True).expand(-1, b.shape[1]) for b in train.split(SKETCH_BLOCK, 1)], 1
    )
    torch.testing.assert_close(sketch.abs(), block_means, rtol=1e-3, atol=0)  # float16 scales
    exhaustive = (queries @ train.T).sort(dim=1, descending=True, stable=True)
    values, indices = two_stage_top_k(queries, sketch, train, candidates=500, k=10)
    assert torch.equal(indices, exhaustive.indices[:, :10]) and torch.allclose(values, exhaustive.values[:, :10])
    _, few = two_stage_top_k(queries, sketch, train, candidates=10, k=10)  # the sketch alone: lossy
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(few.tolist(), exhaustive.indices[:, :10].tolist())])
    assert 0.2 < recall < 1.0
    signs_only = pa.array([cell.as_py()[: dim // 8] for cell in cells], pa.binary())  # an index built before the scales
    assert torch.equal(torch.from_numpy(decode_sign_sketch(signs_only, dim)), torch.where(train > 0, 1.0, -1.0))


def test_block_scales_find_what_signs_alone_miss_when_weight_is_uneven_across_blocks():
    g = torch.Generator().manual_seed(2)
    blocks = 8
    gains = torch.rand(2000, blocks, 1, generator=g) ** 3  # each vector's weight spread unevenly over its blocks
    train = (torch.randn(2000, blocks, SKETCH_BLOCK, generator=g) * gains).reshape(2000, -1)
    train = train / train.norm(dim=1, keepdim=True)
    queries = train[:50] + 0.05 * torch.randn(50, train.shape[1], generator=g)
    exhaustive = (queries @ train.T).topk(10, dim=1).indices
    sketch = torch.from_numpy(decode_sign_sketch(encode_sign_sketch(train.numpy()), train.shape[1]))

    def recall(first_stage):
        _, found = two_stage_top_k(queries, first_stage, train, candidates=50, k=10)
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), exhaustive.tolist())])

    assert recall(sketch) > recall(sketch.sign()) + 0.05


def test_int8_queries_score_the_integer_codes_exactly_and_the_floats_within_the_quantisation_bound(monkeypatch):
    import gradient_kernels.scoring as scoring

    g = torch.Generator().manual_seed(3)
    queries, train = torch.randn(5, 300, generator=g), torch.randn(40, 300, generator=g)
    cells, scales = encode_vectors(train.numpy(), "int8")
    codes = torch.from_numpy(stored_values(cells, "int8", 300).copy())
    row_scales = torch.from_numpy(scales.to_numpy().copy())
    coded = scoring.Int8Queries(queries)
    scores = coded.scores(codes, row_scales)
    integer = (coded.codes.double() @ codes.double().T) * coded.scale.double()[:, None] * row_scales.double()[None]
    np.testing.assert_allclose(scores.numpy(), integer.numpy(), rtol=1e-6)
    decoded = torch.from_numpy(decode_vectors(cells, "int8", scales, 300))
    # each query coordinate is off by at most its scale / 2
    bound = 300**0.5 * coded.scale[:, None] / 2 * decoded.norm(dim=1)[None]
    difference = (scores - queries @ decoded.T).abs()
    assert (difference <= bound + 1e-5).all() and difference.max() > 0
    monkeypatch.setattr(scoring, "INT8_DOT_MAX_DIM", 7)  # int32 sums over 7 coordinates at a time
    np.testing.assert_allclose(coded.scores(codes, row_scales).numpy(), scores.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="coordinates"):
        coded.scores(codes[:, :299], row_scales)
