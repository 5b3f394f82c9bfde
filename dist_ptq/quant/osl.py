"""OSL (OutlierSuppressionLite, Golden Stick 1.2): SmoothQuant's migration strength searched, not fixed.

For one input group (the linears reading one activation) every candidate alpha of the grid, and
optionally no smoothing at all (s = 1), is scored by the relative error of the group's quantized
outputs on calibration tokens:

    err(s) = Σ_m ‖X W_mᵀ − Q_x(X / s) Q_w(W_m · diag(s))ᵀ‖² / Σ_m ‖X W_mᵀ‖²

with the activation quantizer the scheme deploys (per tensor with the calibrated range divided by s,
or per token at run time) and the weights rounded as the scheme stores them (RTN: bits, groups). The lowest error wins; ties go to
the earlier candidate (no smoothing first, then the grid in order), so the choice is deterministic.
Golden Stick scores on the decoder layer's output instead; the group's own outputs keep the search a
pure function of one group's tensors, and are what the smoothing of that group changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_ptq.quant import primitives as P
from dist_ptq.quant.smooth import smooth_scale


@dataclass(frozen=True)
class OSLChoice:
    scale: np.ndarray | None  # None: the group stays unsmoothed
    alpha: float | None  # None with scale None
    error: float  # relative output error of the winner
    unsmoothed_error: float  # the same without smoothing, for the report


def _quantized_input(x: np.ndarray, s: np.ndarray, lo: np.ndarray | None, hi: np.ndarray | None) -> np.ndarray:
    """X / s as the deployed activation quantizer returns it (dequantized)."""
    xs = x / s[None, :]
    if lo is None:  # per token, symmetric int8
        t = P.sym_scale(np.abs(xs).max(1), 8)[:, None]
        return P.quantize_sym(xs, t, 8).astype(np.float32) * t
    scale, offset = P.asym_params((lo / s).min(), (hi / s).max())
    return (P.quantize_asym(xs, scale, offset).astype(np.float32) - offset) * scale


def float_outputs(x: np.ndarray, weights: list[np.ndarray]) -> list[np.ndarray]:
    """X W_mᵀ of every linear of the group, float64: what each candidate is compared with."""
    x64 = x.astype(np.float64)
    return [x64 @ w.astype(np.float64).T for w in weights]


def group_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray, lo: np.ndarray | None,
                hi: np.ndarray | None, bits: int = 8, group_size: int = 0,
                ys: list[np.ndarray] | None = None) -> float:
    """err(s) of the module docstring: float64 sums over the group's outputs (``ys``: their float
    outputs, when the caller scores many candidates on the same sample)."""
    xq = _quantized_input(x, s, lo, hi).astype(np.float64)
    num = den = 0.0
    for w, y in zip(weights, ys or float_outputs(x, weights)):
        ws = w * s[None, :]
        scale = P.weight_scale(ws, bits, group_size)
        wq = P.dequantize_weight(P.quantize_weight(ws, scale, bits), scale)
        num += float(((y - xq @ wq.astype(np.float64).T) ** 2).sum())
        den += float((y**2).sum())
    return num / max(den, 1e-30)


def osl_search(x: np.ndarray, absmax: np.ndarray, weights: list[np.ndarray], alphas: list[float],
               allow_unsmoothed: bool, lo: np.ndarray | None = None, hi: np.ndarray | None = None,
               bits: int = 8, group_size: int = 0) -> OSLChoice:
    """The best smoothing of one input group.

    ``x``: (tokens, ic) calibration sample of the input; ``absmax``: its per-channel absmax over all
    calibration tokens (what SmoothQuant uses); ``lo``/``hi``: per-channel min / max for a static
    per-tensor activation quantizer, None for per-token quantization."""
    ones, ys = np.ones(x.shape[1], np.float32), float_outputs(x, weights)
    unsmoothed = group_error(x, weights, ones, lo, hi, bits, group_size, ys)
    best = OSLChoice(None, None, unsmoothed, unsmoothed) if allow_unsmoothed else None
    for alpha in alphas:
        s = smooth_scale(absmax, weights, alpha)
        err = group_error(x, weights, s, lo, hi, bits, group_size, ys)
        if best is None or err < best.error:
            best = OSLChoice(s, float(alpha), err, unsmoothed)
    return best
