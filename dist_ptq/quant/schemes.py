"""Each scheme's deploy format, as data: the one place that knows what a quantized linear stores.

A :class:`LinearFormat` lists a scheme's tensors (:class:`Slot`: suffix, dtype, logical shape) and
turns a :class:`~dist_ptq.quant.quantized.QuantLinear` into them (``encode``) and back (``decode``).
Everything else asks it: the layer quantizer, the fake-quant and reference forwards, the resume
rebuild, ``verify``'s expected tensors, the tensor-parallel split rules and ``inspect``.

Logical dims of a slot, in stored order (SPEC §4):

| dims             | what                                              | TP: column-parallel | row-parallel          |
|------------------|---------------------------------------------------|---------------------|-----------------------|
| (oc, ic)         | int8 or float weight                              | split oc            | split ic              |
| (ic, oc/2)       | int4 weight, two per byte, transposed             | split oc/2          | split ic              |
| (ic/g, oc)       | int4 group scales (g = ic: per channel)           | split oc            | split ic/g, or whole  |
| (oc,)            | per-output multiplier (scales)                    | split               | whole on every rank   |
| (oc,) ``once``   | added once per output (bias, quant_bias)          | split               | rank 0, zeros elsewhere |
| (ic,)            | input side (input_scale, offset, smooth_scale)    | whole on every rank | split                 |
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from dist_ptq.config import PTQConfig, QuantGranularity
from dist_ptq.quant import primitives as P
from dist_ptq.quant.quantized import QuantLinear

MODEL = "model"  # a slot stored in the model dtype (BF16 / F16 / F32, from the source checkpoint)


class Scheme(enum.StrEnum):
    """How a linear is stored; the value is its ``quantization_description.json`` type (SPEC §3)."""

    FLOAT = "FLOAT"
    W8A16 = "W8A16"
    W4A16 = "W4A16"
    W8A8 = "W8A8"
    W8A8_DYNAMIC = "W8A8_DYNAMIC"
    W4A8_DYNAMIC = "W4A8_DYNAMIC"  # A8W4: int4 group weights, int8 per-token activations


class KVScheme(enum.StrEnum):
    """How a layer's KV cache is stored (C8_DYNAMIC has no tensors)."""

    C8 = "C8"
    C8_DYNAMIC = "C8_DYNAMIC"


class Act(enum.Enum):
    """What happens to a linear's input before the matmul."""

    FLOAT = "float"  # weight-only: the input stays float (times smooth_scale where stored)
    STATIC = "static"  # int8 per tensor with calibrated input_scale / input_offset
    DYNAMIC = "dynamic"  # int8 per token, scale computed at run time (times smooth_scale first)


@dataclass(frozen=True)
class Slot:
    """One tensor a linear stores: ``<linear>.<suffix>``."""

    suffix: str
    dtype: str  # safetensors tag, or MODEL
    dims: tuple[str, ...]  # logical dims in stored order: 'oc', 'ic', 'oc/2', 'ic/g'
    required: bool = True
    once: bool = False  # added once per output: a row-parallel rank 0 holds it, the others zeros

    def axis(self, side: str) -> int | None:
        """The stored axis carrying the logical output ('oc') or input ('ic') dim, None if none does."""
        return next((i for i, d in enumerate(self.dims) if d.startswith(side)), None)

    @property
    def grouped(self) -> bool:
        return "ic/g" in self.dims

    def shape(self, oc: int, ic: int, group: int | None) -> tuple[int, ...] | None:
        """The stored shape; None for a grouped slot whose group size is not known."""
        size = {"oc": oc, "ic": ic, "oc/2": oc // 2, "ic/g": ic // group if group else None}
        out = tuple(size[d] for d in self.dims)
        return None if None in out else out


BIAS = Slot("bias", MODEL, ("oc",), required=False, once=True)
_W_INT8 = Slot("weight", "I8", ("oc", "ic"))
_SCALE = Slot("weight_scale", "F32", ("oc",))
# MindFormers' A8W8DynamicLinearMethod holds w_scale in the compute dtype (bf16 models) and Golden
# Stick's DynamicQuantMatmul saves it so (docs/formats.md): stored in the model dtype
_SCALE_DYNAMIC = Slot("weight_scale", MODEL, ("oc",))
_SMOOTH = Slot("smooth_scale", "F32", ("ic",), required=False)
_W_INT4 = Slot("weight", "I8", ("ic", "oc/2"))
_GROUP_SCALE = Slot("weight_scale", "F32", ("ic/g", "oc"))


@dataclass(frozen=True)
class LinearFormat:
    scheme: Scheme
    act: Act
    slots: tuple[Slot, ...]  # BIAS last: every scheme keeps the source's bias, in the model dtype

    @property
    def int4(self) -> bool:
        """Weights packed two per byte (and scales per group of input channels)."""
        return self.slots[0].dims == _W_INT4.dims

    def slot(self, suffix: str) -> Slot | None:
        return next((s for s in self.slots if s.suffix == suffix), None)

    def encode(self, lin: QuantLinear) -> dict[str, np.ndarray]:
        """suffix → the array written for it (values as stored; dtype tags from the slots)."""
        q, ws = lin.q, lin.scale
        if self.int4:
            t = {"weight": P.pack_int4(q), "weight_scale": np.ascontiguousarray((ws if ws.ndim == 2 else ws[:, None]).T)}
        else:
            t = {"weight": q, "weight_scale": ws}
        if self.act is Act.STATIC:
            t["deq_scale"] = (np.float32(lin.x_scale) * ws).astype(np.float32)
            t["quant_bias"] = (-lin.x_offset * q.astype(np.int64).sum(1)).astype(np.int32)
            t["input_scale"] = lin.input_scale
            t["input_offset"] = np.full(q.shape[1], lin.x_offset, np.int8)
        elif lin.smooth_scale is not None:
            t["smooth_scale"] = lin.smooth_scale
        if lin.bias is not None:
            t["bias"] = lin.bias
        return t

    def decode(self, t: dict[str, np.ndarray], aux: dict | None = None) -> QuantLinear:
        """The float view of stored tensors (suffix → array; float ones decoded to float32).

        A static scheme's per-tensor ``x_scale`` is not stored exactly (input_scale is rounded to the
        model dtype): ``aux`` (from :func:`linear_aux`) brings it back, else it stays None."""
        if self.int4:
            q = P.unpack_int4(t["weight"])
            ws = np.ascontiguousarray(t["weight_scale"].T)
            ws = ws[:, 0] if ws.shape[1] == 1 else ws
        else:
            q, ws = t["weight"], t["weight_scale"]
        lin = QuantLinear(kind=self.scheme, q=q, scale=ws, bias=t.get("bias"), smooth_scale=t.get("smooth_scale"))
        if self.act is Act.STATIC:
            lin.input_scale = t["input_scale"]
            if aux is not None:
                lin.x_scale, lin.x_offset = float(aux["x_scale"]), int(aux["x_offset"])
        return lin

    def linear_aux(self, lin: QuantLinear) -> dict | None:
        """What ``decode`` needs beyond the stored tensors (the commit record keeps it)."""
        return {"x_scale": lin.x_scale, "x_offset": lin.x_offset} if self.act is Act.STATIC else None


FORMATS: dict[Scheme, LinearFormat] = {
    Scheme.FLOAT: LinearFormat(Scheme.FLOAT, Act.FLOAT, (Slot("weight", MODEL, ("oc", "ic")), BIAS)),
    Scheme.W8A16: LinearFormat(Scheme.W8A16, Act.FLOAT, (_W_INT8, _SCALE, _SMOOTH, BIAS)),
    Scheme.W4A16: LinearFormat(Scheme.W4A16, Act.FLOAT, (_W_INT4, _GROUP_SCALE, _SMOOTH, BIAS)),
    Scheme.W8A8: LinearFormat(Scheme.W8A8, Act.STATIC, (
        _W_INT8,
        Slot("deq_scale", "F32", ("oc",)),
        Slot("quant_bias", "I32", ("oc",), once=True),
        Slot("input_scale", MODEL, ("ic",)),
        Slot("input_offset", "I8", ("ic",)),
        _SCALE,
        BIAS,
    )),
    Scheme.W8A8_DYNAMIC: LinearFormat(Scheme.W8A8_DYNAMIC, Act.DYNAMIC, (_W_INT8, _SCALE_DYNAMIC, _SMOOTH, BIAS)),
    Scheme.W4A8_DYNAMIC: LinearFormat(Scheme.W4A8_DYNAMIC, Act.DYNAMIC, (_W_INT4, _GROUP_SCALE, _SMOOTH, BIAS)),
}


def format_of(kind: str) -> LinearFormat | None:
    """The format of a description type, None for a type no linear has."""
    try:
        return FORMATS[Scheme(kind)]
    except ValueError:
        return None


# ---- the KV cache ----------------------------------------------------------------------------

KV_TENSORS: dict[str, str] = {"self_attn.k_scale": "F32", "self_attn.v_scale": "F32",
                              "self_attn.k_offset": "I8", "self_attn.v_offset": "I8"}
"""C8's tensors (layer-local name → dtype), each (kv_heads · head_dim,); C8_DYNAMIC stores none."""


# ---- which scheme a config asks for -------------------------------------------------------------


def linear_scheme(cfg: PTQConfig | None) -> Scheme:
    """The scheme of a linear quantized with ``cfg`` (a PTQConfig, or None when blacklisted)."""
    if cfg is None or cfg.weight_quant_dtype is None:
        return Scheme.FLOAT
    if cfg.act_quant_dtype is not None:
        if cfg.weight_bits == 4:
            return Scheme.W4A8_DYNAMIC
        return Scheme.W8A8_DYNAMIC if cfg.act_quant_granularity is QuantGranularity.PER_TOKEN else Scheme.W8A8
    return Scheme.W8A16 if cfg.weight_bits == 8 else Scheme.W4A16


def kv_scheme(cfg: PTQConfig, layer_prefix: str) -> KVScheme | None:
    """The KV-cache scheme of the layer at ``layer_prefix`` under ``cfg`` (its policies and blacklist
    applied to ``<prefix>self_attn``); None when the cache stays float. The one way it is found:
    C8_DYNAMIC leaves no tensor, so a reader asks the recorded config, not the shards."""
    c = cfg.config_for(layer_prefix + "self_attn")
    if c is None or c.kvcache_quant_dtype is None:
        return None
    return KVScheme.C8_DYNAMIC if c.kvcache_quant_granularity is QuantGranularity.PER_TOKEN else KVScheme.C8
