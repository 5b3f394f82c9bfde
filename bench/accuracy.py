"""Perplexity of every scheme on the bundled model and on its function-preserving outlier variant.

    python bench/accuracy.py [--max-tokens 32768] [--out bench/results/accuracy.md]
    python bench/accuracy.py --render bench/results/accuracy.json   # the table again from saved figures
    python bench/accuracy.py --models bundled "harder variant" ...  # a subset of the models
    python bench/accuracy.py --models "tiny moe" --out bench/results/accuracy_moe.md \
        --schemes w8a16_rtn w4a16_rtn_g128 w4a16_gptq_g128 w8a8_smoothquant w8a8_dynamic kv_int8

Quantizes with each recipe in configs/ (calibration: the bundled calib.txt, 64 × 256 tokens), then
evaluates on the held-out valid.txt through the reference quantized inference. Prints a Markdown table
and writes it (plus JSON) under bench/results/. The models: the bundled one, its outlier variant (×32
on 4 RMSNorm channels) and the harder variant (``outlier_variant.HARDER``: ×64/×32, also on the
o_proj and down_proj inputs), all the same float function; and the bundled MoE model
(``dist_ptq/assets/tiny-moe``, Qwen2-MoE, 8 experts top-2 + a shared expert, trained the same way).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMES = [
    "w8a16_rtn",
    "w4a16_rtn_g128",
    "w4a16_rtn_per_channel",
    "w8a8_static",
    "w8a8_smoothquant",
    "w8a8_dynamic",
    "w8a8_dynamic_smooth",
    "kv_int8",
    "kv_int8_dynamic",
    "w8a8_smoothquant_kv_int8",
]
MODELS = ("bundled", "outlier variant", "harder variant", "tiny moe")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "accuracy.md")
    ap.add_argument("--schemes", nargs="*", default=SCHEMES)
    ap.add_argument("--models", nargs="*", default=list(MODELS[:3]), choices=MODELS)
    ap.add_argument("--render", type=Path, help="print and write the table of a saved JSON instead of measuring")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text())
        write(saved["results"], saved["schemes"], saved["num_samples"], args.out)
        return 0

    from dist_ptq.assets import TINY_LLAMA, TINY_MOE
    from dist_ptq.eval.run import evaluate
    from dist_ptq.model.outlier_variant import HARDER, write_outlier_variant
    from dist_ptq.runtime.coordinator import quantize

    valid, calib = TINY_LLAMA / "valid.txt", TINY_LLAMA / "calib.txt"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make = {"bundled": lambda: TINY_LLAMA,
                "outlier variant": lambda: write_outlier_variant(TINY_LLAMA, tmp / "outlier"),
                "harder variant": lambda: write_outlier_variant(TINY_LLAMA, tmp / "harder", **HARDER),
                "tiny moe": lambda: TINY_MOE}
        for label in args.models:
            model = make[label]()
            base, n_tok = evaluate(model, valid, max_tokens=args.max_tokens)
            rows = {"float": {"ppl": base, "rel": 0.0, "seconds": 0.0}}
            print(f"{label}: float perplexity {base:.3f} over {n_tok} tokens", flush=True)
            for scheme in args.schemes:
                out = tmp / f"{label.replace(' ', '_')}-{scheme}"
                t0 = time.time()
                quantize(model, ROOT / "configs" / f"{scheme}.yaml", out, calib=calib,
                         num_samples=args.num_samples, seq_len=256, progress=False)
                secs = time.time() - t0
                ppl, _ = evaluate(out, valid, max_tokens=args.max_tokens)
                rows[scheme] = {"ppl": ppl, "rel": ppl / base - 1.0, "seconds": secs}
                print(f"  {scheme:28s} ppl {ppl:9.3f}  {100 * (ppl / base - 1):+7.2f}%  ({secs:.1f}s)", flush=True)
            results[label] = {"tokens": n_tok, "rows": rows}

    write(results, args.schemes, args.num_samples, args.out)
    return 0


# the recipe each searched or GPTQ recipe is measured against where it is not W4A16 RTN g128 / SmoothQuant
BASELINE = {"w4a8_dynamic_gptq_g128": "w4a8_dynamic_g128", "w8a8_static_clip": "w8a8_static",
            "w8a8_dynamic_osl": "w8a8_dynamic_smooth"}


def write(results: dict, schemes: list[str], num_samples: int, out: Path) -> None:
    """Print the Markdown table and write it with the figures (JSON) beside it."""
    labels = list(results)  # saved runs hold the models they measured, in order
    lines = [
        f"Held-out tokens: {results[labels[0]]['tokens']} (valid.txt, seq-len 256); calibration {num_samples} × 256 tokens.",
        "",
        "| scheme | " + " | ".join(f"{label.replace(' ', '-')} ppl | Δ | gap to RTN recovered | time (s)" for label in labels) + " |",
        "|---|" + "---:|---:|---:|---:|" * len(labels),
    ]

    def recovered(label: str, scheme: str) -> str:
        rows = results[label]["rows"]
        base = BASELINE.get(scheme, "w4a16_rtn_g128" if scheme.startswith("w4a16") else "w8a8_smoothquant")
        rtn = rows.get(base)
        if rtn is None or not re.search(r"gptq|awq|clip|osl", scheme):  # only the recovery / search recipes
            return ""
        gap = rtn["ppl"] - rows["float"]["ppl"]
        return f"{100 * (rtn['ppl'] - rows[scheme]['ppl']) / gap:.0f}%" if abs(gap) > 1e-9 else "n/a"

    for scheme in ["float", *schemes]:
        cells = []
        for label in labels:
            r = results[label]["rows"][scheme]
            cells += [f"{r['ppl']:.3f}", f"{100 * r['rel']:+.2f}%", recovered(label, scheme), f"{r['seconds']:.1f}"]
        lines.append(f"| {scheme} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Accuracy (`python bench/accuracy.py`)\n\n{table}")
    out.with_suffix(".json").write_text(
        json.dumps({"schemes": schemes, "num_samples": num_samples, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
