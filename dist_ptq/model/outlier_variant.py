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

``inner=True`` (the harder variant, :data:`HARDER`) also plants outliers on the inputs of o_proj and
down_proj, which no norm feeds:

* v → o: row r = k·head_dim + c of v_proj (and its bias) is multiplied by f. Attention is linear in V,
  so channel c of the output of every query head h that reads kv head k (h // (heads/kv_heads) = k,
  the GQA repeat) is f times larger; column h·head_dim + c of o_proj is divided by f for each such h.
* up → down: row j of up_proj is multiplied by f; ``silu(gate)·up`` is linear in up, so input j of
  down_proj is f times larger and column j of down_proj is divided by f.

``factor`` may give one power of two per outlier channel (``HARDER``: ×64 and ×32), applied to the
channels in sorted order, the same for the norm, v and up channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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

# the harder variant: ×64/×32 outliers on the norms and on the o_proj / down_proj inputs
HARDER = {"channels": 4, "factor": (64.0, 32.0, 64.0, 32.0), "inner": True}


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


def _factors(factor: float | Sequence[float], channels: int) -> np.ndarray:
    """One power of two per outlier channel (a scalar is repeated); anything else is refused."""
    f = np.broadcast_to(np.asarray(factor, dtype=np.float64), (channels,)) if np.ndim(factor) == 0 else \
        np.asarray(factor, dtype=np.float64)
    if f.shape != (channels,):
        raise ValueError(f"factor has {f.size} values; expected one, or one per channel ({channels})")
    for v in f:
        if not (v > 0 and math.isfinite(v) and math.frexp(v)[0] == 0.5):
            raise ValueError(f"factor={v:g}; expected a power of two, so that the scaling is exact")
    return f.astype(np.float32)


def _multipliers(spec, channels: int, f: np.ndarray, seed: int, inner: bool) -> dict[str, np.ndarray]:
    """Per-tensor multiplier (broadcast over the stored shape) of every tensor that changes."""
    def vec(n: int, chans: np.ndarray) -> np.ndarray:
        v = np.ones(n, dtype=np.float32)
        v[chans] = f
        return v

    norm_up = vec(spec.hidden_size, outlier_channels(spec.hidden_size, channels, seed))
    norm_down = 1.0 / norm_up  # 1/f is exact for a power of two
    kv_rows, rep = spec.num_kv_heads * spec.head_dim, spec.num_heads // spec.num_kv_heads
    v_up = vec(kv_rows, outlier_channels(kv_rows, channels, seed + 1))
    # o_proj column h·d + c reads channel c of kv head h // rep: the GQA repeat of v_up
    o_down = 1.0 / np.repeat(v_up.reshape(spec.num_kv_heads, 1, spec.head_dim), rep, axis=1).reshape(-1)
    mlp_up = vec(spec.intermediate_size, outlier_channels(spec.intermediate_size, channels, seed + 2))
    mult: dict[str, np.ndarray] = {}
    for i in range(spec.num_layers):
        p = spec.layer_prefix(i)
        for norm, linears in SCALED.items():
            mult[f"{p}{norm}.weight"] = norm_up
            for lin in linears:
                mult[f"{p}{lin}.weight"] = norm_down[None, :]
        if not inner:
            continue
        mult[f"{p}self_attn.v_proj.weight"] = v_up[:, None] * norm_down[None, :]
        if spec.qkv_bias:
            mult[f"{p}self_attn.v_proj.bias"] = v_up
        mult[f"{p}self_attn.o_proj.weight"] = o_down[None, :]
        mult[f"{p}mlp.up_proj.weight"] = mlp_up[:, None] * norm_down[None, :]
        mult[f"{p}mlp.down_proj.weight"] = (1.0 / mlp_up)[None, :]
    return mult


def write_outlier_variant(
    src_dir: Path | str, dst_dir: Path | str, channels: int = 4, factor: float | Sequence[float] = 32.0,
    seed: int = 0, inner: bool = False,
) -> Path:
    """Write the function-preserving outlier variant of the model in ``src_dir`` to ``dst_dir``.

    ``dst_dir`` gets the copied config/tokenizer/text files and one ``model.safetensors`` holding
    every source tensor in its source dtype, the scaled ones changed. ``factor`` must be a power of
    two, or a sequence of them, one per channel (so the model's function is preserved exactly);
    ``inner`` adds the v→o and up→down outliers. Returns ``dst_dir``. The source is only read.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    f = _factors(factor, channels)
    if dst.exists() and (dst.resolve() == src.resolve() or any(dst.iterdir())):
        raise FileExistsError(f"{dst}: exists and is not empty; expected a new directory")
    spec = load_spec(src)
    mult = _multipliers(spec, channels, f, seed, inner)

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
