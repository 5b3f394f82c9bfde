"""Check, before a run, that every node of a Ray cluster can serve dist_ptq as the driver expects.

    python launch/preflight.py --address HOST:PORT --model-dir MODEL_DIR [--out-dir OUT_DIR]
                               [--expect-nodes N] [--wait SECONDS]

One small Ray task is pinned to each alive node (NodeAffinitySchedulingStrategy, soft=False) and
reports the node's Python, dist_ptq, MindSpore and Ray versions, its hostname, its NPU resource and
whether it can read MODEL_DIR (config.json parses; every safetensors file named by the index, or
every ``*.safetensors``, has a sound header and its last byte can be read). With ``--out-dir``, the
driver writes a marker file beside OUT_DIR and every node must see it and be able to write there:
stage workers write their shards into ``OUT_DIR.partial`` on their own node, so it has to be one
shared file system. Prints a table, then each problem; exit status 0 when none, 1 when some, 2 when
the cluster cannot be reached.

Needs only Ray in the driver's environment (not dist_ptq). Token authentication: an explicit
HOST:PORT sends the token only with RAY_AUTH_MODE=token (launch/submit.sh sets it); the token comes
from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import struct
import sys
import time
import uuid
from pathlib import Path

VERSIONED = ("python", "dist_ptq", "mindspore", "ray")
PROBE_TIMEOUT_S = 180.0


def module_version(name: str) -> str:
    try:
        module = __import__(name)
    except Exception as e:  # a broken install is reported, not raised
        return f"missing ({type(e).__name__})"
    return str(getattr(module, "__version__", "unknown"))


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable safetensors file, or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name}: shorter than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path.name}: header length {n} exceeds the file size {size}"
            header = json.loads(f.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                return f"{path.name}: truncated, data ends at {8 + n + end} bytes but the file has {size}"
            if end:
                f.seek(8 + n + end - 1)
                if len(f.read(1)) != 1:
                    return f"{path.name}: last data byte cannot be read"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"{path.name}: {type(e).__name__}: {e}"
    return None


def model_dir_problem(model_dir: str) -> str | None:
    root = Path(model_dir)
    if not root.is_dir():
        return f"{model_dir} is not a readable directory"
    try:
        json.loads((root / "config.json").read_text(encoding="utf-8"))
        index = root / "model.safetensors.index.json"
        if index.exists():
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        else:
            names = sorted(p.name for p in root.glob("*.safetensors"))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    if not names:
        return f"no *.safetensors in {model_dir}"
    for name in names:
        problem = safetensors_problem(root / name)
        if problem:
            return problem
    return None


def out_dir_problem(out_dir: str, marker: str) -> str | None:
    parent = Path(out_dir).absolute().parent
    if not parent.is_dir():
        return f"{parent} does not exist"
    if not (parent / marker).exists():
        return f"{parent} is not the driver's directory (its marker file is not visible): not a shared file system"
    probe = parent / f".{marker}.{socket.gethostname()}.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return f"{parent} is not writable: {e.strerror}"
    return None


def probe_node(model_dir: str, out_dir: str | None, marker: str | None) -> dict:
    """What this machine runs and can read (run on each node, and in the driver)."""
    return {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "dist_ptq": module_version("dist_ptq"),
        "mindspore": module_version("mindspore"),
        "ray": module_version("ray"),
        "model_dir": model_dir_problem(model_dir),
        "out_dir": out_dir_problem(out_dir, marker) if out_dir else None,
    }


def alive_nodes(ray, expect: int, wait_s: float) -> list[dict]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        if len(nodes) >= expect or time.monotonic() >= deadline:
            return sorted(nodes, key=lambda n: (n["NodeManagerAddress"], n["NodeID"]))
        time.sleep(1.0)


def run_probes(ray, nodes: list[dict], model_dir: str, out_dir: str | None, marker: str | None) -> list:
    """One probe pinned to each node; a node that fails or does not answer gets a message instead."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(probe_node)
    refs = [
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
        .remote(model_dir, out_dir, marker)
        for n in nodes
    ]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    results: list[dict | str] = []
    for ref in refs:
        if ref not in ready:
            results.append(f"did not answer in {PROBE_TIMEOUT_S:.0f}s")
            continue
        try:
            results.append(ray.get(ref))
        except Exception as e:
            results.append(f"probe failed: {str(e).splitlines()[0]}")
    return results


def problems_of(driver: dict, nodes: list[dict], results: list[dict | str], expect: int, model_dir: str,
                out_dir: str | None) -> list[str]:
    out = []
    for what, path in [("model dir", model_dir), ("output dir", out_dir)]:
        if path and not os.path.isabs(path):
            out.append(f"{what} {path} is relative: give an absolute path, every node resolves a relative one "
                       "against its own working directory")
    if driver["model_dir"]:
        out.append(f"driver: model dir: {driver['model_dir']}")
    if len(nodes) < expect:
        out.append(f"cluster: {len(nodes)} alive nodes, expected {expect}")
    for n, r in zip(nodes, results):
        name = f"node {n['NodeManagerAddress']} ({n['NodeID'][:8]})"
        if isinstance(r, str):
            out.append(f"{name}: {r}")
            continue
        for key in VERSIONED:
            if r[key] != driver[key]:
                out.append(f"{name}: {key} {r[key]}, the driver has {driver[key]}")
        if r["model_dir"]:
            out.append(f"{name}: model dir: {r['model_dir']}")
        if out_dir and r["out_dir"]:
            out.append(f"{name}: output dir: {r['out_dir']}")
    return out


def table(driver: dict, nodes: list[dict], results: list[dict | str], out_dir: str | None) -> str:
    def cell(problem):
        return "ok" if problem is None else "FAIL"

    head = ["node", "hostname", "NPU", *VERSIONED, "model dir", *(["out dir"] if out_dir else [])]
    rows = [["driver", driver["hostname"], "-", *(driver[k] for k in VERSIONED), cell(driver["model_dir"]),
             *([cell(driver["out_dir"])] if out_dir else [])]]
    for n, r in zip(nodes, results):
        npu = f"{n['Resources'].get('NPU', 0):g}"
        if isinstance(r, str):
            rows.append([n["NodeManagerAddress"], "?", npu, *("?" for _ in VERSIONED), "?", *(["?"] * bool(out_dir))])
            continue
        marks = {k: r[k] + ("*" if r[k] != driver[k] else "") for k in VERSIONED}
        rows.append([n["NodeManagerAddress"], r["hostname"], npu, *(marks[k] for k in VERSIONED),
                     cell(r["model_dir"]), *([cell(r["out_dir"])] if out_dir else [])])
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"),
                    help="auto or HOST:PORT (default $RAY_ADDRESS or auto)")
    ap.add_argument("--model-dir", required=True, help="the model directory, as every node sees it")
    ap.add_argument("--out-dir", default=None, help="the output directory: its parent must be shared by all nodes")
    ap.add_argument("--expect-nodes", type=int, default=1, help="wait for at least this many alive nodes")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for --expect-nodes")
    args = ap.parse_args(argv)

    import ray

    try:
        ray.init(address=args.address, log_to_driver=False, logging_level="WARNING")
    except Exception as e:
        first = str(e).splitlines()[0]
        print(f"preflight: error: cannot join the Ray cluster at {args.address}: {first}", file=sys.stderr)
        print("preflight: check the address and that its port is open; a cluster with token authentication (the "
              "launch scripts' default) also needs RAY_AUTH_MODE=token here and the head's token in RAY_AUTH_TOKEN, "
              f"RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (RAY_AUTH_MODE is {os.environ.get('RAY_AUTH_MODE', 'unset')})",
              file=sys.stderr)
        return 2

    marker = None
    if args.out_dir:
        parent = Path(args.out_dir).absolute().parent
        marker = f".dist_ptq_preflight_{uuid.uuid4().hex}"
        try:
            (parent / marker).write_bytes(b"")
        except OSError as e:
            print(f"preflight: error: cannot write beside the output directory in {parent}: {e.strerror}",
                  file=sys.stderr)
            ray.shutdown()
            return 1
    try:
        driver = probe_node(args.model_dir, args.out_dir, marker)
        nodes = alive_nodes(ray, args.expect_nodes, args.wait)
        results = run_probes(ray, nodes, args.model_dir, args.out_dir, marker)
    finally:
        if marker:
            (Path(args.out_dir).absolute().parent / marker).unlink(missing_ok=True)
        ray.shutdown()

    print(table(driver, nodes, results, args.out_dir))
    problems = problems_of(driver, nodes, results, args.expect_nodes, args.model_dir, args.out_dir)
    if problems:
        print(f"\npreflight: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"\npreflight: {len(nodes)} nodes agree with the driver and can read {args.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
