"""How many threads a CPU process uses: the cores idle when it starts, not every core of the machine.

torch's default (one thread per core) assumes the process owns the machine. Beside another busy
process its threads wait at every parallel region for a thread the OS took off its core: the
evaluation's tail-patch ran at 17-25 pairs/s beside a test run against 398 alone
(`bench/tail_patch_threads.py` measures it). So a process counts the idle cores over a short sample
of /proc/stat and uses that many threads (at least one). The user's OMP_NUM_THREADS always wins, then
the `cpu_threads` setting; a count is only chosen when neither is given.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping


def allowed_cores() -> set[int]:
    """The cores this process may run on (its affinity mask: what taskset, cgroups and a container
    leave it), not every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _core_times() -> dict[int, tuple[int, int]]:
    """core -> (idle ticks, all ticks) since boot, from /proc/stat (idle includes iowait)."""
    times = {}
    with open("/proc/stat") as stat:
        for line in stat:
            name, *ticks = line.split()
            if name.startswith("cpu") and name != "cpu":
                values = [int(t) for t in ticks[:8]]  # user nice system idle iowait irq softirq steal
                times[int(name[3:])] = (values[3] + values[4], sum(values))
    return times


def idle_cores(sample_seconds: float = 0.2) -> float:
    """The number of allowed cores left idle over the next `sample_seconds` (a fraction: two cores
    half busy are one idle core). Where /proc/stat does not exist, every allowed core counts."""
    cores = allowed_cores()
    try:
        before = _core_times()
        time.sleep(sample_seconds)
        after = _core_times()
    except OSError:
        return float(len(cores))
    idle = 0.0
    for core in cores & before.keys() & after.keys():
        ticks = after[core][1] - before[core][1]
        idle += (after[core][0] - before[core][0]) / ticks if ticks > 0 else 1.0
    return idle


def cpu_threads(setting: int = 0, share: int = 1, environ: Mapping[str, str] | None = None) -> int:
    """Threads for each of `share` processes about to start (the ranks of a node): OMP_NUM_THREADS
    when the user set it, else the `cpu_threads` setting when positive (both per process), else the
    idle cores split `share` ways (at least one thread each)."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return max(1, int(environ["OMP_NUM_THREADS"]))
    if setting > 0:
        return setting
    return max(1, min(round(idle_cores()), len(allowed_cores())) // max(1, share))


def use_cpu_threads(setting: int = 0, who: str = "") -> int:
    """Sets torch's intra-op threads of this process by `cpu_threads` and says so; returns the count."""
    import torch

    threads = cpu_threads(setting)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        print(f"[{who or 'threads'}] {threads} CPU thread(s) of {len(allowed_cores())} allowed core(s)")
    return threads
