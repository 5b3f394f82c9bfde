"""Clipping searched on calibration inputs: weights (AWQ-style) and static activation ranges (OmniQuant-style).

Weight clipping: per output channel (or per channel and group), the clip ratio r that minimizes the
linear's output error on calibration inputs, with scale = absmax·r / qmax (Lin et al., AWQ §3.3).

For each candidate r the loss of row o is ‖X W_oᵀ − X Q_r(W)_oᵀ‖² over the sample rows of X; per
group it is the group's own contribution ‖X_g (W_o,g − Q_r(W)_o,g)ᵀ‖², as llm-awq's ``auto_clip``
computes it. Products are MindSpore float32 matmuls (they run where the model runs); the per-row
losses come back as float64. Ties go to the earlier ratio in the grid (the default grid starts at 1.0: no clip).

Activation clipping (W8A8 static, with ``weight_clip``): one ratio r for the per-tensor range of an
input group, [r·lo, r·hi], the one whose quantized group output error (``osl.group_error``: the
activation quantized with that range, the weights as stored) is lowest on the calibration sample.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import ops

from dist_ptq.quant import primitives as P
from dist_ptq.quant.osl import float_outputs, group_error


def _row_loss(x: ms.Tensor, err: np.ndarray) -> np.ndarray:
    """Σ_n (x errᵀ)²: per output row, float64."""
    y = ops.matmul(x, ms.Tensor(np.ascontiguousarray(err.T)))
    return ops.sum(y * y, 0).asnumpy().astype(np.float64)


def clip_search(X: np.ndarray, W: np.ndarray, bits: int, group_size: int, ratios: list[float]) -> np.ndarray:
    """The best ratio per row, (oc,) float32 (per channel), or per row and group, (oc, ic/g)."""
    X, W = np.asarray(X, np.float32), np.asarray(W, np.float32)
    oc, ic = W.shape
    g = group_size
    losses = []
    for r in ratios:
        ws = P.weight_scale(W, bits, g, np.float32(r))
        err = W - P.dequantize_weight(P.quantize_weight(W, ws, bits), ws)
        if not g:
            losses.append(_row_loss(ms.Tensor(X), err))
        else:
            losses.append(np.stack([_row_loss(ms.Tensor(np.ascontiguousarray(X[:, j:j + g])), err[:, j:j + g])
                                    for j in range(0, ic, g)], axis=1))
    best = np.argmin(np.stack(losses), axis=0)
    return np.asarray(ratios, np.float32)[best]


def act_clip_search(X: np.ndarray, weights: list[np.ndarray], s: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                    ratios: list[float], bits: int = 8, group_size: int = 0) -> float:
    """The ratio r of the grid that scales a static activation range [lo, hi] (per channel, before
    smoothing by ``s``) to the lowest quantized output error of the group reading it."""
    ys = float_outputs(X, weights)
    errors = [group_error(X, weights, s, lo * np.float32(r), hi * np.float32(r), bits, group_size, ys) for r in ratios]
    return float(ratios[int(np.argmin(errors))])
