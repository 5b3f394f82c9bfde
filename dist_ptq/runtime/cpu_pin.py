"""One core per CPU worker: each actor pins itself to a core no other dist_ptq actor on the node holds.

MindSpore's CPU runtime runs a kernel thread beside the Python thread whatever ``threads_num`` says,
so two "one-thread" workers on two cores still contend for both. Pinning makes one worker one core.
Cores are claimed with ``flock`` on a file per core in the temp directory: the claim is shared by every
process on the node (other jobs too) and released by the kernel when the holder exits, even by SIGKILL.
Pass ``pin_cpu=False`` to ``quantize`` (``DIST_PTQ_PIN_CPU=0`` for the CLI) to leave scheduling to the OS
(a node shared with other CPU-heavy work); the worker then never calls this module.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

_held: list[int] = []  # open lock descriptors: a claim lasts as long as the process


def pin_one_core() -> int | None:
    """Claim a free core of this process's allowed set and run on it alone; None if all are claimed
    or the platform has no CPU affinity."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    lock_dir = Path(tempfile.gettempdir())
    for cpu in sorted(os.sched_getaffinity(0)):
        try:
            fd = os.open(lock_dir / f"dist_ptq-cpu-{cpu}.lock", os.O_CREAT | os.O_RDWR, 0o666)
        except OSError:  # another user's lock file: treat the core as taken
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _pin_all_threads(cpu)
        _held.append(fd)
        return cpu
    return None


def _pin_all_threads(cpu: int) -> None:
    """Affinity is per thread: set it on every thread already running (imports start some), and
    threads started later inherit it from the one that starts them."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, {cpu})
        except OSError:  # the thread has exited meanwhile
            pass
