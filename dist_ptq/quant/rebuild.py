"""A committed layer's QuantizedLayer rebuilt from its shard, so a resumed sequential run can move
calibration data through it without quantizing it again.

Every float value the fake-quant forward uses is recomputed exactly as ``quantize_layer`` computed it
(dequantized weights from the stored integers and scales; scales in the model dtype decode exactly);
the per-tensor activation scale and offset come from the commit record.
"""

from __future__ import annotations

import numpy as np

from dist_ptq.model.arch import LINEARS
from dist_ptq.quant import primitives as P
from dist_ptq.quant.layer import QuantizedLayer, QuantLinear


def rebuild_layer(tensors: dict[str, np.ndarray], description: dict[str, str], aux: dict) -> QuantizedLayer:
    """``tensors``: layer-local names, float tensors decoded to float32, the rest as stored."""
    ql = QuantizedLayer(tensors=dict(tensors), description=dict(description), model_dtype=set(), kv=aux.get("kv"))
    # every stored FLOAT tensor: equal to the source's except where AWQ folded a scale into it
    ql.float_overrides = {n: a for n, a in tensors.items() if description.get(n) == "FLOAT"}
    for m in LINEARS:
        kind = description.get(m + ".weight", "FLOAT")
        if kind == "FLOAT":
            continue
        if kind == "W4A16":
            q = P.unpack_int4(tensors[m + ".weight"])
            ws = np.ascontiguousarray(tensors[m + ".weight_scale"].T)
            ws = ws[:, 0] if ws.shape[1] == 1 else ws
        else:
            q, ws = tensors[m + ".weight"], tensors[m + ".weight_scale"]
        lin = QuantLinear(kind=kind, q=q, scale=ws, bias=tensors.get(m + ".bias"),
                          smooth_scale=tensors.get(m + ".smooth_scale"))
        if kind == "W8A8":
            lin.input_scale = tensors[m + ".input_scale"]
            lin.x_scale = float(aux["linears"][m]["x_scale"])
            lin.x_offset = int(aux["linears"][m]["x_offset"])
        ql.linears[m] = lin
    return ql


def layer_aux(ql: QuantizedLayer) -> dict:
    """What rebuild_layer needs beyond the shard: per-tensor activation parameters and the KV kind."""
    return {
        "kv": ql.kv,
        "linears": {m: {"x_scale": lin.x_scale, "x_offset": lin.x_offset} for m, lin in ql.linears.items() if lin.kind == "W8A8"},
    }
