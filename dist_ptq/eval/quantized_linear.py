"""Reference quantized linears: what the Ascend kernels compute, emulated with ops that exist on CPU.

QuantBatchMatmul (int8 × int8 accumulated in int32, plus quant_bias, times deq_scale), QuantV2
(x / input_scale + input_offset, rounded and clamped to int8), per-token dynamic quantization and
the weight-only (antiquant) matmuls are not registered on MindSpore's CPU backend. These functions
compute the same arithmetic with int32 matmuls and float ops; on Ascend the real kernels replace them.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import ops

from dist_ptq.model.forward import matmul_t, to_tensor
from dist_ptq.quant.primitives import dequantize_weight, unpack_int4


def _int_matmul(xq: ms.Tensor, wq_t: ms.Tensor) -> ms.Tensor:
    shape = xq.shape
    acc = ops.matmul(xq.reshape(-1, shape[-1]), wq_t)
    return acc.reshape(*shape[:-1], wq_t.shape[-1])


class ReferenceLinear:
    """One deployed linear, built from its on-disk tensors (layer-local suffixes → arrays)."""

    def __init__(self, kind: str, t: dict[str, np.ndarray]):
        self.kind = kind
        self.bias = to_tensor(t["bias"]) if "bias" in t else None
        self.smooth = to_tensor(t["smooth_scale"]) if "smooth_scale" in t else None  # x is multiplied by it first
        if kind == "W4A16":
            q = unpack_int4(t["weight"])  # (oc, ic)
            scale = np.ascontiguousarray(t["weight_scale"].T)  # (oc, ic/g)
            self.w = to_tensor(dequantize_weight(q, scale[:, 0] if scale.shape[1] == 1 else scale))
        elif kind == "W8A16":
            self.w = to_tensor(dequantize_weight(t["weight"], t["weight_scale"]))
        else:
            self.wq_t = ms.Tensor(np.ascontiguousarray(t["weight"].astype(np.int32).T))
            if kind == "W8A8":
                self.input_scale = to_tensor(t["input_scale"])
                self.input_offset = to_tensor(t["input_offset"].astype(np.float32))
                self.quant_bias = ms.Tensor(t["quant_bias"].astype(np.int32))
                self.deq_scale = to_tensor(t["deq_scale"])
            else:
                self.w_scale = to_tensor(t["weight_scale"])

    def __call__(self, x: ms.Tensor) -> ms.Tensor:
        if self.kind in ("W8A16", "W4A16"):
            y = matmul_t(x * self.smooth if self.smooth is not None else x, self.w)
        elif self.kind == "W8A8":
            xq = ops.clamp(ops.round(x / self.input_scale) + self.input_offset, -128.0, 127.0).astype(ms.int32)
            acc = _int_matmul(xq, self.wq_t) + self.quant_bias
            y = acc.astype(ms.float32) * self.deq_scale
        else:  # W8A8_DYNAMIC
            if self.smooth is not None:
                x = x * self.smooth
            t = ops.amax(ops.abs(x), -1, True) / 127.0
            t = ops.select(t > 0, t, ops.ones_like(t))
            xq = ops.clamp(ops.round(x / t), -127.0, 127.0).astype(ms.int32)
            y = _int_matmul(xq, self.wq_t).astype(ms.float32) * t * self.w_scale
        return y + self.bias if self.bias is not None else y
