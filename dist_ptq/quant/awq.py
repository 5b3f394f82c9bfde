"""AWQ's per-input-channel scale search (Lin et al., 2024; llm-awq ``auto_scale``, AutoAWQ duo scaling).

For linears sharing an input X, with x_mean = mean|X| per channel and w_mean the mean over all their
rows of |W| normalized by each row-group's max (per channel: by each row's max):

    s = x_mean^α / (w_mean^(1−α) + 1e-4)   (duo_scaling)   or   s = x_mean^α
    s = clamp(s, 1e-4);  s /= sqrt(max s · min s);  s = clamp(s, 1e-4)

and for each α of the grid the loss Σ_linears ‖X Wᵀ − X (Q(W·diag s) / s)ᵀ‖², Q the RTN
quantize-dequantize of ``primitives``. The α with the least loss wins; the identity s = 1 (plain RTN)
is scored too and wins if it beats every grid point (with duo scaling α = 0 is not the identity), so on
the sample AWQ is never worse than RTN. Products X·Eᵀ are MindSpore float32 matmuls (they run where
the model runs); per-column sums of squares come back and are totalled in float64.
Applying s: the linears take W·diag(s), the producer of X divides by s (folded, or stored as a
``smooth_scale``); see ``quant/layer.py``.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import ops

from dist_ptq.quant import primitives as P

MIN_SCALE = 1e-4


def w_mean(weights: list[np.ndarray], group_size: int) -> np.ndarray:
    """Mean over all rows of |W| / max|W| of its row-group (row when per channel), (ic,) float64."""
    w = np.abs(np.concatenate(weights, axis=0).astype(np.float64))
    rows, ic = w.shape
    g = group_size or ic
    w = w.reshape(rows, ic // g, g)
    w = w / np.maximum(w.max(-1, keepdims=True), P.EPS)
    return w.reshape(rows, ic).mean(0)


def awq_scale(x_mean: np.ndarray, wm: np.ndarray, alpha: float, duo_scaling: bool) -> np.ndarray:
    s = np.power(x_mean, alpha)
    if duo_scaling:
        s = s / (np.power(wm, 1.0 - alpha) + MIN_SCALE)
    s = np.maximum(s, MIN_SCALE)
    s = s / np.sqrt(s.max() * s.min())
    return np.maximum(s, MIN_SCALE).astype(np.float32)


def scaled_error(W: np.ndarray, s: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """W − Q(W·diag s)/s: the weight error the layer sees once X is divided by s."""
    ws = W * s[None, :]
    scale = P.weight_scale(ws, bits, group_size)
    return W - P.dequantize_weight(P.quantize_weight(ws, scale, bits), scale) / s[None, :]


def output_loss(x: ms.Tensor, err: np.ndarray) -> float:
    y = ops.matmul(x, ms.Tensor(np.ascontiguousarray(err.T)))
    return float(ops.sum(y * y, 0).asnumpy().astype(np.float64).sum())


def awq_search(X: np.ndarray, weights: list[np.ndarray], bits: int, group_size: int, alphas: list[float],
               duo_scaling: bool) -> tuple[np.ndarray, float | None, np.ndarray]:
    """(s (ic,) float32, the best α or None when plain RTN won, the loss of every α)."""
    X = np.asarray(X, np.float32)
    x = ms.Tensor(X)
    x_mean = np.abs(X.astype(np.float64)).mean(0)
    wm = w_mean(weights, group_size)
    W = np.concatenate(weights, axis=0).astype(np.float32)

    def loss(s: np.ndarray) -> float:
        return output_loss(x, scaled_error(W, s, bits, group_size))

    scales = [awq_scale(x_mean, wm, a, duo_scaling) for a in alphas]
    errors = np.array([loss(s) for s in scales])
    best = int(np.argmin(errors))
    ones = np.ones(W.shape[1], np.float32)
    if loss(ones) < errors[best]:
        return ones, None, errors
    return scales[best], float(alphas[best]), errors
