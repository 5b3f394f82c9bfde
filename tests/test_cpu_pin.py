"""Workers claim distinct cores; a claim ends with its process, even a killed one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.common import ROOT

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")

HOLDER = r"""
import os, sys, threading
threading.Thread(target=threading.Event().wait, daemon=True).start()  # a thread started before pinning
from dist_ptq.runtime.cpu_pin import pin_one_core
cpu = pin_one_core()
sets = {tuple(sorted(os.sched_getaffinity(int(t)))) for t in os.listdir("/proc/self/task")}
assert len(sets) == 1, sets  # every thread, not just the calling one
print(cpu, sorted(os.sched_getaffinity(0)), flush=True)
sys.stdin.readline()  # hold the claim until told to go
"""


def _start(tmp_path, **env) -> subprocess.Popen:
    e = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT), **env)
    return subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=e)


def _claim(p: subprocess.Popen) -> tuple[int | None, list[int]]:
    cpu, allowed = p.stdout.readline().split(" ", 1)
    return (None if cpu == "None" else int(cpu)), eval(allowed)


def test_each_holder_gets_its_own_core_until_none_is_left(tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    procs = [_start(tmp_path) for _ in range(len(cores) + 1)]
    try:
        claims = [_claim(p) for p in procs]
    finally:
        for p in procs:
            p.communicate("\n")
    pinned = [c for c, _ in claims if c is not None]
    assert sorted(pinned) == cores  # every core claimed once
    for c, allowed in claims:
        assert allowed == ([c] if c is not None else cores)  # the one left over runs unpinned


def test_a_killed_holder_frees_its_core(tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    procs = [_start(tmp_path) for _ in cores]
    try:
        first = [_claim(p) for p in procs]
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        again = _start(tmp_path)
        procs.append(again)
        assert _claim(again)[0] == first[0][0]
    finally:
        for p in procs[1:]:
            p.communicate("\n")


WORKER = r"""
import os, sys
from dist_ptq.config import PTQConfig
from dist_ptq.runtime.plan import Stage
from dist_ptq.runtime.stage import StageWorker, WorkerSettings
settings = WorkerSettings(model_dir=sys.argv[1], cfg=PTQConfig().to_dict(), partial="", seq_len=8, pin_cpu=sys.argv[2] == "1")
w = StageWorker(settings, Stage(index=0, layers=(0, 1), first=True, last=True, nbytes=0), writer=False)
print(w.placement()["cpu_core"], sorted(os.sched_getaffinity(0)), flush=True)
"""


def test_pinning_can_be_turned_off(tmp_path):
    from dist_ptq.cli import Environment
    from dist_ptq.model.synthetic import tiny_config, write_random_model

    # DIST_PTQ_PIN_CPU=0, read at the CLI, becomes pin_cpu=False for the workers
    assert Environment.read({"DIST_PTQ_PIN_CPU": "0"}).pin_cpu is False
    assert Environment.read({}).pin_cpu is True
    model = write_random_model(tmp_path / "model", tiny_config("llama"), seed=0)
    cores = sorted(os.sched_getaffinity(0))
    for pin in (True, False):
        e = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, "-c", WORKER, str(model), "1" if pin else "0"], env=e,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        cpu, allowed = proc.stdout.strip().splitlines()[-1].split(" ", 1)
        if pin:
            assert int(cpu) in cores and eval(allowed) == [int(cpu)]
        else:
            assert (cpu, eval(allowed)) == ("None", cores)
