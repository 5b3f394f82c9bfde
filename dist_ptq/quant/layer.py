"""Quantizing one decoder layer: (float tensors, merged statistics, PTQConfig) → deploy tensors.

Pure: no Ray, no files, no progress bars. The result also carries the float view of every quantized
linear (dequantized weight, activation parameters) that the fake-quant forward uses, and the float
tensors that AWQ changed (``float_overrides``), which that forward must use instead of the source's.

Order: (1) AWQ scales are searched for every input group on the source weights, then applied: each
linear reading the input takes W·diag(s); the producer of the input divides by s — the RMSNorm weight
(attn_in, mlp_in), up_proj's output rows (down_in), v_proj's output rows (o_in, when v's output is
o's input: no GQA); otherwise o_proj stores ``smooth_scale`` = 1/s. Changed float tensors are rounded
to the model dtype. (2) Per linear: clip search (``weight_clip``, and always with AWQ, over
``AWQConfig.weight_clip_ratio``) on the calibration sample as the linear sees it (divided by s),
then GPTQ (Hessian diag(1/s) H diag(1/s) when smoothed) or RTN with the clip ratio.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import replace

import numpy as np

from dist_ptq.config import (AWQConfig, GPTQQuantConfig, OSLConfig, OutliersSuppressionType, PrecisionRecovery, PTQConfig,
                             QuantGranularity, SmoothQuantConfig)
from dist_ptq.errors import CalibrationError, ConfigError
from dist_ptq.model.arch import ArchSpec, LayerSpec, expert_groups
from dist_ptq.quant import primitives as P
from dist_ptq.quant.awq import awq_search
from dist_ptq.quant.clip import act_clip_search, clip_search
from dist_ptq.quant.gptq import gptq_quantize
from dist_ptq.quant.kvcache import static_kv_scales
from dist_ptq.quant.observers import LayerStats
from dist_ptq.quant.osl import osl_search
from dist_ptq.quant.quantized import QuantizedLayer, QuantLinear, Recovery
from dist_ptq.quant.schemes import FORMATS, MODEL, KVScheme, Scheme, kv_scheme, linear_scheme
from dist_ptq.quant.smooth import smooth_scale

# (tensor name, array, stored in the model dtype, packed int4) for each output tensor as it is made
Sink = Callable[[str, np.ndarray, bool], None]
_EMPTY = np.empty(0, np.float32)

__all__ = ["QuantizedLayer", "QuantLinear", "Recovery", "check_group_size", "layer_parts", "quantize_layer", "read_order", "round_to_dtype"]


def round_to_dtype(a: np.ndarray, tag: str) -> np.ndarray:
    """What a float32 array becomes once stored in the model dtype (BF16 / F16 / F32), as float32."""
    from dist_ptq.model.safetensors_io import bf16_bits_to_float32, float32_to_bf16_bits

    a = np.asarray(a, np.float32)
    if tag == "BF16":
        return bf16_bits_to_float32(float32_to_bf16_bits(a))
    if tag == "F16":
        return a.astype(np.float16).astype(np.float32)
    return a


def _need(stats: LayerStats | None, tap: str, layer: int):
    if stats is None or tap not in stats:
        raise CalibrationError(f"layer {layer}: no calibration statistics for '{tap}'; this config needs a calibration pass")
    return stats[tap]


def _sample(stats: LayerStats | None, tap: str, layer: int) -> np.ndarray:
    st = _need(stats, tap, layer)
    if st.sample is None:
        raise CalibrationError(f"layer {layer}: no calibration input sample for '{tap}'; "
                               "AWQ and weight_clip need calibration that keeps input samples")
    return st.sample


def _act_key(cfg: PTQConfig) -> tuple:
    sup = cfg.outliers_suppression
    args = (cfg.algo(SmoothQuantConfig).alpha if sup is OutliersSuppressionType.SMOOTH else
            str(cfg.algo(OSLConfig)) if sup is OutliersSuppressionType.OSL else None)
    return (cfg.act_quant_granularity, sup is OutliersSuppressionType.SMOOTH or sup is OutliersSuppressionType.OSL, args)


def _awq_key(cfg: PTQConfig) -> tuple:
    a = cfg.algo(AWQConfig)
    return (cfg.weight_bits, cfg.group_size, a.duo_scaling, tuple(a.smooth_alpha))


def _group_configs(index: int, prefix: str, members: tuple[str, ...], cfg: PTQConfig) -> tuple[dict, dict]:
    """(quantized members → config, those with quantized activations), checked for a shared input."""
    cfgs = {m: cfg.config_for(prefix + m) for m in members}
    cfgs = {m: c for m, c in cfgs.items() if c is not None and c.weight_quant_dtype is not None}
    act = {m: c for m, c in cfgs.items() if c.act_quant_dtype is not None}
    if len({_act_key(c) for c in act.values()}) > 1:
        raise ConfigError(
            f"layer {index}: {', '.join(act)} share one input but got different activation settings; "
            "expected the same act_quant_granularity and outliers_suppression for linears sharing an input"
        )
    awq = [c for c in cfgs.values() if c.outliers_suppression is OutliersSuppressionType.AWQ]
    if awq and (len(awq) != len(cfgs) or len({_awq_key(c) for c in awq}) > 1):
        raise ConfigError(
            f"layer {index}: {', '.join(cfgs)} share one input but got different AWQ settings; expected "
            "outliers_suppression AWQ with the same weight dtype, group_size and algo_args for all or none of them"
        )
    return cfgs, act


def _apply_awq(index: int, w: ChainMap, groups: dict, stats: LayerStats | None, layer: LayerSpec):
    """Search every AWQ group on the source weights, then fold the scales into ``w`` (a working copy).

    Returns (group → (s, α), names of changed tensors, linear → smooth_scale for unfoldable inputs)."""
    searched = {}
    for group, (cfgs, _) in groups.items():
        if cfgs and next(iter(cfgs.values())).outliers_suppression is OutliersSuppressionType.AWQ:
            c0 = next(iter(cfgs.values()))
            a = c0.algo(AWQConfig)
            s, alpha, _ = awq_search(_sample(stats, group, index), [w[m + ".weight"] for m in cfgs],
                                     c0.weight_bits, c0.group_size, a.smooth_alpha, a.duo_scaling)
            searched[group] = (s, alpha)
    changed, smooth = set(), {}
    readers = layer.input_groups
    for group, (s, _) in searched.items():
        target = layer.fold_into.get(group)
        if target is None or (not target.endswith(".weight")
                              and w[target + ".weight"].shape[0] != w[readers[group][0] + ".weight"].shape[1]):
            # no producer to fold into (an expert's input is a subset of the norm's output; GQA: v's rows
            # are not o's inputs): each quantized reader takes W·diag(s) and stores 1/s as smooth_scale
            for m in groups[group][0]:
                w[m + ".weight"] = (w[m + ".weight"] * s[None, :]).astype(np.float32)
                changed.add(m + ".weight")
                smooth[m] = (1.0 / s).astype(np.float32)
            continue
        for m in readers[group]:  # every reader of the input, quantized or not, keeps the function
            w[m + ".weight"] = (w[m + ".weight"] * s[None, :]).astype(np.float32)
            changed.add(m + ".weight")
        if target.endswith(".weight"):
            w[target] = (w[target] / s).astype(np.float32)
            changed.add(target)
        else:
            for name, div in ((target + ".weight", s[:, None]), (target + ".bias", s)):
                if name in w:
                    w[name] = (w[name] / div).astype(np.float32)
                    changed.add(name)
    return searched, changed, smooth


def _quantize_weight(w: np.ndarray, c: PTQConfig, stats: LayerStats | None, group: str, x_div: np.ndarray | None,
                     layer: int, name: str) -> tuple[np.ndarray, np.ndarray, Recovery]:
    """(scale, q, recovery) of one weight whose input is X / x_div: clip search, then GPTQ or RTN."""
    bits, g, rec = c.weight_bits, c.group_size, Recovery()
    ratio = 1.0
    if c.weight_clip or c.outliers_suppression is OutliersSuppressionType.AWQ:
        x = _sample(stats, group, layer)
        x = x if x_div is None else x / x_div[None, :]
        ratio = clip_search(x, w, bits, g, c.algo(AWQConfig).weight_clip_ratio)
        rec.clip_ratio_mean = float(ratio.mean())
    if c.precision_recovery is PrecisionRecovery.GPTQ:
        h = _need(stats, group, layer).hessian()
        h = h if x_div is None else h / np.outer(x_div.astype(np.float64), x_div.astype(np.float64))
        a = c.algo(GPTQQuantConfig)
        r = gptq_quantize(w, h, bits, g, a.block_size, a.damp_percent, a.desc_act, a.static_groups, ratio, name)
        rec.gptq_damp, rec.gptq_damp_raises, rec.gptq_loss = r.damp, r.damp_raises, r.loss
        return r.scale, r.q, rec
    ws = P.weight_scale(w, bits, g, ratio)
    return ws, P.quantize_weight(w, ws, bits), rec


def check_group_size(linear: str, ic: int, group_size: int) -> None:
    """A W4A16 group must tile the linear's input channels."""
    if group_size and ic % group_size:
        raise ConfigError(
            f"{linear} has {ic} input channels, not a multiple of group_size {group_size}; expected a "
            "group_size dividing every quantized linear's input (or per_channel, or blacklist the layer)"
        )


def layer_parts(layer: LayerSpec) -> list[tuple[frozenset[str], tuple[str, ...]]]:
    """A MoE layer as parts quantized one after another: (input groups, linears) of everything but the
    routed experts first (attention, shared expert; the float tensors go with it), then each expert's."""
    experts = [frozenset(expert_groups(e)) for e in range(layer.moe.num_experts)] if layer.moe else []
    rest = frozenset(layer.input_groups) - frozenset().union(*experts)
    return [(g, tuple(m for grp in sorted(g) for m in layer.input_groups[grp])) for g in [rest, *experts]]


def read_order(layer: LayerSpec, names: Iterable[str]) -> list[str]:
    """The order :func:`quantize_layer` reads a layer's tensors in when every linear is quantized:
    the readers of each input in turn (weight, then bias), then the float tensors by name."""
    names = set(names)
    first = [t for members in layer.input_groups.values() for m in members for t in (m + ".weight", m + ".bias") if t in names]
    return first + sorted(names - set(first))


def quantize_layer(
    index: int,
    weights: Mapping[str, np.ndarray],
    stats: LayerStats | None,
    cfg: PTQConfig,
    spec: ArchSpec,
    model_dtype: str = "BF16",
    sink: Sink | None = None,
    part: Collection[str] | None = None,
) -> QuantizedLayer:
    """Apply ``cfg`` (with its blacklist and layer policies) to decoder layer ``index``.

    ``weights`` may read tensors on access (``Checkpoint.layer_lazy``): without calibration every
    tensor is then looked up once and dropped once quantized, so one float linear is held at a time.
    ``sink`` takes each output tensor as soon as it is made instead of ``QuantizedLayer.tensors``
    (a MoE layer's output can be larger than a worker's memory); the linears then keep their kind and
    recovery record only, not their weights.

    ``part``: quantize only these input groups' linears (:func:`layer_parts`), ``weights`` holding
    exactly the part's tensors; the KV-cache scales go with the part holding 'attn_in'. A MoE layer
    quantized part by part gives the values of the whole, since no expert's math reads another's."""
    prefix, layer = spec.layer_prefix(index), spec.layer(index)
    out = QuantizedLayer(tensors={}, description={}, model_dtype=set())
    put = sink or (lambda name, a, in_model_dtype, int4: out.tensors.__setitem__(name, a))
    quantized = set()
    groups = {g: _group_configs(index, prefix, members, cfg) for g, members in layer.input_groups.items()
              if part is None or g in part}
    for cfgs, _ in groups.values():
        for m, c in cfgs.items():
            check_group_size(prefix + m, layer.dims(m)[1], c.group_size)
    work = ChainMap({}, weights)  # AWQ's changed tensors over the source
    awq, changed, awq_smooth = _apply_awq(index, work, groups, stats, layer)

    for group, (cfgs, act) in groups.items():
        s = None
        if act:
            c0 = next(iter(act.values()))
            st = _need(stats, group, index)
            static = c0.act_quant_granularity is QuantGranularity.PER_TENSOR
            osl = None
            if c0.outliers_suppression is OutliersSuppressionType.SMOOTH:
                alpha = c0.algo(SmoothQuantConfig).alpha
                s = smooth_scale(st.absmax, [weights[m + ".weight"] for m in act], alpha)
            elif c0.outliers_suppression is OutliersSuppressionType.OSL:
                a = c0.algo(OSLConfig)
                osl = osl_search(_sample(stats, group, index), st.absmax, [weights[m + ".weight"] for m in act],
                                 a.alpha_grid, a.allow_unsmoothed, st.min if static else None,
                                 st.max if static else None, c0.weight_bits, c0.group_size)
                s = osl.scale
            act_ratio = None
            if static:
                sm = np.ones_like(st.absmax) if s is None else s
                lo, hi = st.min, st.max
                if c0.weight_clip:
                    act_ratio = act_clip_search(_sample(stats, group, index), [weights[m + ".weight"] for m in act], sm,
                                                lo, hi, c0.algo(AWQConfig).weight_clip_ratio, c0.weight_bits, c0.group_size)
                    lo, hi = lo * np.float32(act_ratio), hi * np.float32(act_ratio)
                x_scale, x_offset = P.asym_params((lo / sm).min(), (hi / sm).max())
                input_scale = round_to_dtype(np.float32(x_scale) * sm, model_dtype)
        for m, c in cfgs.items():
            w = work[m + ".weight"]
            x_div = awq[group][0] if group in awq else None
            if m in act and s is not None:
                w, x_div = w * s[None, :], s
            ws, q, rec = _quantize_weight(w, c, stats, group, x_div, index, prefix + m)
            fmt = FORMATS[linear_scheme(c)]
            if getattr(fmt.slot("weight_scale"), "dtype", None) == MODEL:  # as deployed, so the measured error is the deployed one
                ws = round_to_dtype(ws, model_dtype)
            if group in awq:
                rec.awq_alpha = awq[group][1]
            if m in act and act_ratio is not None:
                rec.act_clip_ratio = act_ratio
            if m in act and osl is not None:
                rec.osl_alpha, rec.osl_error, rec.osl_unsmoothed_error = osl.alpha, osl.error, osl.unsmoothed_error
            lin = QuantLinear(kind=fmt.scheme, q=q, scale=ws, recovery=rec)
            if m in act and static:
                lin.x_scale, lin.x_offset, lin.input_scale = float(x_scale), x_offset, input_scale
            elif m in act and s is not None:
                lin.smooth_scale = (1.0 / s).astype(np.float32)
            elif m in awq_smooth:
                lin.smooth_scale = awq_smooth[m]
            if m + ".bias" in weights:
                bias = work[m + ".bias"]
                lin.bias = round_to_dtype(bias, model_dtype) if m + ".bias" in changed else bias
            if fmt.int4:
                out.int4.add(m + ".weight")
            for suffix, arr in fmt.encode(lin).items():
                name = m + "." + suffix
                put(name, arr, fmt.slot(suffix).dtype == MODEL, name in out.int4)
                out.description[name] = fmt.scheme
                if fmt.slot(suffix).dtype == MODEL:
                    out.model_dtype.add(name)
            out.linears[m] = lin if sink is None else replace(lin, q=_EMPTY, scale=_EMPTY, bias=None)
            quantized.add(m)
            del w  # before the next linear is read: one float linear at a time

    for name in sorted(weights):
        linear = name.rsplit(".", 1)[0]
        if linear in quantized:
            continue
        value = weights[name]
        if name in changed:
            value = out.float_overrides[name] = round_to_dtype(work[name], model_dtype)
        put(name, value, name not in layer.float32, False)
        out.description[name] = Scheme.FLOAT
        if name not in layer.float32:
            out.model_dtype.add(name)

    out.kv = kv_scheme(cfg, prefix)
    if out.kv is KVScheme.C8 and (part is None or "attn_in" in part):
        kv = static_kv_scales(_need(stats, "k", index).absmax, _need(stats, "v", index).absmax)
        for name, a in kv.items():
            put(name, a, False, False)
        out.description.update({n: KVScheme.C8 for n in kv})
    assert set(layer.linear_names) >= quantized
    return out
