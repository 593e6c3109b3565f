"""Starting a stage's DeepSpeed ranks on this node.

A stage writes its plan (a JSON file) and calls `launch_ranks(module, plan, ranks)`, or starts the
ranks first (`start_ranks`) and writes the plan while they start; every rank runs
`python -m <module> --plan <plan>` and ends with `end_rank()`. Where no GPU exists the ranks are CPU processes
(`DS_ACCELERATOR=cpu`, gloo); the same command runs GPU ranks on a GPU node, each bound to the GPU
of its local rank (`bind_rank_device`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from jobs.threads import cpu_threads


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def node_ranks(requested: int, work_items: int) -> int:
    """How many ranks to start on this node: as asked, or for 0 one per GPU (2 CPU ranks where there
    is none), but never more than there are work items: an idle rank holds a GPU, or on a CPU node
    the cores the working ranks' threads would use."""
    wanted = requested or _gpu_count() or 2
    return max(1, min(wanted, work_items))


def launch_ranks(module: str, plan: str, ranks: int, cpu_threads_setting: int = 0):
    """Starts this host's ranks on a written plan and waits (`start_ranks`, `wait_ranks`)."""
    wait_ranks(start_ranks(module, plan, ranks, cpu_threads_setting))


def start_ranks(
    module: str, plan: str, ranks: int, cpu_threads_setting: int = 0, arguments=()
) -> list[subprocess.Popen]:
    """Starts this host's ranks, each `python -m <module> --local_rank=<i> --plan <plan> <arguments>`,
    and returns them at once. They get the environment DeepSpeed's node launcher
    (`deepspeed.launcher.launch`) would give them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT,
    LOCAL_SIZE, CROSS_RANK/SIZE) and join DeepSpeed's process group (`init_rank`), but are started
    here: the launcher cost one more Python and torch start before them (1.6 s), and after the last
    rank ended its once-a-second poll and its own teardown (2.4 s), on every launch (measured on the
    bergson bench, whose whole extraction took 13 s). A user's CUDA_VISIBLE_DEVICES is kept; each rank
    takes the GPU of its local rank among them (`bind_rank_device`). The plan may be written after
    this returns: ranks that start first wait for it (`wait_for_plan`)."""
    env = dict(
        os.environ,
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore::FutureWarning",
        TRACKSTAR_DRIVER_PID=str(os.getpid()),
        PYTHONPATH=os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(ranks),
        LOCAL_SIZE=str(ranks),
        CROSS_RANK="0",
        CROSS_SIZE="1",
    )
    if not _gpu_count():
        # the ranks share the idle cores as threads (jobs.threads), unless the user set OMP_NUM_THREADS
        threads = cpu_threads(cpu_threads_setting, share=ranks, environ=env)
        if not cpu_threads_setting and "OMP_NUM_THREADS" not in os.environ:  # chosen here: ranks may re-share them
            env[SHARED_THREADS] = str(threads * ranks)
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads))
    started = []
    try:
        for rank in range(ranks):
            command = [sys.executable, "-u", "-m", module, f"--local_rank={rank}", "--plan", str(plan), *arguments]
            started.append(subprocess.Popen(command, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank))))
    except BaseException:
        stop_ranks(started)
        raise
    return started


def wait_ranks(ranks: list[subprocess.Popen], poll_seconds: float = 0.05) -> None:
    """Waits for the ranks of `start_ranks`. The first to fail stops the others and fails the launch
    (CalledProcessError), as DeepSpeed's launcher does."""
    running = list(ranks)
    while running:
        for rank in list(running):
            code = rank.poll()
            if code is None:
                continue
            running.remove(rank)
            if code:
                stop_ranks(running)
                raise subprocess.CalledProcessError(code, rank.args)
        if running:
            time.sleep(poll_seconds)


def stop_ranks(ranks: list[subprocess.Popen], grace_seconds: float = 10.0) -> None:
    """Stops the ranks of `start_ranks` still running (SIGTERM, then SIGKILL after `grace_seconds`)
    and waits for them."""
    for rank in ranks:
        if rank.poll() is None:
            rank.terminate()
    for rank in ranks:
        try:
            rank.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            rank.kill()
            rank.wait()


# the cores a node's CPU ranks were given in all, when launch chose the count (not the user)
SHARED_THREADS = "TRACKSTAR_SHARED_THREADS"


def share_threads(working_ranks: int) -> None:
    """On a CPU node whose thread count launch chose: the cores of every rank started go to the
    ranks that have work (a rank started before the plan said how many partitions were missing)."""
    shared = os.environ.get(SHARED_THREADS)
    if shared and working_ranks > 0:
        import torch

        torch.set_num_threads(max(1, int(shared) // working_ranks))


def wait_for_plan(plan: str, poll_seconds: float = 0.05) -> dict:
    """The plan at `plan` once its driver has written it (ranks start while the driver plans; a
    driver that dies meanwhile ends them: `exit_with_driver`)."""
    from infra import storage

    while not storage.exists(plan):
        time.sleep(poll_seconds)
    return json.loads(storage.read_bytes(plan))


def end_rank() -> None:
    """Leaves the process group and exits at once. Everything a rank writes is committed before
    this; the interpreter's own teardown (torch, gloo, thread pools) took ~2 s per rank, which
    every launch waited for."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def exit_with_driver(poll_seconds: float = 1.0) -> None:
    """Ends this rank when the driver that started it is gone. A killed driver gets no chance to
    stop its ranks, which would otherwise keep writing slices for a dead run."""
    import threading

    driver = int(os.environ.get("TRACKSTAR_DRIVER_PID", "0"))
    if not driver:
        return

    def watch():
        while True:
            try:
                os.kill(driver, 0)
            except ProcessLookupError:
                print(f"[rank {os.getpid()}] driver process {driver} is gone: exiting", file=sys.stderr, flush=True)
                os._exit(1)
            time.sleep(poll_seconds)

    threading.Thread(target=watch, name="exit-with-driver", daemon=True).start()


def rank_device(cuda_available: bool, local_rank: int, gpus: int) -> str:
    """The device of the rank with this local rank: its own GPU `cuda:<local_rank>` on a GPU node
    (`start_ranks` starts at most one rank per GPU), else the CPU."""
    if not cuda_available:
        return "cpu"
    if not 0 <= local_rank < gpus:
        raise ValueError(f"local rank {local_rank} has no GPU: this node has {gpus}; start at most {gpus} rank(s)")
    return f"cuda:{local_rank}"


def bind_rank_device() -> str:
    """This rank's device (`rank_device` for $LOCAL_RANK, set by `start_ranks`); on a GPU node it also
    becomes the rank's current CUDA device, so collectives and `.cuda()` calls stay off GPU 0."""
    import torch

    cuda = torch.cuda.is_available()
    device = rank_device(cuda, int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count() if cuda else 0)
    if device != "cpu":
        torch.cuda.set_device(device)
    return device


def init_rank():
    """Bind the rank's device and join the process group from inside a rank; returns (rank, world_size)."""
    exit_with_driver()  # first: the imports below take seconds
    import logging

    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist
    import transformers
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    # DeepSpeed would JIT-compile its shared-memory all-reduce on CPU (~150 s on 2 cores, once per
    # venv); gloo's all-reduce is plenty for what the ranks exchange here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    bind_rank_device()
    deepspeed.init_distributed(dist_backend="gloo" if os.environ.get("DS_ACCELERATOR") == "cpu" else None)
    return dist.get_rank(), dist.get_world_size()


def rank_arguments():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True, help="the plan's path or s3:// URI")
    parser.add_argument("--checkpoint-dir", help="the model to load while the driver writes the plan")
    parser.add_argument("--local_rank", type=int, default=0)  # as DeepSpeed's launcher passes it
    return parser.parse_args()
