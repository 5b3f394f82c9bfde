"""Runner benchmarks: memory per worker, distance to the I/O and compute limits, parallel speed-up, scaling.

    python bench/runner_bench.py memory   --work /tmp/dptq-bench     # 7B-shaped W8A16 RTN, 2 workers, vs cp
    python bench/runner_bench.py speedup  --work /tmp/dptq-bench     # W8A8 SQ + KV int8, 1 vs 2 workers
    python bench/runner_bench.py compute  --work /tmp/dptq-bench     # calibration forward vs float32 GEMM rate
    python bench/runner_bench.py scaling  --work /tmp/dptq-bench     # time and memory vs layers and width

Every quantization runs in a fresh subprocess so its peak RSS is its own; timings that are compared
are taken side by side in the same invocation. Results go to bench/results/runner_<what>.json and
are printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))
from synthetic import config_for  # noqa: E402

CHILD = r"""
import json, os, sys, time
a = json.loads(sys.argv[1])
if a.get("one_core"):  # the one-worker baseline on one core, as each of several workers runs
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before MindSpore starts threads: they inherit it
from dist_ptq.runtime.coordinator import quantize
from dist_ptq.runtime.stage import peak_rss_mb
t0 = time.time()
if a["workers"] * a.get("replicas", 1) > 1 or a.get("ray"):
    import ray
    ray.init(num_cpus=a["workers"] * a.get("replicas", 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
t1 = time.time()
rep = quantize(a["model"], a["config"], a["out"], calib=a.get("calib"), num_samples=a.get("num_samples", 16),
               seq_len=a.get("seq_len", 256), batch=a.get("batch", 4), workers=a["workers"], replicas=a.get("replicas", 1),
               schedule=a.get("schedule", "auto"), progress=False, threads=a.get("threads", 1))
t2 = time.time()
workers = [r["peak_rss_mb"] for s in rep["stages"] for r in s["replicas"]]
print("RESULT " + json.dumps({"seconds": t2 - t1, "ray_start_s": t1 - t0,
      "driver_peak_rss_mb": peak_rss_mb(),
      "worker_peak_rss_mb": workers, "layers": rep["layers"]}))
"""


def run_child(**kw) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kw)], capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-3000:]}")


def ensure_model(work: Path, name: str, shape: str, layers: int | None = None, hidden: int | None = None) -> Path:
    from dist_ptq.model.synthetic import write_random_model

    d = work / name
    if not (d / "config.json").is_file():
        t0 = time.time()
        write_random_model(d, config_for(shape, layers, hidden), seed=0, dtype="BF16", shard_bytes=2 << 30)
        print(f"generated {d} in {time.time() - t0:.0f}s", flush=True)
    return d


def calib_npy(work: Path, samples: int, seq_len: int, vocab: int) -> Path:
    import numpy as np

    p = work / f"calib_{samples}x{seq_len}.npy"
    if not p.exists():
        np.save(p, np.random.default_rng(0).integers(0, vocab, size=(samples, seq_len)))
    return p


def model_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def save(what: str, data: dict, md: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"runner_{what}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"runner_{what}.md").write_text(md)
    print(md)


def bench_memory(work: Path) -> None:
    m7 = ensure_model(work, "llama2-7b", "llama2-7b")
    out = work / "out-7b"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"])
    t0 = time.time()
    copy = work / "copy-7b"
    shutil.rmtree(copy, ignore_errors=True)
    subprocess.run(["cp", "-r", str(m7), str(copy)], check=True)
    subprocess.run(["sync"])
    cp_s = time.time() - t0
    shutil.rmtree(copy)
    r = run_child(model=str(m7), config=str(ROOT / "configs/w8a16_rtn.yaml"), out=str(out), workers=2)
    shutil.rmtree(out, ignore_errors=True)
    m1 = ensure_model(work, "tinyllama-1.1b", "tinyllama-1.1b")
    calib = calib_npy(work, 16, 256, 32000)
    out1 = work / "out-1b"
    shutil.rmtree(out1, ignore_errors=True)
    r1 = run_child(model=str(m1), config=str(ROOT / "configs/w8a8_smoothquant_kv_int8.yaml"), out=str(out1),
                   workers=2, calib=str(calib), num_samples=16, seq_len=256, batch=4)
    shutil.rmtree(out1, ignore_errors=True)
    data = {"7b": {"model_gb": model_bytes(m7) / 1e9, "cp_seconds": cp_s, **r},
            "1b": {"model_gb": model_bytes(m1) / 1e9, **r1}}
    md = (
        "| run | model size | worker peak RSS (GB) | driver peak RSS (GB) | wall (s) | `cp -r` (s) | wall / cp |\n"
        "|---|---:|---|---:|---:|---:|---:|\n"
        f"| Llama-2-7B shape, W8A16 RTN, 2 workers | {data['7b']['model_gb']:.1f} GB | "
        f"{', '.join(f'{x / 1024:.2f}' for x in r['worker_peak_rss_mb'])} | {r['driver_peak_rss_mb'] / 1024:.2f} | "
        f"{r['seconds']:.0f} | {cp_s:.0f} | {r['seconds'] / cp_s:.2f} |\n"
        f"| TinyLlama-1.1B shape, W8A8 SQ + KV int8, 2 workers, 16×256 | {data['1b']['model_gb']:.1f} GB | "
        f"{', '.join(f'{x / 1024:.2f}' for x in r1['worker_peak_rss_mb'])} | {r1['driver_peak_rss_mb'] / 1024:.2f} | "
        f"{r1['seconds']:.0f} | | |\n"
    )
    save("memory", data, md)


def bench_speedup(work: Path, layers: int) -> None:
    m = ensure_model(work, f"tinyllama-{layers}l", "tinyllama-1.1b", layers=layers)
    calib = calib_npy(work, 16, 256, 32000)
    cfg = str(ROOT / "configs/w8a8_smoothquant_kv_int8.yaml")
    layouts = [("1 worker, 1 core", 1, 1, True), ("1 worker, 2 cores", 1, 1, False),
               ("2 stages", 2, 1, False), ("1 stage × 2 replicas", 1, 2, False)]
    res = {}
    for schedule in ("pipeline", "sequential"):
        for label, workers, replicas, one_core in layouts:
            out = work / "out-speed"
            shutil.rmtree(out, ignore_errors=True)
            key = f"{schedule}, {label}"
            res[key] = run_child(model=str(m), config=cfg, out=str(out), workers=workers, replicas=replicas,
                                 calib=str(calib), num_samples=16, seq_len=256, batch=4, schedule=schedule,
                                 one_core=one_core)
            print(f"{key}: {res[key]['seconds']:.1f}s", flush=True)
    shutil.rmtree(work / "out-speed", ignore_errors=True)
    rows, speedups = [], {}
    for schedule in ("pipeline", "sequential"):
        one, free, stages, reps = (res[f"{schedule}, {x[0]}"]["seconds"] for x in layouts)
        speedups[schedule] = {"stages_vs_one_core": one / stages, "replicas_vs_one_core": one / reps,
                              "stages_vs_two_cores": free / stages, "replicas_vs_two_cores": free / reps}
        rows.append(f"| {schedule} | {one:.1f} | {free:.1f} | {stages:.1f} | {one / stages:.2f}× | "
                    f"{reps:.1f} | {one / reps:.2f}× |\n")
    md = (
        f"TinyLlama-1.1B dims with {layers} layers, W8A8 SmoothQuant + KV int8, 16 × 256 calibration tokens "
        "(4 micro-batches). Each Ray worker pins itself to one core (`dist_ptq/runtime/cpu_pin.py`); the "
        "one-worker baseline runs in the driver, on one core (as each worker does) and on both. Speed-ups "
        "are against one worker on one core.\n\n"
        "| schedule | 1 worker, 1 core (s) | 1 worker, 2 cores (s) | 2 stages (s) | speed-up | "
        "1 stage × 2 replicas (s) | speed-up |\n|---|---:|---:|---:|---:|---:|---:|\n" + "".join(rows)
    )
    save("speedup", {"layers": layers, "runs": res, "speedup": speedups}, md)


def bench_compute(work: Path) -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as each pinned worker has
    import mindspore as ms
    import numpy as np

    from dist_ptq.model.arch import spec_from_config
    from dist_ptq.model.forward import configure_mindspore, to_tensor
    from dist_ptq.model.layer_source import Rope
    from dist_ptq.model.synthetic import random_tensor
    from dist_ptq.runtime.layer_steps import observe_batch

    configure_mindspore(1)
    spec = spec_from_config(config_for("tinyllama-1.1b", layers=1))
    rng = np.random.default_rng(0)
    w = {k[len(spec.layer_prefix(0)):]: to_tensor(random_tensor(k, s, rng, 1)) for k, s in spec.layer_shapes(0).items()}
    b, s = 4, 256
    rope = Rope(spec, s)
    x = ms.Tensor(rng.standard_normal((b, s, spec.hidden_size)).astype(np.float32))
    observe_batch(w, spec, rope, x, 0)
    reps = 3
    t0 = time.time()
    for _ in range(reps):
        observe_batch(w, spec, rope, x, 0)
    fwd_s = (time.time() - t0) / reps
    tokens = b * s
    linear_params = sum(int(np.prod(v.shape)) for k, v in w.items() if k.endswith("proj.weight"))
    attn_flops = 4 * b * spec.num_heads * s * s * spec.head_dim
    flops = 2 * tokens * linear_params + attn_flops
    # the same matmul shapes, alone
    xs = {k: ms.Tensor(rng.standard_normal((tokens, v.shape[1])).astype(np.float32)) for k, v in w.items() if k.endswith("proj.weight")}
    for k, v in w.items():
        if k.endswith("proj.weight"):
            ms.ops.matmul(xs[k], v.T).asnumpy()
    t0 = time.time()
    for _ in range(reps):
        for k, v in w.items():
            if k.endswith("proj.weight"):
                ms.ops.matmul(xs[k], v.T).asnumpy()
    gemm_s = (time.time() - t0) / reps
    gemm_rate = 2 * tokens * linear_params / gemm_s
    achieved = flops / fwd_s
    data = {"tokens_per_s": tokens / fwd_s, "achieved_gflops": achieved / 1e9, "gemm_gflops": gemm_rate / 1e9,
            "ratio": achieved / gemm_rate}
    md = (
        "One TinyLlama-1.1B-shaped layer, calibration forward (with statistics taps) of 4 × 256 tokens, on one core.\n\n"
        "| calibration tokens/s | achieved GFLOP/s | float32 GEMM GFLOP/s (same shapes) | ratio |\n|---:|---:|---:|---:|\n"
        f"| {data['tokens_per_s']:.0f} | {data['achieved_gflops']:.1f} | {data['gemm_gflops']:.1f} | {data['ratio']:.2f} |\n"
    )
    save("compute", data, md)


def bench_scaling(work: Path) -> None:
    calib = calib_npy(work, 8, 128, 32000)
    rows = []
    for hidden in (1024, 2048):
        for layers in (2, 4, 8, 16):
            m = ensure_model(work, f"scale-h{hidden}-l{layers}", "tinyllama-1.1b", layers=layers, hidden=hidden)
            for cfg in ("w8a16_rtn", "w8a8_smoothquant_kv_int8"):
                out = work / "out-scale"
                shutil.rmtree(out, ignore_errors=True)
                r = run_child(model=str(m), config=str(ROOT / f"configs/{cfg}.yaml"), out=str(out), workers=1,
                              calib=str(calib), num_samples=8, seq_len=128, batch=4)
                rows.append({"hidden": hidden, "layers": layers, "config": cfg, "model_gb": model_bytes(m) / 1e9,
                             "seconds": r["seconds"], "peak_rss_gb": r["driver_peak_rss_mb"] / 1024})
                print(rows[-1], flush=True)
            shutil.rmtree(m)
    shutil.rmtree(work / "out-scale", ignore_errors=True)
    md = "One worker; W8A8 runs calibrate on 8 × 128 tokens.\n\n| hidden | layers | model GB | config | seconds | peak RSS GB |\n|---:|---:|---:|---|---:|---:|\n"
    md += "".join(f"| {r['hidden']} | {r['layers']} | {r['model_gb']:.2f} | {r['config']} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} |\n" for r in rows)
    save("scaling", {"rows": rows}, md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["memory", "speedup", "compute", "scaling"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/dptq-bench"))
    ap.add_argument("--layers", type=int, default=8, help="decoder layers for the speed-up model")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    {"memory": lambda: bench_memory(args.work), "speedup": lambda: bench_speedup(args.work, args.layers),
     "compute": lambda: bench_compute(args.work), "scaling": lambda: bench_scaling(args.work)}[args.what]()


if __name__ == "__main__":
    main()
