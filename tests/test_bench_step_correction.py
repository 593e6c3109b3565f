"""The step-correction bench's correction is the tail-patch's own Adam step, to the last bit of
its arithmetic: checked against `AdamStep` (the step every tail-patch takes) on a random state."""

import types

import torch

from bench.step_correction import step_direction, step_terms
from gradient_kernels.tail_patch import AdamStep


def test_the_step_direction_is_adams_step_on_the_gradient_in_either_orientation():
    g = torch.Generator().manual_seed(0)
    shapes = {"linear.weight": (3, 5), "conv1d.weight": (5, 3)}  # Conv1D stores (in, out)
    state = {
        "kind": "adam",
        "step": 7,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "state": {n: {"exp_avg_sq": torch.rand(s, generator=g) * 1e-4} for n, s in shapes.items()},
    }
    matrices = {
        "linear.weight": types.SimpleNamespace(stored_transposed=False),
        "conv1d.weight": types.SimpleNamespace(stored_transposed=True),
    }
    v_part, g2_weight, eps = step_terms(state, matrices, list(shapes))
    adam, lr = AdamStep(state), 3e-4
    for name, shape in shapes.items():
        stored = torch.randn(shape, generator=g) * 1e-2  # a gradient as the parameter stores it
        delta = adam.delta(name, torch.zeros(shape), stored, lr)
        oriented = stored.t() if matrices[name].stored_transposed else stored  # (out, in), as the hooks see it
        direction = step_direction(oriented, v_part[name], g2_weight, eps)
        expected = (delta.t() if matrices[name].stored_transposed else delta) / (-lr * adam.m_hat_weight)
        torch.testing.assert_close(direction, expected, rtol=1e-5, atol=0)
    assert g2_weight == (1 - 0.95) / (1 - 0.95**8)
