"""bench/gpu.py's code on the CPU with its tiny model: the GPU run (docs/results/gpu-h200.json) uses
the same functions, so what it reports is checked here where CI can run it."""

import torch

from bench import gpu
from bench.common import fake_adam_state, random_documents
from gradient_kernels.losses import document_batch


def test_gpu_bench_fidelity_and_rates_on_cpu():
    model = gpu.pythia("tiny")
    state = fake_adam_state(model)
    batch = document_batch(random_documents(3, 32, model.config.vocab_size))
    device = torch.device("cpu")
    errors = gpu.fidelity(model, device, batch, 4, state)
    for normalizer in ("adam-factored", "adam-floored"):
        assert errors[normalizer]["max_rel_err_float32"] < 1e-4
        assert errors[normalizer]["min_cosine_bfloat16"] > 0.99
    rows = gpu.extraction(model, device, batch, 4, state)
    assert set(rows) == {
        f"{kind} {dtype}" for kind in ("plain", "adam-factored", "adam-floored") for dtype in ("float32", "bfloat16")
    }
    assert all(row["tokens_per_s"] > 0 for row in rows.values())
    index = gpu.index_scoring(device, n=3000, dim=64, queries=8, batch_rows=1000)
    assert index["vectors"] == 3000 and 0 < index["index_ratio"]


def test_gpu_bench_shapes_have_the_published_sizes():
    from transformers import GPTNeoXConfig

    # parameters from the config alone (no weights built): Pythia-160M and Pythia-1B as published
    def parameters(shape: dict) -> int:
        config = GPTNeoXConfig(**shape, tie_word_embeddings=False)
        h, ff, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
        per_layer = 3 * h * h + 3 * h + h * h + h + 2 * h * ff + ff + h + 4 * h
        return layers * per_layer + 2 * v * h + 2 * h

    assert round(parameters(gpu.SHAPES["pythia-160m"]) / 1e6) == 162
    assert round(parameters(gpu.SHAPES["pythia-1b"]) / 1e6) == 1012
    assert gpu.matmul_flops_per_s(torch.device("cpu"), n=64) > 0
