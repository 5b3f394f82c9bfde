"""LLM Compressor's side of ``bench/vs_llmcompressor.py``: runs in the bench venv (torch CPU, transformers, llmcompressor).

    .venv-bench/bin/python bench/llmcompressor_side.py versions --json OUT.json
    .venv-bench/bin/python bench/llmcompressor_side.py eval MODEL_DIR --eval eval.npy --json OUT.json
    .venv-bench/bin/python bench/llmcompressor_side.py quantize MODEL_DIR --recipe w4a16_gptq_g128 \\
        --calib calib.npy --eval eval.npy --json OUT.json [--save DIR] [--export-float DIR]

Token ids come in as .npy arrays of shape (samples, seq_len) that dist_ptq made (the driver tokenizes
once, so both tools see the same ids). ``quantize`` loads the model in float32, runs ``oneshot`` with the
recipe named after the dist_ptq config it is compared with, records the wall time and the process's
peak RSS (VmHWM) once the compressed model is saved (``--save``), then scores the fake-quantized model in torch (the same perplexity
as ``dist-ptq eval``: sum of next-token log-probabilities over every window). ``--export-float`` writes
the fake-quantized weights as a float32 Hugging Face checkpoint (weight-only recipes), so dist_ptq's
evaluator can score the same weights. KV-cache recipes (``kv_int8``, ``w8a8_smoothquant_kv_int8``) are
scored with compressed-tensors' ``QuantizedKVCache`` in the forward, as oneshot leaves the model, and the
JSON says whether it acted (``kv_check``: the attention modules holding k/v scales, how often the cache
quantized K and V during the evaluation and by how much, the perplexity with it switched off).
This file never imports dist_ptq or MindSpore.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

# the dist_ptq config each recipe is compared with -> what it means on this side
RECIPES = ("w4a16_rtn_g128", "w4a16_gptq_g128", "w4a16_gptq_actorder_g128", "w4a16_awq_g128",
           "w4a16_rtn_per_channel", "w4a16_gptq_per_channel",
           "w8a8_smoothquant", "w8a8_smoothquant_gptq", "kv_int8", "w8a8_smoothquant_kv_int8")
KV_RECIPES = ("kv_int8", "w8a8_smoothquant_kv_int8")  # with a kv_cache_scheme
DATA_FREE = ("w4a16_rtn_g128", "w4a16_rtn_per_channel")  # RTN is data-free on both sides


def hwm_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "llmcompressor", "compressed-tensors",
                                    "accelerate", "datasets", "safetensors", "numpy")}


def load_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model


def perplexity(model, ids, batch: int = 8) -> tuple[float, int]:
    """exp(−mean log p(next token)) over every window of ``ids`` (samples, seq_len), as dist-ptq eval."""
    import torch

    x_all = torch.from_numpy(ids.astype("int64"))
    total = 0.0
    with torch.no_grad():
        for b in range(0, len(x_all), batch):
            x = x_all[b:b + batch]
            logp = torch.log_softmax(model(input_ids=x).logits.float(), -1)
            total += logp[:, :-1].gather(-1, x[:, 1:, None]).double().sum().item()
    n = ids.shape[0] * (ids.shape[1] - 1)
    return math.exp(-total / n), n


def w8a8_static_groups() -> dict:
    """W8A8 as dist_ptq's static recipes: int8 weights per channel (symmetric), int8 activations per
    tensor, asymmetric, static, range = min/max over the whole calibration set (``static_minmax``;
    LLM Compressor's default ``minmax`` is a moving average over batches)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return {"group_0": QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
        input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="tensor",
                                           dynamic=False, observer="static_minmax"))}


def w4a16_channel_groups() -> dict:
    """W4A16 per output channel, as dist_ptq's ``weight_quant_granularity: per_channel`` int4: the ``W4A16``
    preset's weights (symmetric int4, static) with strategy "channel" instead of groups of 128."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return {"group_0": QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel", dynamic=False))}


def kv_cache_args(strategy: str):
    """Static symmetric int8 K and V, as dist_ptq's C8 (``kvcache_quant_dtype: int8``, static): compressed-tensors
    takes "tensor" or "attn_head" (one scale per KV head) for K/V, not "channel" (its ``_flatten_attention``
    refuses it), so "attn_head" is the nearest to dist_ptq's per-channel (kv_heads·head_dim) scales. Range =
    min/max over the whole calibration set (``static_minmax``, as dist_ptq; the default ``minmax`` averages)."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy=strategy, dynamic=False,
                            observer="static_minmax")


def recipe(name: str, args) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    ignore = ["lm_head"]
    gptq = dict(block_size=args.block_size, dampening_frac=args.damp)
    if name == "w4a16_rtn_g128":
        return [QuantizationModifier(targets="Linear", scheme="W4A16", ignore=ignore)]
    if name == "w4a16_gptq_g128":
        return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=ignore, actorder=None, **gptq)]
    if name == "w4a16_gptq_actorder_g128":
        return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=ignore, actorder="static", **gptq)]
    if name == "w4a16_awq_g128":  # AWQ scale search (default Llama mappings, duo scaling, 20-point grid), then RTN
        from llmcompressor.modifiers.transform.awq import AWQModifier  # modifiers.awq: a deprecated shim to these two

        no_pinning_without_accelerator()
        return [AWQModifier(duo_scaling=True, n_grid=20),
                QuantizationModifier(targets="Linear", scheme="W4A16", ignore=ignore)]
    if name == "w4a16_rtn_per_channel":
        return [QuantizationModifier(config_groups=w4a16_channel_groups(), ignore=ignore)]
    if name == "w4a16_gptq_per_channel":
        return [GPTQModifier(config_groups=w4a16_channel_groups(), ignore=ignore, actorder=None, **gptq)]
    if name == "kv_int8":  # weights and activations float, only the KV cache
        return [QuantizationModifier(kv_cache_scheme=kv_cache_args(args.kv_strategy), ignore=ignore)]
    smooth = SmoothQuantModifier(smoothing_strength=args.alpha)
    if name == "w8a8_smoothquant":
        return [smooth, QuantizationModifier(config_groups=w8a8_static_groups(), ignore=ignore)]
    if name == "w8a8_smoothquant_gptq":
        return [smooth, GPTQModifier(config_groups=w8a8_static_groups(), ignore=ignore, actorder=None, **gptq)]
    if name == "w8a8_smoothquant_kv_int8":
        return [smooth, QuantizationModifier(config_groups=w8a8_static_groups(), ignore=ignore,
                                             kv_cache_scheme=kv_cache_args(args.kv_strategy))]
    raise SystemExit(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}")


def no_pinning_without_accelerator() -> None:
    """llmcompressor 0.14's AWQ pins its cached layer inputs (``IntermediatesCache.pin_memory``) for faster
    host-to-device copies; a CPU-only torch refuses (``Cannot access accelerator device``). Pinning changes
    no value, so without an accelerator it is skipped."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def kv_checked_perplexity(model, ids, batch: int) -> tuple[float, int, dict]:
    """``perplexity`` with forward hooks on every attention module's ``QuantizedKVCache`` (they only look),
    then again with the KV quantization switched off (``quantization_enabled = False`` on the attention
    modules only): evidence that the KV-cache quantization is in the evaluation forward."""
    import torch
    from compressed_tensors.modeling.kvcache import KV_CACHE_ATTR

    attn = [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, KV_CACHE_ATTR, None), torch.nn.Module)
            and getattr(getattr(m, "quantization_scheme", None), "input_activations", None) is not None]
    seen = {"calls": 0, "changed_calls": 0, "k_err": 0.0, "k_norm": 0.0, "v_err": 0.0, "v_norm": 0.0}

    def look(cache, args, kwargs, out):  # QuantizedKVCache.forward(key_states, value_states, ...) -> (k, v)
        k_in = kwargs.get("key_states", args[0] if args else None)
        v_in = kwargs.get("value_states", args[1] if len(args) > 1 else None)
        k_out, v_out = out[0], out[1]
        seen["calls"] += 1
        if k_out.shape != k_in.shape:  # a cache holding earlier tokens: not the case in this evaluation
            return
        dk, dv = (k_out - k_in).double().norm().item(), (v_out - v_in).double().norm().item()
        seen["changed_calls"] += int(dk > 0 and dv > 0)
        seen["k_err"] += dk ** 2
        seen["k_norm"] += k_in.double().norm().item() ** 2
        seen["v_err"] += dv ** 2
        seen["v_norm"] += v_in.double().norm().item() ** 2

    handles = [getattr(m, KV_CACHE_ATTR).register_forward_hook(look, with_kwargs=True) for _, m in attn]
    try:
        ppl, n = perplexity(model, ids, batch)
    finally:
        for h in handles:
            h.remove()
    enabled = [getattr(m, "quantization_enabled", True) for _, m in attn]
    for _, m in attn:
        m.quantization_enabled = False
    try:
        ppl_off, _ = perplexity(model, ids, batch)
    finally:
        for (_, m), e in zip(attn, enabled):
            m.quantization_enabled = e
    args = attn[0][1].quantization_scheme.input_activations if attn else None
    check = {
        "attention_modules": len(attn),
        "with_k_v_scales": sum(hasattr(m, "k_scale") and hasattr(m, "v_scale") for _, m in attn),
        "k_scale_shape": list(attn[0][1].k_scale.shape) if attn and hasattr(attn[0][1], "k_scale") else None,
        "k_scale_first_layer": attn[0][1].k_scale.flatten().tolist() if attn and hasattr(attn[0][1], "k_scale") else None,
        "strategy": getattr(args.strategy, "value", args.strategy) if args is not None else None,
        "observer": args.observer if args is not None else None,
        "symmetric": args.symmetric if args is not None else None,
        "quantization_enabled": enabled,
        "cache_calls_in_eval": seen["calls"], "cache_calls_that_changed_k_and_v": seen["changed_calls"],
        "k_rel_change": math.sqrt(seen["k_err"] / seen["k_norm"]) if seen["k_norm"] else None,
        "v_rel_change": math.sqrt(seen["v_err"] / seen["v_norm"]) if seen["v_norm"] else None,
        "ppl_kv_quant_off": ppl_off}
    return ppl, n, check


def export_float(model, src_dir: Path, out_dir: Path) -> None:
    """The fake-quantized weights as a float32 checkpoint with the source's tensor names (weight-only schemes)."""
    import torch
    from compressed_tensors.quantization import fake_quantize
    from safetensors import safe_open
    from safetensors.torch import save_file

    names = []
    for f in sorted(src_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            names += list(fh.keys())
    modules = dict(model.named_modules())
    tensors = {}
    with torch.no_grad():
        for name in names:
            mod_name, _, attr = name.rpartition(".")
            mod = modules[mod_name]
            t = getattr(mod, attr).detach().float()
            scheme = getattr(mod, "quantization_scheme", None)
            if attr == "weight" and scheme is not None and scheme.weights is not None:
                if scheme.input_activations is not None:
                    raise SystemExit("--export-float: only weight-only recipes (activation quantization does not travel in a float checkpoint)")
                t = fake_quantize(t, mod.weight_scale.float(), mod.weight_zero_point, scheme.weights)
            tensors[name] = t.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for side in ("config.json", "generation_config.json", "tokenizer.json"):
        if (src_dir / side).is_file():
            shutil.copy(src_dir / side, out_dir / side)


def cmd_quantize(args) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import PreTrainedTokenizerFast

    t_imported, hwm_imported = time.perf_counter(), hwm_bytes()
    calib = np.load(args.calib).astype("int64")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(args.model_dir / "tokenizer.json"))
    t0, c0 = time.perf_counter(), time.process_time()
    model = load_model(args.model_dir)
    mods = recipe(args.recipe, args)
    kwargs = {}
    if args.recipe not in DATA_FREE:
        ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": np.ones_like(calib).tolist()})
        kwargs = dict(dataset=ds, num_calibration_samples=len(calib), max_seq_length=calib.shape[1],
                      batch_size=args.batch, shuffle_calibration_samples=False)
    oneshot(model=model, recipe=mods, tokenizer=tok, **kwargs)
    t1 = time.perf_counter()
    if args.export_float:  # before saving: save_pretrained leaves the modules compressed (no .weight)
        export_float(model, args.model_dir, args.export_float)
    save_s = None
    if args.save:  # the compressed checkpoint, as dist_ptq's quantize writes its deploy directory
        ts = time.perf_counter()
        model.save_pretrained(str(args.save), save_compressed=True)
        tok.save_pretrained(str(args.save))
        save_s = time.perf_counter() - ts
    hwm_quant, cpu_s = hwm_bytes(), time.process_time() - c0
    ppl = n = kv = None
    if args.eval and args.recipe in KV_RECIPES:
        ppl, n, kv = kv_checked_perplexity(model, np.load(args.eval), args.batch)
        # the driver shows the row as not comparable unless the cache quantized K and V and that moved the ppl
        kv["applied"] = bool(kv["with_k_v_scales"] and kv["cache_calls_that_changed_k_and_v"]
                             and kv["ppl_kv_quant_off"] != ppl)
    elif args.eval:
        ppl, n = perplexity(model, np.load(args.eval), args.batch)
    return {"recipe": args.recipe, "threads": torch.get_num_threads(),
            "import_s": t_imported - T_START, "quantize_s": t1 - t0, "save_s": save_s,
            "quantize_cpu_s": cpu_s,
            "process_to_quantized_s": t1 - T_START + (save_s or 0.0), "peak_rss_imports_bytes": hwm_imported,
            "peak_rss_quant_bytes": hwm_quant,
            "peak_rss_end_bytes": hwm_bytes(), "ppl": ppl, "tokens": n,
            **({"kv_check": kv} if kv is not None else {})}


def cmd_eval(args) -> dict:
    import numpy as np

    ppl, n = perplexity(load_model(args.model_dir), np.load(args.eval), args.batch)
    return {"ppl": ppl, "tokens": n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("versions")
    e = sub.add_parser("eval")
    q = sub.add_parser("quantize")
    for p in (v, e, q):
        p.add_argument("--json", type=Path, required=True, help="write the result here")
        p.add_argument("--threads", type=int, default=1)
    for p in (e, q):
        p.add_argument("model_dir", type=Path)
        p.add_argument("--eval", type=Path, help=".npy (samples, seq_len) of evaluation token ids")
        p.add_argument("--batch", type=int, default=8)
    q.add_argument("--recipe", required=True, choices=RECIPES)
    q.add_argument("--calib", type=Path, required=True, help=".npy (samples, seq_len) of calibration token ids")
    q.add_argument("--block-size", type=int, default=128)
    q.add_argument("--damp", type=float, default=0.01)
    q.add_argument("--alpha", type=float, default=0.5)
    q.add_argument("--kv-strategy", default="attn_head", choices=("attn_head", "tensor"),
                   help="K/V scale granularity of the KV-cache recipes (compressed-tensors takes these two)")
    q.add_argument("--save", type=Path, help="save the compressed model here (timed apart)")
    q.add_argument("--export-float", type=Path, help="write the fake-quantized weights as a float32 checkpoint")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.cmd == "versions":
        out = versions()
    elif args.cmd == "eval":
        if args.eval is None:
            ap.error("eval needs --eval")
        out = cmd_eval(args)
    else:
        out = cmd_quantize(args)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
