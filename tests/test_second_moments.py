"""Second moments estimated from data, against full per-example gradients and through the hooks
(through `extract`: tests/test_jobs.py)."""

import pytest
import torch

from gradient_kernels.hooks import GradientProjector
from gradient_kernels.losses import document_batch
from gradient_kernels.modules import uniform_k, weight_matrices
from gradient_kernels.normalizers import ExactNormalizer, FactoredNormalizer, normalizers_from_state
from gradient_kernels.projection import ProjectionSpec
from gradient_kernels.reference import per_example_gradients, reference_vectors
from gradient_kernels.second_moments import mean_squared_gradients
from tests.test_kernels import _documents, _gpt2, _llama


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_estimate_is_the_mean_of_squared_per_example_gradients(arch):
    model = _gpt2() if arch == "gpt2" else _llama()
    batch = document_batch(_documents(n=6))
    estimate = mean_squared_gradients(model, [batch])
    assert estimate["kind"] == "data" and estimate["examples"] == 6
    by_name = {m.name: m for m in weight_matrices(model)}
    full = per_example_gradients(model, batch, list(by_name))
    for name, gradients in full.items():
        expected = gradients.double().square().mean(0)  # (out, in)
        held = estimate["state"][name]["mean_sq"]
        held = held.t() if by_name[name].stored_transposed else held
        torch.testing.assert_close(held, expected, rtol=1e-5, atol=1e-12)
    assert all(float(estimate["state"][n]["mean_sq"].min()) >= 0 for n in full)


def test_big_matrices_keep_adafactor_row_and_column_means():
    model = _gpt2()
    batch = document_batch(_documents(n=4))
    whole = mean_squared_gradients(model, [batch])["state"]
    factored = mean_squared_gradients(model, [batch], full_max_elements=1000)["state"]
    for name, held in whole.items():
        if held["mean_sq"].numel() <= 1000:
            assert set(factored[name]) == {"mean_sq"}
            continue
        assert set(factored[name]) == {"row_var", "col_var"}
        torch.testing.assert_close(factored[name]["row_var"], held["mean_sq"].mean(1, keepdim=True))
        torch.testing.assert_close(factored[name]["col_var"], held["mean_sq"].mean(0, keepdim=True))


@pytest.mark.parametrize("kind", ["data-floored", "data-factored"])
def test_data_corrections_through_the_hooks_equal_the_reference(kind):
    model = _gpt2()
    estimate = mean_squared_gradients(model, [document_batch(_documents(seed=3, n=8))])
    matrices = weight_matrices(model)
    normalizers = normalizers_from_state(estimate, matrices, kind)
    wanted = ExactNormalizer if kind == "data-floored" else FactoredNormalizer
    assert all(isinstance(n, wanted) for n in normalizers.values())
    spec = ProjectionSpec(seed=5, k=uniform_k(matrices, 4), normalizer=kind, moments="0" * 16)
    batch = document_batch(_documents())
    fast = GradientProjector(model, spec, normalizers)(batch)
    exact = reference_vectors(model, batch, spec, normalizers)
    assert float((fast - exact).norm() / exact.norm()) < 1e-4


def test_data_floored_divides_by_the_root_mean_square_above_its_floor():
    v = torch.tensor([[0.0, 1e-8], [4.0, 9.0]], dtype=torch.float64)
    state = {"kind": "data", "examples": 1, "state": {"w": {"mean_sq": v}}}

    class One:  # the one field normalizers_from_state reads of a WeightMatrix
        name, stored_transposed = "w", False

    denominator = normalizers_from_state(state, [One()], "data-floored")["w"].denominator
    # trained coordinates 1e-4, 2, 3: the floor (their lowest) lifts the untouched one to 1e-4, not 0
    torch.testing.assert_close(denominator.double(), torch.tensor([[1e-4, 1e-4], [2.0, 3.0]], dtype=torch.float64))


def test_a_spec_names_its_data_estimate_and_others_keep_their_fingerprints():
    plain = ProjectionSpec(seed=0, k={"a": 4}, normalizer="adam-floored")
    assert "moments" not in plain.as_dict()
    one = ProjectionSpec(seed=0, k={"a": 4}, normalizer="data-floored", moments="a" * 16)
    other = ProjectionSpec(seed=0, k={"a": 4}, normalizer="data-floored", moments="b" * 16)
    assert one.fingerprint() != other.fingerprint()
    with pytest.raises(ValueError, match="moments"):
        ProjectionSpec(seed=0, k={"a": 4}, normalizer="data-floored")
    with pytest.raises(ValueError, match="moments"):
        ProjectionSpec(seed=0, k={"a": 4}, normalizer="adam-floored", moments="a" * 16)
