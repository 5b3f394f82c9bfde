"""dist_ptq side by side with LLM Compressor on the bundled model: perplexity, wall time and peak RSS.

    python bench/vs_llmcompressor.py [--out bench/results/vs_llmcompressor.md]
    python bench/vs_llmcompressor.py --models bundled "harder variant" --recipes w4a16_rtn_g128 w4a16_gptq_g128
    python bench/vs_llmcompressor.py --recipes w4a16_rtn_per_channel w4a16_gptq_per_channel --cross-check ''
    python bench/vs_llmcompressor.py --recipes kv_int8 w8a8_smoothquant_kv_int8 --cross-check ''
    python bench/vs_llmcompressor.py --recipes w4a16_awq_g128 --cross-check ''
    python bench/vs_llmcompressor.py --render bench/results/vs_llmcompressor.json   # the tables again from saved figures

A run merges into the JSON beside ``--out`` when one is there: the figures it measured (per model: the
float perplexities, each recipe's row and grid row, the cross-check) replace the saved ones, everything
else (other recipes, other models, the note) is kept; the saved run must have the same settings
(samples, seq-len, tokens, threads) and package versions. ``--replace`` writes only this run's figures.

Needs a second virtual environment with torch (CPU build), transformers and llmcompressor, by default
``.venv-bench`` beside ``.venv`` (``--bench-python`` names another interpreter); without it the script
says how to make it and exits 2. The two tools never share a process: dist_ptq's pinned numpy 1.26 and
MindSpore stay in this one, LLM Compressor runs in ``bench/llmcompressor_side.py`` under the bench venv.

What it does, per model (the bundled one and its function-preserving outlier variants, as
``bench/accuracy.py``):

* Tokens: calibration = dist_ptq's own windows of calib.txt (``--num-samples`` × ``--seq-len``, the
  batches ``dist-ptq quantize --calib`` builds); evaluation = the first ``--max-tokens`` tokens of
  valid.txt in windows of ``--seq-len``, as ``dist-ptq eval``. Both go to both tools as the same
  token ids (.npy), so LLM Compressor calibrates and scores on exactly dist_ptq's samples.
* Float perplexity both ways (dist_ptq's reference inference; transformers' LlamaForCausalLM in float32).
* Each recipe quantized by each tool in a child process of its own, one after the other, the same
  thread count (``--threads``), timing the quantize call (model read, calibration, quantization,
  writing the output directory) and reading the child's peak RSS (VmHWM). dist_ptq's output is scored
  by ``dist-ptq eval``'s reference quantized inference, LLM Compressor's fake-quantized model in torch.
* A cross-check of the two evaluators on one recipe (``--cross-check``): dist_ptq's output with
  ``backend: none`` (dequantized float weights) scored in torch, and LLM Compressor's fake-quantized
  weights written as a float checkpoint scored by dist_ptq.
* KV cache int8 (``kv_int8``, ``w8a8_smoothquant_kv_int8``): dist_ptq's static per-channel C8 against
  LLM Compressor's ``kv_cache_scheme`` (static symmetric int8, one scale per KV head), each scored with its
  KV quantization in the forward; the LLM Compressor side reports whether its ``QuantizedKVCache`` acted in
  the evaluation (``kv_check``), and a row where it did not is shown as not comparable.
* The int4 grid alone (unless ``--no-grid-check``): dist_ptq's W4A16 recipes again with int4 scale
  absmax/7.5, compressed-tensors' grid, patched into the child process (``patch_int4_grid``), to tell
  the grid from the GPTQ solver (issue 17).

Prints the tables and writes them (Markdown) and every figure (JSON) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIDE = ROOT / "bench" / "llmcompressor_side.py"
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
RECIPES = ["w4a16_rtn_g128", "w4a16_gptq_g128", "w4a16_gptq_actorder_g128", "w4a16_awq_g128", "w4a16_rtn_per_channel",
           "w4a16_gptq_per_channel", "w8a8_smoothquant", "w8a8_smoothquant_gptq", "kv_int8",
           "w8a8_smoothquant_kv_int8"]
MODELS = ("bundled", "outlier variant", "harder variant")
# the baseline each recovery recipe's "gap recovered" is measured against (on each tool's own figures)
BASELINE = {"w4a16_gptq_g128": "w4a16_rtn_g128", "w4a16_gptq_actorder_g128": "w4a16_rtn_g128",
            "w4a16_awq_g128": "w4a16_rtn_g128",
            "w4a16_gptq_per_channel": "w4a16_rtn_per_channel", "w8a8_smoothquant_gptq": "w8a8_smoothquant"}
DIFFERENCES = """\
## What differs between the two tools (settings and defaults)

Matched on purpose: the same token ids for calibration and evaluation; symmetric int4 in groups of 128
(`*_g128`, LLM Compressor's `W4A16` preset) or per output channel (`*_per_channel`, that preset's weights
with `strategy="channel"`), block size 128, damping 0.01 × mean(diag H) on both sides; act-order off
(`w4a16_gptq_g128` and `w4a16_gptq_per_channel`, LLM Compressor `actorder=None`) and on
(`w4a16_gptq_actorder_g128`, `actorder="static"`: columns by descending diag(H), group scales from the
original weight, as dist_ptq's `desc_act + static_groups`); `lm_head` left float; both calibrate layer by
layer on the outputs of the already quantized layers (LLM Compressor's sequential pipeline with
`propagate_error`); one thread per quantizing process, each pinned to one core.

Left as each tool does it:

* **Int4 grid.** dist_ptq: scale = absmax/7 (SPEC §3), so RTN uses the 15 levels −7…7. compressed-tensors:
  scale = absmax/((qmax − qmin)/2) = absmax/7.5, clamped to [−8, 7], so all 16 levels are used, the step
  is 7% finer and a group's positive extreme is clipped from 7.5 to 7 steps. Int8 likewise: absmax/127 on
  [−127, 127] against absmax/127.5 on [−128, 127]. The "int4 grid alone" table reruns dist_ptq on that grid.
* **Group scales without act-order** (g128 only: per channel, both take each row's scale from the
  original weight up front). dist_ptq (`static_groups: false`) takes a group's scale from the weights as
  the sweep reaches it (earlier columns' updates applied); LLM Compressor 0.14 always takes them up front
  from the original weights (its weight observer), with or without act-order.
* **Hessian.** dist_ptq: float64 sums of xᵀx over tokens, divided by the token count; LLM Compressor:
  float32 sums of 2·xᵀx divided by the number of sequences (the scale cancels against the relative damping).
  A Hessian that will not factor: dist_ptq raises the damping ×10 (up to 6 times), LLM Compressor falls back
  to RTN for that linear.
* **W4A16 AWQ** (`w4a16_awq_g128`; LLM Compressor `AWQModifier(duo_scaling=True, n_grid=20)`, its default Llama
  mappings, then `QuantizationModifier` with the `W4A16` preset: symmetric int4, groups of 128, min/max RTN).
  Alike: x_mean = mean |X| per input channel, w_mean = mean of |W| / its group's max, s = x_mean^α /
  (w_mean^(1−α) + 1e-4) normalized by √(max s · min s), and s = 1 (plain RTN) among the candidates. Grid: dist_ptq
  α = 0, 0.05, …, 0.95; LLM Compressor α = 0, 1/18, …, 1. Loss: dist_ptq the output error of the linears
  reading the input, ‖X Wᵀ − X (Q(W·s)/s)ᵀ‖²; LLM Compressor the MSE of the parent module's output (self_attn
  for q/k/v, mlp for gate/up, down_proj itself for down_proj). o_proj: with GQA (2 KV heads, 4 query heads) v_proj's rows are
  not o_proj's inputs, so LLM Compressor skips the v_proj → o_proj mapping (o_proj plain RTN); dist_ptq smooths
  o_proj's input anyway, storing `smooth_scale` = 1/s. Clipping: dist_ptq then searches a clip ratio per row and
  group (1.0, 0.95, …, 0.75, by output error, as llm-awq's `auto_clip`); LLM Compressor 0.14's `AWQModifier` has
  no clip search. Its pinning of cached inputs fails on a CPU-only torch; the bench skips it (no value changes).
* **Defaults a user would get.** LLM Compressor's `GPTQModifier` defaults to `actorder="static"`; its `W8A8`
  preset is per-token dynamic int8 activations. Neither is used here: the recipes mirror dist_ptq's configs.
* **W8A8 SmoothQuant.** Both α = 0.5, per-channel int8 weights, per-tensor static asymmetric int8
  activations. LLM Compressor smooths only the inputs a norm feeds (q/k/v ← input_layernorm, gate/up ←
  post_attention_layernorm, its default Llama mappings); dist_ptq also smooths the o_proj and down_proj
  inputs (storing `smooth_scale`). LLM Compressor's weight term is 2·max|W| (a constant factor that cancels
  under per-channel weight and per-tensor activation scales). The activation observer here is
  `static_minmax` (min/max over all calibration batches, as dist_ptq); LLM Compressor's default `minmax`
  is a moving average over batches.
* **KV cache int8** (`kv_int8`: weights and activations float; `w8a8_smoothquant_kv_int8`: the W8A8
  SmoothQuant recipe above plus the cache). Both static and symmetric, K taken after RoPE, V as projected,
  scales from min/max over the whole calibration set (LLM Compressor: `observer="static_minmax"`, its default
  `minmax` averages over batches). Granularity: dist_ptq one scale per cache channel (kv_heads·head_dim,
  `k_scale` / `v_scale` of that length); compressed-tensors 0.19 takes only `tensor` or `attn_head` for K/V
  (`channel` is refused for attention states), so LLM Compressor runs `attn_head`, one scale per KV head
  (k_scale (kv_heads, 1, 1)). Grid: absmax/127 on [−127, 127] against absmax/127.5 on [−128, 127].
  Scoring: dist_ptq's reference inference rounds K and V through its int8 grid before the attention;
  LLM Compressor's `QuantizedKVCache` (a hook that replaces `past_key_values` in every attention call)
  fake-quantizes them at `cache.update`, i.e. at the same point, in the torch forward of the oneshot model.
* **Timing scope.** Both quantize calls include reading the model and writing the result (dist_ptq's deploy
  directory; LLM Compressor's compressed-tensors checkpoint); imports (MindSpore / torch + transformers +
  llmcompressor) are only in "to output". On a model this small fixed costs dominate: the ratios say little
  about 7B–70B, where the per-layer work is what counts.
"""
INSTALL = "python3.11 -m venv .venv-bench && .venv-bench/bin/pip install -r bench/requirements-vs-llmcompressor.txt"


def main() -> int:
    if sys.argv[1:2] == ["--dist-ptq-child"]:
        return dist_ptq_child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    ap.add_argument("--recipes", nargs="*", default=RECIPES, choices=RECIPES)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of each quantizing process (both tools)")
    ap.add_argument("--cross-check", default="w4a16_gptq_g128",
                    help="weight-only recipe scored in both evaluators on the first model ('' for none)")
    ap.add_argument("--no-grid-check", dest="grid_check", action="store_false",
                    help="skip re-running dist_ptq's int4 recipes with compressed-tensors' int4 grid (absmax/7.5)")
    ap.add_argument("--bench-python", type=Path, default=BENCH_PYTHON,
                    help="the interpreter of the venv holding torch, transformers and llmcompressor")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vs_llmcompressor.md")
    ap.add_argument("--note", default="", help="a paragraph for the Markdown (e.g. how busy the machine was); kept in the JSON")
    ap.add_argument("--render", type=Path, help="print and write the tables of a saved JSON instead of measuring")
    ap.add_argument("--replace", action="store_true",
                    help="write only this run's figures instead of merging them into the JSON beside --out")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text())
        if args.note:
            saved["note"] = args.note
        write(saved, args.out)
        return 0

    previous = None
    if not args.replace and args.out.with_suffix(".json").is_file():
        previous = json.loads(args.out.with_suffix(".json").read_text())
        if previous.get("note") and args.note:
            previous["note"] = ""  # --note replaces the saved one
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        versions = bench_versions(args.bench_python, tmp)
        if versions is None:
            return 2
        if previous is not None:  # refuse before measuring if the saved figures cannot take this run's
            mismatch(previous, vars(args), {**versions, "dist_ptq": dist_ptq_version()})
        saved = measure(args, tmp, versions)
    if previous is not None:
        saved = merge(previous, saved)
    write(saved, args.out)
    return 0


SETTINGS = ("num_samples", "seq_len", "max_tokens", "threads")


def dist_ptq_version() -> str:
    from dist_ptq.version import __version__

    return __version__


def mismatch(previous: dict, settings: dict, versions: dict) -> None:
    """Exit (2) when the saved run's settings or package versions differ from this run's."""
    diff = [f"{k}: saved {previous.get(k)!r}, now {settings[k]!r}" for k in SETTINGS if previous.get(k) != settings[k]]
    diff += [f"{k}: saved {previous['versions'].get(k)!r}, now {v!r}" for k, v in versions.items()
             if previous["versions"].get(k) != v]
    if diff:
        raise SystemExit("vs_llmcompressor: the saved JSON beside --out was measured differently ("
                         + "; ".join(diff) + "); pass --replace to overwrite it or --out elsewhere")


def merge(previous: dict, new: dict) -> dict:
    """The saved figures with this run's in place of theirs: per model its float perplexities, each rerun
    recipe's row and grid row, and the cross-check if one ran; other recipes, models and the note kept."""
    out = {**previous, "cpus": new["cpus"], "note": new["note"] or previous.get("note", "")}
    results = {lab: dict(r) for lab, r in previous["results"].items()}
    for lab, r in new["results"].items():
        old = results.setdefault(lab, {})
        old["tokens"], old["float"] = r["tokens"], r["float"]
        old["rows"] = {**old.get("rows", {}), **r["rows"]}
        if "grid_7.5" in r:
            old["grid_7.5"] = {**old.get("grid_7.5", {}), **r["grid_7.5"]}
        if "cross_check" in r:
            old["cross_check"] = r["cross_check"]
    out["results"] = {lab: results[lab] for lab in MODELS if lab in results}
    done = set(previous["recipes"]) | set(new["recipes"])
    out["recipes"] = [r for r in RECIPES if r in done] + sorted(done - set(RECIPES))
    return out


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def pin_to(threads: int):
    """A preexec_fn pinning the child to ``threads`` cores: the thread settings of both tools leave helper
    threads (MindSpore's CPU runtime, torch's interop pool) that would otherwise run on a second core."""
    cores = sorted(os.sched_getaffinity(0))[:max(1, threads)]
    return lambda: os.sched_setaffinity(0, cores)


def run_child(cmd: list, threads: int, log: Path) -> float:
    """Run one child process to completion, on ``threads`` cores; its output goes to ``log``; returns its
    wall time (s)."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.call([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, env=child_env(threads),
                             preexec_fn=pin_to(threads))
    secs = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"child failed (exit {rc}): {' '.join(map(str, cmd))}\n{tail}")
    return secs


def bench_versions(python: Path, tmp: Path) -> dict | None:
    """Versions of the bench venv's packages, or None (with the install command printed) when it is missing."""
    ok = python.is_file()
    if ok:
        try:
            run_child([python, SIDE, "versions", "--json", tmp / "versions.json"], 1, tmp / "versions.log")
        except SystemExit:
            ok = False
    if not ok:
        print(f"vs_llmcompressor: no LLM Compressor venv at {python} (torch, transformers and llmcompressor are not\n"
              f"importable there). Make it from the repository root with:\n\n    {INSTALL}\n\n"
              "(torch==2.13.0 must be a CPU build: on a machine whose pip would fetch a CUDA build, install torch\n"
              "from PyTorch's CPU wheel index first), or pass --bench-python PATH to another interpreter.",
              file=sys.stderr)
        return None
    return json.loads((tmp / "versions.json").read_text())


def token_arrays(model_dir: Path, num_samples: int, seq_len: int, max_tokens: int, tmp: Path) -> tuple[Path, Path]:
    """calib.npy as ``dist-ptq quantize --calib calib.txt`` cuts it; eval.npy as ``dist-ptq eval`` does."""
    import numpy as np

    from dist_ptq.calib.data import make_samples, token_ids
    from dist_ptq.model.arch import load_spec

    vocab = load_spec(model_dir).vocab_size
    calib = make_samples(token_ids(model_dir / "calib.txt", model_dir, vocab), num_samples, seq_len, "calib.txt")
    ids = token_ids(model_dir / "valid.txt", model_dir, vocab)[:max_tokens]
    evals = make_samples(ids, None, seq_len, "valid.txt")
    np.save(tmp / "calib.npy", calib)
    np.save(tmp / "eval.npy", evals)
    return tmp / "calib.npy", tmp / "eval.npy"


def dist_ptq_config(name: str, tmp: Path, backend_none: bool = False) -> Path:
    src = ROOT / "configs" / f"{name}.yaml"
    if not backend_none:
        return src
    import yaml

    cfg = yaml.safe_load(src.read_text())
    cfg["backend"] = "none"
    out = tmp / f"{name}_backend_none.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def run_dist_ptq(model: Path, config: Path, out: Path, calib: Path, args, tmp: Path, grid: str = "7") -> dict:
    res = tmp / f"{out.name}.json"
    wall = run_child([sys.executable, Path(__file__), "--dist-ptq-child", model, config, out, calib,
                      args.num_samples, args.seq_len, args.threads, grid, res], args.threads, tmp / f"{out.name}.log")
    return {**json.loads(res.read_text()), "process_s": wall}


def run_llmc(model: Path, recipe: str, out: Path, calib: Path, evals: Path, args, tmp: Path,
             export_float: Path | None = None) -> dict:
    res = tmp / f"{out.name}.json"
    cmd = [args.bench_python, SIDE, "quantize", model, "--recipe", recipe, "--calib", calib, "--eval", evals,
           "--threads", args.threads, "--save", out, "--json", res]
    if export_float:
        cmd += ["--export-float", export_float]
    wall = run_child(cmd, args.threads, tmp / f"{out.name}.log")
    r = json.loads(res.read_text())
    return {**r, "process_s": wall, "quantize_save_s": r["quantize_s"] + (r["save_s"] or 0.0)}


def torch_eval(model: Path, evals: Path, args, tmp: Path) -> float:
    res = tmp / f"torch_eval_{model.name}.json"
    run_child([args.bench_python, SIDE, "eval", model, "--eval", evals, "--threads", args.threads, "--json", res],
              args.threads, tmp / f"torch_eval_{model.name}.log")
    return json.loads(res.read_text())["ppl"]


def measure(args, tmp: Path, versions: dict) -> dict:
    from dist_ptq.assets import TINY_LLAMA
    from dist_ptq.eval.run import evaluate
    from dist_ptq.model.forward import configure_mindspore
    from dist_ptq.model.outlier_variant import HARDER, write_outlier_variant
    from dist_ptq.version import __version__

    configure_mindspore(threads=args.threads)
    make = {"bundled": lambda: TINY_LLAMA,
            "outlier variant": lambda: write_outlier_variant(TINY_LLAMA, tmp / "outlier"),
            "harder variant": lambda: write_outlier_variant(TINY_LLAMA, tmp / "harder", **HARDER)}

    valid = TINY_LLAMA / "valid.txt"  # the variants carry a copy of it

    def ppl_ours(d: Path) -> float:
        return evaluate(d, valid, seq_len=args.seq_len, max_tokens=args.max_tokens)[0]

    results = {}
    for label in args.models:
        tag = label.replace(" ", "_")
        model = make[label]()
        (tmp / tag).mkdir()
        calib, evals = token_arrays(model, args.num_samples, args.seq_len, args.max_tokens, tmp / tag)
        ours_float, n_tok = evaluate(model, valid, seq_len=args.seq_len, max_tokens=args.max_tokens)
        theirs_float = torch_eval(model, evals, args, tmp)
        print(f"{label}: float perplexity {ours_float:.4f} (dist_ptq) / {theirs_float:.4f} (torch) over {n_tok} tokens",
              flush=True)
        rows = {}
        for recipe in args.recipes:
            out_ours, out_theirs = tmp / f"{tag}-dist_ptq-{recipe}", tmp / f"{tag}-llmc-{recipe}"
            ours = run_dist_ptq(model, dist_ptq_config(recipe, tmp), out_ours, calib, args, tmp)
            ours["ppl"] = ppl_ours(out_ours)
            theirs = run_llmc(model, recipe, out_theirs, calib, evals, args, tmp)
            rows[recipe] = {"dist_ptq": ours, "llmcompressor": theirs}
            kv = theirs.get("kv_check")
            if kv is not None:
                print(f"  {recipe:26s} LLM Compressor KV cache: {kv['with_k_v_scales']}/{kv['attention_modules']} "
                      f"attention modules with k/v scales {kv['k_scale_shape']} ({kv['strategy']}), "
                      f"{kv['cache_calls_that_changed_k_and_v']}/{kv['cache_calls_in_eval']} cache calls changed K and V "
                      f"(rel. {kv['k_rel_change']:.2e} / {kv['v_rel_change']:.2e}), ppl with it off "
                      f"{kv['ppl_kv_quant_off']:.4f}: {'applied' if kv['applied'] else 'NOT APPLIED (row not comparable)'}",
                      flush=True)
            print(f"  {recipe:26s} ppl dist_ptq {ours['ppl']:8.4f}  llmcompressor {theirs['ppl']:8.4f}   "
                  f"quantize {ours['quantize_s']:6.1f}s / {theirs['quantize_save_s']:6.1f}s   "
                  f"peak RSS {ours['peak_rss_quant_bytes'] / 2**20:5.0f} / {theirs['peak_rss_quant_bytes'] / 2**20:5.0f} MiB",
                  flush=True)
        results[label] = {"tokens": n_tok, "float": {"dist_ptq": ours_float, "torch": theirs_float}, "rows": rows}
        if args.grid_check:  # the same dist_ptq recipes on LLM Compressor's int4 grid: isolates grid from solver
            grid_rows = {}
            for recipe in (r for r in args.recipes if r.startswith("w4a16")):
                out = tmp / f"{tag}-dist_ptq-{recipe}-grid7.5"
                r = run_dist_ptq(model, dist_ptq_config(recipe, tmp), out, calib, args, tmp, grid="7.5")
                r["ppl"] = ppl_ours(out)
                grid_rows[recipe] = r
                print(f"  {recipe:26s} dist_ptq with int4 scale absmax/7.5: ppl {r['ppl']:8.4f}", flush=True)
            results[label]["grid_7.5"] = grid_rows

        if args.cross_check and label == args.models[0]:
            rc = args.cross_check
            out_none = tmp / f"{tag}-dist_ptq-{rc}-backend_none"
            run_dist_ptq(model, dist_ptq_config(rc, tmp, backend_none=True), out_none, calib, args, tmp)
            exported = tmp / f"{tag}-llmc-{rc}-float"
            run_llmc(model, rc, tmp / f"{tag}-llmc-{rc}-again", calib, evals, args, tmp, export_float=exported)
            cross = {"recipe": rc,
                     "dist_ptq_backend_none": {"dist_ptq": ppl_ours(out_none), "torch": torch_eval(out_none, evals, args, tmp)},
                     "llmcompressor_float_export": {"dist_ptq": ppl_ours(exported), "torch": torch_eval(exported, evals, args, tmp)}}
            results[label]["cross_check"] = cross
            print(f"  cross-check {rc}: dist_ptq backend-none output {cross['dist_ptq_backend_none']['dist_ptq']:.4f} "
                  f"(dist_ptq) / {cross['dist_ptq_backend_none']['torch']:.4f} (torch); LLM Compressor's weights "
                  f"{cross['llmcompressor_float_export']['dist_ptq']:.4f} (dist_ptq) / "
                  f"{cross['llmcompressor_float_export']['torch']:.4f} (torch)", flush=True)

    return {"versions": {**versions, "dist_ptq": __version__}, "recipes": args.recipes, "num_samples": args.num_samples,
            "seq_len": args.seq_len, "max_tokens": args.max_tokens, "threads": args.threads,
            "cpus": os.cpu_count(), "note": args.note, "results": results}


def dist_ptq_child(argv: list[str]) -> int:
    """Quantize with dist_ptq in this process, one worker in-process; write time and peak RSS as JSON."""
    t_start = time.perf_counter()
    model, config, out, calib, num_samples, seq_len, threads, grid, res = argv

    def hwm() -> int:
        line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    from dist_ptq.runtime.coordinator import quantize

    if grid == "7.5":
        patch_int4_grid()
    t_imported, hwm_imported, c0 = time.perf_counter(), hwm(), time.process_time()
    quantize(model, config, out, calib=calib, num_samples=int(num_samples), seq_len=int(seq_len),
             threads=int(threads), progress=False)
    t1 = time.perf_counter()
    Path(res).write_text(json.dumps({
        "threads": int(threads), "int4_grid": grid, "import_s": t_imported - t_start, "quantize_s": t1 - t_imported,
        "quantize_cpu_s": time.process_time() - c0,
        "process_to_quantized_s": t1 - t_start, "peak_rss_imports_bytes": hwm_imported,
        "peak_rss_quant_bytes": hwm()}, indent=2) + "\n")
    return 0


def patch_int4_grid() -> None:
    """Experiment only (``--grid-check``): int4 scales absmax/7.5 as compressed-tensors' (and AutoGPTQ's symmetric)
    grid instead of dist_ptq's absmax/7, both clamped to [-8, 7]; everything else (GPTQ, RTN, format) unchanged."""
    import numpy as np

    from dist_ptq.quant import primitives as P

    shipped = P.sym_scale

    def sym_scale(absmax, bits):
        if bits != 4:
            return shipped(absmax, bits)
        absmax = np.asarray(absmax, dtype=np.float32)
        return np.where(absmax > P.EPS, absmax / np.float32(7.5), np.float32(1.0)).astype(np.float32)

    P.sym_scale = sym_scale  # weight_scale and gptq_quantize look it up in primitives at call time


def recovered(rows: dict, tool: str, recipe: str, float_ppl: float) -> str:
    base = BASELINE.get(recipe)
    if base not in rows:
        return ""
    gap = rows[base][tool]["ppl"] - float_ppl
    return f"{100 * (rows[base][tool]['ppl'] - rows[recipe][tool]['ppl']) / gap:.0f}%" if abs(gap) > 1e-9 else "n/a"


def write(saved: dict, out: Path) -> None:
    """Print the Markdown tables and write them, with the figures (JSON) beside them."""
    v, labels, mib = saved["versions"], list(saved["results"]), 2**20
    res = saved["results"]
    lines = [
        f"Calibration {saved['num_samples']} × {saved['seq_len']} tokens of calib.txt (the same token ids for both tools); "
        f"perplexity on the first {saved['max_tokens']} tokens of valid.txt in windows of {saved['seq_len']} "
        f"({res[labels[0]]['tokens']} tokens scored); {saved['threads']} thread(s) per quantizing process, each "
        f"child pinned to that many cores, on a {saved['cpus']}-core machine.",
        "",
        f"Versions: dist_ptq {v['dist_ptq']}; llmcompressor {v['llmcompressor']}, compressed-tensors "
        f"{v['compressed-tensors']}, torch {v['torch']}, transformers {v['transformers']}, accelerate {v['accelerate']}.",
        "",
        "## Perplexity",
        "",
        "dist_ptq's output scored by its reference quantized inference (`dist-ptq eval`), LLM Compressor's "
        "fake-quantized model in torch; \"rec.\" = gap recovered = (ppl_base − ppl) / (ppl_base − ppl_float) on each "
        "tool's own figures, base = its own W4A16 RTN at the same granularity (g128 or per channel) for GPTQ and AWQ, its own "
        "W8A8 SmoothQuant for SmoothQuant + GPTQ.",
        "",
        "| recipe | " + " | ".join(f"{lab}: dist_ptq | rec. | LLM Compressor | rec." for lab in labels) + " |",
        "|---|" + "---:|---:|---:|---:|" * len(labels),
        "| float | " + " | ".join(f"{res[lab]['float']['dist_ptq']:.3f} |  | {res[lab]['float']['torch']:.3f} | "
                                  for lab in labels) + " |",
    ]
    for recipe in saved["recipes"]:
        cells = []
        for lab in labels:
            rows, f = res[lab]["rows"], res[lab]["float"]
            if recipe not in rows:
                cells += [""] * 4
                continue
            theirs = rows[recipe]["llmcompressor"]
            kv_off = "kv_check" in theirs and not theirs["kv_check"]["applied"]
            cells += [f"{rows[recipe]['dist_ptq']['ppl']:.3f}", recovered(rows, "dist_ptq", recipe, f["dist_ptq"]),
                      f"n/c ({theirs['ppl']:.3f}, KV not quantized)" if kv_off else f"{theirs['ppl']:.3f}",
                      recovered(rows, "llmcompressor", recipe, f["torch"])]
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")

    grid = [lab for lab in labels if res[lab].get("grid_7.5")]
    if grid:
        lines += ["", "## The int4 grid alone: dist_ptq with LLM Compressor's int4 scale", "",
                  "The same dist_ptq runs with one change, made in the child process only (`patch_int4_grid`): int4 "
                  "scale = absmax/7.5 (compressed-tensors' symmetric grid) instead of dist_ptq's absmax/7, both "
                  "clamped to [-8, 7]. \"rec.\" against dist_ptq's own RTN on that grid.", "",
                  "| recipe | " + " | ".join(f"{lab}: dist_ptq absmax/7 | dist_ptq absmax/7.5 | rec. | LLM Compressor | rec."
                                           for lab in grid) + " |",
                  "|---|" + "---:|---:|---:|---:|---:|" * len(grid)]
        gridded = {r for lab in grid for r in res[lab]["grid_7.5"]}
        for recipe in [r for r in saved["recipes"] if r in gridded]:
            cells = []
            for lab in grid:
                g, rows, f = res[lab]["grid_7.5"], res[lab]["rows"], res[lab]["float"]
                if recipe not in g or recipe not in rows:
                    cells += [""] * 5
                    continue
                rec = ""
                if recipe in BASELINE and BASELINE[recipe] in g:
                    base = g[BASELINE[recipe]]["ppl"]
                    rec = f"{100 * (base - g[recipe]['ppl']) / (base - f['dist_ptq']):.0f}%"
                cells += [f"{rows[recipe]['dist_ptq']['ppl']:.3f}", f"{g[recipe]['ppl']:.3f}", rec,
                          f"{rows[recipe]['llmcompressor']['ppl']:.3f}", recovered(rows, "llmcompressor", recipe, f["torch"])]
            lines.append(f"| {recipe} | " + " | ".join(cells) + " |")

    kv_rows = [(lab, r) for lab in labels for r in saved["recipes"]
               if "kv_check" in res[lab]["rows"].get(r, {}).get("llmcompressor", {})]
    if kv_rows:
        lines += ["", "## KV cache int8: is LLM Compressor's KV quantization in its evaluation?", "",
                  "Recorded while LLM Compressor's perplexity above was measured (forward hooks that only look, on each "
                  "attention module's `QuantizedKVCache`), then once more with the KV quantization switched off "
                  "(`quantization_enabled = False` on the attention modules only). \"cache calls\" = calls that "
                  "changed both K and V / all calls; rel. change = ‖K_q − K‖ / ‖K‖ (and V) over the evaluation. "
                  "A row is \"applied\" when every check holds; otherwise the perplexity table marks it n/c.", "",
                  "| model | recipe | LLMC strategy (observer) | attention modules with k/v scales | k_scale shape | "
                  "cache calls | rel. change K / V | LLMC ppl, KV quant on | off | applied | dist_ptq ppl |",
                  "|---|---|---|---:|---|---:|---|---:|---:|---|---:|"]
        for lab, recipe in kv_rows:
            row = res[lab]["rows"][recipe]
            kv = row["llmcompressor"]["kv_check"]
            lines.append(
                f"| {lab} | {recipe} | {kv['strategy']} ({kv['observer']}) | {kv['with_k_v_scales']} / "
                f"{kv['attention_modules']} | {tuple(kv['k_scale_shape'] or ())} | "
                f"{kv['cache_calls_that_changed_k_and_v']} / {kv['cache_calls_in_eval']} | "
                f"{kv['k_rel_change']:.2e} / {kv['v_rel_change']:.2e} | {row['llmcompressor']['ppl']:.4f} | "
                f"{kv['ppl_kv_quant_off']:.4f} | {'yes' if kv['applied'] else '**no**'} | {row['dist_ptq']['ppl']:.4f} |")

    lines += ["", "## Wall time, CPU time and peak RSS of each quantization run", "",
              "quantize = the call in the child process: read the model, calibrate, quantize, write the output "
              "directory (dist_ptq's `quantize()`, one worker in-process; LLM Compressor's `from_pretrained` + `oneshot` + "
              "`save_pretrained`); CPU = the child's CPU time (all threads) over that call, less disturbed by other "
              "jobs than wall time; to output = from the child's start, imports included; peak RSS = the child's VmHWM "
              "once its output is written (\"imports\": VmHWM before the model is read); ratio = dist_ptq ÷ LLM Compressor.",
              "",
              "| model | recipe | quantize wall (s) dist_ptq / LLMC | ratio | CPU (s) dist_ptq / LLMC | ratio | "
              "to output (s) dist_ptq / LLMC | ratio | peak RSS (MiB) dist_ptq / LLMC | ratio | imports (MiB) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lab in labels:
        for recipe in (r for r in saved["recipes"] if r in res[lab]["rows"]):
            o, t = (res[lab]["rows"][recipe][k] for k in ("dist_ptq", "llmcompressor"))
            lines.append(
                f"| {lab} | {recipe} | {o['quantize_s']:.2f} / {t['quantize_save_s']:.2f} | "
                f"{o['quantize_s'] / t['quantize_save_s']:.2f} | {o['quantize_cpu_s']:.2f} / {t['quantize_cpu_s']:.2f} | "
                f"{o['quantize_cpu_s'] / t['quantize_cpu_s']:.2f} | "
                f"{o['process_to_quantized_s']:.1f} / {t['process_to_quantized_s']:.1f} | "
                f"{o['process_to_quantized_s'] / t['process_to_quantized_s']:.2f} | "
                f"{o['peak_rss_quant_bytes'] / mib:.0f} / {t['peak_rss_quant_bytes'] / mib:.0f} | "
                f"{o['peak_rss_quant_bytes'] / t['peak_rss_quant_bytes']:.2f} | "
                f"{o['peak_rss_imports_bytes'] / mib:.0f} / {t['peak_rss_imports_bytes'] / mib:.0f} |")

    for lab in labels:
        cc = res[lab].get("cross_check")
        if cc:
            f, a, b = res[lab]["float"], cc["dist_ptq_backend_none"], cc["llmcompressor_float_export"]
            lines += ["", f"## Evaluator cross-check ({lab}, {cc['recipe']})", "",
                      "| weights | dist_ptq evaluator | torch | relative difference |", "|---|---:|---:|---:|",
                      f"| float model | {f['dist_ptq']:.5f} | {f['torch']:.5f} | {f['dist_ptq'] / f['torch'] - 1:+.1e} |",
                      f"| dist_ptq, `backend: none` (dequantized float weights) | {a['dist_ptq']:.5f} | {a['torch']:.5f} | "
                      f"{a['dist_ptq'] / a['torch'] - 1:+.1e} |",
                      f"| LLM Compressor, its fake-quantized weights as a float checkpoint | {b['dist_ptq']:.5f} | "
                      f"{b['torch']:.5f} | {b['dist_ptq'] / b['torch'] - 1:+.1e} |",
                      "",
                      f"(The same dist_ptq quantization written for the Ascend backend and scored by the reference "
                      f"quantized inference: {res[lab]['rows'][cc['recipe']]['dist_ptq']['ppl']:.5f}. `backend: none` "
                      f"stores the dequantized weights in the model dtype, bfloat16, hence the small difference.)"
                      if cc["recipe"] in res[lab]["rows"] else ""]
    table = "\n".join(lines) + "\n"
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    note = f"\n{saved['note'].strip()}\n" if saved.get("note") else ""
    out.write_text(f"# dist_ptq vs LLM Compressor (`python bench/vs_llmcompressor.py`)\n\n{table}{note}\n{DIFFERENCES}")
    out.with_suffix(".json").write_text(json.dumps(saved, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
