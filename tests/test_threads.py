"""Threads from the idle cores (jobs/threads.py): measured on this machine's own /proc/stat with a
real busy process beside the test, and the order of what decides (OMP_NUM_THREADS, setting, idle)."""

import os
import subprocess
import sys

import pytest

from jobs import threads

BUSY_LOOP = "import time\nend = time.time() + 30\nwhile time.time() < end: pass"


def test_a_busy_process_leaves_one_core_fewer_idle():
    cores = threads.allowed_cores()
    if len(cores) < 2:
        pytest.skip("needs two allowed cores")
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        os.sched_setaffinity(busy.pid, {min(cores)})
        threads.idle_cores(0.1)  # the loop is running by now
        idle = threads.idle_cores(0.5)
    finally:
        busy.kill()
        busy.wait()
    # the pinned loop keeps its core busy; anything else running only lowers the count further
    assert 0.0 <= idle <= len(cores) - 0.7


def test_threads_come_from_the_users_variable_then_the_setting_then_the_idle_cores(monkeypatch):
    monkeypatch.setattr(threads, "allowed_cores", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "idle_cores", lambda: 1.4)  # a test double: 2.6 of 4 cores busy
    assert threads.cpu_threads(0, environ={}) == 1
    assert threads.cpu_threads(0, share=2, environ={}) == 1  # never zero
    assert threads.cpu_threads(3, environ={}) == 3
    assert threads.cpu_threads(3, environ={"OMP_NUM_THREADS": "2"}) == 2
    monkeypatch.setattr(threads, "idle_cores", lambda: 5.0)  # never more than the allowed cores
    assert threads.cpu_threads(0, environ={}) == 4
    assert threads.cpu_threads(0, share=2, environ={}) == 2


def test_use_cpu_threads_sets_torchs_count(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        assert threads.use_cpu_threads(0, "test") == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
