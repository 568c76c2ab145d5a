"""process.setup: the threads a command takes (explicit, OMP_NUM_THREADS, or the cores other
processes leave idle) and glibc's allocator keeping freed memory."""
import subprocess
import sys
import time

import pytest
import torch

from osrt_fast import process


def test_a_busy_process_is_seen_and_its_core_left_to_it(monkeypatch):
    monkeypatch.undo()                # the real auto_threads, not the suite's stand-in
    fresh = process
    idle = fresh.cores_busy_elsewhere(0.3)
    if idle is None:
        pytest.skip("no /proc/stat here (not Linux)")
    other = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = fresh.cores_busy_elsewhere(0.5)
        threads = fresh.auto_threads()
    finally:
        other.kill()
        other.wait()
    assert busy > idle + 0.5, (idle, busy)
    if torch.get_num_threads() >= 2:
        assert threads <= torch.get_num_threads() - 1


def test_setup_takes_explicit_threads_then_omp_num_threads_then_the_idle_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(process, "auto_threads", lambda: 1)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert process.setup() == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert process.setup() == 2
        assert process.setup(threads=1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_allocator_keeps_freed_memory_on_linux():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt is Linux's")
    assert process.reuse_freed_memory()
