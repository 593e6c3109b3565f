"""Starting a stage's ranks with the DeepSpeed launcher.

A stage writes its plan (a JSON file) and calls `launch_ranks(module, plan, ranks)`; every rank runs
`python -m <module> --plan <plan>`. Where no GPU exists the ranks are CPU processes
(`DS_ACCELERATOR=cpu`, gloo); the same command runs GPU ranks on a GPU node.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def launch_ranks(module: str, plan: Path, ranks: int):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore::FutureWarning", TRACKSTAR_DRIVER_PID=str(os.getpid()))
    if not _has_gpu():
        # one thread per rank: the ranks themselves are the parallelism on a CPU host
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--log_level", "warning", "--num_gpus", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "--module", module, "--plan", str(plan)]
    subprocess.run(command, env=env, check=True)


def exit_with_driver(poll_seconds: float = 1.0) -> None:
    """Ends this rank when the driver that launched it is gone. A killed driver gets no chance to
    stop the DeepSpeed launcher, whose ranks would otherwise keep writing slices for a dead run."""
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
                os._exit(1)  # the launcher sees a failed rank and stops the others
            time.sleep(poll_seconds)

    threading.Thread(target=watch, name="exit-with-driver", daemon=True).start()


def init_rank():
    """Join the process group from inside a rank; returns (rank, world_size)."""
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
    deepspeed.init_distributed(dist_backend="gloo" if os.environ.get("DS_ACCELERATOR") == "cpu" else None)
    return dist.get_rank(), dist.get_world_size()


def rank_arguments():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the launcher
    return parser.parse_args()
