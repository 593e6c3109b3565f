"""Which device a DeepSpeed rank binds: its own GPU on a GPU node, the CPU elsewhere (no GPU here,
so the choice is tested as the pure function the ranks call)."""

import pytest

from jobs.launch import bind_rank_device, rank_device


def test_each_rank_takes_the_gpu_of_its_local_rank():
    assert [rank_device(True, local_rank, gpus=4) for local_rank in range(4)] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:3",
    ]


def test_without_cuda_every_rank_stays_on_the_cpu():
    assert {rank_device(False, local_rank, gpus=0) for local_rank in range(3)} == {"cpu"}


def test_a_rank_without_a_gpu_of_its_own_is_an_error():
    with pytest.raises(ValueError, match="local rank 2 has no GPU: this node has 2"):
        rank_device(True, 2, gpus=2)


def test_a_rank_binds_the_device_of_its_local_rank(monkeypatch):
    import torch

    monkeypatch.setenv("LOCAL_RANK", "0")
    assert bind_rank_device() == ("cuda:0" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert torch.cuda.current_device() == 0
