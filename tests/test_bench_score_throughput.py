"""The score-throughput bench's random index at a large dimension: what it times must be a real
index (rows the verified reader accepts, unit vectors) scored as the score job scores it."""

import numpy as np
import torch

from bench import score_throughput
from infra.lake import Lake
from jobs.score import score_batches
from schemas.vectors import decode_vectors


def test_the_random_index_is_read_back_verified_and_scores_like_its_decoded_vectors(tmp_path):
    where = score_throughput.synthetic_index(str(tmp_path), dim=600, rows=30, partitions=4)
    lake = Lake(str(tmp_path))
    rows = lake.read("trackstar_index", filters=where)  # checks every vector against its checksum
    assert rows.num_rows == 30 and sorted(set(rows["partition"].to_pylist())) == [0, 1, 2, 3]
    vectors = decode_vectors(rows["vector"], "int8", rows["scale"], 600)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=0.01)

    queries = np.random.default_rng(5).standard_normal((3, 600)).astype(np.float32)
    batches = score_throughput.vector_batches(lake, "trackstar_index", where, 600, ahead=True)
    (found,) = score_batches(batches, queries, None, False, 5, 600)
    exact = torch.from_numpy(queries) @ torch.from_numpy(vectors).T
    for query in range(3):
        top = exact[query].topk(5).indices.tolist()
        expected = [rows["doc_id"][i].as_py() for i in top]
        got = [d for q, d in zip(found["query_index"].to_pylist(), found["doc_id"].to_pylist()) if q == query]
        assert got == expected
