"""Extraction throughput with 1 and 2 concurrent extraction tasks: the DAGs' fan-out, measured.

The partitions of `make run`'s lake, each replicated --copies times (so that a task's work, not
its ~20 s of start-up, dominates, as it does at any real size), are extracted twice, each time for
a fresh projection seed (so every slice is missing), as the reindex DAG's mapped `extract_group`
tasks run them:
- 1 worker: one task (`python -m jobs extract`, one CPU rank) extracts every partition;
- 2 workers: two tasks at once, each one rank on half of the partitions.
Each task is pinned to its own core (`--cores`; here one each) and has OMP_NUM_THREADS=1, so "each
worker has its own cores" as N GPU nodes would. Printed: vectors/s of each run, the speed-up
(`worker_speedup=`, aim ≥ 1.8 with 2 workers), each task's seconds and peak RSS (its process tree:
the task, the DeepSpeed launcher and its rank), and the fixed cost of a task and the time per
partition solved from the two runs. The tables are checked after each run: every slice once, no
duplicates.

    python bench/extract_workers.py [--lake lake] [--partitions 0 1 2 3] [--copies 6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.lake import Lake  # noqa: E402


def start_task(lake: str, partitions: list[int], seed: int, core: int) -> subprocess.Popen:
    """One extraction task as a mapped DAG task runs it, pinned to `core`."""
    command = [sys.executable, "-m", "jobs", "extract", "--lake", lake, "--ranks", "1", "--query-set", ""]
    command += ["--projection-seed", str(seed), "--partitions", *map(str, partitions)]
    return subprocess.Popen(
        command,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {core}),
    )


CALIBRATION = """
import torch
a = torch.randn(384, 384)
for _ in range(2500):
    a = torch.tanh(a @ a)
"""


def machine_ceiling() -> float:
    """The speed-up two single-threaded processes pinned to their own cores get on this machine
    for pure compute (a matrix-product loop): vCPUs that share a physical core, memory bandwidth or a
    busy host keep it below 2, and no fan-out can beat it."""

    def timed(cores: list[int]) -> float:
        started = time.perf_counter()
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", CALIBRATION],
                env=dict(os.environ, OMP_NUM_THREADS="1"),
                preexec_fn=lambda core=core: os.sched_setaffinity(0, {core}),
            )
            for core in cores
        ]
        for process in processes:
            process.wait()
        return time.perf_counter() - started

    return 2 * timed([0]) / timed([0, 1])


def run_workers(lake: Lake, groups: list[list[int]], seed: int) -> dict:
    """Runs one task per group at once; returns seconds, vectors written and each task's figures."""
    from bench.common import peak_tree_rss_mb

    before = lake.count_rows("train_gradients")
    started = time.perf_counter()
    tasks = [start_task(lake.root, group, seed, core) for core, group in enumerate(groups)]
    figures: list[dict] = [{} for _ in tasks]

    def watch(index: int):
        figures[index]["peak_rss_mb"] = peak_tree_rss_mb(tasks[index], interval=0.1)
        figures[index]["seconds"] = time.perf_counter() - started

    watchers = [threading.Thread(target=watch, args=(i,)) for i in range(len(tasks))]
    for watcher in watchers:
        watcher.start()
    for watcher in watchers:
        watcher.join()
    seconds = time.perf_counter() - started
    for task in tasks:
        if task.returncode:
            raise RuntimeError(f"an extraction task failed:\n{task.stderr.read()[-3000:]}")
    vectors = lake.count_rows("train_gradients") - before
    keys = lake.read("train_gradients", columns=["partition", "doc_id", "chunk", "fingerprint"])
    unique = len(set(zip(*(keys[c].to_pylist() for c in keys.column_names))))
    if unique != keys.num_rows:
        raise RuntimeError(f"{keys.num_rows - unique} duplicate rows after {len(groups)} concurrent task(s)")
    return {"seconds": seconds, "vectors": vectors, "tasks": figures}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lake", default="lake")
    parser.add_argument("--partitions", type=int, nargs="*", help="default: every tokenized partition")
    parser.add_argument("--copies", type=int, default=6, help="each partition's chunks this many times over")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs 2 cores: one for each concurrent task")
    with tempfile.TemporaryDirectory(prefix="extract-workers-") as scratch:
        from bench.scaling import replicate_tokens

        # only what extraction reads: the model (tokenizer, checkpoints) and the tokens
        shutil.copytree(Path(args.lake) / "model", Path(scratch) / "model", symlinks=True)
        source, lake = Lake(args.lake), Lake(scratch)
        partitions = args.partitions or sorted(p for (p,) in source.distinct("tokens", ["partition"]))
        for partition in partitions:
            replicate_tokens(source, lake, None, args.copies, partition)
        half = (len(partitions) + 1) // 2
        chunks = lake.count_rows("tokens", [("partition", "in", partitions)])
        print(f"[workers] {chunks:,} chunks in partitions {partitions}, one CPU rank per task", flush=True)
        results = {}
        for workers, groups, seed in ((1, [partitions], 101), (2, [partitions[:half], partitions[half:]], 102)):
            result = results[workers] = run_workers(lake, groups, seed)
            tasks = ", ".join(
                f"task {i}: {t['seconds']:.1f}s, peak RSS {t['peak_rss_mb']:,.0f} MB"
                for i, t in enumerate(result["tasks"])
            )
            print(
                f"[workers] {workers} worker(s): {result['vectors']:,} vectors in {result['seconds']:.1f}s = "
                f"{result['vectors'] / result['seconds']:,.1f} vectors/s ({tasks})",
                flush=True,
            )
    one, two = results[1]["seconds"], results[2]["seconds"]  # one = S + n·P, two = S + (n/2)·P
    per_partition = 2 * (one - two) / len(partitions)
    print(
        f"[workers] solved: {2 * two - one:.1f}s fixed per task (start-up, plan, commit), {per_partition:.1f}s per partition"
    )
    rate = {w: r["vectors"] / r["seconds"] for w, r in results.items()}
    rss = {w: max(t["peak_rss_mb"] for t in r["tasks"]) for w, r in results.items()}
    ceiling = machine_ceiling()
    print(f"worker_speedup={rate[2] / rate[1]:.2f} (vectors/s with 2 concurrent tasks ÷ 1; aim ≥ 1.8)")
    print(f"machine_ceiling={ceiling:.2f} (two pinned compute-only processes ÷ one, this machine's best)")
    print(f"worker_speedup_of_ceiling={rate[2] / rate[1] / ceiling:.2f}")
    print(f"worker_rss_ratio={rss[2] / rss[1]:.2f} (peak RSS per task, 2 workers ÷ 1)")


if __name__ == "__main__":
    main()
