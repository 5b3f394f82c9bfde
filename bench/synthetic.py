"""Write a synthetic Hugging Face Llama checkpoint of a real model's shape (random weights, realistic scales).

    python bench/synthetic.py --shape llama2-7b --out /tmp/llama2-7b-synth
    python bench/synthetic.py --shape tinyllama-1.1b --layers 8 --out /tmp/tiny-8l

bfloat16 shards of --shard-gb; generated shard by shard, so the model is never in memory whole.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "tinyllama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
}


def config_for(shape: str, layers: int | None = None, hidden: int | None = None) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
        **SHAPES[shape],
    }
    if layers:
        cfg["num_hidden_layers"] = layers
    if hidden:
        scale = hidden / cfg["hidden_size"]
        cfg["intermediate_size"] = int(round(cfg["intermediate_size"] * scale / 64)) * 64
        cfg["num_attention_heads"] = max(1, int(cfg["num_attention_heads"] * scale))
        cfg["num_key_value_heads"] = max(1, min(cfg["num_key_value_heads"], cfg["num_attention_heads"]))
        cfg["hidden_size"] = hidden
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    ap.add_argument("--hidden", type=int, default=None, help="override the width (heads and MLP scale with it)")
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from dist_ptq.model.synthetic import write_random_model

    t0 = time.time()
    write_random_model(args.out, config_for(args.shape, args.layers, args.hidden), seed=0, dtype="BF16",
                       shard_bytes=int(args.shard_gb * (1 << 30)))
    size = sum(p.stat().st_size for p in args.out.glob("*.safetensors"))
    print(f"wrote {args.out}: {size / 1e9:.2f} GB in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
