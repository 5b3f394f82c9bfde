"""A committed layer's QuantizedLayer rebuilt from its shard, so a resumed sequential run can move
calibration data through it without quantizing it again.

Every float value the fake-quant forward uses is recomputed exactly as ``quantize_layer`` computed it
(dequantized weights from the stored integers and scales; scales in the model dtype decode exactly);
what the shard does not hold exactly (a static scheme's per-tensor activation scale, the KV scheme)
comes from the commit record, written by :func:`layer_aux`.
"""

from __future__ import annotations

import numpy as np

from dist_ptq.quant.quantized import QuantizedLayer
from dist_ptq.quant.schemes import FORMATS, KVScheme, Scheme


def rebuild_layer(tensors: dict[str, np.ndarray], description: dict[str, str], aux: dict) -> QuantizedLayer:
    """``tensors``: layer-local names, float tensors decoded to float32, the rest as stored."""
    kv = aux.get("kv")
    ql = QuantizedLayer(tensors=dict(tensors), description=dict(description), model_dtype=set(),
                        kv=None if kv is None else KVScheme(kv))
    # every stored FLOAT tensor: equal to the source's except where AWQ folded a scale into it
    ql.float_overrides = {n: a for n, a in tensors.items() if description.get(n) == Scheme.FLOAT}
    for name, kind in description.items():
        linear, _, suffix = name.rpartition(".")
        if suffix != "weight" or kind == Scheme.FLOAT or kind not in Scheme.__members__:
            continue
        own = {n[len(linear) + 1:]: a for n, a in tensors.items() if n.rpartition(".")[0] == linear}
        ql.linears[linear] = FORMATS[Scheme(kind)].decode(own, aux["linears"].get(linear))
    return ql


def layer_aux(ql: QuantizedLayer) -> dict:
    """What rebuild_layer needs beyond the shard: per-tensor activation parameters and the KV kind."""
    aux = {m: FORMATS[lin.kind].linear_aux(lin) for m, lin in ql.linears.items()}
    return {"kv": ql.kv, "linears": {m: a for m, a in aux.items() if a is not None}}
