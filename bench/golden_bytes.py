"""Output bytes of every recipe in configs/ on the bundled model, recorded once and checked after a change.

    python bench/golden_bytes.py --record    # writes bench/results/golden_manifests.json
    python bench/golden_bytes.py --check     # quantizes again, compares every MANIFEST.sha256 line
    python bench/golden_bytes.py --check --model tiny-moe   # the MoE model, MOE_RECIPES (golden_manifests_moe.json)

Each recipe runs with one worker on 8 × 128 calibration tokens (calibrated recipes) and, for the
Golden-Stick ones, with ``tp=2``, so the per-rank files are covered too. Every manifest line but
``report.json``'s must match: refactors keep the bytes (``tests/test_golden_bytes.py`` checks a few
recipes on every CI run; this script checks them all).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "golden_manifests.json"
RESULTS_MOE = ROOT / "bench" / "results" / "golden_manifests_moe.json"
NUM_SAMPLES, SEQ_LEN = 8, 128
# on the bundled MoE model (routed calibration, per-expert GPTQ / AWQ, experts split by TP rank)
MOE_RECIPES = ["kv_int8", "w4a16_awq_g128", "w4a16_gptq_g128", "w8a16_rtn", "w8a8_dynamic", "w8a8_smoothquant_kv_int8"]


def record_file(model: str) -> Path:
    return RESULTS_MOE if model == "tiny-moe" else RESULTS


def recipe_manifest(config: Path, out: Path, model: str = "bundled") -> dict[str, str]:
    """Quantize a bundled model with ``config`` into ``out``; every manifest line but report.json's."""
    from dist_ptq.assets import TINY_LLAMA, TINY_MOE
    from dist_ptq.config import BackendTarget, load_yaml
    from dist_ptq.export.unified import read_manifest
    from dist_ptq.runtime.coordinator import quantize

    src = TINY_MOE if model == "tiny-moe" else TINY_LLAMA
    cfg = load_yaml(config)
    tp = 2 if cfg.backend is BackendTarget.ASCEND else None
    calib = None if cfg.is_data_free else src / "calib.txt"
    quantize(src, cfg, out, calib=calib, num_samples=NUM_SAMPLES, seq_len=SEQ_LEN, progress=False, tp=tp)
    return {k: v for k, v in read_manifest(out).items() if k != "report.json"}


def all_manifests(names: list[str] | None = None, model: str = "bundled") -> dict[str, dict[str, str]]:
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    names = names or (MOE_RECIPES if model == "tiny-moe" else None)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for c in configs:
            if names and c.stem not in names:
                continue
            print(f"{c.stem} ...", flush=True)
            out[c.stem] = recipe_manifest(c, Path(tmp) / c.stem, model)
    return out


def compare(want: dict[str, dict[str, str]], got: dict[str, dict[str, str]]) -> list[str]:
    problems = []
    for recipe in sorted(got):
        if recipe not in want:
            problems.append(f"{recipe}: no recorded hashes (new recipe? run --record)")
            continue
        w, g = want[recipe], got[recipe]
        for f in sorted(set(w) | set(g)):
            if w.get(f) != g.get(f):
                problems.append(f"{recipe}: {f}: recorded {w.get(f)}, now {g.get(f)}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", action="store_true")
    mode.add_argument("--check", action="store_true")
    ap.add_argument("--recipes", nargs="*", help="only these configs/ stems")
    ap.add_argument("--model", choices=["bundled", "tiny-moe"], default="bundled",
                    help="the bundled dense model (every recipe) or the bundled MoE model (MOE_RECIPES)")
    args = ap.parse_args()
    got = all_manifests(args.recipes, args.model)
    results = record_file(args.model)
    if args.record:
        saved = json.loads(results.read_text()) if results.is_file() else {}
        saved.update(got)
        results.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(got)} recipes in {results}")
        return 0
    problems = compare(json.loads(results.read_text()), got)
    for p in problems:
        print(p)
    files = sum(len(m) for m in got.values())
    print(f"{len(got)} recipes, {files} files: {'identical' if not problems else f'{len(problems)} differ'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
