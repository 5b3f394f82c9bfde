"""The fake-quant forward: float MindSpore ops that reproduce what the quantized kernels compute.

Used during quantization (sequential calibration, per-layer error); the reference integer inference
in ``eval/quantized_linear.py`` must agree with it.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import ops

from dist_ptq.model.forward import KVFn, LinearFn, expanded, float_linear, matmul_t, to_tensor
from dist_ptq.quant.quantized import QuantizedLayer
from dist_ptq.quant.schemes import FORMATS, Act, KVScheme


def fake_quant_per_token(x: ms.Tensor, axis: int = -1) -> ms.Tensor:
    """Symmetric int8 per token (the last axis is reduced): round(x / t)·t, t = absmax/127."""
    t = ops.amax(ops.abs(x), axis, True) / 127.0
    t = expanded(ops.select(t > 0, t, ops.ones_like(t)), x.shape)
    return ops.clamp(ops.round(x / t), -127.0, 127.0) * t


def layer_weights_for(ql: QuantizedLayer, float_weights: dict[str, ms.Tensor]) -> dict[str, ms.Tensor]:
    """The layer's float tensors as the quantized checkpoint holds them: ``float_weights`` with the
    tensors AWQ changed (norms, folded producers; rounded to the model dtype) swapped in. Pass the
    result to ``decoder_layer`` for the quantized forward: it reads the norm weights from it."""
    if not ql.float_overrides:
        return float_weights
    return {**float_weights, **{n: to_tensor(a) for n, a in ql.float_overrides.items()}}


def fake_linear(ql: QuantizedLayer, float_weights: dict[str, ms.Tensor]) -> LinearFn:
    plain = float_linear(layer_weights_for(ql, float_weights))
    prepared = {}
    for name, lin in ql.linears.items():
        prepared[name] = (
            lin,
            FORMATS[lin.kind].act,
            to_tensor(lin.w_dq),
            None if lin.bias is None else to_tensor(lin.bias),
            None if lin.input_scale is None else to_tensor(lin.input_scale),
            None if lin.smooth_scale is None else to_tensor(lin.smooth_scale),
        )

    def linear(name: str, x: ms.Tensor) -> ms.Tensor:
        if name not in prepared:
            return plain(name, x)
        lin, act, w, bias, input_scale, smooth = prepared[name]
        if act is Act.STATIC:
            xq = ops.clamp(ops.round(x / expanded(input_scale, x.shape)) + float(lin.x_offset), -128.0, 127.0)
            x = (xq - float(lin.x_offset)) * lin.x_scale
        elif act is Act.DYNAMIC:
            x = fake_quant_per_token(x * expanded(smooth, x.shape) if smooth is not None else x)
        elif smooth is not None:  # weight-only with an AWQ scale that could not be folded
            x = x * expanded(smooth, x.shape)
        y = matmul_t(x, w)
        return y + bias if bias is not None else y

    return linear


def kv_int8_static(k_scale: np.ndarray, v_scale: np.ndarray, cache_heads: int) -> KVFn:
    """K/V as read back from an int8 cache with per-channel scales (C8), K and V of ``cache_heads``
    heads each (MLA: one, its k_pe and latent of different widths)."""
    ks = to_tensor(np.asarray(k_scale).reshape(1, cache_heads, 1, -1))
    vs = to_tensor(np.asarray(v_scale).reshape(1, cache_heads, 1, -1))

    def kv(k: ms.Tensor, v: ms.Tensor) -> tuple[ms.Tensor, ms.Tensor]:
        kse, vse = expanded(ks, k.shape), expanded(vs, v.shape)
        return (ops.clamp(ops.round(k / kse), -127.0, 127.0) * kse, ops.clamp(ops.round(v / vse), -127.0, 127.0) * vse)

    return kv


def kv_int8_dynamic(k: ms.Tensor, v: ms.Tensor) -> tuple[ms.Tensor, ms.Tensor]:
    """K/V as read back from an int8 cache quantized per token and kv head (C8_DYNAMIC)."""
    return fake_quant_per_token(k), fake_quant_per_token(v)


def fake_kv(ql: QuantizedLayer, cache_heads: int) -> KVFn | None:
    if ql.kv is KVScheme.C8_DYNAMIC:
        return kv_int8_dynamic
    if ql.kv is KVScheme.C8:
        return kv_int8_static(ql.tensors["self_attn.k_scale"], ql.tensors["self_attn.v_scale"], cache_heads)
    return None
