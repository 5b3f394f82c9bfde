"""Train the bundled tiny Llama on the Python standard library's own sources, with MindSpore on CPU.

No pretrained model can be downloaded where this project is built, so it carries a small real one.
The text is the standard library of the Python running this script (present on every machine);
files are split into train / validation / calibration by a hash of their relative path, so the
held-out texts never overlap the training text.

    python scripts/train_tiny_llama.py --out dist_ptq/assets/tiny-llama --minutes 20

Writes config.json, generation_config.json, tokenizer.json, model.safetensors (bfloat16),
valid.txt and calib.txt into --out, and prints the validation perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 2048,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
SPECIAL = ["<unk>", "<s>", "</s>"]


def split_of(rel: str) -> str:
    bucket = zlib.crc32(rel.encode()) % 20
    return "valid" if bucket == 0 else "calib" if bucket == 1 else "train"


def stdlib_texts() -> dict[str, list[str]]:
    """Stdlib .py files (no test suites, no site-packages) by split, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, list[str]] = {"train": [], "valid": [], "calib": []}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/", "idlelib/idle_test/", "lib2to3/tests/")) or "/tests/" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out[split_of(rel)].append(text)
    return out


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def init_weights(spec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    std = 0.02
    out = {}
    for name, shape in spec.all_shapes().items():
        if name.endswith("norm.weight"):
            out[name] = np.ones(shape, np.float32)
        else:
            scale = std / math.sqrt(2 * spec.num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            out[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("dist_ptq/assets/tiny-llama"))
    ap.add_argument("--minutes", type=float, default=20.0, help="training wall-time budget")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path, default=None, help="continue from this model directory's weights and tokenizer")
    args = ap.parse_args()

    import mindspore as ms
    from mindspore import nn, ops

    from dist_ptq.model.arch import spec_from_config
    from dist_ptq.model.forward import causal_mask, configure_mindspore, decoder_layer, embed, final_logits

    configure_mindspore(args.threads)
    ms.set_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    texts = stdlib_texts()
    print(f"files: train {len(texts['train'])}, valid {len(texts['valid'])}, calib {len(texts['calib'])}")
    if args.init is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(args.init / "tokenizer.json"))
    else:
        tok = train_tokenizer(texts["train"], CONFIG["vocab_size"])
    tok.save(str(args.out / "tokenizer.json"))
    (args.out / "valid.txt").write_text("\n".join(texts["valid"]), encoding="utf-8")
    (args.out / "calib.txt").write_text("\n".join(texts["calib"]), encoding="utf-8")
    ids = np.array([i for enc in tok.encode_batch(texts["train"]) for i in enc.ids + [2]], dtype=np.int32)
    print(f"train tokens: {len(ids):,}")

    spec = spec_from_config(CONFIG)
    names = sorted(spec.all_shapes())
    start_weights = init_weights(spec, rng)
    if args.init is not None:
        from dist_ptq.model.checkpoint import Checkpoint

        ckpt = Checkpoint(args.init)
        start_weights = {n: ckpt.get(n) for n in start_weights}
        ckpt.close()
    params = [ms.Parameter(ms.Tensor(w), name=n) for n, w in sorted(start_weights.items())]
    by_name = dict(zip(names, params))
    mask = causal_mask(args.seq_len)
    cos, sin = (ms.Tensor(a) for a in spec.rope_cos_sin(args.seq_len))

    def loss_fn(x_ids, y_ids):
        x = embed(by_name["model.embed_tokens.weight"], x_ids)
        for i in range(spec.num_layers):
            p = spec.layer_prefix(i)
            layer = {k[len(p):]: v for k, v in by_name.items() if k.startswith(p)}
            x = decoder_layer(layer, spec, x, (cos, sin), mask)
        logits = final_logits(by_name["model.norm.weight"], by_name[spec.lm_head_name], x, spec.rms_norm_eps)
        return ops.cross_entropy(logits.reshape(-1, spec.vocab_size), y_ids.reshape(-1))

    budget = args.minutes * 60
    opt = nn.AdamWeightDecay(params, learning_rate=args.lr, weight_decay=0.01, beta2=0.95)
    grad_fn = ms.value_and_grad(loss_fn, None, opt.parameters)
    start, step, ema = time.time(), 0, None
    est_steps = None
    while time.time() - start < budget:
        # linear warm-up, then cosine decay over the steps the budget is estimated to allow
        if step == 20:
            est_steps = int(budget / ((time.time() - start) / 20))
        total = est_steps or 10**9
        lr = args.lr * min(1.0, (step + 1) / 20) * (0.5 * (1 + math.cos(math.pi * min(1.0, step / total))) * 0.9 + 0.1)
        ops.assign(opt.learning_rate, ms.Tensor(lr, ms.float32))
        starts = rng.integers(0, len(ids) - args.seq_len - 1, size=args.batch)
        batch = np.stack([ids[s : s + args.seq_len + 1] for s in starts])
        loss, grads = grad_fn(ms.Tensor(batch[:, :-1]), ms.Tensor(batch[:, 1:]))
        grads = ops.clip_by_global_norm(grads, 1.0)
        opt(grads)
        value = float(loss.asnumpy())
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        if step % 50 == 0:
            print(f"step {step} loss {value:.3f} (ema {ema:.3f}, ppl {math.exp(ema):.1f}) lr {lr:.2e} {time.time() - start:.0f}s", flush=True)
        step += 1

    from dist_ptq.model.safetensors_io import float32_to_bf16_bits, write_safetensors

    tensors = {n: float32_to_bf16_bits(p.asnumpy()) for n, p in by_name.items()}
    write_safetensors(
        args.out / "model.safetensors", tensors, metadata={"format": "pt"}, dtypes={n: "BF16" for n in tensors}
    )
    (args.out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (args.out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 64}, indent=2) + "\n"
    )
    print(f"trained {step} steps in {time.time() - start:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
