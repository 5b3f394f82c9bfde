"""Runner benchmarks: memory per worker, distance to the I/O and compute limits, parallel speed-up, scaling.

    python bench/runner_bench.py memory   --work /tmp/dptq-bench     # 7B-shaped W8A16 RTN, 2 workers, vs cp
    python bench/runner_bench.py speedup  --work /tmp/dptq-bench     # W8A8 SQ + KV int8, 1 vs 2 workers
    python bench/runner_bench.py compute  --work /tmp/dptq-bench     # calibration forward vs float32 GEMM rate
    python bench/runner_bench.py kernels                               # the forward's CPU formulations vs the plain ones
    python bench/runner_bench.py scaling  --work /tmp/dptq-bench     # time and memory vs layers and width
    python bench/runner_bench.py scaling  --hidden 2048 --configs w8a8_smoothquant_kv_int8   # calibrated only
    python bench/runner_bench.py moe      --work /tmp/dptq-bench     # Qwen3-30B-A3B (4 layers) and DeepSeek-V3
                                                                     # (1 dense + 1 MoE layer) shapes, W8A16 RTN vs cp
    python bench/runner_bench.py calibrated --work /tmp/dptq-bench --baseline 595a2fd
        # W8A8 SQ + KV int8, 2 workers, 16 x 256: 7B shape (memory, bytes read), 1.1B shape against the
        # code at --baseline (a git worktree, run in the same invocation)

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
extra = {k: a[k] for k in ("activation_memory", "hold_moe_bytes") if k in a}  # older code lacks them
rep = quantize(a["model"], a["config"], a["out"], calib=a.get("calib"), num_samples=a.get("num_samples", 16),
               seq_len=a.get("seq_len", 256), batch=a.get("batch", 4), workers=a["workers"], replicas=a.get("replicas", 1),
               schedule=a.get("schedule", "auto"), progress=False, threads=a.get("threads", 1), **extra)
t2 = time.time()
import dist_ptq
replicas = [r for s in rep["stages"] for r in s["replicas"]]
print("RESULT " + json.dumps({"seconds": t2 - t1, "ray_start_s": t1 - t0, "code": dist_ptq.__file__,
      "driver_peak_rss_mb": peak_rss_mb(),
      "worker_peak_rss_mb": [r["peak_rss_mb"] for r in replicas],
      "worker_bytes_read": [r.get("bytes_read") for r in replicas],
      "worker_io": [r.get("io") for r in replicas], "worker_activations": [r.get("activations") for r in replicas],
      "activation_memory_bytes": rep.get("activation_memory_bytes"), "layers": rep["layers"]}))
"""


def run_child(code: Path = ROOT, **kw) -> dict:
    """One quantization in a fresh process, importing dist_ptq from ``code`` (this tree, or a baseline
    worktree: PYTHONPATH wins over the editable install)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(code))
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kw)], capture_output=True, text=True, env=env, cwd=code)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            got = json.loads(line[7:])
            if not got["code"].startswith(str(code)):
                raise RuntimeError(f"benchmark child imported {got['code']}; expected dist_ptq from {code}")
            return got
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
    cp_s = copy_seconds(m7, work)
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


MOE_SHAPES = {"qwen3-30b-a3b": ("qwen3_30b_a3b_shaped_config", 4), "deepseek-v3": ("deepseek_v3_shaped_config", 2)}
# DeepSeek-V3 (28 GB for 2 layers) is copied file by file: the disk here cannot hold it twice


def copy_seconds(model: Path, work: Path, per_file: bool = False) -> float:
    """``cp -r`` of the model directory, synced: the I/O floor a data-free run is measured against.
    ``per_file``: ``cp`` one file at a time, each copy synced and deleted before the next (the same
    bytes read and written, for a model the disk cannot hold twice); the time is the sum."""
    copy = work / f"copy-{model.name}"
    shutil.rmtree(copy, ignore_errors=True)
    subprocess.run(["sync"])
    if not per_file:
        t0 = time.time()
        subprocess.run(["cp", "-r", str(model), str(copy)], check=True)
        subprocess.run(["sync"])
        secs = time.time() - t0
        shutil.rmtree(copy)
        return secs
    secs = 0.0
    for f in sorted(model.iterdir()):
        t0 = time.time()
        subprocess.run(["cp", str(f), str(copy)], check=True)
        subprocess.run(["sync"])
        secs += time.time() - t0
        copy.unlink()
    return secs


HELD_FITS = ("qwen3-30b-a3b",)  # MoE shapes whose layer a worker here can hold whole (DeepSeek-V3's: 22 GB)


def bench_moe(work: Path, shapes: list[str], calibrated: bool = False) -> None:
    """W8A16 RTN (data-free: one expert's linear read at a time) on MoE-shaped synthetic checkpoints,
    2 workers; each model is deleted after its run (the DeepSeek-V3 one is 25 GB). ``calibrated``: W8A8
    SmoothQuant + KV int8 on 16 × 256 tokens instead, its MoE layers streamed expert by expert, and where
    a layer fits a worker, held whole in the same invocation for comparison."""
    import dist_ptq.model.synthetic as synth

    path = RESULTS / "runner_moe.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    for shape in shapes:
        fn, layers = MOE_SHAPES[shape]
        d = work / f"{shape}-{layers}l"
        if not (d / "config.json").is_file():
            t0 = time.time()
            synth.write_random_model(d, getattr(synth, fn)(layers=layers), seed=0, dtype="BF16", shard_bytes=2 << 30)
            print(f"generated {d} in {time.time() - t0:.0f}s", flush=True)
        cp_s = copy_seconds(d, work, per_file=shape == "deepseek-v3")
        out = work / f"out-{shape}"
        shutil.rmtree(out, ignore_errors=True)
        recipe = "w8a8_smoothquant_kv_int8" if calibrated else "w8a16_rtn"
        calib = dict(calib=str(calib_npy(work, 16, 256, 32000)), num_samples=16, seq_len=256, batch=4) if calibrated else {}
        # calibrated: streamed expert by expert (the default), and side by side held whole where a layer fits
        modes = [("", {})] + ([(" held", {"hold_moe_bytes": 1 << 40})] if calibrated and shape in HELD_FITS else [])
        for suffix, extra in modes:
            r = run_child(model=str(d), config=str(ROOT / f"configs/{recipe}.yaml"), out=str(out), workers=2, **calib, **extra)
            shutil.rmtree(out, ignore_errors=True)
            data[shape + (" calibrated" if calibrated else "") + suffix] = {
                **r, "decoder_layers": layers, "model_gb": model_bytes(d) / 1e9, "cp_seconds": cp_s, "recipe": recipe,
                "streamed": calibrated and not extra, "commit": head_commit()}
        shutil.rmtree(d)
    md = ("| model (synthetic, bf16) | size | worker peak RSS (GB) | driver peak RSS (GB) | wall (s) | `cp -r` (s) | wall / cp |\n"
          "|---|---:|---|---:|---:|---:|---:|\n")
    names = {"w8a16_rtn": "W8A16 RTN", "w8a8_smoothquant_kv_int8": "W8A8 SmoothQuant + KV int8 on 16 × 256 tokens"}
    for key, r in data.items():
        shape = key.split(" ")[0]
        how = (", experts streamed" if r.get("streamed") else ", MoE layer held whole") if " calibrated" in key else ""
        md += (f"| {shape} shape, {r['decoder_layers']} layers, {names[r.get('recipe', 'w8a16_rtn')]}{how}, 2 workers | "
               f"{r['model_gb']:.1f} GB | "
               f"{', '.join(f'{x / 1024:.2f}' for x in r['worker_peak_rss_mb'])} | {r['driver_peak_rss_mb'] / 1024:.2f} | "
               f"{r['seconds']:.0f} | {r['cp_seconds']:.0f} | "
               f"{'' if ' calibrated' in key else format(r['seconds'] / r['cp_seconds'], '.2f')} |\n")
    save("moe", data, md)


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
    from dist_ptq.model.forward import configure_mindspore, matmul_t, to_tensor
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
    # the same matmul shapes, alone: with the forward's kernel (matmul_t) and with numpy's BLAS
    xs = {k: rng.standard_normal((tokens, v.shape[1])).astype(np.float32) for k, v in w.items() if k.endswith("proj.weight")}
    ws = {k: v for k, v in w.items() if k in xs}

    def gemm_seconds(run) -> float:
        run()
        t0 = time.time()
        for _ in range(reps):
            run()
        return (time.time() - t0) / reps

    xt = {k: ms.Tensor(x) for k, x in xs.items()}
    wn = {k: v.asnumpy() for k, v in ws.items()}
    ms_s = gemm_seconds(lambda: [matmul_t(xt[k], v).asnumpy() for k, v in ws.items()])
    np_s = gemm_seconds(lambda: [xs[k] @ wn[k].T for k in xs])
    linear_flops = 2 * tokens * linear_params
    achieved = flops / fwd_s
    data = {"tokens_per_s": tokens / fwd_s, "achieved_gflops": achieved / 1e9, "gemm_gflops": linear_flops / ms_s / 1e9,
            "numpy_gemm_gflops": linear_flops / np_s / 1e9, "ratio": achieved / (linear_flops / ms_s)}
    md = (
        "One TinyLlama-1.1B-shaped layer, calibration forward (with statistics taps) of 4 × 256 tokens, on one core. "
        "GEMM: the layer's linear shapes alone, with the forward's kernel (`matmul_t`: MindSpore MatMul, transpose in "
        "the kernel) and with numpy's BLAS; ratio = achieved ÷ the MindSpore GEMM rate.\n\n"
        "| calibration tokens/s | achieved GFLOP/s | float32 GEMM GFLOP/s, MindSpore (same shapes) | numpy GEMM GFLOP/s | ratio |\n"
        "|---:|---:|---:|---:|---:|\n"
        f"| {data['tokens_per_s']:.0f} | {data['achieved_gflops']:.1f} | {data['gemm_gflops']:.1f} | "
        f"{data['numpy_gemm_gflops']:.1f} | {data['ratio']:.2f} |\n"
    )
    save("compute", data, md)


def bench_kernels() -> None:
    """Each CPU formulation ``model/forward.py`` uses against the plain MindSpore call it replaced, on
    TinyLlama-1.1B shapes (4 × 256 tokens), one core: time of each, side by side, and whether the two
    give the same bits (they must: output bytes may not change)."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import mindspore as ms
    import numpy as np
    from mindspore import ops

    from dist_ptq.model.forward import configure_mindspore, expanded, matmul_t, permuted, scores_matmul

    configure_mindspore(1)
    rng = np.random.default_rng(0)
    t = lambda *shape: ms.Tensor(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    b, s, nh, d, hid, inter = 4, 256, 32, 64, 2048, 5632
    x, w_up, w_down, h = t(b * s, hid), t(inter, hid), t(hid, inter), t(b * s, inter)
    q, k = t(b, s, nh, d), t(b, nh, s, d)
    cos, mask, sc = t(s, d), t(s, s), t(b, nh, s, s)
    cases = [
        ("linear 1024×2048 → 5632", lambda: ops.matmul(x, w_up.T), lambda: matmul_t(x, w_up)),
        ("linear 1024×5632 → 2048", lambda: ops.matmul(h, w_down.T), lambda: matmul_t(h, w_down)),
        ("attention scores q kᵀ (4, 32, 256, 64)", lambda: ops.matmul(k, k.transpose(0, 1, 3, 2)),
         lambda: scores_matmul(k, k)),
        ("transpose (4, 256, 32, 64) → (4, 32, 256, 64), then × cos", lambda: ops.transpose(q, (0, 2, 1, 3)) * cos,
         lambda: (lambda p: p * expanded(cos, p.shape))(permuted(q, (0, 2, 1, 3)))),
        ("scores + causal mask (broadcast)", lambda: sc + mask, lambda: sc + expanded(mask, sc.shape)),
    ]
    rows = []
    for name, plain, ours in cases:
        same = bool(np.array_equal(plain().asnumpy(), ours().asnumpy()))
        times = []
        for fn in (plain, ours):
            fn().asnumpy()
            t0 = time.perf_counter()
            for _ in range(5):
                y = fn()
            y.asnumpy()
            times.append((time.perf_counter() - t0) / 5)
        rows.append({"case": name, "plain_ms": times[0] * 1e3, "ours_ms": times[1] * 1e3,
                     "speedup": times[0] / times[1], "same_bits": same})
    md = ("MindSpore 2.10 CPU, one core, TinyLlama-1.1B shapes (4 × 256 tokens): each formulation of "
          "`model/forward.py` against the plain call it replaced, timed side by side (mean of 5).\n\n"
          "| operation | plain (ms) | forward.py (ms) | speed-up | same bits |\n|---|---:|---:|---:|---|\n"
          + "".join(f"| {r['case']} | {r['plain_ms']:.1f} | {r['ours_ms']:.1f} | {r['speedup']:.1f}× | "
                    f"{'yes' if r['same_bits'] else 'NO'} |\n" for r in rows))
    save("kernels", {"rows": rows}, md)


def bench_scaling(work: Path, hiddens: list[int], configs: list[str]) -> None:
    """Time and peak RSS against layers; a filtered run (one width or recipe) saves as scaling_<filter>."""
    calib = calib_npy(work, 8, 128, 32000)
    rows = []
    for hidden in hiddens:
        for layers in (2, 4, 8, 16):
            m = ensure_model(work, f"scale-h{hidden}-l{layers}", "tinyllama-1.1b", layers=layers, hidden=hidden)
            for cfg in configs:
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
    full = hiddens == [1024, 2048] and configs == list(SCALING_CONFIGS)
    save("scaling" if full else "scaling_" + "_".join([*map(str, hiddens), *configs]), {"rows": rows}, md)


SCALING_CONFIGS = ("w8a16_rtn", "w8a8_smoothquant_kv_int8")


def baseline_tree(rev: str) -> Path:
    """A git worktree of this repository at ``rev`` (created once), whose dist_ptq a child can import."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    tree = Path("/tmp") / f"dptq-baseline-{sha}"
    if not (tree / "dist_ptq").is_dir():
        subprocess.run(["git", "worktree", "add", "-f", "--detach", str(tree), sha], cwd=ROOT, check=True, capture_output=True)
    return tree


def _bytes_read_row(r: dict, model_b: int) -> tuple[float, float, float]:
    """(reader bytes, rchar, storage read_bytes) summed over the workers, each ÷ the model's bytes."""
    reader = sum(x or 0 for x in r["worker_bytes_read"]) / model_b
    rchar = sum((x or {}).get("rchar", 0) for x in r["worker_io"]) / model_b
    storage = sum((x or {}).get("read_bytes", 0) for x in r["worker_io"]) / model_b
    return reader, rchar, storage


def head_commit(code: Path = ROOT) -> str:
    """The commit the code was at, '+' when its tracked files had changes: which code a figure is from."""
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "dist_ptq"], cwd=code).returncode != 0
    return rev + ("+" if dirty else "")


def bench_calibrated(work: Path, baseline: str | None, layers7b: int | None = None, shapes: tuple[str, ...] = ("7b", "1.1b"),
                     batch: int = 4) -> None:
    """The issue-15 figures: W8A8 SmoothQuant + KV int8, 2 workers, 16 × 256 calibration tokens.
    ``layers7b``: the 7B shape with fewer layers (peak memory is per layer; bytes read scale with them).
    ``batch``: samples per micro-batch (4: four micro-batches); a run with another batch is recorded
    beside the others, not over them."""
    cfg = str(ROOT / "configs/w8a8_smoothquant_kv_int8.yaml")
    calib = calib_npy(work, 16, 256, 32000)
    common = dict(config=cfg, workers=2, calib=str(calib), num_samples=16, seq_len=256, batch=batch)
    tag = "" if batch == 4 else f" batch {batch}"
    runs = {}
    out = work / "out-calibrated"
    sizes = {}
    if "7b" in shapes:  # generated only when run: the full-depth model is 13.5 GB
        m7 = ensure_model(work, f"llama2-7b-{layers7b}l" if layers7b else "llama2-7b", "llama2-7b", layers=layers7b)
        sizes["7b"] = model_bytes(m7)
        shutil.rmtree(out, ignore_errors=True)
        key = ("7b layer-major" if layers7b else "7b full-depth layer-major") + tag  # full depth beside the short runs
        depth = layers7b or json.loads((m7 / "config.json").read_text())["num_hidden_layers"]
        runs[key] = {**run_child(model=str(m7), out=str(out), **common), "commit": head_commit(),
                     "batch": batch, "model_bytes": model_bytes(m7), "layers7b": depth}
        print(f"7b: {runs[key]['seconds']:.1f}s", flush=True)
    m1 = ensure_model(work, "tinyllama-1.1b", "tinyllama-1.1b") if "1.1b" in shapes else None
    if m1 is not None:
        sizes["1.1b"] = model_bytes(m1)
    trees = [("layer-major", ROOT)] + ([(f"baseline {baseline}", baseline_tree(baseline))] if baseline else [])
    for label, code in trees if "1.1b" in shapes else []:  # side by side, one after the other, same inputs
        shutil.rmtree(out, ignore_errors=True)
        runs[f"1.1b {label}{tag}"] = {**run_child(code=code, model=str(m1), out=str(out), **common),
                                      "commit": head_commit(code), "batch": batch, "model_bytes": model_bytes(m1)}
        print(f"1.1b {label}: {runs[f'1.1b {label}{tag}']['seconds']:.1f}s", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    recorded = RESULTS / "runner_calibrated.json"
    if (set(shapes) != {"7b", "1.1b"} or tag) and recorded.exists():  # a partial run keeps the other records
        saved = json.loads(recorded.read_text())
        runs, sizes = {**saved["runs"], **runs}, {**saved.get("model_bytes", {}), **sizes}
    ratio = None
    if baseline and "1.1b" in shapes:
        ratio = runs["1.1b layer-major" + tag]["seconds"] / runs[f"1.1b baseline {baseline}{tag}"]["seconds"]
    data = {"model_bytes": sizes, "layers7b": layers7b, "runs": runs,
            "wall_ratio_vs_baseline": ratio, "baseline": baseline}
    save("calibrated", data, render_calibrated(data))


def rerender_calibrated() -> None:
    data = json.loads((RESULTS / "runner_calibrated.json").read_text())
    save("calibrated", data, render_calibrated(data))


def render_calibrated(data: dict) -> str:
    """The Markdown of runner_calibrated.json: each run with the model it ran on (a record from an
    earlier invocation keeps its own size and depth)."""
    rows = []
    for key, r in data["runs"].items():
        shape = key.split()[0]
        depth = r.get("layers7b", data.get("layers7b")) if shape == "7b" else None
        label = f"{shape} ({depth} layers)" if depth else shape
        size = r.get("model_bytes", data["model_bytes"][shape])
        reader, rchar, storage = _bytes_read_row(r, size)
        rss = ", ".join(f"{x / 1024:.2f}" for x in r["worker_peak_rss_mb"])
        rows.append(f"| {label} | {key.split(' ', 1)[1]} ({r.get('commit', '?')}) | {r.get('batch', 4)} | {size / 1e9:.1f} GB | {rss} | "
                    f"{r['driver_peak_rss_mb'] / 1024:.2f} | {r['seconds']:.0f} | {reader:.3f} | {rchar:.3f} | {storage:.3f} |\n")
    md = ("W8A8 SmoothQuant + KV int8, 2 workers (2 pipeline stages, one core each), 16 × 256 calibration "
          "tokens in micro-batches of `batch` samples. Bytes read ÷ model size, summed over the workers: by the checkpoint "
          "reader (tensor bytes), and from `/proc/self/io` (`rchar`: every read call, libraries included; "
          "`read_bytes`: what reached the disk, less what the page cache served).\n\n"
          "| shape | code | batch | model | worker peak RSS (GB) | driver peak RSS (GB) | wall (s) | reader bytes ÷ model | "
          "rchar ÷ model | disk read_bytes ÷ model |\n|---|---|---:|---:|---|---:|---:|---:|---:|---:|\n" + "".join(rows))
    if data.get("wall_ratio_vs_baseline") is not None:
        md += f"\n1.1B wall time, layer-major ÷ baseline {data['baseline']} (same invocation): {data['wall_ratio_vs_baseline']:.2f}\n"
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["memory", "speedup", "compute", "kernels", "scaling", "calibrated", "moe"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/dptq-bench"))
    ap.add_argument("--layers", type=int, default=8, help="decoder layers for the speed-up model")
    ap.add_argument("--hidden", type=int, action="append", help="scaling: widths to run (default 1024 and 2048)")
    ap.add_argument("--configs", nargs="+", default=list(SCALING_CONFIGS), help="scaling: recipes to run")
    ap.add_argument("--baseline", default=None, help="calibrated: also run the 1.1B case with the code at this git revision")
    ap.add_argument("--layers7b", type=int, default=None, help="calibrated: decoder layers of the 7B-shaped model (default 32)")
    ap.add_argument("--shapes", nargs="+", choices=["7b", "1.1b"], default=["7b", "1.1b"],
                    help="calibrated: which shapes to run; the other keeps its recorded figures")
    ap.add_argument("--batch", type=int, default=4, help="calibrated: samples per micro-batch (16 samples in all)")
    ap.add_argument("--render", action="store_true", help="calibrated: print the table of the recorded figures again")
    ap.add_argument("--moe-shapes", nargs="+", choices=list(MOE_SHAPES), default=list(MOE_SHAPES),
                    help="moe: which shapes to run; the others keep their recorded figures")
    ap.add_argument("--calibrated", action="store_true",
                    help="moe: W8A8 SmoothQuant + KV int8 on 16 x 256 tokens instead of data-free W8A16 RTN")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    {"memory": lambda: bench_memory(args.work), "speedup": lambda: bench_speedup(args.work, args.layers),
     "compute": lambda: bench_compute(args.work), "kernels": bench_kernels,
     "scaling": lambda: bench_scaling(args.work, args.hidden or [1024, 2048], args.configs),
     "calibrated": lambda: rerender_calibrated() if args.render else
                           bench_calibrated(args.work, args.baseline, args.layers7b, tuple(args.shapes), args.batch),
     "moe": lambda: bench_moe(args.work, args.moe_shapes, args.calibrated)}[args.what]()


if __name__ == "__main__":
    main()
