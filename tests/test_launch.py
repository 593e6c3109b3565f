"""How a node's DeepSpeed ranks are started and stopped, and which device each binds: its own GPU
on a GPU node, the CPU elsewhere (no GPU here, so the choice is tested as the pure function the
ranks call)."""

import json

import pytest

from jobs.launch import bind_rank_device, node_ranks, rank_device


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


def test_a_node_starts_the_ranks_asked_for_but_never_one_without_work(monkeypatch):
    import jobs.launch

    monkeypatch.setattr(jobs.launch, "_gpu_count", lambda: 8)
    assert node_ranks(0, work_items=20) == 8  # one per GPU
    assert node_ranks(0, work_items=3) == 3  # a group of three partitions leaves five GPUs free
    assert node_ranks(2, work_items=20) == 2
    monkeypatch.setattr(jobs.launch, "_gpu_count", lambda: 0)
    assert node_ranks(0, work_items=20) == 2 and node_ranks(0, work_items=1) == 1  # CPU ranks


def test_cpu_ranks_share_the_idle_cores_unless_threads_are_set(monkeypatch):
    """A test double for the machine: 8 allowed cores, all idle (this one has 2), and for the
    rank processes (only their environment is looked at)."""
    import subprocess

    import jobs.launch
    import jobs.threads

    seen = []

    class Launched:
        def __init__(self, command, env):
            seen.append((env["OMP_NUM_THREADS"], env.get(jobs.launch.SHARED_THREADS)))
            self.args, self.returncode = command, 0

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Launched)
    monkeypatch.setattr(jobs.launch, "_gpu_count", lambda: 0)
    monkeypatch.setattr(jobs.threads, "allowed_cores", lambda: set(range(8)))
    monkeypatch.setattr(jobs.threads, "idle_cores", lambda: 7.6)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    jobs.launch.launch_ranks("jobs.extract_rank", "plan.json", 2)
    jobs.launch.launch_ranks("jobs.extract_rank", "plan.json", 2, cpu_threads_setting=3)  # the setting: per rank
    monkeypatch.setattr(jobs.threads, "idle_cores", lambda: 2.7)  # five cores busy elsewhere
    jobs.launch.launch_ranks("jobs.extract_rank", "plan.json", 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the user's wins over the setting
    jobs.launch.launch_ranks("jobs.extract_rank", "plan.json", 2, cpu_threads_setting=3)
    # the cores launch chose may be re-shared by the ranks that have work; a user's count never is
    assert seen == [("4", "8")] * 2 + [("3", None)] * 2 + [("1", "2")] * 2 + [("5", None)] * 2  # a pair per launch


def test_ranks_with_work_take_the_cores_of_ranks_without(monkeypatch):
    import torch

    from jobs.launch import SHARED_THREADS, share_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(SHARED_THREADS, "2")
        share_threads(working_ranks=1)  # two ranks started, one partition missing
        assert torch.get_num_threads() == 2
        share_threads(working_ranks=2)
        assert torch.get_num_threads() == 1
        monkeypatch.delenv(SHARED_THREADS)
        share_threads(working_ranks=1)  # the user's or the setting's count: left alone
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


RANK_SCRIPT = """
import json, os, sys, time
rank = int(os.environ["RANK"])
plan = sys.argv[sys.argv.index("--plan") + 1]
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")
with open(f"{plan}.{rank}", "w") as out:
    json.dump({"env": {k: os.environ[k] for k in keys}, "argv": sys.argv[1:]}, out)
if plan.endswith("fails"):
    if rank == 1:
        sys.exit(3)
    time.sleep(120)
"""


def test_ranks_get_the_environment_of_a_deepspeed_launch_and_the_first_failure_stops_the_others(tmp_path, monkeypatch):
    """Real processes (a module of this test standing in for a stage's rank): each rank is told its
    rank, the world and the rendezvous as DeepSpeed's launcher tells them; a rank that fails fails
    the launch at once and the rank still running is stopped, not left to run out."""
    import subprocess
    import time

    from jobs.launch import start_ranks, wait_ranks

    (tmp_path / "rank_under_test.py").write_text(RANK_SCRIPT)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    plan = tmp_path / "plan.json"
    wait_ranks(start_ranks("rank_under_test", str(plan), 2, arguments=["--checkpoint-dir", "ck"]))
    seen = [json.loads((tmp_path / f"plan.json.{rank}").read_text()) for rank in (0, 1)]
    assert [s["env"]["RANK"] for s in seen] == ["0", "1"] and [s["env"]["LOCAL_RANK"] for s in seen] == ["0", "1"]
    assert {(s["env"]["WORLD_SIZE"], s["env"]["LOCAL_SIZE"], s["env"]["CROSS_SIZE"]) for s in seen} == {("2", "2", "1")}
    assert len({s["env"]["MASTER_PORT"] for s in seen}) == 1 and seen[0]["env"]["MASTER_ADDR"] == "127.0.0.1"
    assert seen[1]["argv"] == ["--local_rank=1", "--plan", str(plan), "--checkpoint-dir", "ck"]

    ranks, started = start_ranks("rank_under_test", str(tmp_path / "plan.fails"), 2), time.monotonic()
    with pytest.raises(subprocess.CalledProcessError) as failed:
        wait_ranks(ranks)
    assert failed.value.returncode == 3 and time.monotonic() - started < 60
    assert all(rank.poll() is not None for rank in ranks)  # the sleeping rank was stopped
