"""Quantizing one decoder layer: (float tensors, merged statistics, PTQConfig) → deploy tensors.

Pure: no Ray, no files, no progress bars. The result also carries the float view of every quantized
linear (dequantized weight, activation parameters) that the fake-quant forward uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dist_ptq.config import OutliersSuppressionType, PTQConfig, QuantGranularity, SmoothQuantConfig
from dist_ptq.errors import CalibrationError, ConfigError
from dist_ptq.model.arch import INPUT_GROUPS, LINEARS, ArchSpec
from dist_ptq.quant import primitives as P
from dist_ptq.quant.kvcache import static_kv_scales
from dist_ptq.quant.observers import LayerStats
from dist_ptq.quant.smooth import smooth_scale


def round_to_dtype(a: np.ndarray, tag: str) -> np.ndarray:
    """What a float32 array becomes once stored in the model dtype (BF16 / F16 / F32), as float32."""
    from dist_ptq.model.safetensors_io import bf16_bits_to_float32, float32_to_bf16_bits

    a = np.asarray(a, np.float32)
    if tag == "BF16":
        return bf16_bits_to_float32(float32_to_bf16_bits(a))
    if tag == "F16":
        return a.astype(np.float16).astype(np.float32)
    return a


@dataclass
class QuantLinear:
    """One quantized linear, in the float terms the fake-quant forward needs."""

    kind: str  # W8A16 | W4A16 | W8A8 | W8A8_DYNAMIC
    w_dq: np.ndarray  # (oc, ic) dequantized weight, applied to the (smoothed) input
    bias: np.ndarray | None = None
    input_scale: np.ndarray | None = None  # W8A8: (ic,) as stored (model dtype), smoothing folded in
    x_scale: float | None = None  # W8A8: the per-tensor activation scale
    x_offset: int | None = None
    smooth_scale: np.ndarray | None = None  # W8A8_DYNAMIC: x is multiplied by it first


@dataclass
class QuantizedLayer:
    tensors: dict[str, np.ndarray]  # layer-local names, on-disk values
    description: dict[str, str]  # layer-local name → SPEC §3 type
    model_dtype: set[str]  # float tensors stored in the model dtype (others keep their numpy dtype)
    int4: set[str] = field(default_factory=set)  # packed int4 tensors (tagged Int4)
    linears: dict[str, QuantLinear] = field(default_factory=dict)
    kv: str | None = None  # C8 | C8_DYNAMIC | None


def _need(stats: LayerStats | None, tap: str, layer: int):
    if stats is None or tap not in stats:
        raise CalibrationError(f"layer {layer}: no calibration statistics for '{tap}'; this config needs a calibration pass")
    return stats[tap]


def _act_key(cfg: PTQConfig) -> tuple:
    smooth = cfg.outliers_suppression is OutliersSuppressionType.SMOOTH
    return (cfg.act_quant_granularity, smooth, cfg.algo(SmoothQuantConfig).alpha if smooth else None)


def quantize_layer(
    index: int,
    weights: dict[str, np.ndarray],
    stats: LayerStats | None,
    cfg: PTQConfig,
    spec: ArchSpec,
    model_dtype: str = "BF16",
) -> QuantizedLayer:
    """Apply ``cfg`` (with its blacklist and layer policies) to decoder layer ``index``."""
    prefix = spec.layer_prefix(index)
    out = QuantizedLayer(tensors={}, description={}, model_dtype=set())
    quantized = set()

    for group, members in INPUT_GROUPS.items():
        cfgs = {m: cfg.config_for(prefix + m) for m in members}
        cfgs = {m: c for m, c in cfgs.items() if c is not None and c.weight_quant_dtype is not None}
        act = {m: c for m, c in cfgs.items() if c.act_quant_dtype is not None}
        if len({_act_key(c) for c in act.values()}) > 1:
            raise ConfigError(
                f"layer {index}: {', '.join(act)} share one input but got different activation settings; "
                "expected the same act_quant_granularity and outliers_suppression for linears sharing an input"
            )
        s = None
        if act:
            c0 = next(iter(act.values()))
            st = _need(stats, group, index)
            if c0.outliers_suppression is OutliersSuppressionType.SMOOTH:
                alpha = c0.algo(SmoothQuantConfig).alpha
                s = smooth_scale(st.absmax, [weights[m + ".weight"] for m in act], alpha)
            static = c0.act_quant_granularity is QuantGranularity.PER_TENSOR
            if static:
                sm = np.ones_like(st.absmax) if s is None else s
                x_scale, x_offset = P.asym_params((st.min / sm).min(), (st.max / sm).max())
                input_scale = round_to_dtype(np.float32(x_scale) * sm, model_dtype)
        for m, c in cfgs.items():
            w = weights[m + ".weight"]
            bits = c.weight_bits
            if m in act and s is not None:
                w = w * s[None, :]
            ws = P.weight_scale(w, bits, c.group_size)
            q = P.quantize_weight(w, ws, bits)
            kind = c.description_type()
            lin = QuantLinear(kind=kind, w_dq=P.dequantize_weight(q, ws))
            t: dict[str, np.ndarray] = {}
            if bits == 4:
                t[".weight"] = P.pack_int4(q)
                t[".weight_scale"] = np.ascontiguousarray((ws if ws.ndim == 2 else ws[:, None]).T)
                out.int4.add(m + ".weight")
            else:
                t[".weight"] = q
                t[".weight_scale"] = ws
            if kind == "W8A8":
                lin.x_scale, lin.x_offset, lin.input_scale = float(x_scale), x_offset, input_scale
                t[".deq_scale"] = (np.float32(x_scale) * ws).astype(np.float32)
                t[".quant_bias"] = (-x_offset * q.astype(np.int64).sum(1)).astype(np.int32)
                t[".input_scale"] = input_scale
                t[".input_offset"] = np.full(w.shape[1], x_offset, np.int8)
                out.model_dtype.add(m + ".input_scale")
            elif kind == "W8A8_DYNAMIC" and s is not None:
                lin.smooth_scale = (1.0 / s).astype(np.float32)
                t[".smooth_scale"] = lin.smooth_scale
            if m + ".bias" in weights:
                lin.bias = weights[m + ".bias"]
                t[".bias"] = lin.bias
                out.model_dtype.add(m + ".bias")
            for suffix, arr in t.items():
                out.tensors[m + suffix] = arr
                out.description[m + suffix] = kind
            out.linears[m] = lin
            quantized.add(m)

    for name in sorted(weights):
        linear = name.rsplit(".", 1)[0]
        if linear in quantized:
            continue
        out.tensors[name] = weights[name]
        out.description[name] = "FLOAT"
        out.model_dtype.add(name)

    kv_cfg = cfg.config_for(prefix + "self_attn")
    out.kv = kv_cfg.kv_description_type() if kv_cfg is not None else None
    if out.kv == "C8":
        kv = static_kv_scales(_need(stats, "k", index).absmax, _need(stats, "v", index).absmax)
        out.tensors.update(kv)
        out.description.update({n: "C8" for n in kv})
    assert set(LINEARS) >= quantized
    return out
