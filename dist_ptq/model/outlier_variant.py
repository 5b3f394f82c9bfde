"""A function-preserving outlier variant of a model: what smoothing is for, on a model we can test.

Real LLMs carry activation outliers in a few hidden channels: the inputs of q/k/v and gate/up are
tens of times larger there than elsewhere, so one per-tensor int8 activation scale spends its range on
those channels and rounds the rest to a handful of levels. SmoothQuant moves that range into the
weights. A small trained fixture lacks such outliers, so this module plants them without changing
what the model computes: in every decoder layer, RMSNorm weight channel j is multiplied by ``factor``
and column j of the linears that read that norm's output (q/k/v after ``input_layernorm``, gate/up
after ``post_attention_layernorm``) is divided by it. Since ``(f·h_j)·(W_ij/f) = h_j·W_ij`` and
``factor`` is a power of two, the scaling is exact in bfloat16/float16/float32 (checked tensor by
tensor: no overflow, no underflow), so the variant's logits equal the source's while its
linear inputs show the outliers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dist_ptq.model import side_files
from dist_ptq.model.arch import load_spec
from dist_ptq.model.safetensors_io import (
    SINGLE_NAME,
    ModelFiles,
    bf16_bits_to_float32,
    float32_to_bf16_bits,
    write_safetensors,
)

# Files copied unchanged when present: config, tokenizer, and the fixture's calibration/validation text.
COPIED = (*side_files.COPIED, "calib.txt", "valid.txt")

# norm -> the linears that read its output
SCALED = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}


def outlier_channels(hidden_size: int, channels: int, seed: int) -> np.ndarray:
    """The hidden channels that get outliers: ``channels`` distinct ones, sorted, fixed by ``seed``."""
    if not 0 < channels <= hidden_size:
        raise ValueError(f"channels={channels}; expected 1..hidden_size={hidden_size}")
    return np.sort(np.random.default_rng(seed).choice(hidden_size, size=channels, replace=False))


def _decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    return bf16_bits_to_float32(raw) if dtype == "BF16" else raw.astype(np.float32)


def _encode(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return float32_to_bf16_bits(a)
    return a.astype(np.float16 if dtype == "F16" else np.float32)


def _scaled(raw: np.ndarray, dtype: str, name: str, mult: np.ndarray) -> np.ndarray:
    """``raw`` (stored form) times ``mult`` (broadcast), re-encoded in ``dtype``; asserts exactness."""
    if dtype not in ("BF16", "F16", "F32"):
        raise ValueError(f"tensor {name} has dtype {dtype}; expected BF16, F16 or F32")
    x = _decode(raw, dtype)
    out = _encode(x * mult, dtype)
    back = _decode(out, dtype)
    # exact iff scaling back recovers every value bit for bit (fails on overflow to inf or on underflow)
    if not np.array_equal(back / mult, x, equal_nan=True):
        bad = int(np.count_nonzero(back / mult != x))
        raise ValueError(f"tensor {name}: scaling is not exact in {dtype} for {bad} values (overflow or underflow)")
    return out


def write_outlier_variant(
    src_dir: Path | str, dst_dir: Path | str, channels: int = 4, factor: float = 32.0, seed: int = 0
) -> Path:
    """Write the function-preserving outlier variant of the model in ``src_dir`` to ``dst_dir``.

    ``dst_dir`` gets the copied config/tokenizer/text files and one ``model.safetensors`` holding
    every source tensor in its source dtype, the scaled ones changed. ``factor`` must be a power of
    two (so the model's function is preserved exactly). Returns ``dst_dir``. The source is only read.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    factor = float(factor)
    if not (factor > 0 and math.isfinite(factor) and math.frexp(factor)[0] == 0.5):
        raise ValueError(f"factor={factor}; expected a power of two, so that the scaling is exact")
    if dst.exists() and (dst.resolve() == src.resolve() or any(dst.iterdir())):
        raise FileExistsError(f"{dst}: exists and is not empty; expected a new directory")
    spec = load_spec(src)
    chans = outlier_channels(spec.hidden_size, channels, seed)

    # per-tensor multiplier (broadcast over the stored shape) for every tensor that changes
    mult: dict[str, np.ndarray] = {}
    up = np.ones(spec.hidden_size, dtype=np.float32)
    up[chans] = factor
    down = (1.0 / up)[None, :].astype(np.float32)  # 1/factor is exact for a power of two
    for i in range(spec.num_layers):
        p = spec.layer_prefix(i)
        for norm, linears in SCALED.items():
            mult[f"{p}{norm}.weight"] = up
            for lin in linears:
                mult[f"{p}{lin}.weight"] = down

    dst.mkdir(parents=True, exist_ok=True)
    with ModelFiles(src) as files:
        missing = sorted(set(mult) - set(files.keys()))
        if missing:
            raise ValueError(f"{src}: tensor {missing[0]} is missing; config.json implies it")
        tensors, dtypes = {}, {}
        for name in files.keys():
            dtype = files.dtype(name)
            raw = files.get_raw(name)
            tensors[name] = _scaled(raw, dtype, name, mult[name]) if name in mult else raw
            dtypes[name] = dtype
        write_safetensors(dst / SINGLE_NAME, tensors, metadata={"format": "pt"}, dtypes=dtypes)
        del tensors
    side_files.copy_side_files(src, dst, COPIED)
    return dst
