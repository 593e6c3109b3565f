"""The LDS bench's arithmetic on hand-made cases whose answers are known."""

import numpy as np
import pytest

from bench import lds


def test_predicted_effect_sums_each_subsets_document_scores():
    scores = np.array([[1.0, 2.0, 4.0], [0.0, -1.0, 3.0]])  # [queries, documents]
    membership = np.array([[1, 1, 0], [0, 1, 1]])  # [subsets, documents]
    assert lds.predicted_effects(scores, membership).tolist() == [[3.0, -1.0], [6.0, 2.0]]


def test_document_scores_sum_their_chunks():
    chunk_scores = np.array([[1.0, 2.0, 5.0]])  # chunks 0 and 1 belong to document 1, chunk 2 to document 0
    assert lds.document_scores(chunk_scores, np.array([1, 1, 0]), 3).tolist() == [[5.0, 3.0, 0.0]]


def test_lds_is_the_spearman_over_subsets_per_query():
    predicted = np.array([[1.0, 4.0, 1.0], [2.0, 3.0, 1.0], [3.0, 2.0, 1.0], [4.0, 1.0, 1.0]])
    actual = np.array([[10.0, 10.0, 1.0], [20.0, 20.0, 2.0], [40.0, 30.0, 3.0], [30.0, 40.0, 4.0]])
    values = lds.lds_per_query(predicted, actual)
    # query 0: ranks 1,2,3,4 against 1,2,4,3: 1 - 6·2 / (4·15) = 0.8; query 1: reversed; query 2: constant
    assert values[0] == pytest.approx(0.8)
    assert values[1] == pytest.approx(-1.0)
    assert np.isnan(values[2])


def test_bootstrap_mean_ignores_nan_and_brackets_the_mean():
    mean, low, high = lds.bootstrap_mean(np.array([0.2, 0.4, np.nan, 0.6]))
    assert mean == pytest.approx(0.4)
    assert 0.2 <= low < mean < high <= 0.6
    assert lds.bootstrap_mean(np.array([0.5, 0.5, 0.5])) == pytest.approx((0.5, 0.5, 0.5))


def test_paired_difference_against_bergson():
    summary = lds.summarise({lds.REFERENCE: np.array([0.5, 0.7]), lds.BERGSON: np.array([0.4, 0.5])})
    assert summary[f"{lds.REFERENCE} − {lds.BERGSON}"]["mean"] == pytest.approx(0.15)


def test_random_halves_are_seeded_halves():
    halves = lds.random_halves(11, 5, seed=3)
    assert (halves.sum(axis=1) == 5).all()
    assert (halves == lds.random_halves(11, 5, seed=3)).all()
    assert len({tuple(row) for row in halves}) == 5
