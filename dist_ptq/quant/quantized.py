"""What quantizing a decoder layer produces: data only (the math is in ``layer.py``, the format in ``schemes.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from dist_ptq.quant import primitives as P

if TYPE_CHECKING:  # schemes.py builds these classes from stored tensors
    from dist_ptq.quant.schemes import KVScheme, Scheme


@dataclass
class Recovery:
    """What the searches and the GPTQ solve settled on for one linear (numbers for the layer report)."""

    awq_alpha: float | None = None  # None: no AWQ, or plain RTN (s = 1) scored best
    osl_alpha: float | None = None  # OSL's alpha; None with OSL errors set: the group stayed unsmoothed
    osl_error: float | None = None  # relative output error of the group with OSL's choice
    osl_unsmoothed_error: float | None = None  # the same without smoothing
    clip_ratio_mean: float | None = None  # mean chosen clip ratio, None when no clip search ran
    act_clip_ratio: float | None = None  # the static activation range's clip ratio (weight_clip with W8A8)
    gptq_damp: float | None = None  # damp_percent used, None without GPTQ
    gptq_damp_raises: int | None = None
    gptq_loss: float | None = None


@dataclass
class QuantLinear:
    """One quantized linear, in the float terms the fake-quant forward needs."""

    kind: Scheme
    q: np.ndarray  # (oc, ic) int8 values (int4 ones too, unpacked)
    scale: np.ndarray  # (oc,) per channel or (oc, ic/g) per group
    bias: np.ndarray | None = None
    input_scale: np.ndarray | None = None  # static activations: (ic,) as stored (model dtype), smoothing folded in
    x_scale: float | None = None  # static activations: the per-tensor scale
    x_offset: int | None = None
    smooth_scale: np.ndarray | None = None  # dynamic activations, AWQ weight-only: x is multiplied by it first
    recovery: Recovery = field(default_factory=Recovery)

    @property
    def w_dq(self) -> np.ndarray:
        """(oc, ic) dequantized weight, applied to the (smoothed) input; computed on demand so a
        data-free run never holds a float copy of every weight."""
        return P.dequantize_weight(self.q, self.scale)


@dataclass
class QuantizedLayer:
    tensors: dict[str, np.ndarray]  # layer-local names, on-disk values
    description: dict[str, str]  # layer-local name → its Scheme / KVScheme value
    model_dtype: set[str]  # float tensors stored in the model dtype (others keep their numpy dtype)
    int4: set[str] = field(default_factory=set)  # packed int4 tensors (tagged Int4)
    linears: dict[str, QuantLinear] = field(default_factory=dict)
    kv: KVScheme | None = None
    float_overrides: dict[str, np.ndarray] = field(default_factory=dict)  # FLOAT tensors AWQ changed, as stored
