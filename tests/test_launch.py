"""launch/ scripts on this machine: a head and an NPU worker node on loopback, preflight, a quantization
submitted through them that matches the local run byte for byte, and a teardown that leaves nothing.

Everything runs as subprocesses (the scripts, `dist-ptq`, Ray's daemons) with its own Ray temp dir and
free ports, so other test modules' in-process Ray sessions are not touched.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from dist_ptq.model.synthetic import tiny_config, write_random_model
from tests.common import manifest_without_report

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
CONFIG = ROOT / "configs" / "w8a8_smoothquant_kv_int8.yaml"
NODE_PORTS = ("NODE_MANAGER", "OBJECT_MANAGER", "RUNTIME_ENV_AGENT", "DASHBOARD_AGENT_GRPC",
              "DASHBOARD_AGENT_LISTEN", "METRICS_EXPORT")
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, taken: set[int]) -> list[int]:
    out = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken and port not in out:
            out.append(port)
    taken.update(out)
    return out


def free_range(width: int, taken: set[int]) -> tuple[int, int]:
    """``width`` consecutive free ports below the kernel's ephemeral range (Ray's worker ports)."""
    rng = random.Random()
    for _ in range(200):
        lo = rng.randrange(20000, 30000 - width)
        span = range(lo, lo + width)
        if not taken.intersection(span) and all(port_free(p) for p in span):
            taken.update(span)
            return lo, lo + width - 1
    raise RuntimeError("no free port range for Ray workers")


def node_env(base: dict, taken: set[int], npus: int, cpus: int) -> dict:
    env = dict(base, DIST_PTQ_NPUS=str(npus), RAY_NUM_CPUS=str(cpus))
    for name, port in zip(NODE_PORTS, free_ports(len(NODE_PORTS), taken)):
        env[f"RAY_{name}_PORT"] = str(port)
    env["RAY_MIN_WORKER_PORT"], env["RAY_MAX_WORKER_PORT"] = map(str, free_range(40, taken))
    return env


def run(cmd: list[str], env: dict, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"{proc.args} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc


def session_processes(temp_dir: Path, gcs_port: int) -> list[psutil.Process]:
    """Live processes of the Ray session under ``temp_dir`` and their descendants."""
    found = {}
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or []) + " "
        ours = f"{temp_dir}/" in cmd or f"--address=127.0.0.1:{gcs_port} " in cmd  # the client server names only that
        if p.info["status"] != psutil.STATUS_ZOMBIE and ours:
            found[p.pid] = p
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.Error:
                pass
    live = []
    for p in found.values():
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                live.append(p)
        except psutil.Error:
            pass
    return live


def non_loopback_listeners(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN and c.laddr.ip not in LOOPBACK:
                    out.append(f"{p.pid} {p.name()} {c.laddr.ip}:{c.laddr.port}")
        except psutil.Error:
            pass
    return out


@pytest.fixture
def workdir():
    # short, outside pytest's tmp tree: Ray's Unix socket paths live under it (107-byte limit)
    d = Path(tempfile.mkdtemp(prefix="dptq-launch-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_every_script_documents_its_environment():
    for name in ("start_head.sh", "start_worker.sh", "stop.sh", "submit.sh"):
        proc = ok(run(["bash", LAUNCH / name, "--help"], dict(os.environ)))
        assert "Expects in its environment" in proc.stdout, name
    proc = ok(run([sys.executable, LAUNCH / "preflight.py", "--help"], dict(os.environ)))
    assert "--model-dir" in proc.stdout
    for name in ("start_head.sh", "start_worker.sh", "stop.sh", "submit.sh", "preflight.py"):
        assert os.access(LAUNCH / name, os.X_OK), f"launch/{name} is not executable"


def test_npu_count_comes_from_the_override_or_the_node():
    def npus(env_extra: dict) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("DIST_PTQ_NPUS", "ASCEND_RT_VISIBLE_DEVICES")}
        return run(["bash", "-c", f"source {LAUNCH / 'common.sh'}; detect_npus"], dict(env, **env_extra))

    assert ok(npus({"DIST_PTQ_NPUS": "3"})).stdout.strip() == "3"
    assert ok(npus({"DIST_PTQ_NPUS": "4", "ASCEND_RT_VISIBLE_DEVICES": "0,1"})).stdout.strip() == "2"
    here = len(list(Path("/dev").glob("davinci[0-9]*")))
    if here or not shutil.which("npu-smi"):
        assert ok(npus({})).stdout.strip() == str(here)
    bad = npus({"DIST_PTQ_NPUS": "two"})
    assert bad.returncode == 2 and "DIST_PTQ_NPUS must be a non-negative integer, got 'two'" in bad.stderr


def loopback_alias(port: int) -> str:
    """HOST:PORT for a loopback head as the scripts address it (a host name of 127.0.0.1), or skip."""
    script = f"source {LAUNCH / 'common.sh'}; reachable_head_address 127.0.0.1:{port}"
    proc = run(["bash", "-c", script], dict(os.environ))
    if proc.returncode != 0:
        pytest.skip(f"no host name resolves to 127.0.0.1, so Ray cannot join a loopback head: {proc.stderr.strip()}")
    return proc.stdout.strip()


def cluster_envs(workdir: Path) -> tuple[dict, dict, dict, int]:
    """Environments for the driver, the head (no NPU) and a worker node (2 NPUs), and the GCS port."""
    taken: set[int] = set()
    gcs_port, client_port, autoscaler_metrics, dashboard_metrics = free_ports(4, taken)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("RAY_", "DIST_PTQ_")) and k != "ASCEND_RT_VISIBLE_DEVICES"}
    base.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_TEMP_DIR=str(workdir / "ray"),
        RAY_AUTH_TOKEN_PATH=str(workdir / "auth_token"),  # generated by start_head.sh, used by all
        RAY_OBJECT_STORE_MEMORY=str(100 * 2**20),
    )
    head = dict(node_env(base, taken, npus=0, cpus=1), NODE_IP="127.0.0.1",
                RAY_PORT=str(gcs_port), RAY_CLIENT_SERVER_PORT=str(client_port),
                AUTOSCALER_METRIC_PORT=str(autoscaler_metrics), DASHBOARD_METRIC_PORT=str(dashboard_metrics))
    return base, head, node_env(base, taken, npus=2, cpus=2), gcs_port


@pytest.mark.slow
def test_loopback_cluster_quantizes_like_a_local_run(workdir):
    t0 = time.monotonic()
    base, head_env, worker_env, gcs_port = cluster_envs(workdir)
    alias = loopback_alias(gcs_port)
    temp_dir = workdir / "ray"

    cfg = tiny_config("llama", num_hidden_layers=4)
    model = write_random_model(workdir / "model", cfg, seed=5)
    calib = workdir / "calib.npy"
    np.save(calib, np.random.default_rng(0).integers(0, cfg["vocab_size"], size=(8, 32)))
    recipe = ["-c", CONFIG, "--calib", calib, "--num-samples", "8", "--seq-len", "32", "--batch", "2"]
    # the reference: one worker and no --address run in the driver without Ray, while the cluster starts
    local, local_log = workdir / "local", workdir / "local.log"
    with open(local_log, "w") as log:
        local_run = subprocess.Popen(
            [str(c) for c in [Path(sys.executable).parent / "dist-ptq", "quantize", model, "-o", local, *recipe]],
            stdout=log, stderr=subprocess.STDOUT,
        )

    timings = {}
    try:
        head = ok(run([LAUNCH / "start_head.sh"], head_env))
        assert head.stdout.strip().splitlines()[-1] == f"RAY_ADDRESS=127.0.0.1:{gcs_port}"
        assert (workdir / "auth_token").stat().st_mode & 0o077 == 0, "the generated token must be private"
        assert "token authentication: on" in head.stderr
        timings["head"] = time.monotonic() - t0

        ok(run([LAUNCH / "start_worker.sh", f"127.0.0.1:{gcs_port}"], worker_env))
        timings["worker"] = time.monotonic() - t0
        procs = session_processes(temp_dir, gcs_port)
        assert sum("raylet/raylet" in " ".join(p.cmdline()) for p in procs) == 2
        assert non_loopback_listeners(procs) == []

        # token authentication is on: a driver with another token is turned away
        intruder = run([sys.executable, LAUNCH / "preflight.py", "--address", alias, "--model-dir", model],
                       dict(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64, RAY_NUM_REDIS_GET_RETRIES="2"))
        assert intruder.returncode == 2, intruder.stderr
        assert "InvalidAuthToken" in intruder.stderr and "cannot join the Ray cluster" in intruder.stderr
        timings["intruder refused"] = time.monotonic() - t0

        driver_env = dict(base, RAY_ADDRESS=f"127.0.0.1:{gcs_port}", DIST_PTQ_EXPECT_NODES="2")
        submit = [LAUNCH / "submit.sh", model, "-o", workdir / "cluster", *recipe, "--workers", "2"]
        bad = run([submit[0], workdir / "nowhere", *submit[2:]], driver_env, cwd=workdir)
        assert bad.returncode == 1, bad.stderr
        # the driver and both nodes
        assert bad.stderr.count(f"model dir: {workdir / 'nowhere'} is not a readable directory") == 3, bad.stderr
        assert "preflight failed; nothing was submitted" in bad.stderr
        timings["preflight (failing)"] = time.monotonic() - t0

        sub = ok(run(submit, driver_env, timeout=240, cwd=workdir))
        timings["submit"] = time.monotonic() - t0
        table = sub.stdout[: sub.stdout.index("preflight: 2 nodes agree")]
        rows = [line.split() for line in table.splitlines()[2:] if line.strip()]  # after the header and driver
        assert sorted((r[0], r[2]) for r in rows) == [("127.0.0.1", "0"), ("127.0.0.1", "2")], table
        assert all(r[-2:] == ["ok", "ok"] for r in rows), table
        assert local_run.wait(timeout=120) == 0, local_log.read_text()
        assert manifest_without_report(workdir / "cluster") == manifest_without_report(local)
    finally:
        if local_run.poll() is None:
            local_run.kill()
            local_run.wait()
        stop = run([LAUNCH / "stop.sh", "--grace", "3", "--temp-dir", temp_dir], base)
        timings["stop"] = time.monotonic() - t0
        print("timings (s since start):", {k: round(v, 1) for k, v in timings.items()})
        left = session_processes(temp_dir, gcs_port)
        for p in left:  # never leave a session behind, even when stop.sh failed
            p.kill()
    ok(stop)
    assert "no Ray process left" in stop.stdout
    assert left == [], [" ".join(p.cmdline()) for p in left]
