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
from dist_ptq.quant.schemes import FORMATS, Act, Scheme


def _int_matmul(xq: ms.Tensor, wq_t: ms.Tensor) -> ms.Tensor:
    shape = xq.shape
    acc = ops.matmul(xq.reshape(-1, shape[-1]), wq_t)
    return acc.reshape(*shape[:-1], wq_t.shape[-1])


def per_token_int8(x: ms.Tensor, absmax: ms.Tensor | None = None) -> tuple[ms.Tensor, ms.Tensor]:
    """(int32 values, scale) of x quantized symmetric int8 per token; ``absmax`` overrides the row's
    own (a tensor-parallel rank holding a slice uses the whole row's, all-reduced)."""
    t = (ops.amax(ops.abs(x), -1, True) if absmax is None else absmax) / 127.0
    t = ops.select(t > 0, t, ops.ones_like(t))
    return ops.clamp(ops.round(x / t), -127.0, 127.0).astype(ms.int32), t


class ReferenceLinear:
    """One deployed linear, built from its on-disk tensors (suffixes → arrays, floats as float32)."""

    def __init__(self, kind: str, t: dict[str, np.ndarray]):
        fmt = FORMATS[Scheme(kind)]
        self.kind, self.act = fmt.scheme, fmt.act
        self.bias = to_tensor(t["bias"]) if "bias" in t else None
        self.smooth = to_tensor(t["smooth_scale"]) if "smooth_scale" in t else None  # x is multiplied by it first
        self.wq_groups = None
        if self.act is Act.FLOAT:  # the antiquant matmul: weights dequantized, input float
            self.w = to_tensor(fmt.decode(t).w_dq)
            return
        if fmt.int4:  # A8W4: int32 sums per group of input channels, each times its group's scale
            lin = fmt.decode(t)
            scale = lin.scale if lin.scale.ndim == 2 else lin.scale[:, None]  # (oc, groups)
            groups, oc = scale.shape[1], lin.q.shape[0]
            q = lin.q.astype(np.int32).reshape(oc, groups, -1).transpose(1, 2, 0)  # (groups, g, oc)
            self.wq_groups = ms.Tensor(np.ascontiguousarray(q))
            self.group_scale = to_tensor(np.ascontiguousarray(scale.T[:, None, :]))  # (groups, 1, oc)
            return
        self.wq_t = ms.Tensor(np.ascontiguousarray(t["weight"].astype(np.int32).T))
        if self.act is Act.STATIC:
            self.input_scale = to_tensor(t["input_scale"])
            self.input_offset = to_tensor(t["input_offset"].astype(np.float32))
            self.quant_bias = ms.Tensor(t["quant_bias"].astype(np.int32))
            self.deq_scale = to_tensor(t["deq_scale"])
        else:
            self.w_scale = to_tensor(t["weight_scale"])

    def smoothed(self, x: ms.Tensor) -> ms.Tensor:
        return x * self.smooth if self.smooth is not None else x

    def dynamic(self, x: ms.Tensor, absmax: ms.Tensor | None = None) -> ms.Tensor:
        """A dynamic scheme's matmul on an already smoothed input (without bias)."""
        xq, t = per_token_int8(x, absmax)
        if self.wq_groups is None:
            return _int_matmul(xq, self.wq_t).astype(ms.float32) * t * self.w_scale
        lead, (groups, g, oc) = xq.shape[:-1], self.wq_groups.shape
        xg = xq.reshape(-1, groups, g).transpose(1, 0, 2)  # (groups, tokens, g)
        acc = ops.matmul(xg, self.wq_groups).astype(ms.float32) * self.group_scale  # (groups, tokens, oc)
        return acc.sum(0).reshape(*lead, oc) * t

    def __call__(self, x: ms.Tensor) -> ms.Tensor:
        if self.act is Act.FLOAT:
            y = matmul_t(self.smoothed(x), self.w)
        elif self.act is Act.STATIC:
            xq = ops.clamp(ops.round(x / self.input_scale) + self.input_offset, -128.0, 127.0).astype(ms.int32)
            acc = _int_matmul(xq, self.wq_t) + self.quant_bias
            y = acc.astype(ms.float32) * self.deq_scale
        else:
            y = self.dynamic(self.smoothed(x))
        return y + self.bias if self.bias is not None else y
