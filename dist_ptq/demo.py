"""`dist-ptq demo`: the bundled tiny model, end to end, with no arguments."""

from __future__ import annotations

from pathlib import Path

import mindspore as ms

from dist_ptq.assets import TINY_LLAMA
from dist_ptq.config import OutliersSuppressionType, PTQConfig, SmoothQuantConfig
from dist_ptq.eval.run import evaluate
from dist_ptq.runtime.coordinator import quantize
from dist_ptq.runtime.progress import print_report

DEMO_CONFIG = PTQConfig(
    weight_quant_dtype=ms.int8,
    act_quant_dtype=ms.int8,
    kvcache_quant_dtype=ms.int8,
    outliers_suppression=OutliersSuppressionType.SMOOTH,
    algo_args=SmoothQuantConfig(alpha=0.5),
)


def run_demo(out: Path, max_tokens: int = 16384, device: str = "cpu", threads: int | None = None) -> tuple[float, float]:
    """Quantize the bundled model into ``out`` and print float and quantized perplexity (returned too)."""
    print(f"quantizing {TINY_LLAMA} with W8A8 SmoothQuant + KV int8 into {out}")
    report = quantize(TINY_LLAMA, DEMO_CONFIG, out, calib=TINY_LLAMA / "calib.txt", num_samples=32, seq_len=256,
                      overwrite=True, device=device, threads=threads)
    print_report(report)
    valid = TINY_LLAMA / "valid.txt"
    ppl_f, n = evaluate(TINY_LLAMA, valid, max_tokens=max_tokens)
    ppl_q, _ = evaluate(out, valid, max_tokens=max_tokens)
    print(f"perplexity on {n} held-out tokens: float {ppl_f:.3f}, quantized {ppl_q:.3f} ({(ppl_q / ppl_f - 1) * 100:+.2f}%)")
    return ppl_f, ppl_q
