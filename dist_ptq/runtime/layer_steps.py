"""Per-layer steps shared by every schedule: calibrate, measure the quantized layer, shape its output.

Each takes tensors and returns values; the stage worker strings them together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import mindspore as ms
import numpy as np

from dist_ptq.config import BackendTarget
from dist_ptq.model.forward import decoder_layer
from dist_ptq.quant.quantized import QuantizedLayer, Recovery
from dist_ptq.quant.schemes import FORMATS, Act, KVScheme, Scheme
from dist_ptq.quant.observers import LayerStats, kv_channels, observe


@dataclass(frozen=True)
class Needs:
    """What calibration must record beyond max/min: GPTQ Hessians, AWQ / clip input samples."""

    hessian: bool = False
    sample_rows: int = 0  # per micro-batch and tap
    min_expert_tokens: int = 0  # an expert routed fewer calibration tokens takes fallback statistics


def layer_tap(stats: LayerStats, layer: int, needs: Needs = Needs()):
    """A forward ``tap`` that records into ``stats`` each tapped activation's statistics."""

    def tap(name: str, t: ms.Tensor) -> None:
        a = t.asnumpy()
        kv = name in ("k", "v")
        a = kv_channels(a) if kv else a.reshape(-1, a.shape[-1])
        stats[name] = observe(a, f"layer {layer} {name}", hessian=needs.hessian and not kv,
                              sample_rows=0 if kv else needs.sample_rows)

    return tap


def observe_batch(weights: dict[str, ms.Tensor], spec, rope, x: ms.Tensor, layer: int, needs: Needs = Needs(),
                  linear=None):
    """The float layer on one micro-batch: (output, statistics of every tap); ``linear`` (default: the
    float linears of ``weights``) lets a caller supply the weights linear by linear."""
    stats: LayerStats = {}
    return decoder_layer(weights, spec, x, rope.cos_sin, rope.mask, linear=linear, tap=layer_tap(stats, layer, needs),
                         index=layer, expert_floor=needs.min_expert_tokens), stats


def batch_errors(x: ms.Tensor, y_float: ms.Tensor, y_quant: ms.Tensor) -> np.ndarray:
    """Per-sample relative error of the layer's update (output minus residual input), float64."""
    df = (y_float - x).asnumpy().astype(np.float64)
    dq = (y_quant - x).asnumpy().astype(np.float64)
    num = np.sqrt(((dq - df) ** 2).sum(axis=(1, 2)))
    den = np.sqrt((df**2).sum(axis=(1, 2)))
    return num / np.maximum(den, 1e-30)


def deploy_tensors(ql: QuantizedLayer, backend: BackendTarget) -> tuple[dict[str, np.ndarray], set[str], set[str], dict | None]:
    """(tensors, model-dtype names, int4 names, description) for the chosen backend, layer-local names."""
    if backend is BackendTarget.ASCEND:
        return ql.tensors, ql.model_dtype, ql.int4, ql.description
    # generic float checkpoint: every quantized weight replaced by its dequantized value
    tensors = {n: a for n, a in ql.tensors.items() if ql.description[n] == Scheme.FLOAT}
    for name, lin in ql.linears.items():
        w = lin.w_dq
        if FORMATS[lin.kind].act is Act.STATIC and lin.x_scale:
            w = w * (np.float32(lin.x_scale) / lin.input_scale.astype(np.float32))[None, :]
        elif lin.smooth_scale is not None:
            w = w * lin.smooth_scale[None, :]
        tensors[name + ".weight"] = w.astype(np.float32)
        if lin.bias is not None:
            tensors[name + ".bias"] = lin.bias
    return tensors, set(tensors), set(), None


def activation_record(ql: QuantizedLayer, prefix: str) -> dict:
    """Activation and K/V parameters of a layer, for dist_ptq.json when the backend is NONE."""
    rec = {}
    for name, lin in ql.linears.items():
        act = FORMATS[lin.kind].act
        if act is Act.STATIC:
            rec[prefix + name] = {"type": lin.kind, "x_scale": lin.x_scale, "x_offset": lin.x_offset,
                                  "input_scale": [float(v) for v in lin.input_scale]}
        elif act is Act.DYNAMIC:
            rec[prefix + name] = {"type": lin.kind,
                                  "smooth_scale": None if lin.smooth_scale is None else [float(v) for v in lin.smooth_scale]}
    if ql.kv is KVScheme.C8:
        rec[prefix + "self_attn"] = {"type": ql.kv, "k_scale": [float(v) for v in ql.tensors["self_attn.k_scale"]],
                                     "v_scale": [float(v) for v in ql.tensors["self_attn.v_scale"]]}
    elif ql.kv is KVScheme.C8_DYNAMIC:
        rec[prefix + "self_attn"] = {"type": ql.kv}
    return rec


def recovery_record(ql: QuantizedLayer) -> dict:
    """What GPTQ, AWQ and clip search settled on per linear (report.json); empty for plain RTN."""
    return {m: {k: v for k, v in asdict(lin.recovery).items() if v is not None}
            for m, lin in sorted(ql.linears.items()) if lin.recovery != Recovery()}
