"""The evaluation's tail-patch on a shared CPU: pairs/s alone and beside a busy process, with torch's
default threads (one per allowed core) and with the threads `jobs.threads` picks from the idle cores.

In one process, on `make run`'s lake: the TrackStar top-10 proponents of the first `--queries`
queries (`--queries` × 10 pairs), tail-patched with the checkpoint's own optimizer step as
`evaluate` does. The competitor is another torch process multiplying matrices with its own default
threads (what a concurrent test run or a second job is). Each condition runs `--repeats` times;
the median is printed. This script sets the threads itself, so OMP_NUM_THREADS (which `make bench`
sets to 1) does not decide them here.

    python bench/tail_patch_threads.py            # after `make run`
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import busy_process  # noqa: E402
from evaluation.rankings import ranked_proponents  # noqa: E402
from evaluation.tail_patching import tail_patch, tail_patch_step  # noqa: E402
from infra.lake import Lake  # noqa: E402
from jobs import threads  # noqa: E402
from jobs.catalog import checkpoint_folder, latest_checkpoint_id  # noqa: E402
from jobs.checkpoints import load_manifest  # noqa: E402


def pairs_per_second(patch, pairs: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        patch()
        times.append(time.perf_counter() - started)
    return pairs / sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", default="lake")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()  # the model loads once per repeat

    lake = Lake(args.lake)
    checkpoint_id = latest_checkpoint_id(lake)
    checkpoint_dir = checkpoint_folder(lake, checkpoint_id)
    query_set = lake.read("query_sets", columns=["query_set"])["query_set"][0].as_py()
    queries = {q["query_id"]: q for q in lake.read("queries", filters=[("query_set", "=", query_set)]).to_pylist()}
    ranked = {"trackstar": ranked_proponents(lake, query_set, checkpoint_id)["trackstar"]}
    sample = sorted(ranked["trackstar"])[: args.queries]
    rule, learning_rate, step_line = tail_patch_step(checkpoint_dir, load_manifest(checkpoint_dir), None)
    pairs = sum(len(ranked["trackstar"][q]) for q in sample)
    cores = len(threads.allowed_cores())
    print(f"checkpoint {checkpoint_id}, {pairs} pairs ({len(sample)} queries), {step_line}; {cores} allowed cores")

    def patch():
        tail_patch(lake, checkpoint_dir, rule, learning_rate, ranked, queries, sample)

    def measure(name: str, count: int) -> float:
        torch.set_num_threads(count)
        rate = pairs_per_second(patch, pairs, args.repeats)
        print(f"{name:<34} {count} thread(s): {rate:7.1f} pairs/s", flush=True)
        return rate

    patch()  # warm-up: imports, the model's first load
    alone = measure("alone, torch default", cores)
    alone_idle = measure("alone, from idle cores", threads.cpu_threads(0, environ={}))
    with busy_process(threads=cores):
        shared = measure("beside a busy process, torch default", cores)
        chosen = threads.cpu_threads(0, environ={})
        shared_idle = measure("beside a busy process, from idle cores", chosen)
    print(f"alone_pairs_per_s={alone:.1f}")
    print(f"alone_idle_threads_pairs_per_s={alone_idle:.1f}")
    print(f"shared_default_threads_pairs_per_s={shared:.1f}")
    print(f"shared_idle_threads_pairs_per_s={shared_idle:.1f}")
    print(f"shared_default_over_alone={shared / alone:.3f}")
    print(f"shared_idle_threads_over_alone={shared_idle / alone:.3f}")


if __name__ == "__main__":
    main()
