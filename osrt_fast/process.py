"""What a command sets up for its own process on the CPU: its intra-op threads and glibc's
allocator (`setup`, called first by train.py, render, evaluate, encode and the viewer).

Both were found by profiling the demo's training step on a 2-core CPU (docs/performance.md):
- Threads: torch starts one intra-op thread per core. Beside another busy process, two threads
  sharing a core wait for each other at every op: on 2 cores beside one pure-Python loop, the
  demo trained about 3x slower than idle with 2 threads, and at its idle 1-thread speed with one.
  So by default a command takes the cores that other processes leave idle when it starts
  (`auto_threads`), once: the run's arithmetic then does not change under it.
- Memory: glibc's malloc serves large blocks (the step's activations) by mmap and trims its heap,
  so every step's tensors were faulted in again, zeroed, page by page: thousands of page faults a
  step, and stretches of tens of seconds 25% slower. `reuse_freed_memory` keeps freed memory for
  the next step.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from typing import Optional

import torch


def cores_busy_elsewhere(seconds: float = 0.25) -> Optional[float]:
    """The cores other processes kept busy over the next `seconds`: the machine's busy time
    (/proc/stat) less this process's own CPU time. None where /proc/stat cannot be read (not
    Linux)."""
    def sample():
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]     # user .. steal
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")   # less idle, iowait
        return busy, sum(os.times()[:2])
    try:
        busy0, ours0 = sample()
        time.sleep(seconds)
        busy1, ours1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, (busy1 - busy0) - (ours1 - ours0)) / seconds


def auto_threads() -> int:
    """Intra-op threads that leave the cores other processes keep busy to them: torch's default
    (one per core) less those, at least one."""
    cores = torch.get_num_threads()
    others = cores_busy_elsewhere()
    return cores if others is None else max(1, min(cores, round(cores - others)))


def reuse_freed_memory() -> bool:
    """Has glibc's malloc keep freed memory for reuse (blocks up to 32 MB from its heap, never
    trimmed below 512 MB) instead of returning it to the system and faulting it in again.
    Returns whether it applied (glibc, i.e. Linux; elsewhere a no-op)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 512 << 20))


def setup(threads: Optional[int] = None) -> int:
    """The process's allocator (`reuse_freed_memory`) and intra-op threads: `threads` if given,
    else OMP_NUM_THREADS's (torch applied it) where it is set, else `auto_threads`. Returns the
    threads."""
    reuse_freed_memory()
    if threads is None:
        threads = torch.get_num_threads() if "OMP_NUM_THREADS" in os.environ else auto_threads()
    torch.set_num_threads(threads)
    return threads
